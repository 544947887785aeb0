"""Rank 0's view of every rank's build progress, read from the store itself.

Each rank marks its units in `units_done` once they are durable (see `read_cache.store`), so rank 0
needs no message from the others to count their work: it polls that array and reports the units other
ranks finished (its own it counts per forward batch, as one process does). Polling the store rather than
talking keeps the ranks free of collectives until the split ends.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

import numpy as np

log = logging.getLogger(__name__)


class UnitPoller:
    """A thread on rank 0 that calls `on_done(units)` with the watched units newly marked done."""

    def __init__(self, read_done: Callable[[], np.ndarray], watched: Iterable[int], on_done: Callable[[list[int]], None], every: float = 2.0):
        self.read_done, self.on_done, self.every = read_done, on_done, every
        self.waiting = set(watched)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="read-cache-unit-poller", daemon=True)

    def __enter__(self) -> UnitPoller:
        if self.waiting:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if exc[0] is None:
            self.poll()  # the last units, read after the split's barrier

    def _run(self) -> None:
        while not self._stop.wait(self.every) and self.waiting:
            try:
                self.poll()
            except Exception as e:  # noqa: BLE001 - progress only; the split's end re-reads units_done
                log.debug("progress poll failed: %s", e)

    def poll(self) -> None:
        done = self.read_done()
        new = sorted(u for u in self.waiting if done[u])
        if new:
            self.waiting.difference_update(new)
            self.on_done(new)
