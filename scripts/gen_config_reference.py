"""Write docs/CONFIG.md from the config model: `.venv/bin/python scripts/gen_config_reference.py`."""

from pathlib import Path

from pipeline.config_reference import config_reference

if __name__ == "__main__":
    target = Path(__file__).resolve().parent.parent / "docs" / "CONFIG.md"
    target.write_text(config_reference())
    print(f"wrote {target}")
