"""The command line: bad input exits 2 with a clear message and writes nothing."""

import hashlib
import json
import os
import re

import pytest
import yaml

from pipeline.cli import main
from tests.conftest import FINISHED, tiny_raw, write_config


def call(*args):
    with pytest.raises(SystemExit) as info:
        main(list(args))
    return info.value.code


def snapshot(root):
    files = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            files[path] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return files


def _bad(tmp_path, capsys, raw_or_text, *extra):
    config = tmp_path / "c.yaml"
    if isinstance(raw_or_text, str):
        config.write_text(raw_or_text)
    else:
        write_config(config, raw_or_text)
    code = call("run", str(config), *extra)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def test_malformed_yaml(tmp_path, capsys):
    code, err = _bad(tmp_path, capsys, "output: [x\ntarget: {layer: a}\n")
    assert code == 2 and "is not valid YAML" in err


def test_unknown_key(tmp_path, capsys):
    raw = tiny_raw(tmp_path / "s.zarr")
    raw["data"]["batchsize"] = 3
    code, err = _bad(tmp_path, capsys, raw)
    assert code == 2 and "data.batchsize: unknown key; did you mean 'batch_size'?" in err
    assert not (tmp_path / "s.zarr").exists()


def test_wrong_type(tmp_path, capsys):
    raw = tiny_raw(tmp_path / "s.zarr", compute={"shard_size": "wide"})
    code, err = _bad(tmp_path, capsys, raw)
    assert code == 2 and "compute.shard_size" in err and "'wide'" in err
    assert not (tmp_path / "s.zarr").exists()


def test_bad_override(tmp_path, capsys):
    code, err = _bad(tmp_path, capsys, tiny_raw(tmp_path / "s.zarr"), "--set", "compute.shard_size=-1")
    assert code == 2 and "compute.shard_size" in err


def test_missing_layer_lists_layers(tmp_path, capsys):
    code, err = _bad(tmp_path, capsys, tiny_raw(tmp_path / "s.zarr", target={"layer": "block4_conv3"}))
    assert code == 2 and "layer 'block4_conv3' not found" in err and "layers are: block1_conv1" in err and "block2_conv1" in err
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "run"])
def test_plan_over_the_memory_budget_is_refused(tmp_path, capsys, dry_run):
    raw = tiny_raw(tmp_path / "s.zarr", compute={"engine": "factored", "memory_gb": 1e-4, "column_chunk": 16})
    code, err = _bad(tmp_path, capsys, raw, *(["--dry-run"] if dry_run else []))
    assert code == 2 and "GiB for one example" in err and "more than compute.memory_gb 0.0001;" in err
    assert re.search(r"compute.column_chunk \d+ would fit", err)
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "run"])
def test_exact_products_over_the_memory_budget_are_refused(tmp_path, capsys, dry_run):
    raw = tiny_raw(tmp_path / "s.zarr", compute={"engine": "exact", "memory_gb": 1e-3})
    code, err = _bad(tmp_path, capsys, raw, *(["--dry-run"] if dry_run else []))
    assert code == 2 and "for one Hessian-vector product over a batch of 64 examples of 'block2_conv1/kernel'" in err
    assert "more than compute.memory_gb 0.001; data.batch_size 9 would fit" in err
    assert not (tmp_path / "s.zarr").exists()


def test_missing_data_file(tmp_path, capsys):
    raw = tiny_raw(tmp_path / "s.zarr", data={"source": "npz", "path": str(tmp_path / "nope.npz")})
    code, err = _bad(tmp_path, capsys, raw)
    assert code == 2 and "nope.npz' does not exist" in err
    assert not (tmp_path / "s.zarr").exists()


def test_output_not_writable(tmp_path, capsys):
    (tmp_path / "plain_file").write_text("")
    code, err = _bad(tmp_path, capsys, tiny_raw(tmp_path / "plain_file" / "s.zarr"))
    assert code == 2 and "is not writable" in err


def test_store_from_another_config_is_refused_untouched(finished_store, tmp_path, capsys):
    before = snapshot(finished_store)
    raw = tiny_raw(finished_store, **{**FINISHED, "data": {"num_examples": 200}})
    code, err = _bad(tmp_path, capsys, raw)
    assert code == 2 and "was written for a different config" in err and "data.num_examples" in err and "--overwrite" in err
    assert snapshot(finished_store) == before


def test_status_json_of_finished_store(finished_store, capsys):
    assert call("status", str(finished_store), "--json") == 0
    status = json.loads(capsys.readouterr().out)
    assert status["complete"] is True and status["shards_done"] == status["shards_total"] == 18
    assert status["missing"] == [] and {t["engine"] for t in status["tensors"]} == {"factored"}
    assert status["validation"]["passed"] is True and len(status["tensors"]) == 12


def test_validate_existing_store(finished_store, capsys):
    assert call("validate", str(finished_store), "--samples", "3") == 0
    assert "yes" in capsys.readouterr().out


def test_dry_run_prints_plan_and_writes_nothing(tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", tiny_raw(tmp_path / "s.zarr"))
    assert call("run", config, "--dry-run") == 0
    out = capsys.readouterr().out
    assert "shards of 4 channels" in out and "18,432 entries" in out
    assert "1 tensor(s), 18,432 entries; 4 units of at most 64 examples (256 examples, batches of 64)" in out
    assert "block2_conv1/kernel" in out and "factored" in out and "shared pass" in out
    assert re.search(r"shared pass \(1 tensors, rules\): [\d.]+ s predicted, [\d.]+ s of tracing per worker", out)
    rows = [line for line in out.splitlines() if line.startswith("│")]
    predicted = {int(r.split("│")[1]): float(r.split("│")[2].replace(",", "")) for r in rows if r.split("│")[1].strip().isdigit()}
    assert sorted(predicted) == [1, 2, 4, 8, 16, 64]
    assert predicted[1] >= predicted[2] >= predicted[4] == predicted[64] > 0  # 4 units: no gain past 4 workers
    assert not (tmp_path / "s.zarr").exists()


def test_store_of_the_older_layout_is_refused(finished_store, tmp_path, capsys):
    import shutil

    import zarr

    old = tmp_path / "old.zarr"
    shutil.copytree(finished_store, old)
    group = zarr.open_group(str(old), mode="r+")
    attributes = dict(group.attrs)
    attributes["layout_version"] = 2
    group.attrs.put(attributes)
    config = write_config(tmp_path / "c.yaml", tiny_raw(old, **FINISHED))
    assert call("run", config) == 2
    assert "layout version 2" in capsys.readouterr().err
    assert call("status", str(old)) == 2
    assert "layout version 2" in capsys.readouterr().err


def test_example_configs_are_valid():
    from pipeline.config import load_config

    names = [os.path.join("configs", n) for n in os.listdir("configs") if n.endswith(".yaml")]
    names.append(os.path.join("configs", "cluster", "vgg16_conv4_3_s3.yaml"))
    for name in sorted(names):
        load_config(name)
    assert yaml.safe_load(open("configs/default.yaml"))["targets"] == "all"


@pytest.mark.parametrize("command", ["status", "validate", "report"])
def test_a_path_that_is_no_store_exits_2_and_is_left_alone(tmp_path, capsys, command):
    config = tmp_path / "c.yaml"  # a config given where the store goes
    write_config(config, tiny_raw(tmp_path / "s.zarr"))
    before = snapshot(tmp_path)
    for path, message in [(config, "it is a file"), (tmp_path / "nothing.zarr", "no hessdiag store at")]:
        code = call(command, str(path))
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, err
    assert snapshot(tmp_path) == before
