"""What the admission webhook changes in a pod of a governed cluster: pure functions
from the pod and its governing policy to the pod's new containers.

- A **scheduler** pod gets the policy's AMM settings as dask config from its first
  second: environment variables in distributed's own form
  (``DASK_DISTRIBUTED__SCHEDULER__ACTIVE_MEMORY_MANAGER__*``, values that dask's
  config parses with ``ast.literal_eval``), and, when the cluster says its image can
  import amm_core (the annotation :data:`PRELOAD_ANNOTATION`), the plugin preloaded.
  The live install stays the fallback for images without it.
- A **worker** pod gets a ``preStop`` exec hook that retires the worker through its
  scheduler (:mod:`amm_core.prestop`) within the policy's retirement time limit, and a
  ``terminationGracePeriodSeconds`` that covers the limit. The hook's source is put
  in the pod as ``python -c`` (the module needs only the standard library and
  distributed), so the worker image needs nothing of this project.

The policy's AMM variables replace the pod's own (the policy governs the scheduler: a
live apply would override them anyway, a second later). A pod that already preloads
something else keeps its preload list; the plugin is then installed live.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import amm_core.prestop

from dask_memory_operator.api.memorypolicy import GROUP, AMMConfig
from dask_memory_operator.api.scaling import RetirementSpec

#: On a DaskCluster (or the pod): "true" when the scheduler image can import amm_core
PRELOAD_ANNOTATION = f"{GROUP}/preload-plugin"
_PREFIX = "DASK_DISTRIBUTED__SCHEDULER__ACTIVE_MEMORY_MANAGER__"
PRELOAD_ENV = "DASK_DISTRIBUTED__SCHEDULER__PRELOAD"
#: dask config ``amm-core.allowed-policy-classes`` (amm_core.config.ALLOWED_CONFIG): the
#: classes besides amm_core's and distributed's that the scheduler lets a live apply
#: import; the operator's ``--allow-policy-class`` patterns, a Python list literal
ALLOWED_ENV = "DASK_AMM_CORE__ALLOWED_POLICY_CLASSES"


def amm_env(amm: AMMConfig) -> dict[str, str]:
    """The AMM config as dask environment variables (repr of plain data is a Python
    literal, which is what dask parses them with)."""
    config = amm.to_dask_config()
    return {
        f"{_PREFIX}START": repr(bool(config["start"])),
        f"{_PREFIX}INTERVAL": repr(f"{round(config['interval'], 6)!r}s"),  # 700ms: 0.7s, not 0.7000000000000001s
        f"{_PREFIX}MEASURE": repr(config["measure"]),
        f"{_PREFIX}POLICIES": repr(config["policies"]),
    }


def scheduler_containers(
    pod: Mapping[str, Any], amm: AMMConfig, preload: bool, allowed: Sequence[str] = ()
) -> list[dict[str, Any]] | None:
    """The pod's containers with the settings added to the scheduler container (the
    one named ``scheduler``, else the first), or None when nothing changes.

    ``allowed`` (the operator's allowed policy classes) becomes the scheduler's own
    allow list, so that a policy the operator accepts later is not refused by the
    scheduler; an allow list the pod sets itself is its owner's and stays."""
    containers = [dict(c) for c in (pod.get("spec") or {}).get("containers") or ()]
    if not containers:
        return None
    target = next((c for c in containers if c.get("name") == "scheduler"), containers[0])
    wanted = amm_env(amm)
    env = [dict(e) for e in target.get("env") or () if e.get("name") not in wanted]
    present = {e.get("name") for e in env}
    if preload and PRELOAD_ENV not in present:
        wanted[PRELOAD_ENV] = "amm_core.plugin"
    if allowed and ALLOWED_ENV not in present:
        wanted[ALLOWED_ENV] = repr([str(p) for p in allowed])  # dask parses it with ast.literal_eval
    new = env + [{"name": k, "value": v} for k, v in wanted.items()]
    if new == list(target.get("env") or ()):
        return None
    target["env"] = new
    return containers


#: Seconds of the grace period past the time limit: Python's start-up, and the
#: worker's own close after its SIGTERM
GRACE_MARGIN = 15
#: Marks a preStop hook as this operator's (status counts workers without it)
HOOK_MARKER = "amm_core.prestop (dask-memory-operator)"


@functools.cache
def prestop_source() -> str:
    """amm_core.prestop's source for ``python -c``, its long docstring left out."""
    with open(amm_core.prestop.__file__, encoding="utf-8") as f:
        text = f.read()
    head, _, rest = text.partition('"""')
    _, _, body = rest.partition('"""')
    return f'"""{HOOK_MARKER}"""' + body


def has_retirement_hook(container: Mapping[str, Any]) -> bool:
    command = ((((container.get("lifecycle") or {}).get("preStop") or {}).get("exec") or {})
               .get("command") or [])
    return any(isinstance(c, str) and HOOK_MARKER in c for c in command)


def worker_pod(pod: Mapping[str, Any], retirement: RetirementSpec) -> dict[str, Any] | None:
    """``{"containers", "terminationGracePeriodSeconds"}`` for a worker pod: the hook
    on the worker container (named ``worker``, else the first), unless it has a
    preStop hook of its own (theirs is kept, and the pod counts as without ours)."""
    spec = pod.get("spec") or {}
    containers = [dict(c) for c in spec.get("containers") or ()]
    if not containers:
        return None
    target = next((c for c in containers if c.get("name") == "worker"), containers[0])
    lifecycle = dict(target.get("lifecycle") or {})
    if "preStop" in lifecycle and not has_retirement_hook(target):
        return None
    grace = max(int(spec.get("terminationGracePeriodSeconds") or 30),
                math.ceil(retirement.time_limit) + GRACE_MARGIN)
    lifecycle["preStop"] = {"exec": {"command": [
        "python", "-c", prestop_source(),
        "--limit", f"{retirement.time_limit:g}", "--grace", str(grace),
        "--drain" if retirement.drain else "--no-drain",
    ]}}
    target["lifecycle"] = lifecycle
    return {"containers": containers, "terminationGracePeriodSeconds": grace}
