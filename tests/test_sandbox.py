"""The README's first command, small: the sandbox runs the demo end to end and stops
everything it started."""

from __future__ import annotations

import re
import subprocess
import sys

import psutil


def test_sandbox_runs_the_demo_and_cleans_up(tmp_path):
    state = tmp_path / "sandbox"
    result = subprocess.run(
        [sys.executable, "-m", "dask_memory_operator.cli", "sandbox",
         "--size", "2000", "--chunk", "500", "--state-dir", str(state)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "the operator stopped the scheduler's AMM" in out
    match = re.search(r"peak_managed_amm_on_gib=([\d.]+) peak_managed_amm_off_gib=([\d.]+)", out)
    assert match and float(match[1]) > 0 and float(match[2]) > 0
    assert re.search(r"analytics\s+1\s+1\s+True\s+Applied", out)
    assert "cluster demo: Applied, plugin live" in out
    leftovers = [p for p in psutil.process_iter()
                 if _environ(p).get("DMO_STACK") == str(state.resolve())]
    assert leftovers == []


def _environ(proc: psutil.Process) -> dict[str, str]:
    try:
        return proc.environ()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return {}
