"""The preStop hook (``python -m amm_core.prestop``) against real processes: a
``dask scheduler`` subprocess (with ``--preload amm_core.plugin``, or without the
plugin), ``dask worker`` subprocesses named w0.. (one thread each), and the hook run
as a subprocess with the environment dask-kubernetes gives a worker pod
(``DASK_SCHEDULER_ADDRESS``, ``DASK_WORKER_NAME``).

The data on the worker that goes is scattered to it, so nothing could recompute it:
that another worker holds a copy is asked of the scheduler (``who_has``). Worker
status and retirement records are asked of the scheduler too, over RPC.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from distributed import Client
from distributed.core import rpc
from test_plugin import preloaded_status, scheduler_process, until

from amm_core.prestop import REASON, main

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
    assert seconds < 5
    assert "unreachable" in last_line(err)


async def test_no_room_anywhere_aborts_and_exits(tmp_path):
    # The others' process memory alone is near their limit: nothing fits (they do
    # not pause themselves, so only the engine's room check refuses them)
    async with cluster(
        tmp_path,
        ["2GB", "150MB", "150MB"],
        worker_env={"DASK_DISTRIBUTED__WORKER__MEMORY__PAUSE": "False"},
    ) as (addr, c, ws):
        w0 = ws["w0"]["address"]
        futures = await scatter_to(c, w0, 1, 64 * MB)

        code, err, seconds = await hook(addr, "w0", "--limit", "10")

        assert code == 0 and seconds < 10
        assert last_line(err).startswith("aborted: retirement of worker w0: ")
        assert "has room" in last_line(err)
        assert all(h == {w0} for h in (await holders(c, futures)).values())
        assert (await identity(addr))["w0"]["status"] == "running"  # put back


async def test_limit_passes_while_draining(tmp_path):
    async with cluster(tmp_path, ["1GB"] * 2) as (addr, c, ws):
        w0 = ws["w0"]["address"]
        futures = await scatter_to(c, w0, 2, MB)
        running = c.submit(time.sleep, 60, workers=[w0], pure=False)
        async def started() -> bool:
            return bool((await c.processing()).get(w0))

        await until(started, "the task to start on w0")

        code, err, seconds = await hook(addr, "w0", "--limit", "2")

        assert code == 0
        assert seconds < 2 + 1 + 4  # the limit, the engine's slack, Python start-up
        line = last_line(err)
        assert line.startswith("aborted: retirement of worker w0: the limit of 2s passed")
        assert "1 task(s) running" in line
        assert (await identity(addr))["w0"]["status"] == "running"
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
