"""Loading inputs: saved .keras models (with custom objects) and .npz data give the same run as built-ins."""

import keras
import numpy as np
import pytest

from pipeline.coordinator import run
from pipeline.errors import BadInputError
from pipeline.job import Job
from pipeline.model import build_model
from tests.stores import assert_same_results
from tests.conftest import FINISHED, tiny_config


class Scale(keras.layers.Layer):
    """A custom layer (x * 1): loading it needs its custom object."""

    def call(self, inputs):
        return inputs * 1.0


def test_keras_file_and_npz_reproduce_the_builtin_run_bit_for_bit(finished_store, tmp_path):
    model = build_model("digits_vgg", seed=0)
    model.save(tmp_path / "m.keras")
    reference = Job.load(tiny_config(tmp_path / "unused.zarr"))
    np.savez(tmp_path / "d.npz", *(), **dict(zip("xy", reference.read(0, reference.examples))))
    config = tiny_config(
        tmp_path / "s.zarr",
        **{**FINISHED, "validation": {"samples": 0}},
        model={"source": "keras_file", "path": str(tmp_path / "m.keras"), "builder": None},
        data={"source": "npz", "path": str(tmp_path / "d.npz"), "num_examples": None},
    )
    run(config, live=False)
    assert_same_results(tmp_path / "s.zarr", finished_store)


def test_custom_objects_are_imported_by_name(tmp_path):
    inp = keras.Input((64,))
    out = keras.layers.Dense(10, name="logits")(Scale()(keras.layers.Dense(8, name="hidden")(inp)))
    keras.Model(inp, out).save(tmp_path / "c.keras")
    model = {"source": "keras_file", "path": str(tmp_path / "c.keras")}
    options = dict(target={"layer": "hidden"}, loss={"from_logits": True}, data={"source": "synthetic", "num_examples": 4})
    with pytest.raises(BadInputError, match="cannot load model file"):
        Job.load(tiny_config(tmp_path / "s.zarr", model=model, **options))
    job = Job.load(tiny_config(tmp_path / "s.zarr", model={**model, "custom_objects": ["tests.test_job:Scale"]}, **options))
    # a layer type missing from the piecewise-linear table makes auto choose the exact engine, naming it
    choice = job.curvature.choices["hidden/kernel"]
    assert choice.name == "exact" and "(Scale)" in choice.reason
    with pytest.raises(BadInputError, match="custom object 'tests.test_job:Missing' cannot be imported"):
        Job.load(tiny_config(tmp_path / "s.zarr", model={**model, "custom_objects": ["tests.test_job:Missing"]}, **options))


def test_a_builder_gives_the_same_fingerprint_when_built_twice_in_one_process():
    from pipeline.model import model_fingerprint

    # keras.applications.VGG16 has auto-named layers: a second build must not get new names
    assert model_fingerprint(build_model("vgg16", seed=0)) == model_fingerprint(build_model("vgg16", seed=0))
