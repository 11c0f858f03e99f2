"""The coordinator: check inputs, open or create the store, run missing shards, assemble, validate.

Order matters for the guarantees: every input check runs before the store is
touched (bad input writes nothing); a shard is recorded done only after its
chunks were written and verified; corrupt shards are forgotten and rerun.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from pipeline import __version__
from pipeline.config import Config
from pipeline.errors import BadInputError, Interrupted
from pipeline.executors import make_executor
from pipeline.job import Job
from pipeline.plan import Plan
from pipeline.progress import RunProgress
from pipeline.store import ResultStore, check_writable
from pipeline.validate import validate_store
from pipeline.worker import configure_tensorflow


@dataclass
class RunResult:
    """What a run did and where the result is."""

    output: str
    engine: str
    engine_reason: str
    computed: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    recomputed_corrupt: list[int] = field(default_factory=list)
    retries: int = 0
    seconds: float = 0.0
    validation: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return bool(self.validation.get("passed"))


def _config_differences(stored: dict, current: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(stored) | set(current))
    found = []
    for key in keys:
        a, b = stored.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += _config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append(f"{prefix}{key}: store has {a!r}, config has {b!r}")
    return found


def _recorded_config(config: Config) -> dict:
    """The config as stored: everything but storage options (which may carry secrets)."""
    return config.model_dump(mode="json", exclude={"storage_options"})


def open_store(config: Config, job: Job, plan: Plan, overwrite: bool) -> ResultStore:
    """Open the store for this config, or create it; refuse a store written for something else."""
    url, options = config.output, config.storage_options
    attrs = {
        "config_fingerprint": config.fingerprint(),
        "model_fingerprint": job.model_fingerprint,
        "config": _recorded_config(config),
        "shard_size": plan.shard_size,
        "shards": len(plan.shards),
        "hessdiag_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "validation": {"samples": 0, "max_rel_error": None, "passed": None},
        "runs": [],
        **job.describe(),
    }
    if ResultStore.exists(url, options):
        try:
            store = ResultStore.open(url, options)
        except BadInputError:
            if not overwrite:
                raise BadInputError(f"{url!r} exists and is not a hessdiag store; use --overwrite to replace it") from None
            return ResultStore.create(url, options, plan, attrs)
        if overwrite:
            store.acquire_lock()  # refuses while another coordinator is alive
            return ResultStore.create(url, options, plan, attrs)
        if not store.initialized and store.attrs.get("config_fingerprint") == attrs["config_fingerprint"]:
            return ResultStore.create(url, options, plan, attrs)  # creation was interrupted: nothing to keep
        stored = store.attrs
        if stored.get("config_fingerprint") != attrs["config_fingerprint"]:
            differences = _config_differences(stored.get("config", {}), attrs["config"])
            shown = "; ".join(d for d in differences if not d.startswith(("output", "cluster", "validation"))) or "fingerprints differ"
            raise BadInputError(f"store {url!r} was written for a different config ({shown}); use --overwrite to replace it")
        if stored.get("model_fingerprint") != attrs["model_fingerprint"]:
            raise BadInputError(
                f"store {url!r} was written for a model with different weights or architecture"
                " (model fingerprint differs); use --overwrite to replace it"
            )
        return store
    return ResultStore.create(url, options, plan, attrs)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


def install_stop_handlers() -> dict:
    """SIGTERM and Ctrl-C raise ``Interrupted`` in the coordinator; returns the handlers they replace.

    Called again after Ray starts, because ``ray.init`` installs its own SIGTERM handler.
    """
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.signal(signum, _raise_interrupted) for signum in STOP_SIGNALS}


def restore_handlers(saved: dict) -> None:
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def run(config: Config, *, overwrite: bool = False, live: bool | None = None, log: Callable[[str], None] | None = None) -> RunResult:
    """Start or resume the run described by ``config``; returns after validation.

    SIGTERM or Ctrl-C stop handing out shards, release the lock and raise ``Interrupted``
    saying how many shards are done; rerunning resumes.
    """
    saved_handlers = install_stop_handlers()
    try:
        return _run(config, overwrite, live, log)
    finally:
        restore_handlers(saved_handlers)


def _run(config: Config, overwrite: bool, live: bool | None, log: Callable[[str], None] | None) -> RunResult:
    started = time.time()
    check_writable(config.output, config.storage_options)
    if config.cluster.executor == "local":
        configure_tensorflow(config.cluster.cpus_per_worker)  # the same settings as a Ray worker, before TF starts
    job = Job.load(config)
    loss_value = job.mean_loss()
    plan = job.plan()
    store = open_store(config, job, plan, overwrite)
    token = store.acquire_lock()
    progress = None
    try:
        done, corrupt, missing = store.verify(plan)
        for shard in corrupt:
            store.forget(shard)
        todo = sorted(corrupt + missing, key=lambda s: s.index)
        progress = RunProgress(len(plan.shards), len(done), plan.entries_per_channel * plan.shard_size, live)
        say = log or progress.log
        say(
            f"{config.output}: {job.model.name}/{job.curvature.target.layer.name} {plan.weight_shape}, "
            f"{len(plan.shards)} shards of {plan.shard_size} channels, engine {job.curvature.choice.name} "
            f"({job.curvature.choice.reason}); {len(done)} done, {len(corrupt)} corrupt, {len(missing)} missing"
        )
        result = RunResult(config.output, job.curvature.choice.name, job.curvature.choice.reason, skipped=[s.index for s in done],
                           recomputed_corrupt=[s.index for s in corrupt])
        if todo:
            executor = make_executor(config, say, run_id=token[:8])
            install_stop_handlers()
            try:
                for identity in executor.identities:
                    if identity["model_fingerprint"] != job.model_fingerprint:
                        raise BadInputError(f"worker {identity['host']}:{identity['pid']} built a different model; check model.seed/weights")

                def on_done(shard, record):
                    store.record_done(shard, record.pop("checksum"), **record)
                    result.computed.append(shard.index)
                    progress.shard_done(shard.name, record["seconds"], f"{record['host']}:{record['pid']}")

                def on_retry(shard, reason, attempt):
                    result.retries += 1
                    progress.shard_retry(shard.name, reason, attempt)

                executor.execute(todo, on_done, on_retry, lambda: store.heartbeat(token))
            except Interrupted as exc:
                finished = len(plan.shards) - len(todo) + len(result.computed)
                raise Interrupted(exc.signum, f"interrupted; {finished} of {len(plan.shards)} units done;"
                                  " rerun the same command to resume") from None
            finally:
                executor.close()
        progress.close()
        done, corrupt, missing = store.verify(plan)
        if corrupt or missing:
            raise RuntimeError(f"shards still missing after the run: {[s.name for s in corrupt + missing]}")
        runs = list(store.attrs.get("runs", [])) + [
            {"started": started, "seconds": time.time() - started, "computed": result.computed, "retries": result.retries}
        ]
        store.update_attrs(complete=True, loss=loss_value, runs=runs)
        say("all shards done; validating against float64 finite differences")
        result.validation = validate_store(job, store, plan, config.validation)
        store.update_attrs(validation=result.validation)
        result.seconds = time.time() - started
        return result
    finally:
        if progress is not None:
            progress.close()
        store.release_lock(token)

