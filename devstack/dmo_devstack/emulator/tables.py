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


def _name(o: Mapping[str, Any]) -> str:
    return o['metadata']['name']


def _event_first_seen(event: Mapping[str, Any]) -> str:
    return age(event.get('firstTimestamp') or event.get('eventTime'))


def _event_last_seen(event: Mapping[str, Any]) -> str:
    if event.get('series'):
        return age(event['series'].get('lastObservedTime'))
    return age(event['lastTimestamp']) if event.get('lastTimestamp') else _event_first_seen(event)


def _event_object(event: Mapping[str, Any]) -> str:
    ref = event.get('involvedObject') or {}
    kind = (ref.get('kind') or '').lower()
    return f'{kind}/{ref["name"]}' if ref.get('name') else kind


def _event_source(event: Mapping[str, Any]) -> str:
    """formatEventSource: component (or reportingComponent), then host (or reportingInstance)."""
    source = event.get('source') or {}
    component = source.get('component') or event.get('reportingComponent') or ''
    instance = source.get('host') or event.get('reportingInstance') or ''
    return f'{component}, {instance}' if instance else component


def _event_count(event: Mapping[str, Any]) -> int:
    if event.get('series'):
        return int(event['series'].get('count') or 0)
    return int(event.get('count') or 1)  # singleton events of the new API have no count


#: kube-apiserver's printers (pkg/printers/internalversion) for the built-in kinds one
#: looks at in the sandbox: (name, type, priority, format, cell). The server renders
#: every column ("wide"); kubectl hides priority 1 columns unless ``-o wide``.
BUILTIN_COLUMNS: dict[tuple[str, str], list[tuple[str, str, int, str, Any]]] = {
    ('', 'pods'): [
        ('Name', 'string', 0, 'name', _name),
        ('Ready', 'string', 0, '', _pod_ready),
        ('Status', 'string', 0, '', _pod_status),
        ('Restarts', 'string', 0, '', lambda o: str(sum(cs.get('restartCount', 0) for cs in
                                                       (o.get('status') or {}).get('containerStatuses') or []))),
        ('Age', 'string', 0, '', _created),
        ('IP', 'string', 1, '', lambda o: (o.get('status') or {}).get('podIP') or '<none>'),
        ('Node', 'string', 1, '', lambda o: (o.get('spec') or {}).get('nodeName') or '<none>'),
    ],
    ('apps', 'deployments'): [
        ('Name', 'string', 0, 'name', _name),
        ('Ready', 'string', 0, '', lambda o: f'{(o.get("status") or {}).get("readyReplicas", 0)}/'
                                             f'{(o.get("spec") or {}).get("replicas", 0)}'),
        ('Up-to-date', 'integer', 0, '', lambda o: (o.get('status') or {}).get('updatedReplicas', 0)),
        ('Available', 'integer', 0, '', lambda o: (o.get('status') or {}).get('availableReplicas', 0)),
        ('Age', 'string', 0, '', _created),
    ],
    ('', 'services'): [
        ('Name', 'string', 0, 'name', _name),
        ('Type', 'string', 0, '', lambda o: (o.get('spec') or {}).get('type', 'ClusterIP')),
        ('Cluster-IP', 'string', 0, '', lambda o: (o.get('spec') or {}).get('clusterIP') or '<none>'),
        ('External-IP', 'string', 0, '', lambda o: '<none>'),
        ('Port(s)', 'string', 0, '', _service_ports),
        ('Age', 'string', 0, '', _created),
    ],
    # printEvent: the name comes last, and only with -o wide.
    ('', 'events'): [
        ('Last Seen', 'string', 0, '', _event_last_seen),
        ('Type', 'string', 0, '', lambda o: o.get('type') or ''),
        ('Reason', 'string', 0, '', lambda o: o.get('reason') or ''),
        ('Object', 'string', 0, '', _event_object),
        ('Subobject', 'string', 1, '', lambda o: (o.get('involvedObject') or {}).get('fieldPath') or ''),
        ('Source', 'string', 1, '', _event_source),
        ('Message', 'string', 0, '', lambda o: (o.get('message') or '').strip()),
        ('First Seen', 'string', 1, '', _event_first_seen),
        ('Count', 'string', 1, '', _event_count),
        ('Name', 'string', 1, 'name', _name),
    ],
}

#: The default table convertor's columns (kinds without a printer here).
_DEFAULT_COLUMNS = [('Name', 'string', 0, 'name', _name), ('Age', 'string', 0, '', _created)]


def _columns(rtype: ResourceType) -> list[tuple[str, str, int, str, Any]]:
    if rtype.crd is not None and rtype.printer_columns:
        return [('Name', 'string', 0, 'name', _name)] + [
            (c['name'], c.get('type', 'string'), c.get('priority', 0), c.get('format', ''),
             lambda o, c=c: cell(o, c)) for c in rtype.printer_columns]
    return BUILTIN_COLUMNS.get((rtype.group, rtype.plural), _DEFAULT_COLUMNS)


def to_table(rtype: ResourceType, items: list[dict[str, Any]],
             listed: dict[str, Any] | None) -> dict[str, Any]:
    """A Table of these objects (``listed``: the list they come from, for its resourceVersion)."""
    columns = _columns(rtype)
    definitions = [{'name': name, 'type': ctype, 'format': fmt, 'priority': priority, 'description': ''}
                   for name, ctype, priority, fmt, _ in columns]
    rows = [{'cells': [getter(o) for *_, getter in columns],
             'object': {'kind': 'PartialObjectMetadata', 'apiVersion': 'meta.k8s.io/v1',
                        'metadata': o['metadata']}} for o in items]
    meta = {'resourceVersion': listed['metadata']['resourceVersion']} if listed else {}
    return {'kind': 'Table', 'apiVersion': 'meta.k8s.io/v1', 'metadata': meta,
            'columnDefinitions': definitions, 'rows': rows}


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

