"""The Zarr v3 store: one group of result arrays per tensor, the per-shard manifest, unit sums, and the run lock.

Layout (readable by ``zarr.open_group`` and ``xarray.open_datatree(STORE, engine="zarr")``):

    params/<layer path>/<weight>/   one group per tensor: ``gradient``, ``hessian_diagonal``, ``saliency``
                                    (float64, shaped like the weight, one chunk per shard along its shard
                                    axis, named dimensions), and once complete ``channel_trace`` and
                                    ``channel_saliency``; attributes: engine, summary statistics, validation
    manifest/tTTTT-sSSSSS           one group per finished shard of tensor T; attrs hold its checksum
    partials/<unit>                 float64 sums of one work unit, one array per tensor and quantity
    running/<chain>-kKKKKK          float64 sums of a fold chain's blocks 0..K-1, folded in block order
    units/<unit>                    timing of each finished unit (kept after its partial is folded)
    lock                            a group whose attrs name the coordinator running now

Sums count only once their checksum attribute is written and still matches, and an older running
sum is deleted only after its successor is complete, so a crash at any point loses at most the
units in flight. A shard is done only when its manifest entry exists and the stored chunks'
checksum still matches it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import socket
import time
import uuid
from typing import Any, Iterable, Iterator

import numpy as np
import zarr

from pipeline.errors import BadInputError
from pipeline.plan import Plan, Shard, TensorPlan, Unit, plan_units

RESULT_ARRAYS = ("gradient", "hessian_diagonal", "saliency")
SUMMED = ("gradient", "hessian_diagonal")
LOCK_STALE_SECONDS = 90.0
LAYOUT_VERSION = 3  # 1: one shard = channels x all data; 2: one tensor's arrays at the root


SUM_CHUNK_BYTES = 32 << 20  # partial and running sums are stored (and read back) in chunks of about this size


def checksum_of(arrays: Iterable[np.ndarray]) -> str:
    """sha256 of float64 values in C order, array after array."""
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(np.ascontiguousarray(array, dtype=np.float64).data)
    return digest.hexdigest()


def sum_rows(shape: tuple[int, ...]) -> int:
    """Rows (along the first axis) of a float64 sum array of ``shape`` per stored chunk: about SUM_CHUNK_BYTES."""
    if not shape:
        return 1
    return max(1, min(shape[0], SUM_CHUNK_BYTES // (8 * max(1, int(np.prod(shape[1:]))))))


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def check_writable(url: str, storage_options: dict) -> None:
    """Raise BadInputError when ``url`` cannot be written, without writing anything locally."""
    if is_remote(url):
        import fsspec

        fs, path = fsspec.core.url_to_fs(url, **storage_options)
        probe = f"{path.rstrip('/')}/.hessdiag-write-probe-{uuid.uuid4().hex}"
        try:
            fs.pipe(probe, b"")
            fs.rm(probe)
        except Exception as exc:  # noqa: BLE001 - any failure means "not writable"
            raise BadInputError(f"output {url!r} is not writable: {exc}") from None
        return
    path = os.path.abspath(local_path(url))
    ancestor = path
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor) or not os.access(ancestor, os.W_OK | os.X_OK):
        raise BadInputError(f"output {url!r} is not writable: {ancestor!r} is not a writable directory")


def tensor_key(index: int) -> str:
    return f"t{index:04d}"


def _chunks(tensor: TensorPlan, shard_size: int) -> tuple[int, ...]:
    chunks = list(tensor.shape)
    chunks[tensor.shard_axis] = min(shard_size, tensor.channels)
    return tuple(chunks)


class ResultStore:
    """An open hessdiag Zarr store."""

    def __init__(self, group: zarr.Group, url: str):
        self.group = group
        self.url = url

    # opening -----------------------------------------------------------------
    @staticmethod
    def _open(url: str, storage_options: dict, mode: str, attributes: dict | None = None) -> zarr.Group:
        options = {"storage_options": storage_options} if is_remote(url) else {}
        return zarr.open_group(local_path(url), mode=mode, zarr_format=3, attributes=attributes, **options)

    @classmethod
    def exists(cls, url: str, storage_options: dict | None = None) -> bool:
        try:
            cls._open(url, storage_options or {}, "r")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError):
            return False
        return True

    @classmethod
    def open(cls, url: str, storage_options: dict | None = None, mode: str = "r+") -> "ResultStore":
        if not is_remote(url) and os.path.isfile(local_path(url)):
            raise BadInputError(f"no hessdiag store at {url!r}: it is a file (a store is a directory or a URL)")
        try:
            group = cls._open(url, storage_options or {}, mode)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
            raise BadInputError(f"no hessdiag store at {url!r}") from exc
        if "config_fingerprint" not in group.attrs:
            raise BadInputError(f"{url!r} is a Zarr group but not a hessdiag store")
        version = group.attrs.get("layout_version", 1)
        if version != LAYOUT_VERSION:
            raise BadInputError(
                f"{url!r} is a hessdiag store of layout version {version}; this hessdiag reads version {LAYOUT_VERSION}"
                " (one group per tensor under params/). Write to a new output, or rerun with --overwrite"
            )
        return cls(group, url)

    @property
    def initialized(self) -> bool:
        """False when a crash interrupted ``create`` before every tensor's arrays existed."""
        return bool(self.group.attrs.get("initialized"))

    @classmethod
    def create(cls, url: str, storage_options: dict, plan: Plan, attrs: dict[str, Any],
               tensor_attrs: dict[str, dict] | None = None) -> "ResultStore":
        """A new, empty store (replacing whatever is at ``url``); the tensors' arrays are created empty."""
        group = cls._open(url, storage_options, "w", attributes={
            "complete": False, "layout_version": LAYOUT_VERSION, "targets": [t.name for t in plan.tensors],
            "tensors": [dataclasses.asdict(t) for t in plan.tensors], "shard_size": plan.shard_size,
            "examples": plan.examples, "example_block": plan.example_block, "units": len(plan.units), **attrs})
        for tensor in plan.tensors:
            params = group.require_group(f"params/{tensor.name}")
            params.attrs.update((tensor_attrs or {}).get(tensor.name, {}))
            for name in RESULT_ARRAYS:
                units = {"gradient": "loss / weight", "hessian_diagonal": "loss / weight^2", "saliency": "loss"}[name]
                params.create_array(name, shape=tensor.shape, chunks=_chunks(tensor, plan.shard_size), dtype="float64",
                                    fill_value=np.nan, dimension_names=tensor.dims,
                                    attributes={"long_name": name.replace("_", " "), "units": units})
        group.require_group("manifest")
        group.attrs["initialized"] = True
        return cls(group, url)

    # attributes --------------------------------------------------------------
    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs)

    def update_attrs(self, **values: Any) -> None:
        self.group.attrs.update(values)

    def tensor_group(self, name: str) -> zarr.Group:
        return self.group[f"params/{name}"]

    def tensor_attrs(self, name: str) -> dict[str, Any]:
        return dict(self.tensor_group(name).attrs)

    def update_tensor_attrs(self, name: str, **values: Any) -> None:
        self.tensor_group(name).attrs.update(values)

    @property
    def plan(self) -> Plan:
        """The tensors and units this store was created for, from its own attributes."""
        attrs = self.group.attrs
        tensors = tuple(TensorPlan(**{**t, "shape": tuple(t["shape"]), "dims": tuple(t["dims"])}) for t in attrs["tensors"])
        return plan_units(tensors, int(attrs["shard_size"]), int(attrs["examples"]), int(attrs["example_block"]))

    # sums of work units --------------------------------------------------------
    def write_sums(self, kind: str, name: str, arrays: Iterable[tuple[str, np.ndarray]], **info: Any) -> str:
        """Write named float64 arrays one after another (each read back), then record their checksum, which marks
        them complete. ``arrays`` may be a generator, so a fold holds one array at a time."""
        digest = hashlib.sha256()
        group = self.group.require_group(kind).create_group(name, overwrite=True)
        names = []
        for array_name, values in arrays:
            values = np.ascontiguousarray(values, dtype=np.float64)
            rows = sum_rows(values.shape)
            array = group.create_array(array_name, shape=values.shape, chunks=(rows, *values.shape[1:]) if values.ndim else (),
                                       dtype="float64")
            array[...] = values
            for start in range(0, max(1, len(values) if values.ndim else 1), rows):
                part = (slice(start, start + rows),) if values.ndim else ()
                if not np.array_equal(np.asarray(array[part]), values[part], equal_nan=True):
                    raise OSError(f"{kind}/{name}/{array_name}: chunks read back differ from what was written")
            digest.update(values.data)
            names.append(array_name)
        group.attrs.update({"checksum": digest.hexdigest(), "arrays": names, **info})
        return digest.hexdigest()

    def read_sum(self, kind: str, name: str, array: str) -> np.ndarray:
        return np.asarray(self.group[kind][name][array][...])

    def sum_names(self, kind: str, name: str) -> list[str]:
        return list(self.group[kind][name].attrs.get("arrays", []))

    def iter_sums(self, kind: str, name: str) -> Iterator[tuple[str, np.ndarray]]:
        for array in self.sum_names(kind, name):
            yield array, self.read_sum(kind, name, array)

    def sums_valid(self, kind: str, name: str) -> bool:
        """True when the sums exist, are complete and still match their checksum (read one array at a time)."""
        try:
            checksum = self.group[kind][name].attrs.get("checksum")
            if checksum is None:
                return False
            found = checksum_of(values for _, values in self.iter_sums(kind, name))
        except Exception:  # noqa: BLE001 - missing, partly written or undecodable: not valid
            return False
        return found == checksum

    def sums_list(self, kind: str) -> list[str]:
        return sorted(self.group[kind].group_keys()) if kind in self.group else []

    def delete_sums(self, kind: str, name: str) -> None:
        if kind in self.group and name in self.group[kind]:
            del self.group[kind][name]

    def record_unit(self, unit: Unit, **info: Any) -> None:
        """Keep a finished unit's timing (its partial sums are deleted once folded)."""
        self.group.require_group("units").create_group(unit.name, overwrite=True,
                                                       attributes={"chain": unit.chain, "block": unit.block, **info})

    def unit_records(self) -> dict[str, dict[str, Any]]:
        if "units" not in self.group:
            return {}
        return {name: dict(group.attrs) for name, group in self.group["units"].groups()}

    # shards ------------------------------------------------------------------
    def _region(self, plan: Plan, shard: Shard) -> tuple:
        tensor = plan.tensors[shard.tensor]
        region = [slice(None)] * len(tensor.shape)
        region[tensor.shard_axis] = shard.channels
        return tuple(region)

    def write_shard(self, plan: Plan, shard: Shard, values: dict[str, np.ndarray]) -> str:
        """Write a shard's chunks of every result array, read them back, and return their verified checksum."""
        group = self.tensor_group(plan.tensors[shard.tensor].name)
        region = self._region(plan, shard)
        for name in RESULT_ARRAYS:
            group[name][region] = values[name]
        expected = checksum_of(values[name] for name in RESULT_ARRAYS)
        stored = self.stored_checksum(plan, shard)
        if stored != expected:
            raise OSError(f"{shard.name}: chunks read back differ from what was written ({stored} != {expected})")
        return expected

    def read_shard(self, plan: Plan, shard: Shard) -> dict[str, np.ndarray]:
        group = self.tensor_group(plan.tensors[shard.tensor].name)
        region = self._region(plan, shard)
        return {name: np.asarray(group[name][region]) for name in RESULT_ARRAYS}

    def stored_checksum(self, plan: Plan, shard: Shard) -> str:
        stored = self.read_shard(plan, shard)
        return checksum_of(stored[name] for name in RESULT_ARRAYS)

    def _readable_checksum(self, plan: Plan, shard: Shard) -> str | None:
        """The stored checksum, or None when the chunks cannot even be decoded."""
        try:
            return self.stored_checksum(plan, shard)
        except Exception:  # noqa: BLE001 - any decode/IO failure means the chunk is corrupt
            return None

    def record_done(self, shard: Shard, checksum: str, **info: Any) -> None:
        """Mark a shard done; call only after ``write_shard`` returned ``checksum``."""
        entry = {"tensor": shard.tensor, "index": shard.index, "start": shard.start, "stop": shard.stop, "checksum": checksum, **info}
        self.group.require_group("manifest").create_group(shard.name, overwrite=True, attributes=entry)

    def manifest(self) -> dict[str, dict[str, Any]]:
        """Recorded shards by name (not yet verified against the chunks)."""
        if "manifest" not in self.group:
            return {}
        return {name: dict(group.attrs) for name, group in self.group["manifest"].groups() if "checksum" in group.attrs}

    def verify(self, plan: Plan) -> tuple[list[Shard], list[Shard], list[Shard]]:
        """(done, corrupt, missing) shards: corrupt ones have a manifest entry whose checksum no longer matches."""
        recorded = self.manifest()
        done, corrupt, missing = [], [], []
        for shard in plan.shards:
            entry = recorded.get(shard.name)
            if entry is None:
                missing.append(shard)
            elif self._readable_checksum(plan, shard) == entry["checksum"]:
                done.append(shard)
            else:
                corrupt.append(shard)
        return done, corrupt, missing

    def forget(self, shard: Shard) -> None:
        """Drop a shard's manifest entry so it is recomputed."""
        manifest = self.group.require_group("manifest")
        if shard.name in manifest:
            del manifest[shard.name]

    def tensor_arrays(self, name: str) -> dict[str, np.ndarray]:
        """Every array of tensor ``name`` (the result arrays, and the per-channel sums once written)."""
        group = self.tensor_group(name)
        return {key: np.asarray(group[key][...]) for key in sorted(group.array_keys())}

    def write_tensor_array(self, name: str, array: str, values: np.ndarray, dims: tuple[str, ...]) -> None:
        group = self.tensor_group(name)
        stored = group.create_array(array, shape=values.shape, dtype="float64", dimension_names=dims, overwrite=True)
        stored[...] = values

    def values_at(self, name: str, array: str, indices: list[tuple[int, ...]]) -> np.ndarray:
        stored = self.tensor_group(name)[array]
        return np.array([stored[i] for i in indices])

    # lock --------------------------------------------------------------------
    def lock_info(self) -> dict[str, Any] | None:
        if "lock" not in self.group:
            return None
        info = dict(self.group["lock"].attrs)
        return info or None

    def acquire_lock(self) -> str:
        """Take the coordinator lock, recovering a stale one; raise BadInputError if it is held."""
        info = self.lock_info()
        if info and not lock_is_stale(info):
            raise BadInputError(
                f"store {self.url!r} is being written by another coordinator (pid {info['pid']} on {info['host']},"
                f" last heartbeat {time.time() - info['heartbeat']:.0f} s ago); a lock without heartbeat for"
                f" {LOCK_STALE_SECONDS:.0f} s is taken over automatically"
            )
        token = uuid.uuid4().hex
        now = time.time()
        self.group.require_group("lock").attrs.put(
            {"token": token, "host": socket.gethostname(), "pid": os.getpid(), "started": now, "heartbeat": now}
        )
        if (self.lock_info() or {}).get("token") != token:
            raise BadInputError(f"store {self.url!r}: another coordinator took the lock at the same time")
        return token

    def heartbeat(self, token: str) -> None:
        info = self.lock_info()
        if info and info.get("token") == token:
            self.group["lock"].attrs.update({"heartbeat": time.time()})

    def release_lock(self, token: str) -> None:
        info = self.lock_info()
        if info and info.get("token") == token:
            del self.group["lock"]


def lock_is_stale(info: dict[str, Any]) -> bool:
    """A lock is stale when its owner on this host is gone, or its heartbeat is too old."""
    if time.time() - float(info.get("heartbeat", 0)) > LOCK_STALE_SECONDS:
        return True
    if info.get("host") == socket.gethostname():
        try:
            os.kill(int(info["pid"]), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
    return False
