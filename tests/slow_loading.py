"""A Keras layer that is slow to load, so that a test can signal a run while it loads its model."""

import os
import time
from pathlib import Path

import keras

MARK = "HESSDIAG_TEST_LOADING_MARK"


class SlowToLoad(keras.layers.Layer):
    """The identity. Loading it from a ``.keras`` file creates the file named by $HESSDIAG_TEST_LOADING_MARK,
    when set, and then takes 5 s."""

    def call(self, x):
        return x

    @classmethod
    def from_config(cls, config):
        mark = os.environ.get(MARK)
        if mark:
            Path(mark).touch()
            time.sleep(5)
        return super().from_config(config)


def save_model(path) -> str:
    """A small digits model with a ``SlowToLoad`` layer, saved to ``path``; returns the path."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((64,), name="features")
    h = SlowToLoad(name="slow")(inp)
    h = keras.layers.Dense(16, activation="tanh", name="dense1")(h)
    keras.Model(inp, keras.layers.Dense(10, name="logits")(h), name="slow_to_load").save(path)
    return str(path)
