"""A full `hessdiag run` through GroupNormalization and LayerNormalization, validated by finite differences."""

import subprocess
import sys

import keras
import pytest

from pipeline.cli import main
from pipeline.config import parse_config
from pipeline.coordinator import run
from pipeline.store import ResultStore
from tests.conftest import tiny_raw, write_config
from tests.stores import assert_same_results


def call(*args):
    with pytest.raises(SystemExit) as info:
        main(list(args))
    return info.value.code


def normalized_raw(root, **sections) -> dict:
    defaults = dict(
        model={"source": "keras_file", "path": str(root / "m.keras"), "builder": None},
        target={"layer": "target"},
        data={"source": "synthetic", "num_examples": 12, "batch_size": 6},
        loss={"from_logits": True},
        compute={"engine": "auto", "shard_size": 2},
        cluster={"executor": "local"},
        validation={"samples": 6, "rtol": 1e-4},
    )
    return tiny_raw(root / "s.zarr", **{**defaults, **sections})


@pytest.fixture(scope="module")
def normalized_run(tmp_path_factory):
    """A model the engines' case table does not contain: conv (tanh) -> GroupNorm -> LayerNorm -> conv -> logits."""
    root = tmp_path_factory.mktemp("norm")
    keras.utils.set_random_seed(11)
    inp = keras.Input((7, 7, 3))
    h = keras.layers.Conv2D(4, 3, activation="tanh", name="target")(inp)
    h = keras.layers.GroupNormalization(groups=2)(h)
    h = keras.layers.LayerNormalization(axis=(1, 2, 3))(h)
    h = keras.layers.Conv2D(3, 2, activation="softsign")(h)
    keras.Model(inp, keras.layers.Dense(5)(keras.layers.Flatten()(h))).save(root / "m.keras")
    config = write_config(root / "c.yaml", normalized_raw(root))
    return call("run", config), root / "s.zarr"


def test_run_through_normalization_layers_passes_validation(normalized_run):
    code, store = normalized_run
    assert code == 0
    opened = ResultStore.open(str(store), mode="r")
    attrs = opened.tensor_attrs("target/kernel")
    assert attrs["engine"] == "exact" and attrs["validation"]["passed"] is True and opened.attrs["validation"]["passed"]
    assert attrs["validation"]["nonsmooth_samples"] == 0 and attrs["validation"]["max_rel_error_hessian_diagonal"] < 1e-4
    rules = " ".join(attrs["second_order_rules"])
    assert "group_normalization" in rules and "layer_normalization" in rules and "softsign" in rules
    assert attrs["hvp_compiler"] == "xla" and attrs["not_xla_verified"] == []


def test_two_ray_actors_compile_by_xla_and_write_the_local_bits(normalized_run, ray_session, tmp_path):
    """The exact engine over several channel groups and example blocks on 2 Ray actors, against the local executor
    in a fresh process (as a user runs it; this test process has run other models' engines before)."""
    _, first = normalized_run

    def raw_for(name, cluster):
        raw = normalized_raw(first.parent, cluster=cluster, validation={"samples": 0})
        raw["output"] = str(tmp_path / f"{name}.zarr")
        raw["compute"]["example_block"] = 6
        return raw

    local = write_config(tmp_path / "local.yaml", raw_for("local", {"executor": "local"}))
    assert subprocess.run([sys.executable, "-m", "pipeline", "run", local], capture_output=True).returncode == 0
    run(parse_config(raw_for("ray", {"num_workers": 2})), live=False)
    records = ResultStore.open(str(tmp_path / "ray.zarr"), mode="r").unit_records()
    assert len({name.split("-b")[0] for name in records}) >= 2 and len({r["pid"] for r in records.values()}) == 2
    assert {r["hvp_compiler"] for r in records.values()} == {"xla"}  # what each worker ran, not only what was planned
    assert_same_results(tmp_path / "ray.zarr", tmp_path / "local.zarr")


def test_validation_fails_a_chunk_scaled_by_one_percent(normalized_run, capsys):
    _, store = normalized_run
    opened = ResultStore.open(str(store))
    plan = opened.plan
    for shard in plan.shards:  # every sampled entry scaled, with consistent checksums
        values = opened.read_shard(plan, shard)
        values["hessian_diagonal"] = values["hessian_diagonal"] * 1.01
        opened.record_done(shard, opened.write_shard(plan, shard, values))
    assert call("validate", str(store)) == 3
    assert "NO" in capsys.readouterr().out
    assert ResultStore.open(str(store), mode="r").attrs["validation"]["passed"] is False


def test_cli_refuses_a_layer_failing_the_audit_and_writes_nothing(tmp_path, capsys):
    from tests.curvature.test_audit import StopGradientNorm

    inp = keras.Input((6,))
    h = StopGradientNorm(name="sg_norm")(keras.layers.Dense(4, name="target")(inp))
    keras.Model(inp, keras.layers.Dense(3)(h)).save(tmp_path / "m.keras")
    raw = tiny_raw(
        tmp_path / "s.zarr",
        model={"source": "keras_file", "path": str(tmp_path / "m.keras"), "builder": None,
               "custom_objects": ["tests.curvature.test_audit:StopGradientNorm"]},
        target={"layer": "target"},
        data={"source": "synthetic", "num_examples": 4},
        loss={"from_logits": True},
        cluster={"executor": "local"},
    )
    assert call("run", write_config(tmp_path / "c.yaml", raw)) == 2
    err = capsys.readouterr().err
    assert "layer 'sg_norm' (StopGradientNorm)" in err and "Traceback" not in err
    assert not (tmp_path / "s.zarr").exists()
