"""The hostile tenant's own scheduler preload, for benchmarks/tenants.py.

A tenant controls its DaskCluster's scheduler: this file is what it preloads after
amm_core's plugin (``dask scheduler --preload amm_core.plugin --preload <this file>``),
and it replaces the plugin's handlers that the operator calls:

- ``amm_core_status`` / ``amm_core_retirements``: the plugin's real status, with
  RECORDS retirement records tagged as the operator's own (half ``aborted``, half
  ``draining`` by a worker that ``left``), re-started on every call, so that each
  pass sees them all as new transitions (an Event flood if nothing caps it);
- every other handler the operator calls (apply, restore, forget_retirement: so it
  is ignored, scaling, candidates, retire, cancel): a reply of about 4 MiB,
  alternately a distributed error reply with a 4 MiB ``exception_text`` and a map of
  4 MiB of long keys that the operator's strict reader refuses (a placeholder key
  last).

``calls`` of the plugin counts the calls by handler (read by the benchmark).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin

NAME = "tenants-hostile"
RECORDS = 1000
#: Under the operator's 4 MiB bound on a whole message, so that it is read
ERROR_BYTES = 4 * 2**20 - 64 * 2**10
#: The prefix of the "requested" reason of the operator's own retirements
TAG = "dask-memory-operator"
FAILING = ("amm_core_apply", "amm_core_restore", "amm_core_retire", "amm_core_cancel_retirement",
           "amm_core_forget_retirement", "amm_core_retirement_candidates", "amm_core_scaling")


def error_reply(n: int) -> dict[str, Any]:
    if n % 2:
        return {"status": "error", "exception": None, "traceback": None, "traceback_text": "",
                "exception_text": "ValueError('" + "x" * ERROR_BYTES + "')"}
    keys = {f"{i:06d}" + "k" * 1018: i for i in range(ERROR_BYTES // 1030)}
    return {"status": "error", **keys, "__Pickled__": 0}


def records() -> list[dict[str, Any]]:
    now = time.time()
    return [{"worker": f"ghost-{i:04d}", "address": f"tcp://10.9.{i // 250}.{i % 250}:9000",
             "state": "aborted" if i % 2 else "draining", "left": not i % 2,
             "reason": "refused: " + "r" * 500, "requested": f"{TAG} adaptive", "blocked": "",
             "keys_left": 1, "bytes_left": 1, "tasks_running": 0, "keys_moved": 0, "bytes_moved": 0,
             "wasted_tasks": 0, "keys_lost": i, "bytes_lost": i, "started": now, "seconds": 1.0,
             "limit": 600.0, "drain": True, "rejoined": 0, "keep_out": True, "leaving": False}
            for i in range(RECORDS)]


class Hostile(SchedulerPlugin):
    name = NAME

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    async def start(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.real_status = scheduler.handlers.get("amm_core_status")
        self.override()
        # amm_core's plugin sets its handlers in its own start(): again, later
        asyncio.get_running_loop().call_later(1.0, self.override)

    def override(self) -> None:
        handlers = self.scheduler.handlers
        if handlers.get("amm_core_status") not in (None, self.status):
            self.real_status = handlers["amm_core_status"]
        handlers["amm_core_status"] = self.status
        handlers["amm_core_retirements"] = self.retirements
        for op in FAILING:
            handlers[op] = self.failing(op)

    def status(self, **_: Any) -> Any:
        self.calls["amm_core_status"] += 1
        status = self.real_status() if self.real_status else {}
        return {**status, "retirements": records()}

    def retirements(self, **_: Any) -> Any:
        self.calls["amm_core_retirements"] += 1
        return records()

    def failing(self, op: str) -> Any:
        def handler(*_: Any, **__: Any) -> Any:
            self.calls[op] += 1
            return error_reply(self.calls[op])
        return handler


def dask_setup(scheduler: Any) -> None:
    scheduler.add_plugin(Hostile(), name=NAME)
