"""What the scheduler plugin answers to ``amm_core_status`` (and, after a change, to
``amm_core_apply`` and ``amm_core_restore``): which code answers, what AMM is in
force and what it did, what every policy reports about itself, and the retirements.

The operator asks at every scaling pass (every 0.5-1 s while it scales a cluster),
so the answer walks workers and policies, never keys.

Message shape (plain data)::

    status = {
        "plugin_version": 1, "amm_core_version": str | None,
        "amm_core_digest": str,          # amm_core.source_digest(): the code it runs
        "amm_core_path": str,            # where the scheduler imported amm_core from
        "distributed_version": str,
        "source": "preload" | "live",
        "baseline_notes": [str, ...],    # what of the scheduler's own AMM config
                                         # was not taken as written
        "error": str | None,             # why the plugin is inert (no AMM); then
                                         # "amm" is None, "owner" None, "in_force"
                                         # False, the lists empty
        "owner": owner | None,           # None: the scheduler's own configuration
        "in_force": bool,                # the AMM is exactly what was last applied
        "amm": None | {
            "running": bool, "interval": seconds, "measure": str,
            "policies": [{"class": str, "kwargs": dict | None,   # configured
                          "role": "configured" | "retirement" | "foreign"}, ...],
                                         # ones first, in config order
            "cycles": int, "replicas_copied": int, "replicas_dropped": int,
            "memory_bytes": int,         # cluster memory by the measure in force
            "retiring_workers": [address, ...],
            "drops_refused": int,        # drops that would have left a key with no
                                         # copy on a worker in service
                                         # (amm_core.departures)
        },
        "workers": int,
        "policy_reports": [policy.report(), ...],
        "replace": [entry, ...],         # report()["replace"] of all policies
        "retirements": [retirement, ...],   # amm_core.retirement (not when inert)
        "savings": counters,             # amm_core.savings: Savings.counters() (not
                                         # when inert): its "seq" grows when a worker
                                         # leaves, so the operator reads
                                         # amm_core_savings' departures only then
    }
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import distributed
from distributed.active_memory_manager import ActiveMemoryManagerPolicy, RetireWorker

import amm_core
from amm_core.config import dotted_name, is_plain

if TYPE_CHECKING:
    from amm_core.plugin import MemoryPolicyPlugin

logger = logging.getLogger(__name__)

#: Version of the message shapes of every handler; bump on an incompatible change.
PLUGIN_VERSION = 1


def identity(plugin: MemoryPolicyPlugin) -> dict[str, Any]:
    """The part of the status that tells which plugin and code answer."""
    return {
        "plugin_version": PLUGIN_VERSION,
        "amm_core_version": getattr(amm_core, "__version__", None),
        "amm_core_digest": amm_core.source_digest(),
        "amm_core_path": os.path.dirname(amm_core.__file__),
        "distributed_version": distributed.__version__,
        "source": plugin.source,
        "baseline_notes": list(plugin.baseline_notes),
    }


def status(plugin: MemoryPolicyPlugin) -> dict[str, Any]:
    """The answer to ``amm_core_status``."""
    control = plugin.control
    if plugin.unavailable is not None or control is None:
        return {
            **identity(plugin),
            "error": plugin.unavailable,
            "owner": None,
            "in_force": False,
            "amm": None,
            "workers": len(plugin.scheduler.workers),
            "policy_reports": [],
            "replace": [],
        }
    amm = control.amm
    ours = [
        (p, path, kwargs)
        for p, path, kwargs in control.configured
        if p is not None and p in amm.policies
    ]
    ours_ids = {id(p) for p, _, _ in ours}
    others = sorted(
        (p for p in amm.policies if id(p) not in ours_ids),
        key=lambda p: (dotted_name(type(p)), repr(p)),
    )
    policies = [
        {"class": path, "kwargs": kwargs, "role": "configured"} for _, path, kwargs in ours
    ]
    for p in others:
        if isinstance(p, RetireWorker):
            policies.append(
                {
                    "class": dotted_name(type(p)),
                    "kwargs": {"address": p.address},
                    "role": "retirement",
                }
            )
        else:
            # Added by someone else (e.g. add_policy from a client): arguments unknown
            policies.append({"class": dotted_name(type(p)), "kwargs": None, "role": "foreign"})

    # In the order of "policies", then retirements handed over to ad-hoc AMMs
    in_order = [p for p, _, _ in ours] + others
    in_order += [p for side in control.retirement_amms for p in side.policies]
    reports = [r for r in map(_report, in_order) if r is not None]
    retiring = sorted(
        p.address for p in control.all_policies() if isinstance(p, RetireWorker)
    )
    # Workers that policies (amm_core.retire_paused) want replaced by whoever runs
    # the cluster
    replace = [entry for r in reports for entry in r.get("replace", ())]
    scheduler = plugin.scheduler
    return {
        **identity(plugin),
        "error": None,
        "owner": control.owner,
        "in_force": control.in_force(control.applied),
        "amm": {
            "running": amm.running,
            "interval": amm.interval,
            "measure": amm.measure,
            "policies": policies,
            "cycles": control.cycles,
            "replicas_copied": control.replicas_copied,
            "replicas_dropped": control.replicas_dropped,
            "memory_bytes": sum(
                # dict.values: the SortedDict iterates its own views in Python
                getattr(ws.memory, amm.measure) for ws in dict.values(scheduler.workers)
            ),
            "retiring_workers": retiring,
            "drops_refused": plugin.retirement.departures.drops_refused,
        },
        "workers": len(scheduler.workers),
        "policy_reports": reports,
        "replace": replace,
        # Looked up at each call: tests put another reports() in its place
        "retirements": plugin.retirement.reports(),
        "savings": plugin.savings.counters(control.replicas_dropped, control.bytes_dropped),
    }


def _report(policy: ActiveMemoryManagerPolicy) -> dict[str, Any] | None:
    """``policy.report()`` if it has one; one faulty policy must not blind the
    operator to all the others: the failure is reported in its place and logged with
    its traceback."""
    report = getattr(policy, "report", None)
    if not callable(report):
        return None
    try:
        out = report()
    except Exception as e:
        logger.exception("report() of AMM policy %r failed", policy)
        return {"class": type(policy).__name__, "error": f"{type(e).__name__}: {e}"}
    if not isinstance(out, dict) or not is_plain(out):
        logger.error("report() of AMM policy %r is not plain data: %r", policy, out)
        return {"class": type(policy).__name__, "error": "report() is not plain data"}
    return out
