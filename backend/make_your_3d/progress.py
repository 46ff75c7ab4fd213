"""Progress reporting and cancellation shared by every stage.

A stage gets one `Reporter`; it calls `reporter.step(i, total, message)` once per diffusion or
optimisation step, which both reports progress and raises `Cancelled` if the token was set.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable

from make_your_3d.errors import Cancelled


@dataclass
class Progress:
    stage: str
    step: int
    total: int
    message: str
    elapsed_s: float
    eta_s: float | None

    def to_dict(self) -> dict:
        return asdict(self)


ProgressFn = Callable[[Progress], None]


class CancelToken:
    """Thread-safe flag checked at every step; `check()` raises `Cancelled` once set."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled()


class Reporter:
    """Reports the steps of one stage with elapsed time and a linear ETA, and checks cancel."""

    def __init__(self, stage: str, progress: ProgressFn | None = None, cancel: CancelToken | None = None):
        self.stage = stage
        self._progress = progress
        self._cancel = cancel
        self._start = time.monotonic()

    def step(self, step: int, total: int, message: str = "") -> None:
        if self._cancel is not None:
            self._cancel.check()
        if self._progress is None:
            return
        elapsed = time.monotonic() - self._start
        eta = elapsed / step * (total - step) if step > 0 and total >= step else None
        self._progress(Progress(self.stage, step, total, message, round(elapsed, 3), None if eta is None else round(eta, 3)))

    def child(self, stage: str) -> "Reporter":
        """A reporter for a sub-stage sharing the same callback and cancel token."""
        return Reporter(stage, self._progress, self._cancel)
