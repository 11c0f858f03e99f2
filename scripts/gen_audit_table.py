"""Write the README's generated tables: the layer support table (from pipeline/curvature/layer_facts.py) and, unless
``--support-only``, the second-derivative audit (run anew into pipeline/curvature/audit_table.json).

`.venv/bin/python scripts/gen_audit_table.py [--support-only]`
"""

import json
import os
import sys
from pathlib import Path

from pipeline.curvature.audit import TABLE_PATH, render_markdown, run_audit
from pipeline.curvature.layer_facts import support_markdown

README = Path(__file__).resolve().parent.parent / "README.md"


def replace_block(text: str, name: str, block: str) -> str:
    start, end = f"<!-- {name}:start -->\n", f"<!-- {name}:end -->\n"
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return head + start + block + end + tail


if __name__ == "__main__":
    text = replace_block(README.read_text(), "support-table", support_markdown())
    if "--support-only" not in sys.argv:
        table = run_audit(workers=os.cpu_count() or 1)
        TABLE_PATH.write_text(json.dumps(table, indent=1) + "\n")
        text = replace_block(text, "audit-table", render_markdown(table))
    README.write_text(text)
    print(f"wrote the generated tables in {README}")
