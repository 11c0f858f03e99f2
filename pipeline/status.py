"""What a store says about its run: units and shards done, missing, corrupt, timing, engines, validation."""

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
    state = unit_state(store, plan, {s.name for s in done})
    records = store.unit_records()
    seconds = [float(record.get("seconds", 0.0)) for record in records.values()]
    workers = max(1, len({(r.get("host"), r.get("pid")) for r in records.values()}))
    mean = sum(seconds) / len(seconds) if seconds else None
    lock = store.lock_info()
    running = bool(lock and not lock_is_stale(lock))
    runs = attrs.get("runs", [])
    finished = {s.name for s in done}
    tensors = []
    for index, tensor in enumerate(plan.tensors):
        facts = store.tensor_attrs(tensor.name)
        shards = plan.shards_of(index)
        tensors.append({
            "name": tensor.name, "shape": list(tensor.shape), "engine": facts.get("engine"),
            "engine_reason": facts.get("engine_reason"), "shards_done": sum(s.name in finished for s in shards),
            "shards_total": len(shards), "trace": facts.get("trace"), "validation":
            {k: v for k, v in (facts.get("validation") or {}).items() if k != "entries"},
        })
    return {
        "store": store.url,
        "complete": bool(attrs.get("complete")) and not (corrupt or missing),
        "running": running,
        "model": attrs.get("model"),
        "targets": attrs.get("targets"),
        "units_total": len(plan.units),
        "units_done": len(state.done),
        "shards_total": len(plan.shards),
        "shards_done": len(done),
        "missing": [s.name for s in missing],
        "corrupt": [s.name for s in corrupt],
        "example_block": plan.example_block,
        "tensors": tensors,
        "compute_seconds": sum(seconds),
        "elapsed_seconds": (time.time() - lock["started"]) if running else sum(r.get("seconds", 0.0) for r in runs),
        "eta_seconds": (mean * len(state.todo) / workers) if mean is not None else None,
        "validation": {k: v for k, v in (attrs.get("validation") or {}).items() if k != "entries"},
    }
