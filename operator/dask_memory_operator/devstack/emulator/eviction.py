"""
Evictions (``POST pods/{name}/eviction``) and the PodDisruptionBudget status they read.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .resources import Target


class Eviction:
    """Evictions (a mixin of ``KubeEmulator``)."""

    def _evict(self, target: Target, body: Any) -> dict[str, Any]:
        """POST pods/<name>/eviction (what ``kubectl drain`` does): a graceful pod deletion.

        PodDisruptionBudgets are not consulted: their status comes from a controller
        that does not run here.
        """
        assert target.name is not None
        pod = self._get_live(target.rtype, target.namespace, target.name)
        if pod is None:
            raise target.rtype.not_found(target.name)
        options = (body or {}).get('deleteOptions') or {} if isinstance(body, Mapping) else {}
        self.delete_object(target.rtype, pod, options.get('propagationPolicy', 'Background'),
                           options.get('gracePeriodSeconds'))
        return {'kind': 'Status', 'apiVersion': 'v1', 'metadata': {}, 'status': 'Success', 'code': 201}
