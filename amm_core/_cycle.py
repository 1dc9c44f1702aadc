"""A periodic callback of the plugin on the scheduler's event loop.

Kept among the scheduler's own ``periodic_callbacks``, so that it stops with the
scheduler; started and stopped by name, so that starting twice runs it once."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from distributed.utils import log_errors
from tornado.ioloop import PeriodicCallback

if TYPE_CHECKING:
    from distributed import Scheduler


class Cycle:
    """``body`` every ``interval`` seconds while started."""

    scheduler: Scheduler
    #: What a cycle does
    body: Callable[[], object]
    #: Seconds between cycles
    interval: float
    #: Its key in ``Scheduler.periodic_callbacks``
    name: str

    def __init__(self, scheduler: Scheduler, body: Callable[[], object], interval: float, name: str):
        self.scheduler = scheduler
        self.body = body
        self.interval = interval
        self.name = f"{name}-{id(self)}"

    @property
    def running(self) -> bool:
        return self.name in self.scheduler.periodic_callbacks

    def start(self) -> None:
        if self.running:
            return
        # run_once looked up at each call (tests count cycles by wrapping it)
        pc = PeriodicCallback(lambda: self.run_once(), self.interval * 1000)
        self.scheduler.periodic_callbacks[self.name] = pc
        pc.start()

    def stop(self) -> None:
        pc = self.scheduler.periodic_callbacks.pop(self.name, None)
        if pc is not None:
            pc.stop()

    @log_errors
    def run_once(self) -> None:
        self.body()
