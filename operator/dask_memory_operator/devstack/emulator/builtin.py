"""
Built-in kinds: their defaults, immutable pod specs and (see ``validation``) schemas.
"""
from __future__ import annotations

import copy
from typing import Any

from .errors import FieldError
from .resources import BUILTIN_SCALE, NAMESPACES, PODS, ResourceType

# What a pod update may change in spec (the API server forbids the rest).
POD_MUTABLE = ('containers[*].image', 'initContainers[*].image', 'activeDeadlineSeconds', 'tolerations')


def check_pod_update(rtype: ResourceType, old: dict[str, Any], new: dict[str, Any]) -> None:
    """Pod specs are immutable but for images, activeDeadlineSeconds and tolerations."""
    def masked(spec: Any) -> Any:
        spec = copy.deepcopy(spec or {})
        for key in ('containers', 'initContainers'):
            for container in spec.get(key) or []:
                container.pop('image', None)
        spec.pop('activeDeadlineSeconds', None)
        spec.pop('tolerations', None)
        return spec
    if masked(old.get('spec')) != masked(new.get('spec')):
        fields = ','.join(f'`spec.{f}`' for f in POD_MUTABLE)
        raise rtype.invalid(old['metadata']['name'], [FieldError(
            'spec', 'FieldValueForbidden', f'Forbidden: pod updates may not change fields other than {fields}')])


def builtin_defaults(rtype: ResourceType, obj: dict[str, Any]) -> None:
    """The few built-in defaults and initial statuses that clients here read."""
    if rtype.resource == NAMESPACES:
        obj.setdefault('spec', {}).setdefault('finalizers', ['kubernetes'])
        obj['status'] = {'phase': 'Active'}
    elif rtype.resource == PODS:
        spec = obj.setdefault('spec', {})
        spec.setdefault('restartPolicy', 'Always')
        spec.setdefault('terminationGracePeriodSeconds', 30)
        spec.setdefault('dnsPolicy', 'ClusterFirst')
        obj['status'] = {'phase': 'Pending'}
    elif (rtype.group, rtype.plural) in BUILTIN_SCALE:
        obj.setdefault('spec', {}).setdefault('replicas', 1)

