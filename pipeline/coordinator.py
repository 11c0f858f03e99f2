"""The coordinator: check inputs, open or create the store, run missing units, fold them, validate.

Order matters for the guarantees: every input check (including a pass over all
data) runs before the store is touched, so bad input writes nothing; a unit counts
only once its partial sums are written and verified; partial sums fold in block
order; corrupt shards are forgotten and their group's units rerun.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from pipeline import __version__
from pipeline.config import Config
from pipeline.errors import BadInputError, Interrupted
from pipeline.executors import make_executor
from pipeline.job import Job
from pipeline.plan import Plan, auto_example_block, unit_seconds
from pipeline.progress import RunProgress
from pipeline.reduction import chain_complete, clean_chain, fold_chain, unit_state
from pipeline.stop_signals import install_stop_handlers, raise_if_stopped, restore_handlers
from pipeline.store import ResultStore, check_writable
from pipeline.summary import tensor_summary
from pipeline.validate import validate_store
from pipeline.worker import configure_tensorflow


@dataclass
class RunResult:
    """What a run did and where the result is."""

    output: str
    engines: dict[str, str]
    computed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    recomputed_corrupt: list[int] = field(default_factory=list)
    retries: int = 0
    seconds: float = 0.0
    validation: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return bool(self.validation.get("passed"))

    @property
    def failed(self) -> bool:
        """Validation found a wrong entry; tensors it could not resolve are not failures."""
        return bool(self.validation.get("failed"))


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


def resumable_store(config: Config, overwrite: bool) -> ResultStore | None:
    """The existing store this run would resume (same config), or None."""
    if overwrite or not ResultStore.exists(config.output, config.storage_options):
        return None
    try:
        store = ResultStore.open(config.output, config.storage_options)
    except BadInputError:
        return None
    same = store.initialized and store.attrs.get("config_fingerprint") == config.fingerprint()
    return store if same else None


def resolve_example_block(config: Config, job: Job, log: Callable[[str], None], overwrite: bool = False) -> tuple[int, dict | None]:
    """Examples per unit: the store's when resuming, the config's number, or calibrated for ``auto``."""
    existing = resumable_store(config, overwrite)
    if existing is not None:
        return int(existing.attrs["example_block"]), existing.attrs.get("calibration")
    if config.compute.example_block != "auto":
        return int(config.compute.example_block), None
    log("example_block auto: timing one example of the shared pass and of each separate tensor")
    calibration = job.calibrate()
    raise_if_stopped()  # a signal whose exception TensorFlow's code swallowed (stop_signals) stops the run here
    probe = job.plan(1)
    slowest = max(unit_seconds(probe, unit, calibration["seconds_per_example"]) for unit in probe.units)
    block = auto_example_block(slowest, config.compute.unit_seconds, config.data.batch_size, job.examples)
    log(f"calibration: the slowest unit costs {slowest:.3g} s per example; example_block {block} for units of about"
        f" {config.compute.unit_seconds:g} s")
    return block, calibration


def open_store(config: Config, job: Job, plan: Plan, overwrite: bool, calibration: dict | None = None) -> ResultStore:
    """Open the store for this config, or create it; refuse a store written for something else."""
    url, options = config.output, config.storage_options
    attrs = {
        "config_fingerprint": config.fingerprint(),
        "model_fingerprint": job.model_fingerprint,
        "config": _recorded_config(config),
        "shards": len(plan.shards),
        "calibration": calibration,
        "hessdiag_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "validation": {"samples": 0, "max_rel_error": None, "passed": None},
        "runs": [],
        **job.describe(),
    }
    tensors = {t.name: job.tensor_facts(t.name) for t in plan.tensors}

    def create():
        return ResultStore.create(url, options, plan, attrs, tensors)

    if ResultStore.exists(url, options):
        try:
            store = ResultStore.open(url, options)
        except BadInputError as exc:
            if not overwrite:
                raise BadInputError(f"{url!r} exists but cannot be resumed: {exc}; use --overwrite to replace it") from None
            return create()
        if overwrite:
            store.acquire_lock()  # refuses while another coordinator is alive
            return create()
        if not store.initialized and store.attrs.get("config_fingerprint") == attrs["config_fingerprint"]:
            return create()  # creation was interrupted: nothing to keep
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
    return create()


def _unit_summary(plan: Plan) -> str:
    chains = plan.chains()
    parts = []
    if plan.shared:
        parts.append(f"{len(chains['s'])} shared block(s) of {plan.example_block} examples for {len(plan.shared)} tensor(s)")
    separate = [c for c in chains if c != "s"]
    if separate:
        parts.append(f"{sum(len(chains[c]) for c in separate)} unit(s) over {len(separate)} channel group(s) of"
                     f" {len(plan.tensors) - len(plan.shared)} tensor(s)")
    return ", ".join(parts)


def _engine_summary(engines: dict[str, str]) -> str:
    counts: dict[str, int] = {}
    for name in engines.values():
        counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{name} x{count}" if len(engines) > 1 else name for name, count in counts.items())


def summarize(store: ResultStore, plan: Plan) -> None:
    """Each tensor's per-channel traces and saliencies and its summary statistics, from its stored arrays."""
    for tensor in plan.tensors:
        arrays = store.tensor_arrays(tensor.name)
        attrs, per_channel = tensor_summary(arrays["hessian_diagonal"], arrays["saliency"], tensor.shard_axis)
        for name, values in per_channel.items():
            store.write_tensor_array(tensor.name, name, values, (tensor.dims[tensor.shard_axis],))
        store.update_tensor_attrs(tensor.name, **attrs)


def run(config: Config, *, overwrite: bool = False, live: bool | None = None, log: Callable[[str], None] | None = None) -> RunResult:
    """Start or resume the run described by ``config``; returns after validation.

    SIGTERM or Ctrl-C, wherever they land (loading, calibration, units, folding, validation),
    stop the run, release the lock and raise ``Interrupted`` saying how many units are done;
    rerunning resumes.
    """
    saved_handlers = install_stop_handlers()
    try:
        return _run(config, overwrite, live, log)
    except Interrupted as exc:
        raise Interrupted(exc.signum, _stopped_message(config)) from None
    finally:
        restore_handlers(saved_handlers)


def _stopped_message(config: Config) -> str | None:
    """``interrupted; N of M units done; ...`` from the store this config resumes; None (the plain
    message) before such a store holds a plan."""
    try:
        store = resumable_store(config, overwrite=False)
        if store is None:
            return None
        plan = store.plan
        done = unit_state(store, plan, {shard.name for shard in store.verify(plan)[0]}).done
    except Exception:  # noqa: BLE001 - a store that cannot say how far it got: the plain message
        return None
    return f"interrupted; {len(done)} of {len(plan.units)} units done; rerun the same command to resume"


def _run(config: Config, overwrite: bool, live: bool | None, log: Callable[[str], None] | None) -> RunResult:
    started = time.time()
    check_writable(config.output, config.storage_options)
    if config.cluster.executor == "local":
        configure_tensorflow(config.cluster.cpus_per_worker)  # the same settings as a Ray worker, before TF starts
    job = Job.load(config)
    loss_value = job.mean_loss()
    say = log or RunProgress.plain_log
    example_block, calibration = resolve_example_block(config, job, say, overwrite)
    plan = job.plan(example_block)
    store = open_store(config, job, plan, overwrite, calibration)
    token = store.acquire_lock()
    progress = None
    try:
        done, corrupt, _ = store.verify(plan)
        for shard in corrupt:
            store.forget(shard)
        done_shards = {s.name for s in done}
        for chain in plan.chains():
            if not chain_complete(plan, chain, done_shards):
                clean_chain(store, plan, chain)
                if fold_chain(store, plan, chain, job.weight_values):  # partials a crash left unfolded completed it
                    done_shards |= {shard.name for shard in plan.chain_shards(chain)}
        state = unit_state(store, plan, done_shards)
        total = len(plan.units)
        progress = RunProgress(total, len(state.done), live)
        say = log or progress.log
        engines = {t.name: job.curvature.choices[t.name].name for t in plan.tensors}
        say(
            f"{config.output}: {job.model.name}, {len(plan.tensors)} tensor(s) ({plan.entries:,} entries), {total} units"
            f" ({_unit_summary(plan)}; {plan.examples} examples), stored in shards of {plan.shard_size} channels;"
            f" engines: {_engine_summary(engines)}; {len(state.done)} units done, {len(corrupt)} corrupt shards,"
            f" {len(state.todo)} units to run"
        )
        result = RunResult(config.output, engines, skipped=[u.name for u in state.done],
                           recomputed_corrupt=[s.name for s in corrupt])
        if state.todo:
            executor = make_executor(config, say, run_id=token[:8], job=job)
            install_stop_handlers()
            try:
                for identity in executor.identities:
                    if identity["model_fingerprint"] != job.model_fingerprint:
                        raise BadInputError(f"worker {identity['host']}:{identity['pid']} built a different model; check model.seed/weights")

                def on_done(unit, record):
                    record.pop("checksum")
                    store.record_unit(unit, **record)
                    fold_chain(store, plan, unit.chain, job.weight_values)
                    result.computed.append(unit.name)
                    progress.unit_done(unit.name, record["seconds"], f"{record['host']}:{record['pid']}")

                def on_retry(unit, reason, attempt):
                    result.retries += 1
                    progress.unit_retry(unit.name, reason, attempt)

                executor.execute(state.todo, on_done, on_retry, lambda: store.heartbeat(token))
            finally:
                executor.close()
        progress.close()
        done, corrupt, missing = store.verify(plan)
        if corrupt or missing:
            raise RuntimeError(f"shards still missing after the run: {[s.name for s in corrupt + missing]}")
        summarize(store, plan)
        runs = list(store.attrs.get("runs", [])) + [
            {"started": started, "seconds": time.time() - started, "computed": result.computed, "retries": result.retries}
        ]
        store.update_attrs(complete=True, loss=loss_value, runs=runs)
        say("all units done and folded; validating against float64 references from loss values")
        result.validation = validate_store(job, store, plan, config.validation)
        result.seconds = time.time() - started
        return result
    finally:
        if progress is not None:
            progress.close()
        store.release_lock(token)
