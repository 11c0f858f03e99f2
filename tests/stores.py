"""Comparing stores: one helper for "these two stores hold bit-identical results"."""

from __future__ import annotations

import numpy as np

from pipeline.store import ResultStore


def results(path, storage_options: dict | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Every tensor's result arrays of the store at ``path``."""
    store = ResultStore.open(str(path), storage_options, mode="r")
    return {name: store.tensor_arrays(name) for name in store.attrs["targets"]}


def assert_same_results(mine, theirs, mine_options: dict | None = None, theirs_options: dict | None = None) -> None:
    """The two stores hold the same tensors with bit-identical arrays."""
    a, b = results(mine, mine_options), results(theirs, theirs_options)
    assert list(a) == list(b)
    for name in a:
        assert sorted(a[name]) == sorted(b[name]), name
        for array in a[name]:
            np.testing.assert_array_equal(a[name][array], b[name][array], err_msg=f"{name}/{array}")
