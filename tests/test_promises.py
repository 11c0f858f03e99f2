"""README promises no other test checks: exit codes 3 and 1, --overwrite, the store lock, example_block auto,
bad targets and a run that mixes the exact and factored engines."""

import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline.config import parse_config
from pipeline.coordinator import run
from pipeline.store import ResultStore
from tests.conftest import tiny_raw, write_config
from tests.test_cli import call, snapshot

# One factored tensor (block2_conv1/kernel) of the digits CNN over 128 digits: 2 units, run in this process.
SMALL = dict(data={"num_examples": 128}, cluster={"executor": "local"}, validation={"samples": 2})
# mlp_tanh: dense1's tanh makes its suffix smooth (exact engine), the linear logits layer is factored.
MIXED = dict(
    model={"builder": "mlp_tanh"},
    target=None,
    targets=[{"layer": "dense1"}, {"layer": "logits"}],
    data={"num_examples": 128},
    loss={"from_logits": True},
    compute={"shard_size": 16, "example_block": "auto"},
    cluster={"executor": "local"},
    validation={"samples": 4},
)


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    """A complete, validated SMALL store; tests copy it before changing anything."""
    path = tmp_path_factory.mktemp("small") / "s.zarr"
    assert run(parse_config(tiny_raw(path, **SMALL)), live=False).passed
    return path


@pytest.fixture
def small_copy(small_store, tmp_path):
    """A copy of the SMALL store and the config that wrote it."""
    path = tmp_path / "s.zarr"
    shutil.copytree(small_store, path)
    return path, write_config(tmp_path / "c.yaml", tiny_raw(path, **SMALL))


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    """The MIXED run: its store, its result and the lines it logged."""
    path = tmp_path_factory.mktemp("mixed") / "s.zarr"
    lines = []
    result = run(parse_config(tiny_raw(path, **MIXED)), live=False, log=lines.append)
    return path, result, lines


def test_run_exits_3_when_its_validation_finds_wrong_values(small_copy, capsys):
    """Stored diagonals 1 % off with consistent checksums: `run` has nothing to compute, re-validates and fails."""
    path, config = small_copy
    store = ResultStore.open(str(path))
    plan = store.plan
    for shard in plan.shards:
        values = store.read_shard(plan, shard)
        values["hessian_diagonal"] = values["hessian_diagonal"] * 1.01
        store.record_done(shard, store.write_shard(plan, shard, values))
    assert call("run", config) == 3
    out = capsys.readouterr().out
    assert "units computed: 0, skipped (already done): 2" in out and "NO" in out and "FAILED" in out
    assert ResultStore.open(str(path), mode="r").attrs["validation"]["passed"] is False


def test_a_tensor_whose_samples_all_sit_at_a_kink_is_unresolved_not_failed(tmp_path, capsys):
    """A ReLU input exactly at its kink, before a tanh (a smooth suffix: plain differences): every step of the target's
    kernel straddles the kink, so its one entry cannot be resolved. The run says so and exits 0; the next layer's
    kernel, which does not move that input, is resolved and passes."""
    inp = keras.Input((1,))
    hidden = keras.layers.Dense(1, activation="relu", name="target")(inp)
    model = keras.Model(inp, keras.layers.Dense(1, activation="tanh", name="out")(hidden))
    model.get_layer("target").set_weights([np.array([[0.5]], "float32"), np.array([-0.5], "float32")])  # z = 0 exactly
    model.get_layer("out").set_weights([np.array([[3.0]], "float32"), np.array([0.1], "float32")])
    model.save(tmp_path / "kink.keras")
    np.savez(tmp_path / "d.npz", x=np.array([[1.0], [3.0]], "float32"), y=np.array([[0.5], [0.2]], "float32"))
    raw = tiny_raw(tmp_path / "s.zarr", model={"source": "keras_file", "path": str(tmp_path / "kink.keras"), "builder": None},
                   data={"source": "npz", "path": str(tmp_path / "d.npz"), "num_examples": None, "batch_size": 2},
                   loss={"name": "mse"}, compute={"example_block": 2}, cluster={"executor": "local"},
                   target=None, targets=[{"layer": "target"}, {"layer": "out"}], validation={"samples": 4})
    assert call("run", write_config(tmp_path / "c.yaml", raw)) == 0
    out = capsys.readouterr().out
    assert "unresolved" in out and "1 tensor(s) unresolved" in out and "target/kernel" in out
    validation = ResultStore.open(str(tmp_path / "s.zarr"), mode="r").attrs["validation"]
    assert validation["unresolved"] == ["target/kernel"] and validation["failed"] == [] and validation["passed"] is False
    assert validation["tensors"]["out/kernel"]["passed"] is True


class FailsWhenEvaluated(keras.layers.Layer):
    """The identity while Keras builds the model; raises a plain RuntimeError on real data (an unexpected error)."""

    def call(self, x):
        if tf.executing_eagerly():
            raise RuntimeError("this layer fails on real data")
        return x


@pytest.mark.parametrize("debug", [False, True], ids=["quiet", "HESSDIAG_DEBUG"])
def test_unexpected_error_exits_1_in_one_line_with_the_traceback_only_when_debugging(debug, tmp_path, capfd,
                                                                                    monkeypatch):
    """A failure that is not bad input: exit 1 and one `error:` line; HESSDIAG_DEBUG=1 adds the traceback."""
    inputs = keras.Input((64,))
    hidden = keras.layers.Dense(8, name="target")(FailsWhenEvaluated(name="fails")(inputs))
    keras.Model(inputs, keras.layers.Dense(10)(hidden)).save(tmp_path / "m.keras")
    model = {"source": "keras_file", "path": str(tmp_path / "m.keras"), "builder": None,
             "custom_objects": ["tests.test_promises:FailsWhenEvaluated"]}
    raw = tiny_raw(tmp_path / "s.zarr", model=model, target={"layer": "target"}, data={"num_examples": 8},
                   loss={"from_logits": True}, cluster={"executor": "local"})
    monkeypatch.setenv("HESSDIAG_DEBUG", "1" if debug else "0")
    assert call("run", write_config(tmp_path / "c.yaml", raw)) == 1
    lines = capfd.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error: RuntimeError: ")
    assert lines[-1].endswith("(--verbose or HESSDIAG_DEBUG=1 shows the traceback)")
    if debug:
        assert lines[0] == "Traceback (most recent call last):"
        assert any("this layer fails on real data" in line for line in lines)
    else:
        assert len(lines) == 1
    assert not (tmp_path / "s.zarr").exists()


def test_overwrite_replaces_a_store_written_for_another_config(small_copy, tmp_path):
    """With --overwrite the store holds only the new config's tensors, under its fingerprint."""
    path, _ = small_copy
    other = {**SMALL, "target": {"layer": "predictions", "weight": "bias"}, "data": {"num_examples": 64}}
    raw = tiny_raw(path, **other)
    assert call("run", write_config(tmp_path / "other.yaml", raw), "--overwrite") == 0
    store = ResultStore.open(str(path), mode="r")
    attrs = store.attrs
    assert attrs["config_fingerprint"] == parse_config(raw).fingerprint() and attrs["examples"] == 64
    assert attrs["targets"] == ["predictions/bias"] and attrs["complete"] is True
    assert attrs["validation"]["passed"] is True
    assert "block2_conv1" not in store.group["params"]


@pytest.mark.parametrize("extra", [(), ("--overwrite",)], ids=["resume", "overwrite"])
def test_a_second_coordinator_is_refused_and_the_store_untouched(small_copy, capsys, extra):
    """While a live coordinator holds the lock, neither a resume nor --overwrite touches the store."""
    path, config = small_copy
    holder = ResultStore.open(str(path))
    token = holder.acquire_lock()
    try:
        before = snapshot(path)
        assert call("run", config, *extra) == 2
        err = capsys.readouterr().err
        assert "is being written by another coordinator (pid" in err and "Traceback" not in err
        assert snapshot(path) == before
        assert holder.lock_info()["token"] == token
    finally:
        holder.release_lock(token)


@pytest.mark.parametrize("targets,message", [
    ([{"layer": "nomatch_*"}],
     "target pattern 'nomatch_*' with weight 'kernel' matches no target; targetable layers are: block1_conv1,"
     " block1_conv2"),
    ([{"layer": "block1_*", "weight": "gamma"}],
     "target pattern 'block1_*' with weight 'gamma' matches no target: the layers it matches offer ['bias', 'kernel']"),
    ([{"layer": "block1_conv1", "weight": "gamma"}],
     "layer 'block1_conv1' (Conv2D) has no target weight 'gamma'; its target weights are ['kernel', 'bias']"),
    ([{"layer": "fc1"}, {"layer": "flatten"}], "layer 'flatten' is a Flatten, which cannot be a target"),
], ids=["pattern_matches_nothing", "pattern_without_the_weight", "layer_without_the_weight", "layer_no_kind_covers"])
def test_bad_targets_exit_2_naming_what_exists_and_write_nothing(tmp_path, capsys, targets, message):
    """Each bad `targets` entry is one `error:` line naming what the model offers; no output is created."""
    out = tmp_path / "s.zarr"
    raw = tiny_raw(out, target=None, targets=targets, cluster={"executor": "local"})
    config = write_config(tmp_path / "c.yaml", raw)
    assert call("run", config) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_a_run_holds_exact_and_factored_tensors_and_validates(mixed_run):
    """engine auto picks per tensor: dense1 (tanh suffix) exact, logits factored; both recorded and validated."""
    path, result, _ = mixed_run
    assert result.engines == {"dense1/kernel": "exact", "logits/kernel": "factored"} and result.passed
    store = ResultStore.open(str(path), mode="r")
    dense1, logits = store.tensor_attrs("dense1/kernel"), store.tensor_attrs("logits/kernel")
    assert dense1["engine"] == "exact" and "tanh" in dense1["engine_reason"] and dense1["validation"]["passed"] is True
    assert logits["engine"] == "factored" and logits["validation"]["passed"] is True
    assert logits["validation"]["spot_check"]["passed"] is True
    assert store.attrs["validation"]["passed"] is True


def test_example_block_auto_is_recorded_and_reused_on_resume(mixed_run, tmp_path):
    """A resumed run takes the calibrated block from the store: it logs no timing and keeps the store's calibration."""
    path, result, lines = mixed_run
    recorded = ResultStore.open(str(path), mode="r").attrs
    assert any(line.startswith("example_block auto: timing") for line in lines)
    assert any(f"example_block {recorded['example_block']} for units" in line for line in lines)
    assert recorded["calibration"]["examples_timed"] == 1
    assert set(recorded["calibration"]["seconds_per_example"]) == {"shared", "dense1/kernel"}
    resumed = tmp_path / "s.zarr"
    shutil.copytree(path, resumed)
    store = ResultStore.open(str(resumed))
    plan = store.plan
    lost = plan.shards_of(0)[1]  # as a corrupt shard is: forgotten, so dense1's second channel group runs again
    store.forget(lost)
    chain = next(chain for chain in plan.chains() if lost in plan.chain_shards(chain))
    rerun_lines = []
    rerun = run(parse_config(tiny_raw(resumed, **MIXED)), live=False, log=rerun_lines.append)
    assert not any("example_block auto" in line or line.startswith("calibration:") for line in rerun_lines)
    assert rerun.computed == [unit.name for unit in plan.chains()[chain]] and chain.startswith("t0000-")
    assert sorted(rerun.skipped + rerun.computed) == sorted(result.computed)
    after = ResultStore.open(str(resumed), mode="r").attrs
    assert after["example_block"] == recorded["example_block"] and after["calibration"] == recorded["calibration"]
