"""The preStop hook (``python -m amm_core.prestop``) against real processes: a
``dask scheduler`` subprocess (with ``--preload amm_core.plugin``, or without the
plugin), ``dask worker`` subprocesses named w0.. (one thread each), and the hook run
as a subprocess with the environment dask-kubernetes gives a worker pod
(``DASK_SCHEDULER_ADDRESS``, ``DASK_WORKER_NAME``).

The data on the worker that goes is scattered to it, so nothing could recompute it:
that another worker holds a copy is asked of the scheduler (``who_has``). Worker
status and retirement records are asked of the scheduler too, over RPC.

The tests of transient errors run an in-process scheduler and workers instead, so that
they can break one of the scheduler's handlers (close the hook's connection, or answer
late) while the hook, still a subprocess where it can be, keeps polling.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import dask
import pytest
from distributed import Client, Event, Scheduler, Worker
from distributed.comm import CommClosedError
from distributed.core import Status, rpc
from test_plugin import preloaded_status, scheduler_process, until

import amm_core.prestop as prestop
from amm_core.plugin import MemoryPolicyPlugin
from amm_core.prestop import ENGINE_SLACK, REASON, main
from amm_testing import WORKER_MEMORY
from amm_testing import until as until_true

MB = 2**20

#: No main AMM (its ReduceReplicas would drop the copies the tests look for)
SCHEDULER_ENV = {
    "DASK_DISTRIBUTED__SCHEDULER__ACTIVE_MEMORY_MANAGER__START": "False",
    "DASK_DISTRIBUTED__SCHEDULER__WORK_STEALING": "True",
}
WORKER_ENV = {
    "DASK_DISTRIBUTED__WORKER__MEMORY__TARGET": "False",
    "DASK_DISTRIBUTED__WORKER__MEMORY__SPILL": "False",
    "DASK_DISTRIBUTED__WORKER__MEMORY__TERMINATE": "False",
}


@asynccontextmanager
async def workers(
    tmp_path: Path, addr: str, limits: list[str], env: dict[str, str] | None = None
) -> AsyncIterator[None]:
    """``dask worker`` subprocesses w0, w1.. with these memory limits (no nanny: the
    hook does not care, and start-up is faster); returns once all are registered."""
    procs = []
    for i, limit in enumerate(limits):
        log = open(tmp_path / f"w{i}.log", "wb")
        procs.append(
            subprocess.Popen(
                [
                    str(Path(sys.executable).parent / "dask"),
                    "worker",
                    addr,
                    "--name",
                    f"w{i}",
                    "--nthreads",
                    "1",
                    "--memory-limit",
                    limit,
                    "--no-nanny",
                    "--no-dashboard",
                    "--host",
                    "127.0.0.1",
                ],
                cwd=tmp_path,
                env={**os.environ, **WORKER_ENV, **(env or {})},
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        )
    try:

        async def registered() -> bool:
            for i, p in enumerate(procs):
                assert p.poll() is None, (tmp_path / f"w{i}.log").read_text()
            return len(await identity(addr)) == len(procs)

        await until(registered, "the workers to register")
        yield
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                # a worker running time.sleep waits for its thread: not that long
                p.wait(timeout=2)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


async def identity(addr: str) -> dict[str, dict[str, Any]]:
    """The scheduler's workers by name."""
    async with rpc(addr) as r:
        info = await r.identity(n_workers=-1)
    return {str(w["name"]): {**w, "address": a} for a, w in info["workers"].items()}


async def records(addr: str) -> dict[str, dict[str, Any]]:
    async with rpc(addr) as r:
        return {rec["worker"]: rec for rec in await r.amm_core_retirements()}


async def hook(
    addr: str, name: str, *args: str, timeout: float = 30
) -> tuple[int, str, float]:
    """Run the hook as a kubelet would; its exit code, stderr and seconds taken."""
    env = {**os.environ, "DASK_SCHEDULER_ADDRESS": addr, "DASK_WORKER_NAME": name}
    start = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "amm_core.prestop",
        *args,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), timeout)
    seconds = time.monotonic() - start
    text = err.decode()
    print(text)
    return proc.returncode, text, seconds


def last_line(stderr: str) -> str:
    """The outcome, without the hook's prefix."""
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("amm_core.prestop: "), line
    return line.removeprefix("amm_core.prestop: ")


@asynccontextmanager
async def cluster(
    tmp_path: Path, limits: list[str], *, plugin: bool = True, worker_env=None
) -> AsyncIterator[tuple[str, Client, dict[str, dict[str, Any]]]]:
    preload = ("--preload", "amm_core.plugin") if plugin else ()
    async with AsyncExitStack() as stack:
        addr = await stack.enter_async_context(
            scheduler_process(tmp_path, *preload, env=SCHEDULER_ENV)
        )
        if plugin:
            await preloaded_status(addr)
        await stack.enter_async_context(workers(tmp_path, addr, limits, worker_env))
        c = await stack.enter_async_context(Client(addr, asynchronous=True))
        yield addr, c, await identity(addr)


async def scatter_to(c: Client, address: str, n: int, size: int) -> list:
    data = {f"x-{i}": i.to_bytes(4, "little") * (size // 4) for i in range(n)}
    futures = await c.scatter(data, workers=[address])
    return list(futures.values())


async def holders(c: Client, futures: list) -> dict[str, set[str]]:
    return {k: set(v) for k, v in (await c.who_has(futures)).items()}


async def test_retires_through_the_plugin(tmp_path):
    async with cluster(tmp_path, ["1GB"] * 3) as (addr, c, ws):
        w0 = ws["w0"]["address"]
        futures = await scatter_to(c, w0, 8, 2 * MB)
        assert all(h == {w0} for h in (await holders(c, futures)).values())

        code, err, seconds = await hook(addr, "w0", "--limit", "20")

        assert code == 0
        assert seconds < 20
        assert last_line(err).startswith("done: worker w0 retired, 8 key(s) (16.0 MiB)")
        # every key has a copy on another worker, as the scheduler sees it
        for key, h in (await holders(c, futures)).items():
            assert h - {w0}, key
        rec = (await records(addr))["w0"]
        assert rec["state"] == "done" and rec["requested"] == REASON
        assert rec["keys_moved"] == 8 and rec["drain"] is True and rec["limit"] == 20
        # still there, out of service until its SIGTERM: not removed
        now = await identity(addr)
        assert now["w0"]["status"] == "closing_gracefully"
        assert now["w1"]["status"] == now["w2"]["status"] == "running"

        # Run again (a retried hook, or a worker the operator retired first): the
        # done record is kept as it is, and the hook exits at once
        code, err, _ = await hook(addr, "w0", "--limit", "20")
        assert code == 0 and last_line(err).startswith("done: worker w0 retired, 8 key(s)")
        assert (await records(addr))["w0"]["started"] == rec["started"]


async def test_without_the_plugin_falls_back_to_retire_workers(tmp_path):
    async with cluster(tmp_path, ["1GB"] * 2, plugin=False) as (addr, c, ws):
        # What distributed answers for an op it has no handler for: None, no error
        async with rpc(addr) as r:
            assert await r.amm_core_retire(workers=["w1"], limit=5.0) is None
            assert await r.amm_core_retirements() is None
        w0 = ws["w0"]["address"]
        futures = await scatter_to(c, w0, 4, 2 * MB)

        code, err, seconds = await hook(addr, "w0", "--limit", "20")

        assert code == 0 and seconds < 20
        assert "no amm_core plugin; using retire_workers" in err
        assert last_line(err).startswith("fallback retire_workers: worker w0 retired")
        for key, h in (await holders(c, futures)).items():
            assert h - {w0}, key
        now = await identity(addr)
        assert now["w0"]["status"] == "closing_gracefully"  # remove=False
        assert now["w1"]["status"] == "running"


async def test_unreachable_scheduler_exits_at_once():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, err, seconds = await hook(f"tcp://127.0.0.1:{port}", "w0", "--limit", "60")
    assert code == 0
    assert seconds < 10  # the connect timeout (2 s) and Python's start-up, not the limit
    assert "unreachable" in last_line(err)


async def test_no_room_anywhere_holds_the_pod_until_the_deadline(tmp_path):
    # The others' process memory alone is near their limit: nothing fits (they do
    # not pause themselves, so only the engine's room check refuses them). The pod
    # goes all the same: the worker stays out, and the hook waits its whole budget
    async with cluster(
        tmp_path,
        ["2GB", "150MB", "150MB"],
        worker_env={"DASK_DISTRIBUTED__WORKER__MEMORY__PAUSE": "False"},
    ) as (addr, c, ws):
        w0 = ws["w0"]["address"]
        futures = await scatter_to(c, w0, 1, 64 * MB)

        code, err, seconds = await hook(addr, "w0", "--limit", "3")

        assert code == 0
        # the limit, the engine's slack, Python's start-up on a busy machine
        assert 3 < seconds < 3 + ENGINE_SLACK + 6
        line = last_line(err)
        assert line.startswith("timed out after ") and "still moving" in line
        assert "blocked: " in line and "has room" in line
        assert all(h == {w0} for h in (await holders(c, futures)).values())
        assert (await identity(addr))["w0"]["status"] == "closing_gracefully"


async def test_limit_passes_while_draining(tmp_path):
    async with cluster(tmp_path, ["1GB"] * 2) as (addr, c, ws):
        w0 = ws["w0"]["address"]
        futures = await scatter_to(c, w0, 2, MB)
        running = c.submit(time.sleep, 60, workers=[w0], pure=False)
        async def started() -> bool:
            return bool((await c.processing()).get(w0))

        await until(started, "the task to start on w0")

        # a grace period that Python's start-up on a busy machine cannot eat into
        code, err, seconds = await hook(addr, "w0", "--limit", "2", "--grace", "20")

        assert code == 0
        assert seconds < 2 + ENGINE_SLACK + 8  # the limit, the slack, start-up
        line = last_line(err)
        assert line.startswith("timed out after ") and "still draining" in line
        assert "1 task(s) running); blocked: the limit of 2s passed" in line
        # the pod goes: not put back in service
        assert (await identity(addr))["w0"]["status"] == "closing_gracefully"
        del running, futures


async def test_grace_period_cuts_the_wait_short_without_cancelling(tmp_path):
    async with cluster(tmp_path, ["1GB"] * 2) as (addr, c, ws):
        w0 = ws["w0"]["address"]
        running = c.submit(time.sleep, 60, workers=[w0], pure=False)

        async def started() -> bool:
            return bool((await c.processing()).get(w0))

        await until(started, "the task to start on w0")

        code, err, seconds = await hook(
            addr, "w0", "--limit", "30", "--grace", "5", "--margin", "2"
        )

        assert code == 0
        assert seconds < 5
        assert last_line(err).startswith("timed out after ")
        assert "still draining" in last_line(err)
        # Left to the engine: nothing was cancelled
        assert (await records(addr))["w0"]["state"] == "draining"
        assert (await identity(addr))["w0"]["status"] == "closing_gracefully"
        del running


@pytest.mark.parametrize(
    "argv, environ, says",
    [
        ([], {}, "no scheduler address"),
        ([], {"DASK_SCHEDULER_ADDRESS": "tcp://127.0.0.1:1"}, "no worker name"),
        (["--limit", "soon"], {}, "bad arguments"),
        (["--limit", "0"], {}, "bad arguments: --limit must be a positive"),
        (["--limit", "10", "--grace", "1", "--margin", "2"],
         {"DASK_SCHEDULER_ADDRESS": "tcp://127.0.0.1:1", "DASK_WORKER_NAME": "w"},
         "no time left"),
    ],
)
def test_bad_input_exits_zero_without_trying(argv, environ, says, capsys):
    assert main(argv, environ) == 0
    assert says in capsys.readouterr().err


# --- transient errors (issue 14, case 7) ---------------------------------------
#
# A real in-process scheduler with the plugin and in-process workers, so that the
# test can break a handler on the scheduler: the hook runs as a subprocess (or, to
# shorten its call timeout, on the test's own event loop).


@asynccontextmanager
async def inprocess_cluster(n: int) -> AsyncIterator[tuple[Scheduler, list[Worker], Client]]:
    """Workers w0.. (one thread each), no main AMM, the plugin registered."""
    settings = {
        **WORKER_MEMORY,
        "distributed.scheduler.active-memory-manager.start": False,
        "distributed.scheduler.active-memory-manager.policies": [],
    }
    with dask.config.set(settings):
        async with AsyncExitStack() as stack:
            s = await stack.enter_async_context(Scheduler(dashboard_address=":0", port=0))
            ws = [
                await stack.enter_async_context(
                    Worker(s.address, name=f"w{i}", nthreads=1, memory_limit="4GB")
                )
                for i in range(n)
            ]
            c = await stack.enter_async_context(Client(s.address, asynchronous=True))
            await c.register_plugin(MemoryPolicyPlugin())
            yield s, ws, c


def break_handler(s: Scheduler, op: str, times: int, how: str = "close") -> list[str]:
    """Make the scheduler's handler ``op`` fail its next ``times`` calls after doing
    its work (the answer is lost): ``close`` aborts the caller's connection and
    raises CommClosedError, as a comm broken mid-call does; ``hang`` answers only
    after HANG seconds. Returns the list of failures so far, to wait on."""
    handler = s.handlers[op]
    failures: list[str] = []

    async def breaking(comm: Any, **kwargs: Any) -> Any:
        result = handler(**kwargs)
        if inspect.isawaitable(result):
            result = await result
        if len(failures) >= times:
            return result
        failures.append(how)
        if how == "hang":
            await asyncio.sleep(HANG)
            return result
        comm.abort()
        raise CommClosedError(f"{op}: connection closed by the test")

    s.handlers[op] = breaking
    return failures


#: Seconds a hung handler takes to answer: past the hook's call timeout in the test
HANG = 2.0


def wait_for_event(ev: Event) -> bytes:
    ev.wait()
    return b"x" * MB


async def draining(c: Client, s: Scheduler, w: Worker) -> tuple[Event, Any]:
    """A task running on ``w`` until the returned event is set: w's retirement
    (with drain) stays ``draining`` until then."""
    gate = Event("gate")
    task = c.submit(wait_for_event, gate, workers=[w.address], pure=False)
    await until_true(lambda: s.workers[w.address].processing and w.state.executing_count,
                "the task to start on the retiring worker")
    return gate, task


@pytest.mark.parametrize("op, times", [("amm_core_retirements", 2), ("amm_core_retire", 1)])
async def test_a_connection_closed_mid_retirement_does_not_end_the_wait(op, times):
    async with inprocess_cluster(2) as (s, (w0, w1), c):
        held = await c.scatter([b"k" * MB for _ in range(4)], workers=[w0.address],
                               hash=False)
        gate, task = await draining(c, s, w0)
        broken = break_handler(s, op, times)

        hooked = asyncio.create_task(hook(s.address, "w0", "--limit", "30"))
        await until_true(lambda: len(broken) == times or hooked.done(), f"{op} broken")
        await gate.set()  # the drain can end: the record goes done
        code, err, seconds = await hooked

        assert code == 0
        assert f"{op} failed (CommClosedError: " in err
        assert f"{op} answered after {times} failed attempt(s)" in err
        assert last_line(err).startswith("done: worker w0 retired, 5 key(s)")
        for f in held + [task]:  # each key held elsewhere, as the scheduler sees it
            assert {ws.address for ws in s.tasks[f.key].who_has} - {w0.address}
        assert s.workers[w0.address].status == Status.closing_gracefully


async def test_a_poll_that_times_out_is_tried_again(monkeypatch, capsys):
    monkeypatch.setattr(prestop, "CALL_TIMEOUT", HANG / 4)
    async with inprocess_cluster(2) as (s, (w0, w1), c):
        gate, task = await draining(c, s, w0)
        broken = break_handler(s, "amm_core_retirements", 1, how="hang")

        hooked = asyncio.create_task(
            prestop.retire(s.address, "w0", 30.0, True, time.monotonic() + 30, 2.0)
        )
        await until_true(lambda: broken or hooked.done(), "a poll hung")
        await gate.set()
        outcome = await hooked

        assert outcome.startswith("done: worker w0 retired, 1 key(s)")
        assert "amm_core_retirements failed (TimeoutError" in capsys.readouterr().err


def test_the_timed_out_line_says_what_blocked_the_retirement():
    record = {"state": "moving", "keys_left": 1, "bytes_left": MB, "tasks_running": 0,
              "blocked": "the worker holds actor(s) ['a'], which cannot be moved",
              "reason": REASON}
    line = prestop._timed_out(record, "w0", 12.0)
    assert line.startswith("timed out after 12.0s: retirement of worker w0 still moving")
    assert "; blocked: the worker holds actor(s) ['a']" in line
    # A record without the field (an older plugin), aborted: its reason instead
    older = {k: v for k, v in record.items() if k != "blocked"}
    older.update(state="aborted", reason="the limit of 10s passed")
    assert "; blocked: the limit of 10s passed" in prestop._timed_out(older, "w0", 12.0)
    # Nothing blocks it: nothing said
    assert "blocked" not in prestop._timed_out({**record, "blocked": ""}, "w0", 12.0)
    # aborted is not an outcome while the worker is still there; left is
    assert prestop._outcome(older, "w0") is None
    assert prestop._outcome({**older, "left": True}, "w0") == (
        "worker w0 left the cluster during its retirement (aborted: the limit of 10s "
        "passed)"
    )
