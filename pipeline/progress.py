"""Progress of a run: a live bar on a terminal, one plain line per event elsewhere (CI, Ray Jobs logs)."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class RunProgress:
    """Counts finished work units; reports throughput, ETA, retries and failures."""

    def __init__(self, total_units: int, already_done: int, live: bool | None = None):
        self.total = total_units
        self.done = already_done
        self.retries = 0
        self.started = time.time()
        self.computed = 0
        self.live = sys.stderr.isatty() if live is None else live
        self.console = Console(stderr=True)
        self._bar = None
        if self.live:
            self._bar = Progress(
                TextColumn("[bold]units"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                TextColumn("retries {task.fields[retries]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                console=self.console,
            )
            self._task = self._bar.add_task("run", total=total_units, completed=already_done, rate="", retries=0)
            self._bar.start()

    @staticmethod
    def plain_log(message: str) -> None:
        print(f"[hessdiag {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    def log(self, message: str) -> None:
        if self._bar is not None:
            self._bar.console.print(message)
        else:
            self.plain_log(message)

    @property
    def units_per_minute(self) -> float:
        return 60 * self.computed / max(time.time() - self.started, 1e-9)

    @property
    def eta_seconds(self) -> float | None:
        if self.computed == 0:
            return None
        return (self.total - self.done) * (time.time() - self.started) / self.computed

    def unit_done(self, name: str, seconds: float, where: str) -> None:
        self.done += 1
        self.computed += 1
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, rate=f"{self.units_per_minute:.1f} units/min")
        else:
            self.log(f"unit {name} done in {seconds:.1f} s on {where} ({self.done}/{self.total}, eta {self.eta_seconds:.0f} s)")

    def unit_retry(self, name: str, reason: str, attempt: int) -> None:
        self.retries += 1
        if self._bar is not None:
            self._bar.update(self._task, retries=self.retries)
        self.log(f"unit {name} will be retried (attempt {attempt}): {reason}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
