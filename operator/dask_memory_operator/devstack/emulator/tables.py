"""
kubectl's table output: ``Accept: application/json;as=Table;g=meta.k8s.io``.

``kubectl get`` asks the server for a ``Table``; the server renders it with the
printers of kube-apiserver (pkg/printers/internalversion) for built-in kinds, the
``additionalPrinterColumns`` for custom resources and NAME/AGE otherwise. Only the
built-in kinds one looks at in the sandbox have their printers here: pods,
deployments, services and events. A watch (``kubectl get -w``) gets one-row tables.
"""
from __future__ import annotations

import datetime
import json
from collections.abc import Mapping
from typing import Any

from .jsonpath import eval_jsonpath
from .meta import parse_time
from .resources import ResourceType

def human_duration(seconds: float) -> str:
    """Render an age as kubectl shows it (k8s.io/apimachinery/pkg/util/duration)."""
    s = int(seconds)
    if s < -1:
        return '<invalid>'
    s = max(s, 0)
    if s < 120:
        return f'{s}s'
    m, h = s // 60, s // 3600
    if m < 10:
        return f'{m}m{s % 60}s' if s % 60 else f'{m}m'
    if m < 180:
        return f'{m}m'
    if h < 8:
        return f'{h}h{m % 60}m' if m % 60 else f'{h}h'
    if h < 48:
        return f'{h}h'
    if h < 24 * 8:
        return f'{h // 24}d{h % 24}h' if h % 24 else f'{h // 24}d'
    if h < 24 * 365 * 2:
        return f'{h // 24}d'
    if h < 24 * 365 * 8:
        return f'{h // 24 // 365}y{h // 24 % 365}d'
    return f'{h // 24 // 365}y'


def _pod_status(pod: Mapping[str, Any]) -> str:
    """The STATUS column of ``kubectl get pods`` (a simplified version of kubectl's printer)."""
    status = pod.get('status') or {}
    reason = status.get('reason') or status.get('phase') or 'Unknown'
    for cs in status.get('containerStatuses') or []:
        state = cs.get('state') or {}
        detail = (state.get('waiting') or {}).get('reason') or (state.get('terminated') or {}).get('reason')
        if detail and not cs.get('ready'):
            reason = detail
    if pod['metadata'].get('deletionTimestamp'):
        reason = 'Terminating'
    return reason


def _pod_ready(pod: Mapping[str, Any]) -> str:
    statuses = (pod.get('status') or {}).get('containerStatuses') or []
    total = len((pod.get('spec') or {}).get('containers') or [])
    return f'{sum(1 for cs in statuses if cs.get("ready"))}/{total}'


def _service_ports(svc: Mapping[str, Any]) -> str:
    ports = (svc.get('spec') or {}).get('ports') or []
    return ','.join(f'{p.get("port")}/{p.get("protocol", "TCP")}' for p in ports) or '<none>'


def _created(o: Mapping[str, Any]) -> str:
    return age(o['metadata'].get('creationTimestamp'))


# The columns of kubectl's printers for the built-in kinds one looks at in the sandbox.
BUILTIN_COLUMNS: dict[tuple[str, str], list[tuple[str, str, int, Any]]] = {
    ('', 'pods'): [
        ('Ready', 'string', 0, _pod_ready),
        ('Status', 'string', 0, _pod_status),
        ('Restarts', 'string', 0, lambda o: str(sum(cs.get('restartCount', 0) for cs in
                                                   (o.get('status') or {}).get('containerStatuses') or []))),
        ('Age', 'string', 0, _created),
        ('IP', 'string', 1, lambda o: (o.get('status') or {}).get('podIP') or '<none>'),
        ('Node', 'string', 1, lambda o: (o.get('spec') or {}).get('nodeName') or '<none>'),
    ],
    ('apps', 'deployments'): [
        ('Ready', 'string', 0, lambda o: f'{(o.get("status") or {}).get("readyReplicas", 0)}/'
                                         f'{(o.get("spec") or {}).get("replicas", 0)}'),
        ('Up-to-date', 'integer', 0, lambda o: (o.get('status') or {}).get('updatedReplicas', 0)),
        ('Available', 'integer', 0, lambda o: (o.get('status') or {}).get('availableReplicas', 0)),
        ('Age', 'string', 0, _created),
    ],
    ('', 'services'): [
        ('Type', 'string', 0, lambda o: (o.get('spec') or {}).get('type', 'ClusterIP')),
        ('Cluster-IP', 'string', 0, lambda o: (o.get('spec') or {}).get('clusterIP') or '<none>'),
        ('External-IP', 'string', 0, lambda o: '<none>'),
        ('Port(s)', 'string', 0, _service_ports),
        ('Age', 'string', 0, _created),
    ],
}


def to_table(rtype: ResourceType, items: list[dict[str, Any]],
             listed: dict[str, Any] | None) -> dict[str, Any]:
    """A Table of these objects (``listed``: the list they come from, for its resourceVersion)."""
    columns = [{'name': 'Name', 'type': 'string', 'format': 'name', 'priority': 0,
                'description': 'Name must be unique within a namespace.'}]
    getters: list[Any] = [lambda o: o['metadata']['name']]
    if rtype.crd is not None and rtype.printer_columns:
        for col in rtype.printer_columns:
            columns.append({'name': col['name'], 'type': col.get('type', 'string'),
                            'format': col.get('format', ''), 'priority': col.get('priority', 0),
                            'description': col.get('description', '')})
            getters.append(lambda o, c=col: cell(o, c))
    elif (rtype.group, rtype.plural) in BUILTIN_COLUMNS:
        for name, ctype, priority, getter in BUILTIN_COLUMNS[rtype.group, rtype.plural]:
            columns.append({'name': name, 'type': ctype, 'format': '', 'priority': priority, 'description': ''})
            getters.append(getter)
    else:
        columns.append({'name': 'Age', 'type': 'string', 'format': '', 'priority': 0,
                        'description': 'CreationTimestamp is a timestamp representing the server time '
                                       'when this object was created.'})
        getters.append(lambda o: age(o['metadata'].get('creationTimestamp')))
    rows = [{'cells': [g(o) for g in getters],
             'object': {'kind': 'PartialObjectMetadata', 'apiVersion': 'meta.k8s.io/v1',
                        'metadata': o['metadata']}} for o in items]
    meta = {'resourceVersion': listed['metadata']['resourceVersion']} if listed else {}
    return {'kind': 'Table', 'apiVersion': 'meta.k8s.io/v1', 'metadata': meta,
            'columnDefinitions': columns, 'rows': rows}


def age(ts: str | None) -> str:
    if not ts:
        return '<unknown>'
    return human_duration((datetime.datetime.now(tz=datetime.UTC) - parse_time(ts)).total_seconds())


def cell(obj: Mapping[str, Any], column: Mapping[str, Any]) -> Any:
    values = eval_jsonpath(obj, column['jsonPath'])
    if not values:
        return None
    if column.get('type') == 'date' and isinstance(values[0], str):
        return age(values[0])  # what kubectl shows for date columns: an age
    if len(values) > 1:
        return ','.join(v if isinstance(v, str) else json.dumps(v) for v in values)
    value = values[0]
    if column.get('type') == 'string' and not isinstance(value, str):
        if isinstance(value, (dict, list)):
            return json.dumps(value)
        return str(value).lower() if isinstance(value, bool) else str(value)
    return value

