"""The build's progress: a bar on a terminal, else a log line every ~10 s."""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger(__name__)


class BuildProgress:
    """Examples computed (per forward batch) and MB written, as a rich bar on a terminal, else a log line every ~10 s.

    Without a terminal (CI, nohup, a pipe) a bar would print nothing useful, and a big model would look hung."""

    LOG_EVERY_SECONDS = 10.0

    def __init__(self, enabled: bool, split: str, total: int, done: int):
        self.enabled, self.split, self.total = enabled, split, total
        self.done, self.base, self.bytes = done, done, 0
        self.started = self.last_log = time.perf_counter()
        self._bar: Any = None

    def __enter__(self) -> BuildProgress:
        from rich.console import Console

        if self.enabled and Console(stderr=True).is_terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn(f"[bold]{self.split:>10}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]} ex/s, {task.fields[mbs]} MB/s written"), TimeRemainingColumn(),
            )
            self._bar.start()
            self._task = self._bar.add_task(self.split, total=self.total, completed=self.done, rate="-", mbs="-")
        return self

    def computed(self, n: int) -> None:
        self.done += n
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        rate, mbs = (self.done - self.base) / elapsed, self.bytes / elapsed / 1e6
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, rate=f"{rate:,.0f}", mbs=f"{mbs:,.1f}")
        elif self.enabled and time.perf_counter() - self.last_log >= self.LOG_EVERY_SECONDS:
            self.last_log = time.perf_counter()
            log.info("%s: %s/%s examples computed, %s ex/s, %.1f MB written", self.split, f"{self.done:,}", f"{self.total:,}", f"{rate:,.0f}", self.bytes / 1e6)

    def written(self, nbytes: int) -> None:
        self.bytes += nbytes

    def __exit__(self, *exc: object) -> None:
        # The bar follows this rank's computing; units still being written (or other ranks' units counted
        # by rank 0's poller) after it are recorded silently, as the next split's bar may be up.
        if self._bar is not None:
            self._bar.stop()
        self._bar, self.enabled = None, False
