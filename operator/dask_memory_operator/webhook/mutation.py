"""What the admission webhook changes in a pod of a governed cluster: pure functions
from the pod and its governing policy to the pod's new containers.

- A **scheduler** pod gets the policy's AMM settings as dask config from its first
  second: environment variables in distributed's own form
  (``DASK_DISTRIBUTED__SCHEDULER__ACTIVE_MEMORY_MANAGER__*``, values that dask's
  config parses with ``ast.literal_eval``), and, when the cluster says its image can
  import amm_core (the annotation :data:`PRELOAD_ANNOTATION`), the plugin preloaded.
  The live install stays the fallback for images without it.
- A **worker** pod gets nothing here yet (the preStop retirement hook comes with
  amm_core.prestop).

The policy's AMM variables replace the pod's own (the policy governs the scheduler: a
live apply would override them anyway, a second later). A pod that already preloads
something else keeps its preload list; the plugin is then installed live.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dask_memory_operator.api.memorypolicy import GROUP, AMMConfig

#: On a DaskCluster (or the pod): "true" when the scheduler image can import amm_core
PRELOAD_ANNOTATION = f"{GROUP}/preload-plugin"
_PREFIX = "DASK_DISTRIBUTED__SCHEDULER__ACTIVE_MEMORY_MANAGER__"
PRELOAD_ENV = "DASK_DISTRIBUTED__SCHEDULER__PRELOAD"


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
    pod: Mapping[str, Any], amm: AMMConfig, preload: bool
) -> list[dict[str, Any]] | None:
    """The pod's containers with the settings added to the scheduler container (the
    one named ``scheduler``, else the first), or None when nothing changes."""
    containers = [dict(c) for c in (pod.get("spec") or {}).get("containers") or ()]
    if not containers:
        return None
    target = next((c for c in containers if c.get("name") == "scheduler"), containers[0])
    wanted = amm_env(amm)
    env = [dict(e) for e in target.get("env") or () if e.get("name") not in wanted]
    present = {e.get("name") for e in env}
    if preload and PRELOAD_ENV not in present:
        wanted[PRELOAD_ENV] = "amm_core.plugin"
    new = env + [{"name": k, "value": v} for k, v in wanted.items()]
    if new == list(target.get("env") or ()):
        return None
    target["env"] = new
    return containers
