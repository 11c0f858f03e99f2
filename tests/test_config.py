import pytest

from pipeline.config import apply_overrides, load_config, parse_config
from pipeline.errors import BadInputError
from tests.conftest import tiny_raw, write_config


def test_valid_config_gets_defaults(tmp_path):
    config = parse_config(tiny_raw(tmp_path / "s.zarr"))
    assert config.target.weight == "kernel"
    assert config.compute.chunk_size == 128 and config.validation.atol == 1e-4 and config.cluster.gpus_per_worker == "auto"


def test_unknown_key_suggests_close_match(tmp_path):
    raw = tiny_raw(tmp_path / "s.zarr")
    raw["compute"]["shard_sise"] = 4
    with pytest.raises(BadInputError, match=r"compute.shard_sise: unknown key; did you mean 'shard_size'\?"):
        parse_config(raw)


def test_unknown_top_level_key(tmp_path):
    raw = tiny_raw(tmp_path / "s.zarr")
    raw["valdation"] = {}
    with pytest.raises(BadInputError, match=r"valdation: unknown key; did you mean 'validation'\?"):
        parse_config(raw)


def test_wrong_type_names_path_and_value(tmp_path):
    raw = tiny_raw(tmp_path / "s.zarr")
    raw["data"]["batch_size"] = "big"
    with pytest.raises(BadInputError, match=r"data.batch_size: .*got 'big'"):
        parse_config(raw)


def test_engine_choices_are_listed(tmp_path):
    raw = tiny_raw(tmp_path / "s.zarr")
    raw["compute"]["engine"] = "fast"
    with pytest.raises(BadInputError, match=r"compute.engine: Input should be 'auto', 'exact', 'factored', 'hutchinson' or 'monte_carlo'"):
        parse_config(raw)


def test_keras_file_needs_path(tmp_path):
    raw = tiny_raw(tmp_path / "s.zarr")
    raw["model"] = {"source": "keras_file"}
    with pytest.raises(BadInputError, match="model.path is required"):
        parse_config(raw)


def test_malformed_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("output: [unclosed\n")
    with pytest.raises(BadInputError, match="is not valid YAML"):
        load_config(path)


def test_dotted_overrides_parse_yaml_values(tmp_path):
    path = write_config(tmp_path / "c.yaml", tiny_raw(tmp_path / "s.zarr"))
    config = load_config(path, ["compute.shard_size=4", "loss.from_logits=true", "cluster.num_workers=auto"])
    assert config.compute.shard_size == 4 and config.loss.from_logits is True and config.cluster.num_workers == "auto"
    with pytest.raises(BadInputError, match="expected dotted.key=value"):
        apply_overrides({}, ["compute.shard_size"])


def test_fingerprint_ignores_where_and_how_but_not_what(tmp_path):
    base = parse_config(tiny_raw(tmp_path / "a.zarr"))
    moved = parse_config(tiny_raw(tmp_path / "b.zarr", cluster={"num_workers": 1}, validation={"samples": 3}))
    changed = parse_config(tiny_raw(tmp_path / "a.zarr", data={"num_examples": 95}))
    assert base.fingerprint() == moved.fingerprint()
    assert base.fingerprint() != changed.fingerprint()


def test_a_setting_added_later_leaves_older_stores_fingerprints_at_its_default(tmp_path):
    """The tiny config's fingerprint as the version before ``compute.precision`` wrote it: such stores still resume."""
    base = parse_config(tiny_raw(tmp_path / "a.zarr"))
    assert base.fingerprint() == "a9d7de89829153ec36f41226ed76a4de619f9e1877bd8398f6034a836190bcde"
    assert parse_config(tiny_raw(tmp_path / "a.zarr", compute={"precision": "float64"})).fingerprint() != base.fingerprint()
