"""Progress of a run: a live bar on a terminal, one plain line per event elsewhere (CI, Ray Jobs logs)."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class RunProgress:
    """Counts finished shards and entries; reports throughput, ETA, retries and failures."""

    def __init__(self, total_shards: int, already_done: int, entries_per_shard: float, live: bool | None = None):
        self.total = total_shards
        self.done = already_done
        self.entries_per_shard = entries_per_shard
        self.retries = 0
        self.started = time.time()
        self.computed = 0
        self.live = sys.stderr.isatty() if live is None else live
        self.console = Console(stderr=True)
        self._bar = None
        if self.live:
            self._bar = Progress(
                TextColumn("[bold]shards"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                TextColumn("retries {task.fields[retries]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                console=self.console,
            )
            self._task = self._bar.add_task("run", total=total_shards, completed=already_done, rate="", retries=0)
            self._bar.start()

    def log(self, message: str) -> None:
        if self._bar is not None:
            self._bar.console.print(message)
        else:
            print(f"[hessdiag {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    @property
    def entries_per_second(self) -> float:
        elapsed = max(time.time() - self.started, 1e-9)
        return self.computed * self.entries_per_shard / elapsed

    @property
    def eta_seconds(self) -> float | None:
        if self.computed == 0:
            return None
        return (self.total - self.done) * (time.time() - self.started) / self.computed

    def shard_done(self, name: str, seconds: float, where: str) -> None:
        self.done += 1
        self.computed += 1
        eta = self.eta_seconds
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, rate=f"{self.entries_per_second:,.0f} entries/s")
        else:
            self.log(
                f"{name} done in {seconds:.1f} s on {where} ({self.done}/{self.total},"
                f" {self.entries_per_second:,.0f} entries/s, eta {eta:.0f} s)"
            )

    def shard_retry(self, name: str, reason: str, attempt: int) -> None:
        self.retries += 1
        if self._bar is not None:
            self._bar.update(self._task, retries=self.retries)
        self.log(f"{name} will be retried (attempt {attempt}): {reason}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
