from pathlib import Path

from pipeline.config import Config
from pipeline.config_reference import config_reference


def test_docs_config_reference_matches_the_config_model():
    written = (Path(__file__).resolve().parent.parent / "docs" / "CONFIG.md").read_text()
    assert written == config_reference(), "docs/CONFIG.md is stale: run scripts/gen_config_reference.py"


def test_reference_lists_every_key():
    text = config_reference()
    for name, field in Config.model_fields.items():
        section = field.annotation
        keys = [f"{name}.{k}" for k in section.model_fields] if hasattr(section, "model_fields") else [name]
        for key in keys:
            assert f"| `{key}` |" in text, key
