"""Reading finished results back: a mapping of tensors to their named arrays and attributes, or an xarray DataTree."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from pipeline.store import ResultStore, is_remote, local_path


@dataclass(frozen=True)
class TensorResult:
    """One tensor's arrays (``gradient``, ``hessian_diagonal``, ``saliency``, ``channel_trace``, ...), their
    dimension names, and its attributes (engine, trace, validation, ...)."""

    name: str
    arrays: dict[str, np.ndarray]
    dims: tuple[str, ...]
    attrs: dict[str, Any]

    def __getattr__(self, key: str) -> np.ndarray:
        try:
            return self.arrays[key]
        except KeyError:
            raise AttributeError(key) from None


class Result(Mapping):
    """``"layer/weight"`` -> ``TensorResult``, in the store's target order; ``attrs`` are the store's."""

    def __init__(self, tensors: dict[str, TensorResult], attrs: dict[str, Any]):
        self._tensors = tensors
        self.attrs = attrs

    def __getitem__(self, name: str) -> TensorResult:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def validation_outcome(check: dict) -> str:
    """A tensor's validation outcome: ``passed``, ``unresolved`` (most samples at kinks: not checked) or ``FAILED``."""
    return "passed" if check.get("passed") else ("unresolved" if check.get("unresolved") else "FAILED")


def load_result(path: str, storage_options: dict | None = None) -> Result:
    """``load_result("results/default.zarr")["block2_conv1/kernel"].hessian_diagonal`` -> NumPy array shaped like W."""
    return read_result(ResultStore.open(path, storage_options, mode="r"))


def read_result(store: ResultStore) -> Result:
    """The ``Result`` of an open store."""
    tensors = {}
    for name in store.attrs["targets"]:
        group = store.tensor_group(name)
        tensors[name] = TensorResult(name, store.tensor_arrays(name), tuple(group["hessian_diagonal"].metadata.dimension_names),
                                     dict(group.attrs))
    return Result(tensors, store.attrs)


def open_datatree(path: str, storage_options: dict | None = None):
    """The store as a lazily loaded ``xarray.DataTree`` with named dimensions (needs xarray)."""
    import xarray as xr

    options = {"storage_options": storage_options} if storage_options and is_remote(path) else {}
    return xr.open_datatree(local_path(path), engine="zarr", consolidated=False, **options)
