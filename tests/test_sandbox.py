"""The README's first command, small: the sandbox runs both demos end to end (the
AMM's dot product; the busy 6 -> 3 scale-down, deleted from outside and through the
MemoryPolicy), writes the demo cluster's memory report, stays up with --keep for
kubectl, and stops everything it started on Ctrl-C. While it is up,
``dask-memory-operator report`` is run against it as a user would, also with bad
input: an unknown cluster, an unreachable scheduler, a hostile one."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
from test_scheduler_rpc import SCHEDULER_HANDSHAKE, message

MiB = 2**20


def test_sandbox_runs_the_demos_writes_the_report_keeps_the_stack_and_cleans_up(tmp_path):
    state = tmp_path / "sandbox"
    log = tmp_path / "sandbox.out"
    report = tmp_path / "report.html"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dask_memory_operator.cli", "sandbox", "--keep", "--demo", "all",
             "--size", "2000", "--chunk", "500", "--report", str(report), "--state-dir", str(state)],
            stdout=out, stderr=subprocess.STDOUT, text=True,
        )
    try:
        deadline = time.monotonic() + 900
        while "Press Ctrl-C" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        text = log.read_text()
        check_amm_demo(text)
        lost_from_outside = check_scale_down_demo(text)
        assert re.search(r"analytics\s+1\s+1\s+True\s+Applied", text)
        assert "cluster demo: Applied, plugin live" in text
        kubeconfig = re.search(r"export KUBECONFIG=(\S+)", text)[1]

        # the report, as the sandbox wrote it
        assert re.search(rf"memory report of DaskCluster demo .*: {re.escape(str(report))}$", text, re.M), text
        check_report(report.read_text(), lost_from_outside)

        # the stack is up for kubectl and for the report, as printed
        table = subprocess.run(["kubectl", "--kubeconfig", kubeconfig, "get", "mempol"],
                               capture_output=True, text=True, check=True).stdout
        assert re.search(r"analytics\s+1\s+1\s+True", table)
        check_report_command(kubeconfig, tmp_path)
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0, log.read_text()
    assert "stopped" in log.read_text()
    leftovers = [p for p in psutil.process_iter() if _environ(p).get("DMO_STACK") == str(state.resolve())]
    assert leftovers == []


def check_amm_demo(text: str) -> None:
    assert "the operator stopped the scheduler's AMM" in text
    match = re.search(r"peak_managed_amm_on_gib=([\d.]+) peak_managed_amm_off_gib=([\d.]+)", text)
    assert match and float(match[1]) > 0 and float(match[2]) > 0, text
    counters = re.search(r"cycles=(\d+) dropped=(\d+) copied=(\d+)", text)
    assert counters and int(counters[1]) > 0, text  # from the scheduler, not None


def check_scale_down_demo(text: str) -> int:
    """The table's numbers (from the scheduler's task ledger): deleted from outside
    loses keys and re-runs them; through the MemoryPolicy nothing. The savings the
    scheduler counted say the same. Returns the keys lost from outside."""
    runs = {m["how"]: {k: float(m[k]) for k in ("keys_lost", "rerun", "cut_short", "wall_s")}
            for m in re.finditer(r"scale_down how=(?P<how>\S+) keys_lost=(?P<keys_lost>\d+) rerun=(?P<rerun>\d+) "
                                 r"cut_short=(?P<cut_short>\d+) wall_s=(?P<wall_s>[\d.]+)", text)}
    assert set(runs) == {"deleted_from_outside", "MemoryPolicy"}, text
    assert runs["deleted_from_outside"]["keys_lost"] > 0 and runs["deleted_from_outside"]["rerun"] > 0
    assert runs["MemoryPolicy"]["keys_lost"] == runs["MemoryPolicy"]["rerun"] == 0
    assert runs["MemoryPolicy"]["cut_short"] == 0  # drained: its running tasks finished
    assert "A busy scale-down, 6 → 3 workers" in text and "Savings on DaskCluster demo since its scheduler started" in text
    rescued = re.search(r"│ Rescued\s+│ (\d+) keys", text)
    lost = re.search(r"│ Lost\s+│ (\d+) keys", text)
    assert rescued and int(rescued[1]) > 0, text  # moved off the three retired workers
    assert lost and int(lost[1]) > 0, text  # with the three deleted ones
    return int(runs["deleted_from_outside"]["keys_lost"])


def check_report(page: str, lost_from_outside: int) -> None:
    """The written page's parts: the memory series and the workers, the markers of
    both scale-downs (losses, the operator's retirements), the savings table."""
    assert "<script" not in page.lower()
    for series in ("managed", "unmanaged", "spilled", "workers"):
        assert f'id="demo-{series}"' in page, series
    workers = re.search(r'<g id="demo-workers">\s*<path d="([^"]+)"', page)
    assert workers and len(re.findall(r"[ML]", workers[1])) > 20  # sampled every 2 s for minutes
    for kind in ("lost", "scale-down", "retirement", "scale-up", "policy"):
        assert re.search(rf'id="demo-marker-\d+-{kind}"', page), kind
    assert 1 <= page.count("worker lost with data</td>") <= 3  # deleted workers that held keys alone
    assert page.count("WorkerRetired: Worker demo-default-worker-") == 3
    table = page[page.index('class="savings"'):]
    table = table[:table.index("</table>")]
    lost = re.search(r"<th>Lost</th><td>(\d+) keys", table)
    assert lost and int(lost[1]) > 0 and "killed:" in table
    assert re.search(r"<th>Rescued</th><td>[1-9]\d* keys", table)


def check_report_command(kubeconfig: str, tmp_path: Path) -> None:
    """``report`` against the sandbox: every cluster of a policy, with PNGs; and bad
    input, which gives one line on stderr and exit 1, never a traceback."""
    done = report_command(kubeconfig, "default", "--policy", "analytics", "--png", "--scheduler-access", "pod-ip",
                          "-o", str(tmp_path / "p.html"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(tmp_path / "p.html"), str(tmp_path / "p-demo.png")]  # one cluster
    assert (tmp_path / "p-demo.png").read_bytes()[:4] == b"\x89PNG"
    assert "MemoryPolicy default/analytics" in (tmp_path / "p.html").read_text()

    def fails(*args: str) -> str:
        done = report_command(kubeconfig, *args, "-o", str(tmp_path / "bad.html"))
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.startswith("dask-memory-operator report: error: ") and not done.stdout
        return done.stderr

    assert "DaskCluster default/nope not found" in fails("default/nope", "--scheduler-access", "pod-ip")
    assert "MemoryPolicy default/nope not found" in fails("default", "--policy", "nope")
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    assert f"nothing listens at tcp://127.0.0.1:{port}" in fails("default/demo", "--scheduler-address",
                                                                 f"tcp://127.0.0.1:{port}")
    with hostile_scheduler() as address:
        said = fails("default/demo", "--scheduler-address", address)
    assert "a message of 67108864 bytes" in said and "refused" in said
    assert not (tmp_path / "bad.html").exists()


def report_command(kubeconfig: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dask_memory_operator.cli", "report", *args],
                          env={**os.environ, "KUBECONFIG": kubeconfig}, capture_output=True, text=True,
                          timeout=120)


class hostile_scheduler:
    """A scheduler that answers the handshake, then announces a reply of 64 MiB (a
    history it would stream forever); serves one connection from a thread."""

    def __enter__(self) -> str:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        return f"tcp://127.0.0.1:{self.server.getsockname()[1]}"

    def _serve(self) -> None:
        self.server.settimeout(60)
        conn, _ = self.server.accept()
        with conn:
            conn.sendall(message(SCHEDULER_HANDSHAKE))
            conn.sendall((16).to_bytes(8, sys.byteorder) + (1).to_bytes(8, sys.byteorder)
                         + (64 * MiB).to_bytes(8, sys.byteorder))
            conn.settimeout(30)
            while conn.recv(65536):  # until the client hangs up
                pass

    def __exit__(self, *exc: object) -> None:
        self.server.close()
        self.thread.join(timeout=30)


def _environ(proc: psutil.Process) -> dict[str, str]:
    try:
        return proc.environ()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return {}
