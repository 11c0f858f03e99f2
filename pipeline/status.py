"""What a store says about its run: shards done, missing, corrupt, timing, engine, validation."""

from __future__ import annotations

import time
from typing import Any

from pipeline.store import ResultStore, lock_is_stale


def store_status(store: ResultStore) -> dict[str, Any]:
    """A JSON-ready summary; checksums of recorded shards are verified."""
    attrs = store.attrs
    plan = store.plan
    done, corrupt, missing = store.verify(plan)
    manifest = store.manifest()
    seconds = [float(manifest[s.index].get("seconds", 0.0)) for s in done]
    workers = max(1, len({(m.get("host"), m.get("pid")) for m in manifest.values()}))
    mean = sum(seconds) / len(seconds) if seconds else None
    remaining = len(corrupt) + len(missing)
    lock = store.lock_info()
    running = bool(lock and not lock_is_stale(lock))
    runs = attrs.get("runs", [])
    return {
        "store": store.url,
        "complete": bool(attrs.get("complete")) and remaining == 0,
        "running": running,
        "shards_total": len(plan.shards),
        "shards_done": len(done),
        "missing": [s.index for s in missing],
        "corrupt": [s.index for s in corrupt],
        "engine": attrs.get("engine"),
        "engine_reason": attrs.get("engine_reason"),
        "target": f"{attrs.get('model')}/{attrs.get('target_layer')}/{attrs.get('target_weight')}",
        "weight_shape": attrs.get("weight_shape"),
        "compute_seconds": sum(seconds),
        "elapsed_seconds": (time.time() - lock["started"]) if running else sum(r.get("seconds", 0.0) for r in runs),
        "eta_seconds": (mean * remaining / workers) if mean is not None else None,
        "validation": {k: v for k, v in (attrs.get("validation") or {}).items() if k != "entries"},
    }
