"""The Zarr v3 store: result arrays, attributes, per-shard manifest, and the run lock.

Layout (readable by ``zarr.open_group`` and ``xarray.open_zarr``):

    gradient, hessian_diagonal   float64 arrays shaped like W (the means), one chunk per shard
    manifest/shard-NNNNN         one group per finished shard; attrs hold its checksum
    partials/gGGGGG-bBBBBB       float64 sums of one work unit (channel group G, example block B)
    running/gGGGGG-kKKKKK        float64 sums of group G's blocks 0..K-1, folded in block order
    units/gGGGGG-bBBBBB          timing of each finished unit (kept after its partial is folded)
    lock                         a group whose attrs name the coordinator running now

Partial and running sums count only once their checksum attribute is written and
still matches, and an older one is deleted only after its successor is complete, so a
crash at any point loses at most the units in flight. A shard is done only when its
manifest entry exists and the stored chunk's checksum still matches it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import socket
import time
import uuid
from typing import Any

import numpy as np
import zarr

from pipeline.errors import BadInputError
from pipeline.plan import Plan, Shard, Unit, plan_shards

ARRAYS = ("gradient", "hessian_diagonal")
CONV_DIMS = ("kh", "kw", "in_channel", "out_channel")
DENSE_DIMS = ("in_feature", "out_channel")
LOCK_STALE_SECONDS = 90.0
LAYOUT_VERSION = 2  # 1: one shard = channels x all data, no partial sums


def dimension_names(rank: int) -> tuple[str, ...]:
    if rank == 4:
        return CONV_DIMS
    if rank == 2:
        return DENSE_DIMS
    return tuple(f"axis{i}" for i in range(rank - 1)) + ("out_channel",)


def shard_checksum(gradient: np.ndarray, hessian_diagonal: np.ndarray) -> str:
    """sha256 of a shard's float64 values in C order."""
    digest = hashlib.sha256()
    for array in (gradient, hessian_diagonal):
        digest.update(np.ascontiguousarray(array, dtype=np.float64).tobytes())
    return digest.hexdigest()


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def _local_path(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


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
    path = os.path.abspath(_local_path(url))
    ancestor = path
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor) or not os.access(ancestor, os.W_OK | os.X_OK):
        raise BadInputError(f"output {url!r} is not writable: {ancestor!r} is not a writable directory")


class ResultStore:
    """An open hessdiag Zarr store."""

    def __init__(self, group: zarr.Group, url: str):
        self.group = group
        self.url = url

    # opening -----------------------------------------------------------------
    @staticmethod
    def _open(url: str, storage_options: dict, mode: str, attributes: dict | None = None) -> zarr.Group:
        options = {"storage_options": storage_options} if is_remote(url) else {}
        return zarr.open_group(_local_path(url), mode=mode, zarr_format=3, attributes=attributes, **options)

    @classmethod
    def exists(cls, url: str, storage_options: dict | None = None) -> bool:
        try:
            cls._open(url, storage_options or {}, "r")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError):
            return False
        return True

    @classmethod
    def open(cls, url: str, storage_options: dict | None = None, mode: str = "r+") -> "ResultStore":
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
                " (work units over channel groups and example blocks). Write to a new output, or rerun with --overwrite"
            )
        return cls(group, url)

    @property
    def initialized(self) -> bool:
        """False when a crash interrupted ``create`` before both arrays existed."""
        return all(name in self.group for name in ARRAYS)

    @classmethod
    def create(cls, url: str, storage_options: dict, plan: Plan, attrs: dict[str, Any]) -> "ResultStore":
        """A new, empty store (replacing whatever is at ``url``); its attributes are written with the group."""
        group = cls._open(url, storage_options, "w", attributes={"complete": False, "layout_version": LAYOUT_VERSION, **attrs})
        chunks = plan.weight_shape[:-1] + (plan.shard_size,)
        for name in ARRAYS:
            group.create_array(
                name,
                shape=plan.weight_shape,
                chunks=chunks,
                dtype="float64",
                fill_value=np.nan,
                dimension_names=dimension_names(len(plan.weight_shape)),
                attributes={"long_name": name.replace("_", " "), "units": "loss / weight" if name == "gradient" else "loss / weight^2"},
            )
        group.require_group("manifest")
        return cls(group, url)

    # attributes --------------------------------------------------------------
    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs)

    def update_attrs(self, **values: Any) -> None:
        self.group.attrs.update(values)

    @property
    def plan(self) -> Plan:
        """The shards and units this store was created for, from its own attributes."""
        attrs = self.group.attrs
        plan = plan_shards(tuple(attrs["weight_shape"]), int(attrs["shard_size"]), int(attrs["examples"]), int(attrs["example_block"]))
        return dataclasses.replace(plan, groups=tuple(tuple(group) for group in attrs["channel_groups"]))

    # sums of work units --------------------------------------------------------
    def write_sums(self, kind: str, name: str, gradient: np.ndarray, hessian_diagonal: np.ndarray, **info: Any) -> str:
        """Write float64 sums (one chunk each), read them back, then record their checksum, which marks them complete."""
        expected = shard_checksum(gradient, hessian_diagonal)
        group = self.group.require_group(kind).create_group(name, overwrite=True)
        for array_name, values in zip(ARRAYS, (gradient, hessian_diagonal)):
            array = group.create_array(array_name, shape=values.shape, chunks=values.shape, dtype="float64")
            array[...] = values
        stored = shard_checksum(*self.read_sums(kind, name))
        if stored != expected:
            raise OSError(f"{kind}/{name}: chunks read back differ from what was written")
        group.attrs.update({"checksum": expected, **info})
        return expected

    def read_sums(self, kind: str, name: str) -> tuple[np.ndarray, np.ndarray]:
        group = self.group[kind][name]
        return tuple(np.asarray(group[array_name][...]) for array_name in ARRAYS)

    def valid_sums(self, kind: str, name: str) -> tuple[np.ndarray, np.ndarray] | None:
        """The sums, read once, when they exist, are complete and still match their checksum; else None."""
        try:
            checksum = self.group[kind][name].attrs.get("checksum")
            sums = self.read_sums(kind, name) if checksum is not None else None
        except Exception:  # noqa: BLE001 - missing, partly written or undecodable: not valid
            return None
        return sums if sums is not None and shard_checksum(*sums) == checksum else None

    def sums_valid(self, kind: str, name: str) -> bool:
        return self.valid_sums(kind, name) is not None

    def sums_names(self, kind: str) -> list[str]:
        return sorted(self.group[kind].group_keys()) if kind in self.group else []

    def delete_sums(self, kind: str, name: str) -> None:
        if kind in self.group and name in self.group[kind]:
            del self.group[kind][name]

    def record_unit(self, unit: Unit, **info: Any) -> None:
        """Keep a finished unit's timing (its partial sums are deleted once folded)."""
        self.group.require_group("units").create_group(unit.name, overwrite=True, attributes={"group": unit.group, "block": unit.block, **info})

    def unit_records(self) -> dict[str, dict[str, Any]]:
        if "units" not in self.group:
            return {}
        return {name: dict(group.attrs) for name, group in self.group["units"].groups()}

    # shards ------------------------------------------------------------------
    def write_shard(self, shard: Shard, gradient: np.ndarray, hessian_diagonal: np.ndarray) -> str:
        """Write a shard's chunks, read them back, and return their verified checksum."""
        expected = shard_checksum(gradient, hessian_diagonal)
        self.group["gradient"][..., shard.channels] = gradient
        self.group["hessian_diagonal"][..., shard.channels] = hessian_diagonal
        stored = self.stored_checksum(shard)
        if stored != expected:
            raise OSError(f"{shard.name}: chunks read back differ from what was written ({stored} != {expected})")
        return expected

    def read_shard(self, shard: Shard) -> tuple[np.ndarray, np.ndarray]:
        return tuple(np.asarray(self.group[name][..., shard.channels]) for name in ARRAYS)

    def stored_checksum(self, shard: Shard) -> str:
        return shard_checksum(*self.read_shard(shard))

    def _readable_checksum(self, shard: Shard) -> str | None:
        """The stored checksum, or None when the chunks cannot even be decoded."""
        try:
            return self.stored_checksum(shard)
        except Exception:  # noqa: BLE001 - any decode/IO failure means the chunk is corrupt
            return None

    def record_done(self, shard: Shard, checksum: str, **info: Any) -> None:
        """Mark a shard done; call only after ``write_shard`` returned ``checksum``."""
        manifest = self.group.require_group("manifest")
        entry = {"index": shard.index, "start": shard.start, "stop": shard.stop, "checksum": checksum, **info}
        manifest.create_group(shard.name, overwrite=True, attributes=entry)

    def manifest(self) -> dict[int, dict[str, Any]]:
        """Recorded shards by index (not yet verified against the chunks)."""
        if "manifest" not in self.group:
            return {}
        manifest = self.group["manifest"]
        entries = (dict(group.attrs) for _, group in manifest.groups())
        return {entry["index"]: entry for entry in entries if "checksum" in entry}

    def verify(self, plan: Plan) -> tuple[list[Shard], list[Shard], list[Shard]]:
        """(done, corrupt, missing) shards: corrupt ones have a manifest entry whose checksum no longer matches."""
        recorded = self.manifest()
        done, corrupt, missing = [], [], []
        for shard in plan.shards:
            entry = recorded.get(shard.index)
            if entry is None:
                missing.append(shard)
            elif self._readable_checksum(shard) == entry["checksum"]:
                done.append(shard)
            else:
                corrupt.append(shard)
        return done, corrupt, missing

    def forget(self, shard: Shard) -> None:
        """Drop a shard's manifest entry so it is recomputed."""
        manifest = self.group.require_group("manifest")
        if shard.name in manifest:
            del manifest[shard.name]

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return tuple(np.asarray(self.group[name][...]) for name in ARRAYS)

    def values_at(self, indices: list[tuple[int, ...]]) -> tuple[np.ndarray, np.ndarray]:
        gradient, diagonal = self.group["gradient"], self.group["hessian_diagonal"]
        return np.array([gradient[i] for i in indices]), np.array([diagonal[i] for i in indices])

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
