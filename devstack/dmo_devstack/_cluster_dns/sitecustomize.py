"""The cluster's resolv.conf: installs the cluster DNS of the local stack.

The process kubelet (and LocalStack, for the operators) put this directory on
PYTHONPATH with ``DMO_CLUSTER_HOSTS`` set; Python imports ``sitecustomize`` at
start-up, so ``<svc>.<ns>.svc.cluster.local`` resolves before any user code runs.
``dns.py`` is loaded by file path, without importing the ``dask_memory_operator``
package, so that this costs every process next to nothing. The ``sitecustomize``
that this one shadows (Debian ships one in the standard library's directory) is
run afterwards.
"""

import importlib.util
import os
import sys


def _load_dns():
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dns.py")
    spec = importlib.util.spec_from_file_location("_dmo_cluster_dns", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _run_shadowed_sitecustomize():
    here = os.path.dirname(os.path.abspath(__file__))
    for entry in sys.path:
        if os.path.abspath(entry or ".") == here:
            continue
        candidate = os.path.join(entry, "sitecustomize.py")
        if os.path.isfile(candidate):
            spec = importlib.util.spec_from_file_location("_shadowed_sitecustomize", candidate)
            spec.loader.exec_module(importlib.util.module_from_spec(spec))
            return


if os.environ.get("DMO_CLUSTER_HOSTS"):
    _load_dns().install(os.environ["DMO_CLUSTER_HOSTS"])
_run_shadowed_sitecustomize()
