"""Step progress for long CLI runs: a log line every 5 % of the steps and at least every 30 s."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

from .interrupt import raise_if_interrupted


class StepLog:
    """Callback ``(step, loss)`` that logs ``step i/n loss x`` at the first and last step, every
    ``total // 20`` steps, and whenever ``every_s`` seconds passed since the last line."""

    def __init__(self, total: int, log: logging.Logger, *, every_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.log, self.every_s, self.clock = total, log, every_s, clock
        self.every = max(1, total // 20)
        self.last = clock()

    def __call__(self, step: int, loss: float) -> None:
        raise_if_interrupted()  # a Ctrl-C that Python dropped (see cli.interrupt) stops the run here
        now = self.clock()
        if step in (1, self.total) or step % self.every == 0 or now - self.last >= self.every_s:
            self.last = now
            self.log.info("step %d/%d loss %.4f", step, self.total, loss)
