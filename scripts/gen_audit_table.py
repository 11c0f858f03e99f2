"""Run the second-derivative audit; write pipeline/curvature/audit_table.json and the README's verified-layers table.

`.venv/bin/python scripts/gen_audit_table.py`
"""

import json
import os
from pathlib import Path

from pipeline.curvature.audit import TABLE_PATH, render_markdown, run_audit

README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- audit-table:start -->\n", "<!-- audit-table:end -->\n"


def replace_block(text: str, block: str) -> str:
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return head + START + block + END + tail


if __name__ == "__main__":
    table = run_audit(workers=os.cpu_count() or 1)
    TABLE_PATH.write_text(json.dumps(table, indent=1) + "\n")
    README.write_text(replace_block(README.read_text(), render_markdown(table)))
    print(f"wrote {TABLE_PATH} and the audit table in {README}")
