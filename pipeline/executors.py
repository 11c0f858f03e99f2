"""Executors run work units: in this process, or on a pool of Ray actors.

Both take the units to run and two callbacks; a test parametrized over both
checks that they produce bit-identical stores.
"""

from __future__ import annotations

import contextlib
import itertools
import time
import uuid
from collections import deque
from typing import TYPE_CHECKING, Callable, Iterator

from pipeline.config import Config
from pipeline.errors import HessdiagError
from pipeline.logs import verbose
from pipeline.plan import Unit
from pipeline.ray_auth import choose_local_token_mode, use_available_token
from pipeline.stop_signals import deferred, raise_if_stopped
from pipeline.worker import UnitWorker, worker_environment

if TYPE_CHECKING:
    from pipeline.job import Job

HEARTBEAT_SECONDS = 10.0
OnDone = Callable[[Unit, dict], None]
OnRetry = Callable[[Unit, str, int], None]


class LocalExecutor:
    """Runs units one after another in this process, on the coordinator's job: its model, audits and traced
    functions (the calibration's included) serve the units too."""

    def __init__(self, config: Config, log: Callable[[str], None], job: Job | None = None):
        self.worker = UnitWorker(config, threads=config.cluster.cpus_per_worker, job=job)
        self.identities = [self.worker.identity()]
        log("executor: local (this process)")

    def execute(self, units: list[Unit], on_done: OnDone, on_retry: OnRetry, heartbeat: Callable[[], None]) -> None:
        for unit in units:
            raise_if_stopped()
            on_done(unit, self.worker.run_unit(unit))
            heartbeat()

    def close(self) -> None:
        pass


def cluster_gpus() -> float:
    import ray

    with deferred():
        return float(ray.cluster_resources().get("GPU", 0))


@contextlib.contextmanager
def _without_ray_sigterm_handlers() -> Iterator[None]:
    """Inside, Ray does not replace this process's SIGTERM handler.

    ``ray.init`` installs its own (exit with the signal number; the local head's: kill the node and
    exit 1), so a SIGTERM during start-up would bypass hessdiag's. Ray installs them all through
    ``ray._private.utils.set_sigterm_handler``; the node's processes are stopped by
    ``ray.shutdown`` (and Ray's exit hook) instead.
    """
    import ray._private.utils as ray_utils

    original = getattr(ray_utils, "set_sigterm_handler", None)
    if original is None:
        yield
        return
    ray_utils.set_sigterm_handler = lambda handler: None
    try:
        yield
    finally:
        ray_utils.set_sigterm_handler = original


def start_ray(address: str | None) -> None:
    """Start a fresh local Ray (``address`` None) or join one; Ray's logs and the actors' output stay in
    Ray's log files unless verbose (``--verbose``, ``HESSDIAG_DEBUG=1``).

    ``local`` starts a fresh Ray whatever the machine holds: plain ray.init() would join the
    "latest cluster" of a dead head and hang. A stop signal during start-up is raised once Ray is up.
    """
    import ray

    loud = verbose()
    with deferred(), _without_ray_sigterm_handlers():
        ray.init(address=address or "local", include_dashboard=False, configure_logging=loud, log_to_driver=loud)


def gather(refs: list) -> list:
    """``ray.get(refs)``, waiting in steps of a second so that a stop signal is honoured meanwhile."""
    import ray

    pending = list(refs)
    while pending:
        with deferred():
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
    with deferred():
        return ray.get(refs)


class RayExecutor:
    """A dynamic queue over Ray actors: a free actor takes the next unit; dead actors are replaced."""

    def __init__(self, config: Config, log: Callable[[str], None], run_id: str | None = None):
        use_available_token()
        if config.cluster.address is None:
            choose_local_token_mode()
        import ray

        self.config = config
        self.log = log
        self.run_id = run_id or uuid.uuid4().hex[:8]
        self._owns_ray = not ray.is_initialized()
        self.actors: list = []
        try:
            if self._owns_ray:
                start_ray(config.cluster.address)
            self._start_actors()
        except BaseException:
            self.close()
            raise
        hosts = sorted({i["host"] for i in self.identities})
        log(
            f"executor: ray, {self.num_workers} actors x ({config.cluster.cpus_per_worker} CPU, {self.gpus_per_worker:g} GPU)"
            f" on {len(hosts)} node(s): " + ", ".join(f"{i['host']}:{i['pid']}{' ' + ','.join(i['gpus']) if i['gpus'] else ''}" for i in self.identities)
        )

    def _start_actors(self) -> None:
        import ray

        cluster = self.config.cluster
        gpus = cluster_gpus()
        self.gpus_per_worker = (1.0 if gpus else 0.0) if cluster.gpus_per_worker == "auto" else float(cluster.gpus_per_worker)
        if cluster.num_workers == "auto":
            with deferred():
                cpus = ray.cluster_resources().get("CPU", 1)
            slots = gpus / self.gpus_per_worker if self.gpus_per_worker else cpus / cluster.cpus_per_worker
            self.num_workers = max(1, int(slots))
        else:
            self.num_workers = cluster.num_workers
        self._generation = itertools.count()
        self._config_json = self.config.model_dump(mode="json")
        for slot in range(self.num_workers):
            with deferred():
                self.actors.append(self._start_actor(slot))
        with deferred():
            calls = [actor.identity.remote() for actor in self.actors]
        self.identities = gather(calls)  # the actors are up: each loaded the model

    def _start_actor(self, slot: int):
        """A new actor for ``slot``; call inside ``deferred()`` and keep the handle before leaving it."""
        import ray

        actor_class = ray.remote(UnitWorker)
        return actor_class.options(
            name=f"hessdiag-{self.run_id}-worker{slot}-{next(self._generation)}",
            num_cpus=self.config.cluster.cpus_per_worker,
            num_gpus=self.gpus_per_worker,
            scheduling_strategy="SPREAD",
            max_restarts=0,
            runtime_env={"env_vars": worker_environment()},
        ).remote(self._config_json, self.config.cluster.cpus_per_worker)

    def execute(self, units: list[Unit], on_done: OnDone, on_retry: OnRetry, heartbeat: Callable[[], None]) -> None:
        """Run ``units``; a replacement actor gets work only once it is up, so a lost node stalls nothing."""
        import ray
        from ray.exceptions import OutOfMemoryError, RayActorError, RayTaskError

        queue = deque((unit, 0) for unit in units)
        tasks: dict = {}  # unit task -> (slot, unit, attempt)
        starting: dict = {}  # identity call of a replacement actor -> slot
        idle = list(range(self.num_workers))

        # every call into Ray runs inside ``deferred()``: a stop signal there is raised once it returns
        def submit():
            while idle and queue:
                slot = idle.pop()
                unit, attempt = queue.popleft()
                with deferred():
                    tasks[self.actors[slot].run_unit.remote(unit)] = (slot, unit, attempt)

        def replace(slot):
            with deferred():
                self.actors[slot] = self._start_actor(slot)
                starting[self.actors[slot].identity.remote()] = slot

        submit()
        last_beat = time.monotonic()
        while tasks or (queue and starting):
            raise_if_stopped()
            # short waits keep SIGTERM and Ctrl-C responsive; the lock's heartbeat is written every 10 s
            with deferred():
                ready, _ = ray.wait(list(tasks) + list(starting), num_returns=1, timeout=1.0)
            if time.monotonic() - last_beat >= HEARTBEAT_SECONDS:
                heartbeat()
                last_beat = time.monotonic()
            if not ready:
                continue
            ref = ready[0]
            if ref in starting:
                slot = starting.pop(ref)
                try:
                    with deferred():
                        identity = ray.get(ref)
                    self.log(f"replacement actor up on {identity['host']}:{identity['pid']}")
                    idle.append(slot)
                except RayActorError:
                    replace(slot)
                submit()
                continue
            slot, unit, attempt = tasks.pop(ref)
            try:
                with deferred():
                    record = ray.get(ref)
            except (RayActorError, OutOfMemoryError, RayTaskError, ray.exceptions.ObjectLostError) as exc:
                reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                if attempt >= self.config.cluster.max_retries:
                    raise HessdiagError(f"unit {unit.name} failed {attempt + 1} times; last error: {reason}") from exc
                on_retry(unit, reason, attempt + 1)
                queue.appendleft((unit, attempt + 1))
                if isinstance(exc, (RayActorError, OutOfMemoryError)):  # Ray's memory monitor killed the actor
                    replace(slot)
                else:
                    idle.append(slot)
                submit()
                continue
            on_done(unit, record)
            idle.append(slot)
            submit()

    def close(self) -> None:
        """Kill the actors, and stop Ray when this executor started it (a stop signal meanwhile is raised after)."""
        import ray

        with deferred():
            for actor in self.actors:
                ray.kill(actor)
            if self._owns_ray:
                ray.shutdown()


def make_executor(config: Config, log: Callable[[str], None], run_id: str | None = None, job: Job | None = None):
    """The configured executor; a local one computes with ``job`` (the coordinator's) where given."""
    if config.cluster.executor == "local":
        return LocalExecutor(config, log, job)
    return RayExecutor(config, log, run_id)
