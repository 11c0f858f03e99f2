"""What a store says about its run: shards done, missing, corrupt, timing, engine, validation."""

from __future__ import annotations

import time
from typing import Any

from pipeline.reduction import unit_state
from pipeline.store import ResultStore, lock_is_stale


def store_status(store: ResultStore) -> dict[str, Any]:
    """A JSON-ready summary; checksums of recorded shards and partial sums are verified."""
    attrs = store.attrs
    plan = store.plan
    done, corrupt, missing = store.verify(plan)
    state = unit_state(store, plan, {s.index for s in done})
    records = store.unit_records()
    seconds = [float(record.get("seconds", 0.0)) for record in records.values()]
    workers = max(1, len({(r.get("host"), r.get("pid")) for r in records.values()}))
    mean = sum(seconds) / len(seconds) if seconds else None
    lock = store.lock_info()
    running = bool(lock and not lock_is_stale(lock))
    runs = attrs.get("runs", [])
    return {
        "store": store.url,
        "complete": bool(attrs.get("complete")) and not (corrupt or missing),
        "running": running,
        "units_total": len(plan.units),
        "units_done": len(state.done),
        "shards_total": len(plan.shards),
        "shards_done": len(done),
        "missing": [s.index for s in missing],
        "corrupt": [s.index for s in corrupt],
        "example_block": plan.example_block,
        "channel_groups": len(plan.groups),
        "engine": attrs.get("engine"),
        "engine_reason": attrs.get("engine_reason"),
        "target": f"{attrs.get('model')}/{attrs.get('target_layer')}/{attrs.get('target_weight')}",
        "weight_shape": attrs.get("weight_shape"),
        "compute_seconds": sum(seconds),
        "elapsed_seconds": (time.time() - lock["started"]) if running else sum(r.get("seconds", 0.0) for r in runs),
        "eta_seconds": (mean * len(state.todo) / workers) if mean is not None else None,
        "validation": {k: v for k, v in (attrs.get("validation") or {}).items() if k != "entries"},
    }
