"""The README's first command, small: the sandbox runs the demo end to end, stays up
with --keep for kubectl, and stops everything it started on Ctrl-C."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import psutil


def test_sandbox_runs_the_demo_keeps_the_stack_and_cleans_up(tmp_path):
    state = tmp_path / "sandbox"
    log = tmp_path / "sandbox.out"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dask_memory_operator.cli", "sandbox", "--keep",
             "--size", "2000", "--chunk", "500", "--state-dir", str(state)],
            stdout=out, stderr=subprocess.STDOUT, text=True,
        )
    try:
        deadline = time.monotonic() + 600
        while "Press Ctrl-C" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        text = log.read_text()
        assert "the operator stopped the scheduler's AMM" in text
        match = re.search(r"peak_managed_amm_on_gib=([\d.]+) peak_managed_amm_off_gib=([\d.]+)", text)
        assert match and float(match[1]) > 0 and float(match[2]) > 0, text
        assert re.search(r"analytics\s+1\s+1\s+True\s+Applied", text)
        assert "cluster demo: Applied, plugin live" in text
        counters = re.search(r"cycles=(\d+) dropped=(\d+) copied=(\d+)", text)
        assert counters and int(counters[1]) > 0, text  # from the scheduler, not None
        kubeconfig = re.search(r"export KUBECONFIG=(\S+)", text)[1]

        # the stack is up for kubectl, as printed
        table = subprocess.run(["kubectl", "--kubeconfig", kubeconfig, "get", "mempol"],
                               capture_output=True, text=True, check=True).stdout
        assert re.search(r"analytics\s+1\s+1\s+True", table)
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0, log.read_text()
    assert "stopped" in log.read_text()
    leftovers = [p for p in psutil.process_iter() if _environ(p).get("DMO_STACK") == str(state.resolve())]
    assert leftovers == []


def _environ(proc: psutil.Process) -> dict[str, str]:
    try:
        return proc.environ()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return {}
