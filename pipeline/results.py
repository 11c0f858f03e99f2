"""Reading finished results back: NumPy arrays with metadata, or an xarray Dataset."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from pipeline.store import ResultStore, _local_path, is_remote


class Result(NamedTuple):
    """A store's arrays (shaped like W) and its attributes (engine, fingerprints, validation, ...)."""

    gradient: np.ndarray
    hessian_diagonal: np.ndarray
    attrs: dict[str, Any]
    dims: tuple[str, ...]


def load_result(path: str, storage_options: dict | None = None) -> Result:
    """``load_result("results/default.zarr").hessian_diagonal`` -> NumPy array shaped like W."""
    store = ResultStore.open(path, storage_options, mode="r")
    gradient, diagonal = store.arrays()
    dims = tuple(store.group["hessian_diagonal"].metadata.dimension_names)
    return Result(gradient, diagonal, store.attrs, dims)


def open_dataset(path: str, storage_options: dict | None = None):
    """The store as a lazily loaded ``xarray.Dataset`` with named dimensions (needs xarray)."""
    import xarray as xr

    options = {"storage_options": storage_options} if storage_options and is_remote(path) else {}
    return xr.open_zarr(_local_path(path), consolidated=False, **options)
