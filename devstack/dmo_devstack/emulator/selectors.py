"""
Label and field selectors of lists and watches (``?labelSelector=``, ``?fieldSelector=``).

kubectl ``-l``, kopf, kr8s and the process kubelet (``spec.nodeName=``) filter on the
server. Field selectors are limited, as on a real server, to ``metadata.name``,
``metadata.namespace`` and the few fields each kind registers (``FIELD_LABELS``);
other fields are a 400 "field label not supported".
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import attrs

from .errors import ApiError
from .jsonpath import get_dotted

# Field selectors a real API server supports beyond metadata.name/metadata.namespace.
FIELD_LABELS: dict[tuple[str, str], set[str]] = {
    ('', 'pods'): {'spec.nodeName', 'spec.restartPolicy', 'spec.schedulerName',
                   'spec.serviceAccountName', 'spec.hostNetwork', 'status.phase',
                   'status.podIP', 'status.nominatedNodeName'},
    ('', 'events'): {'involvedObject.kind', 'involvedObject.namespace', 'involvedObject.name',
                     'involvedObject.uid', 'involvedObject.apiVersion',
                     'involvedObject.resourceVersion', 'involvedObject.fieldPath',
                     'reason', 'reportingComponent', 'source', 'type'},
    ('', 'secrets'): {'type'},
    ('', 'nodes'): {'spec.unschedulable'},
    ('', 'namespaces'): {'status.phase'},
    ('apps', 'replicasets'): {'status.replicas'},
}


@attrs.frozen
class LabelRequirement:
    key: str
    op: str  # '=', '!=', 'in', 'notin', 'exists', '!'
    values: frozenset[str] = frozenset()

    @classmethod
    def from_selector(cls, selector: Mapping[str, Any]) -> list[LabelRequirement]:
        """The requirements of a metav1.LabelSelector (matchLabels and matchExpressions)."""
        ops = {'In': 'in', 'NotIn': 'notin', 'Exists': 'exists', 'DoesNotExist': '!'}
        reqs = [cls(k, '=', frozenset([v])) for k, v in (selector.get('matchLabels') or {}).items()]
        for expr in selector.get('matchExpressions') or []:
            reqs.append(cls(expr['key'], ops[expr['operator']], frozenset(expr.get('values') or [])))
        return reqs

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.op == 'exists':
            return self.key in labels
        if self.op == '!':
            return self.key not in labels
        if self.op in ('=', 'in'):
            return self.key in labels and labels[self.key] in self.values
        # '!=' and 'notin' match objects without the label, as in Kubernetes.
        return self.key not in labels or labels[self.key] not in self.values


def parse_label_selector(text: str) -> list[LabelRequirement]:
    """Parse a label selector string (the syntax of ``kubectl -l``)."""
    reqs: list[LabelRequirement] = []
    # Split at top-level commas (commas inside "in (a,b)" belong to the set).
    parts, depth, current = [], 0, ''
    for ch in text:
        depth += ch == '('
        depth -= ch == ')'
        if ch == ',' and depth == 0:
            parts.append(current)
            current = ''
        else:
            current += ch
    parts.append(current)
    for part in (p.strip() for p in parts):
        if not part:
            continue
        if m := re.fullmatch(r'(\S+)\s+(in|notin)\s*\(([^)]*)\)', part):
            values = frozenset(v.strip() for v in m.group(3).split(',') if v.strip())
            reqs.append(LabelRequirement(m.group(1), m.group(2), values))
        elif m := re.fullmatch(r'([^=!\s]+)\s*(==|=|!=)\s*(\S*)', part):
            op = '!=' if m.group(2) == '!=' else '='
            reqs.append(LabelRequirement(m.group(1), op, frozenset([m.group(3)])))
        elif m := re.fullmatch(r'!\s*(\S+)', part):
            reqs.append(LabelRequirement(m.group(1), '!'))
        elif re.fullmatch(r'[^=!\s()]+', part):
            reqs.append(LabelRequirement(part, 'exists'))
        else:
            raise ApiError(400, 'BadRequest', f'unable to parse requirement: {part!r}')
    return reqs


def parse_field_selector(text: str, allowed: set[str]) -> list[tuple[str, bool, str]]:
    """Parse a field selector into (field, equal?, value) terms."""
    terms = []
    for part in (p.strip() for p in text.split(',')):
        if not part:
            continue
        m = re.fullmatch(r'([^=!]+)(==|=|!=)(.*)', part)
        if not m:
            raise ApiError(400, 'BadRequest', f'invalid selector: {text!r}')
        field = m.group(1).strip()
        if field not in allowed:
            raise ApiError(400, 'BadRequest', f'field label not supported: {field}')
        terms.append((field, m.group(2) != '!=', m.group(3).strip()))
    return terms



def field_value(obj: Mapping[str, Any], field: str) -> str:
    value = get_dotted(obj, field)
    if value is None:
        return ''
    if isinstance(value, bool):
        return 'true' if value else 'false'
    return str(value)

