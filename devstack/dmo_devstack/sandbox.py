"""``dask-memory-operator sandbox``: the whole loop on one machine, no cluster needed.

It starts the local stack (an emulated Kubernetes API, the real dask-kubernetes
operator, a process kubelet that turns Deployments into local Dask processes) and
this operator, applies ``examples/`` with kubectl, and runs two demos on the
resulting DaskCluster (``--demo amm|scale-down|all``):

- **amm**: the AMM announcement's dot product twice, once with the Active Memory
  Manager as the MemoryPolicy sets it, once with the policy switched to
  ``enabled: false``; the peak cluster memory of both runs;
- **scale-down**: a busy 6 -> 3 scale-down twice, Deployments deleted from outside,
  then through the MemoryPolicy (:mod:`.sandbox_scaledown`); keys lost, tasks re-run
  and wall time of both.

It prints the policy's status, writes the memory report of the demo cluster
(``dask-memory-operator report``, ``--report PATH``) and prints its path, then stops
everything (``--keep`` leaves it up for kubectl).
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from distributed import Client
from distributed.diagnostics import MemorySampler
from rich.console import Console
from rich.table import Table

from dask_memory_operator import manifests
from dmo_devstack.probes import amm_counters, amm_state
from dmo_devstack.sandbox_scaledown import Demo, scale_down_demo
from dmo_devstack.stack import LocalStack

EXAMPLES = Path(str(manifests.EXAMPLES))
CLUSTER = "demo"
POLICY = "analytics"
NAMESPACE = "default"
WORKERS = 4
GiB = 2**30


def operator_argv() -> list[str]:
    """This operator as the sandbox runs it: pod IPs are local addresses."""
    return [
        sys.executable, "-m", "dask_memory_operator.cli", "run",
        "--scheduler-access", "pod-ip", "--resync-interval", "2",
    ]


def policy_status(stack: LocalStack) -> dict[str, Any]:
    out = stack.kubectl("get", "memorypolicy", POLICY, "-n", NAMESPACE, "-o", "json")
    return json.loads(out.stdout).get("status") or {}


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or () if c["type"] == type_), {})


def wait_policy_applied(stack: LocalStack, generation: int, timeout: float = 120) -> dict[str, Any]:
    def applied() -> dict[str, Any] | None:
        status = policy_status(stack)
        ready = condition(status, "Ready")
        if status.get("observedGeneration") == generation and ready.get("status") == "True":
            return status
        return None

    return stack.wait_for(applied, timeout, f"MemoryPolicy {POLICY} generation {generation} Ready")


def run_dot_product(client: Any, size: int, chunk: int, label: str, sampler: Any) -> float:
    import dask.array as da

    a = da.random.random((size, size), chunks=(chunk, chunk))
    b = (a @ a.T).sum()
    start = time.perf_counter()
    with sampler.sample(f"{label} (managed)", client=client, measure="managed", interval=0.1), \
            sampler.sample(f"{label} (process)", client=client, measure="process", interval=0.1):
        b.compute()
    return time.perf_counter() - start


def sandbox(args: argparse.Namespace) -> int:
    console = Console(soft_wrap=True)  # long paths and kubectl lines stay whole
    stack = LocalStack(args.state_dir)
    try:
        with console.status("Starting the emulated API, dask-kubernetes and the kubelet..."):
            stack.start()
        _demo(console, stack, args)
    finally:
        with console.status("Stopping everything..."):
            stack.stop()
    console.print("[green]✓[/] stopped")
    return 0


def _demo(console: Console, stack: LocalStack, args: argparse.Namespace) -> None:
    console.print(f"[green]✓[/] local Kubernetes API at {stack.api_url}")
    stack.start_process("dask-memory-operator", operator_argv())
    console.print("[green]✓[/] dask-memory-operator running")

    with console.status(f"kubectl apply -f {EXAMPLES}/ ..."):
        stack.kubectl("apply", "-n", NAMESPACE, "-f", str(EXAMPLES / "daskcluster.yaml"))
        stack.kubectl("apply", "-n", NAMESPACE, "-f", str(EXAMPLES / "memorypolicy.yaml"))
    console.print("[green]✓[/] applied examples/daskcluster.yaml and examples/memorypolicy.yaml")

    with console.status(f"Waiting for DaskCluster {CLUSTER}: scheduler and {WORKERS} workers..."):
        address = stack.wait_for(
            lambda: _try_address(stack), 120, f"the scheduler Service of {CLUSTER}"
        )
        client = stack.wait_for(lambda: _try_client(address), 120, f"a connection to {address}", interval=1)
        client.wait_for_workers(WORKERS, timeout=180)
    console.print(f"[green]✓[/] DaskCluster {CLUSTER} up at {address} with {WORKERS} workers")

    with console.status(f"Waiting for MemoryPolicy {POLICY} to be applied..."):
        wait_policy_applied(stack, generation=1)
        # its first cycle before the run: a small run may end within one AMM interval
        stack.wait_for(lambda: client.run_on_scheduler(amm_counters)["cycles"] > 0, 60,
                       "the first cycle of the scheduler's AMM")
    console.print(f"[green]✓[/] MemoryPolicy {POLICY} applied: "
                  f"{client.run_on_scheduler(amm_state)}")

    if args.demo in ("amm", "all"):
        _amm_demo(console, stack, client, args)
    if args.demo in ("scale-down", "all"):
        scale_down_demo(console, Demo(stack, client, NAMESPACE, CLUSTER, POLICY, rows=args.rows))
    console.print(stack.kubectl("get", "memorypolicy", "-n", NAMESPACE).stdout)
    _print_policy_status(console, policy_status(stack), client.run_on_scheduler(amm_counters))
    client.close()
    _write_report(console, stack, Path(args.report))

    if args.keep:
        console.print(f"\nThe stack stays up. In another shell:\n"
                      f"  export KUBECONFIG={stack.kubeconfig}\n"
                      f"  kubectl get daskclusters,memorypolicies,pods\n"
                      f"  dask-memory-operator report {NAMESPACE}/{CLUSTER} --scheduler-access pod-ip\n"
                      f"Press Ctrl-C to stop everything.")
        _wait_for_interrupt()


def _amm_demo(console: Console, stack: LocalStack, client: Client, args: argparse.Namespace) -> None:
    """The dot product with the AMM on, then off (the policy patched); the policy is
    left as it was."""
    sampler = MemorySampler()
    timings = {}
    with console.status(f"Dot product {args.size}² with the AMM as the policy sets it..."):
        timings["AMM on"] = run_dot_product(client, args.size, args.chunk, "AMM on", sampler)
    console.print(f"[green]✓[/] AMM on: {timings['AMM on']:.1f}s")

    with console.status("kubectl patch: activeMemoryManager.enabled=false ..."):
        stack.kubectl("patch", "memorypolicy", POLICY, "-n", NAMESPACE, "--type=merge",
                      "-p", '{"spec":{"activeMemoryManager":{"enabled":false}}}')
        wait_policy_applied(stack, generation=2)
        stack.wait_for(lambda: not client.run_on_scheduler(amm_state)["running"], 30,
                       "the scheduler's AMM to stop")
    console.print("[green]✓[/] the operator stopped the scheduler's AMM")

    with console.status(f"Dot product {args.size}² with the AMM off..."):
        timings["AMM off"] = run_dot_product(client, args.size, args.chunk, "AMM off", sampler)
    console.print(f"[green]✓[/] AMM off: {timings['AMM off']:.1f}s")

    _print_results(console, sampler, timings)

    with console.status("kubectl patch: activeMemoryManager.enabled=true ..."):
        stack.kubectl("patch", "memorypolicy", POLICY, "-n", NAMESPACE, "--type=merge",
                      "-p", '{"spec":{"activeMemoryManager":{"enabled":true}}}')
        wait_policy_applied(stack, generation=3)


def _write_report(console: Console, stack: LocalStack, path: Path) -> None:
    """``dask-memory-operator report`` of the demo cluster, run as a user would (the
    stack's kubeconfig; pod IPs are local addresses here)."""
    with console.status(f"dask-memory-operator report {NAMESPACE}/{CLUSTER} ..."):
        done = subprocess.run(
            [sys.executable, "-m", "dask_memory_operator.cli", "report", f"{NAMESPACE}/{CLUSTER}",
             "--scheduler-access", "pod-ip", "-o", str(path)],
            env=stack.process_env(), capture_output=True, text=True, timeout=300)
    if done.returncode:
        console.print(f"[red]✗[/] the memory report failed: {done.stderr.strip()}")
        return
    console.print(f"[green]✓[/] memory report of DaskCluster {CLUSTER} (memory over time, what the "
                  f"operator did, what it saved): {done.stdout.strip()}")


def _try_client(address: str) -> Client | None:
    """A client of the scheduler, once it answers: its Service's proxy accepts a
    connection, and closes it, while the scheduler is still starting."""
    try:
        return Client(address, timeout="10s")
    except OSError:  # CommClosedError, and distributed's connect timeout
        return None


def _try_address(stack: LocalStack) -> str | None:
    try:
        return stack.scheduler_address(NAMESPACE, CLUSTER)
    except LookupError:
        return None


def _print_results(console: Console, sampler: Any, timings: dict[str, float]) -> None:
    peaks = sampler.to_pandas(align=True).max() / GiB
    table = Table(title=f"Peak cluster memory, {WORKERS} workers")
    table.add_column("run")
    table.add_column("managed GiB", justify="right")
    table.add_column("process GiB", justify="right")
    table.add_column("wall s", justify="right")
    for label, seconds in timings.items():
        table.add_row(label, f"{peaks[f'{label} (managed)']:.2f}",
                      f"{peaks[f'{label} (process)']:.2f}", f"{seconds:.1f}")
    console.print(table)
    on, off = peaks["AMM on (managed)"], peaks["AMM off (managed)"]
    console.print(f"peak_managed_amm_on_gib={on:.3f} peak_managed_amm_off_gib={off:.3f} "
                  f"ratio_on_vs_off={on / off:.3f}")


def _print_policy_status(console: Console, status: dict[str, Any], counters: dict[str, int]) -> None:
    """The policy's status, and the AMM's counters as the scheduler's plugin has them
    (the status leaves live counters to metrics)."""
    for c in status.get("conditions") or ():
        console.print(f"  {c['type']}={c['status']} ({c.get('reason', '')}) {c.get('message', '')}")
    for entry in status.get("clusters") or ():
        amm = entry.get("amm") or {}
        console.print(
            f"  cluster {entry['name']}: {entry['state']}, plugin {entry.get('pluginSource')}, "
            f"AMM running={amm.get('running')} cycles={counters['cycles']} "
            f"dropped={counters['replicas_dropped']} copied={counters['replicas_copied']}"
        )


def _wait_for_interrupt() -> None:
    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    # Explicitly: a shell starts background jobs with SIGINT ignored.
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        while True:
            signal.pause()
    except KeyboardInterrupt:
        pass
