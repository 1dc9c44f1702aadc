"""The project's Kubernetes manifests, shipped inside the package so that an installed
operator (a wheel, an image) finds them as a source checkout does: the MemoryPolicy
CRD (``crds/``) and the examples the sandbox applies (``examples/``). The checkout's
top-level ``crds/`` and ``examples/`` are links to these folders."""

from __future__ import annotations

from importlib.resources import files
from importlib.resources.abc import Traversable

ROOT: Traversable = files(__name__)
CRDS: Traversable = ROOT / "crds"
EXAMPLES: Traversable = ROOT / "examples"
#: The MemoryPolicy CustomResourceDefinition
MEMORYPOLICY_CRD: Traversable = CRDS / "memorypolicy.yaml"
