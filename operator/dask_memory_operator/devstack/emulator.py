"""
A Kubernetes API emulator with the semantics a real kube-apiserver has.

kmock's ``KubernetesEmulator`` (pinned at 0.8) stores objects in memory and serves
them over real HTTP, but it treats objects as plain JSON documents. kubectl, kr8s,
kopf and dask-kubernetes' operator rely on the API server's semantics, so this
subclass serves every request under ``/api`` and ``/apis`` (and ``/version``,
``/openapi``) itself, still storing the objects in kmock's ``objects`` array (with
their version history) and describing resources in kmock's ``resources`` array
(``load_bundled()`` gives the ~70 built-in kinds). kmock's request DSL
(``emulator['get /x'] << ...``) is bypassed for those paths.

Semantics added, each because a client in this project needs it and each as a real
API server behaves (status codes, ``Status`` objects with reason, message and
``details.causes``):

- Server-side metadata: ``uid``, ``resourceVersion`` (one cluster-wide counter),
  ``creationTimestamp``, ``generation`` where Kubernetes tracks it (custom resources,
  CRDs, workloads; 1 on create; bumped only when something but metadata and, with a
  status subresource, status changes), namespace from the URL, ``generateName``,
  ObjectMeta validation (name format, label and annotation syntax and size), 201 on
  create, 409 AlreadyExists / 404 NotFound / 409 Conflict on a stale
  ``resourceVersion``; a no-op write changes nothing (kopf relies on that to avoid
  loops); namespaces must exist (and not be terminating); custom resources refuse a
  PUT without ``resourceVersion``; pod specs are immutable but for images (and the
  few fields Kubernetes allows) and ``pods/binding`` assigns a node; the built-in
  defaults clients read (pod ``restartPolicy``, ``terminationGracePeriodSeconds``,
  workload ``replicas``, Service port ``protocol``/``targetPort``...).
- Writes: PUT (replace), JSON patch (RFC 6902, a failed ``test`` is 422), merge patch
  (RFC 7386), strategic merge patch for built-in kinds (lists merged by their
  Kubernetes merge keys, ``$patch``/``$setElementOrder``/``$retainKeys``/
  ``$deleteFromPrimitiveList`` directives); custom resources refuse it with 415 as a
  real server does. Server-side apply is not emulated (415).
- ``/status`` and ``/scale`` subresources: with a status subresource the main
  endpoint keeps the stored ``.status`` and ``/status`` changes only ``.status``;
  scale maps ``autoscaling/v1`` Scale onto the CRD's ``specReplicasPath`` etc.
- Deletion: finalizers (``deletionTimestamp``; removed once finalizers are empty;
  no new finalizers while deleting), pod graceful deletion (a pod bound to a node is
  kept for its grace period until deleted with ``gracePeriodSeconds=0``: the
  kubelet's job), deletecollection, and a garbage collector through
  ``ownerReferences`` (background and foreground cascade, ``Orphan``), namespace
  deletion (contents first) and CRD deletion (its objects first).
- Watches: ``resourceVersion`` (only later events; 410 Expired ERROR event when older
  than the kept event log), ``timeoutSeconds``, label selectors (``=``, ``==``,
  ``!=``, ``in``, ``notin``, exists, ``!``) and field selectors (``metadata.name``,
  ``metadata.namespace``, plus the few per-kind fields a real server supports) on
  list and watch, ADDED/DELETED when a change moves an object into/out of a selector.
  Lists carry ``kind: <Kind>List``, ``apiVersion`` and ``metadata.resourceVersion``,
  and are paged with ``limit``/``continue`` (the pages show the current objects, at
  the resourceVersion of the first page, not an exact snapshot).
- Discovery (``/api``, ``/apis``, group and version documents, ``/version``, with or
  without a trailing slash) including subresources; CRDs created through the API are
  served at once (names, scope, subresources, short names, printer columns) and get
  ``Established``/``NamesAccepted`` conditions. ``/openapi/v2`` and ``/openapi/v3``
  answer minimal valid documents: enough for kubectl to validate server-side.
- CRD versions: one set of objects, stored in the ``storage: true`` version and
  served at every served version with its ``apiVersion`` (conversion strategy None;
  webhook conversion is not emulated), each version validated with its own schema.
- CRD schema handling as the API server does it: pruning of unknown fields (outside
  ``x-kubernetes-preserve-unknown-fields``) and of nulls in non-nullable fields,
  ``default`` values, then validation with the ``jsonschema`` library (Draft 4, the
  dialect of OpenAPI v3.0 schemas) with ``x-kubernetes-int-or-string`` and
  ``nullable`` translated; errors are 422 Invalid with the API server's message form.
  ``fieldValidation=Strict`` refuses unknown fields (400 BadRequest "strict decoding
  error", as real), ``Warn`` answers a ``Warning`` header. ``x-kubernetes-validations``
  (CEL) rules are NOT evaluated; built-in kinds are not schema-validated at all.
- Services get a ``spec.clusterIP`` allocated from a configurable CIDR (default
  127.1.0.0/16, so that a process kubelet can bind it on loopback); headless
  (``None``) stays; the address is immutable and released on deletion.
- kubectl's table output (``Accept: ...;as=Table;g=meta.k8s.io``, lists, gets and
  watches): kubectl's usual columns for pods, deployments, services and namespaces,
  NAME and AGE for other built-in kinds, a CRD's ``additionalPrinterColumns``.
- Watch streams end cleanly when the server stops, so no client hangs on them.
- ``/healthz``, ``/livez``, ``/readyz`` answer ``ok``; access reviews allow everything
  (as with the AlwaysAllow authorizer); ``pods/eviction`` deletes a pod gracefully,
  without PodDisruptionBudgets.

Not emulated: server-side apply, admission webhooks, RBAC and authentication, CEL
rules, webhook conversion between CRD versions, schema validation of built-in kinds,
periodic watch bookmarks (one is sent when a watch reaches its timeout), the
controllers (no Deployment makes a pod: a kubelet's job), and protobuf or CBOR request
bodies (answered 415): kubectl's imperative commands for built-in kinds (``create
deployment``, ``expose``, ``run``, ``auth can-i``, ``drain``) send protobuf, so use
``kubectl apply -f`` (JSON) instead.
"""
from __future__ import annotations

import asyncio
import base64
import bisect
import collections
import copy
import datetime
import ipaddress
import json
import random
import re
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import logging
import jsonschema
import kmock
from kmock._internal import rendering  # internals: kmock is pinned

logger = logging.getLogger(__name__)

_DNS1123_SUBDOMAIN = re.compile(r'^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')
_DNS1123_LABEL = re.compile(r'^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')
_GENERATE_ALPHABET = 'bcdfghjklmnpqrstvwxz2456789'  # as k8s.io/apimachinery/pkg/util/rand

# Field selectors a real API server supports beyond metadata.name/metadata.namespace.
_FIELD_LABELS: dict[tuple[str, str], set[str]] = {
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

# Strategic-merge-patch merge keys of the built-in types (from their Go struct tags).
_MERGE_KEYS: dict[str, str] = {
    'containers': 'name', 'initContainers': 'name', 'ephemeralContainers': 'name',
    'env': 'name', 'volumes': 'name', 'volumeMounts': 'mountPath',
    'volumeDevices': 'devicePath', 'imagePullSecrets': 'name', 'conditions': 'type',
    'ownerReferences': 'uid', 'hostAliases': 'ip', 'topologySpreadConstraints': 'topologyKey',
    'resourceClaims': 'name', 'readinessGates': 'conditionType', 'subsets': '',
}
_MERGE_PRIMITIVE_LISTS = {'finalizers'}

# Built-in kinds whose strategies track metadata.generation (CRs and CRDs always do;
# pods, configmaps, services, namespaces... have no generation in Kubernetes 1.32).
_BUILTIN_GENERATION = {('apps', 'deployments'), ('apps', 'replicasets'), ('apps', 'statefulsets'),
                       ('apps', 'daemonsets'), ('batch', 'jobs'), ('batch', 'cronjobs'),
                       ('policy', 'poddisruptionbudgets'), ('networking.k8s.io', 'ingresses'),
                       ('networking.k8s.io', 'networkpolicies'), ('autoscaling', 'horizontalpodautoscalers'),
                       ('', 'replicationcontrollers'), ('apiextensions.k8s.io', 'customresourcedefinitions')}

# What a pod update may change in spec (the API server forbids the rest).
_POD_MUTABLE = ('containers[*].image', 'initContainers[*].image', 'activeDeadlineSeconds', 'tolerations')

# Built-in kinds with a scale subresource.
_BUILTIN_SCALE = {('apps', 'deployments'), ('apps', 'replicasets'), ('apps', 'statefulsets'),
                  ('', 'replicationcontrollers')}

_CRD_RESOURCE = kmock.resource('apiextensions.k8s.io', 'v1', 'customresourcedefinitions')
_NAMESPACES = kmock.resource('', 'v1', 'namespaces')
_SERVICES = kmock.resource('', 'v1', 'services')
_PODS = kmock.resource('', 'v1', 'pods')
_CRD_FINALIZER = 'customresourcecleanup.apiextensions.k8s.io'
_MAX_EVENTS = 10_000  # watch history kept for resumption by resourceVersion (clients relist on 410)
_MAX_HISTORY = 20  # object versions kept per object in kmock's objects array
_MAX_DELETED = 1_000  # deleted objects whose history is kept in kmock's objects array
_MAX_REQUESTS = 5_000  # requests kept in kmock's request log (the sandbox runs for hours)
_VERBS = ['create', 'delete', 'deletecollection', 'get', 'list', 'patch', 'update', 'watch']


class ApiError(Exception):
    """An error answered as a ``Status`` object, as the API server does."""

    def __init__(self, code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code: int = code
        self.reason: str = reason
        self.message: str = message
        self.details: dict[str, Any] | None = details

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = {
            'kind': 'Status', 'apiVersion': 'v1', 'metadata': {}, 'status': 'Failure',
            'message': self.message, 'reason': self.reason, 'code': self.code,
        }
        if self.details is not None:
            status['details'] = self.details
        return status


def _now(offset: float = 0) -> str:
    t = datetime.datetime.now(tz=datetime.UTC) + datetime.timedelta(seconds=offset)
    return t.strftime('%Y-%m-%dT%H:%M:%SZ')


def _parse_time(s: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(s.replace('Z', '+00:00'))


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


def _go_repr(value: Any) -> str:
    """Values as the API server quotes them in field errors."""
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if value is None:
        return 'null'
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value, separators=(',', ':'))


def _path_str(path: Iterable[Any]) -> str:
    out = ''
    for part in path:
        out += f'[{part}]' if isinstance(part, int) else (f'.{part}' if out else str(part))
    return out


# --------------------------------------------------------------------------- selectors


@attrs.frozen
class LabelRequirement:
    key: str
    op: str  # '=', '!=', 'in', 'notin', 'exists', '!'
    values: frozenset[str] = frozenset()

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


def _get_dotted(obj: Any, dotted: str) -> Any:
    for part in dotted.split('.'):
        obj = obj.get(part) if isinstance(obj, Mapping) else None
    return obj


def _field_value(obj: Mapping[str, Any], field: str) -> str:
    value = _get_dotted(obj, field)
    if value is None:
        return ''
    if isinstance(value, bool):
        return 'true' if value else 'false'
    return str(value)


# --------------------------------------------------------------------------- JSONPath


def eval_jsonpath(obj: Any, path: str) -> list[Any]:
    """Evaluate the simple JSONPaths of printer columns and scale subresources."""
    tokens = re.findall(r'\.([A-Za-z0-9_\-$]+)|\[(\*|\d+|\?\(@\.[^)]*\))\]|\.\[(\*)\]', path.strip())
    current = [obj]
    for key, index, star in tokens:
        nxt: list[Any] = []
        for item in current:
            if key:
                if isinstance(item, Mapping) and key in item:
                    nxt.append(item[key])
            elif index == '*' or star:
                if isinstance(item, list):
                    nxt.extend(item)
                elif isinstance(item, Mapping):
                    nxt.extend(item.values())
            elif index.isdigit():
                if isinstance(item, list) and int(index) < len(item):
                    nxt.append(item[int(index)])
            else:
                m = re.fullmatch(r'\?\(@\.([A-Za-z0-9_.\-]+)\s*(==|!=)\s*["\']?([^"\']*)["\']?\)', index)
                if not m or not isinstance(item, list):
                    continue
                for elem in item:
                    value = _get_dotted(elem, m.group(1))
                    if (str(value) == m.group(3)) == (m.group(2) == '=='):
                        nxt.append(elem)
        current = nxt
    return current


def _set_dotted(obj: dict[str, Any], path: str, value: Any) -> None:
    parts = [p for p in path.strip().lstrip('.').split('.') if p]
    for part in parts[:-1]:
        obj = obj.setdefault(part, {})
    obj[parts[-1]] = value


# --------------------------------------------------------------------------- patches


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def strategic_merge_patch(target: Any, patch: Any, field: str = '') -> Any:
    """Strategic merge patch as kubectl needs it for built-in kinds."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    if patch.get('$patch') == 'replace':
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != '$patch'}
    if patch.get('$patch') == 'delete':
        return None
    result = dict(target) if isinstance(target, Mapping) else {}
    retain = patch.get('$retainKeys')
    for key, value in patch.items():
        if key.startswith('$setElementOrder/') or key in ('$retainKeys', '$patch'):
            continue  # ordering hints and directives handled elsewhere
        if key.startswith('$deleteFromPrimitiveList/'):
            name = key.split('/', 1)[1]
            result[name] = [v for v in result.get(name) or [] if v not in value]
            continue
        if value is None:
            result.pop(key, None)
        elif isinstance(value, list) and isinstance(result.get(key), list):
            result[key] = _merge_list(result[key], value, key)
        else:
            merged = strategic_merge_patch(result.get(key), value, key)
            if merged is None and isinstance(value, Mapping) and value.get('$patch') == 'delete':
                result.pop(key, None)
            else:
                result[key] = merged
    if retain is not None:
        result = {k: v for k, v in result.items() if k in retain}
    return result


def _merge_list(current: list[Any], patch: list[Any], field: str) -> list[Any]:
    if field in _MERGE_PRIMITIVE_LISTS:
        return current + [v for v in patch if v not in current]
    key = _MERGE_KEYS.get(field)
    if field == 'ports':  # container ports merge on containerPort, service ports on port
        key = 'containerPort' if any('containerPort' in p for p in patch if isinstance(p, Mapping)) else 'port'
    if not key or not all(isinstance(p, Mapping) for p in patch):
        return [p for p in copy.deepcopy(patch) if not (isinstance(p, Mapping) and p.get('$patch'))]
    if any(isinstance(p, Mapping) and p.get('$patch') == 'replace' for p in patch):
        return [p for p in copy.deepcopy(patch) if not p.get('$patch')]
    result = [copy.deepcopy(item) for item in current]
    for item in patch:
        index = next((i for i, old in enumerate(result)
                      if isinstance(old, Mapping) and old.get(key) == item.get(key)), None)
        if item.get('$patch') == 'delete':
            if index is not None:
                del result[index]
        elif index is None:
            result.append(strategic_merge_patch({}, item))
        else:
            result[index] = strategic_merge_patch(result[index], item)
    return result


# --------------------------------------------------------------------------- CRD schemas


@attrs.define
class FieldError:
    """One field error in the API server's ``field.Error`` form."""
    path: str
    type: str  # the cause reason: FieldValueInvalid, FieldValueRequired, ...
    detail: str

    def __str__(self) -> str:
        return f'{self.path}: {self.detail}'


class StructuralSchema:
    """One CRD version's openAPIV3Schema: pruning, defaulting and validation."""

    def __init__(self, schema: Mapping[str, Any]) -> None:
        self.schema: Mapping[str, Any] = schema
        #: The validator is compiled once; the DaskCluster schema is ~6000 lines.
        self.validator = jsonschema.Draft4Validator(_to_jsonschema(schema, top=True), format_checker=_FORMATS)

    def prune(self, obj: dict[str, Any]) -> list[str]:
        """Drop unknown fields and nulls of non-nullable fields; return the unknown paths."""
        unknown: list[str] = []
        for key in list(obj):
            if key in ('apiVersion', 'kind', 'metadata'):
                continue
            sub = (self.schema.get('properties') or {}).get(key)
            if sub is None and not self.schema.get('x-kubernetes-preserve-unknown-fields'):
                unknown.append(f'.{key}')
                del obj[key]
            elif sub is not None:
                self._prune(obj, key, sub, f'.{key}', unknown)
        return unknown

    def _prune(self, parent: Any, key: Any, schema: Mapping[str, Any], path: str, unknown: list[str]) -> None:
        value = parent[key]
        if value is None:
            if not schema.get('nullable') and isinstance(parent, dict):
                del parent[key]
            return
        if isinstance(value, dict):
            props = schema.get('properties')
            addl = schema.get('additionalProperties')
            preserve = schema.get('x-kubernetes-preserve-unknown-fields')
            embedded = schema.get('x-kubernetes-embedded-resource')
            for k in list(value):
                if props is not None and k in props:
                    self._prune(value, k, props[k], f'{path}.{k}', unknown)
                elif isinstance(addl, Mapping):
                    self._prune(value, k, addl, f'{path}.{k}', unknown)
                elif preserve or addl is True or (embedded and k in ('apiVersion', 'kind', 'metadata')):
                    continue
                else:
                    unknown.append(f'{path}.{k}')
                    del value[k]
        elif isinstance(value, list) and isinstance(schema.get('items'), Mapping):
            for i in range(len(value)):
                self._prune(value, i, schema['items'], f'{path}[{i}]', unknown)

    def default(self, obj: dict[str, Any]) -> None:
        _apply_defaults(obj, self.schema)

    def validate(self, obj: Mapping[str, Any]) -> list[FieldError]:
        body = {k: v for k, v in obj.items() if k not in ('apiVersion', 'kind', 'metadata')}
        errors = []
        for e in sorted(self.validator.iter_errors(body), key=lambda e: list(map(str, e.absolute_path))):
            errors.extend(_field_errors(e))
        return errors


# The formats the API server checks (kube-openapi's strfmt registry) that matter here;
# others (int32, int64, double, password...) are not checked, by the API server either.
_FORMATS = jsonschema.FormatChecker(formats=['email', 'ipv4', 'ipv6', 'uuid', 'date'])


@_FORMATS.checks('date-time', raises=ValueError)
def _is_date_time(value: object) -> bool:
    if not isinstance(value, str):
        return True
    if not re.fullmatch(r'\d{4}-\d\d-\d\d[Tt ]\d\d:\d\d:\d\d(\.\d+)?([Zz]|[+-]\d\d:\d\d)', value):
        return False
    datetime.datetime.fromisoformat(value.upper().replace('Z', '+00:00').replace(' ', 'T'))
    return True


@_FORMATS.checks('byte', raises=(ValueError, TypeError))
def _is_base64(value: object) -> bool:
    if isinstance(value, str):
        base64.b64decode(value, validate=True)
    return True


def _to_jsonschema(schema: Mapping[str, Any], top: bool = False) -> dict[str, Any]:
    """Translate an OpenAPI v3 structural schema into plain JSON Schema (Draft 4)."""
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in ('properties', 'patternProperties'):
            out[key] = {k: _to_jsonschema(v) for k, v in value.items()}
        elif key in ('items', 'not') and isinstance(value, Mapping):
            out[key] = _to_jsonschema(value)
        elif key == 'additionalProperties' and isinstance(value, Mapping):
            out[key] = _to_jsonschema(value)
        elif key in ('allOf', 'anyOf', 'oneOf'):
            out[key] = [_to_jsonschema(v) for v in value]
        elif key in ('type', 'enum', 'minimum', 'maximum', 'exclusiveMinimum', 'exclusiveMaximum',
                     'minLength', 'maxLength', 'pattern', 'format', 'required', 'minItems',
                     'maxItems', 'uniqueItems', 'multipleOf', 'minProperties', 'maxProperties'):
            out[key] = value
    if top:  # apiVersion/kind/metadata are validated by the server itself
        out.pop('required', None) if out.get('required') == ['metadata'] else None
        for key in ('apiVersion', 'kind', 'metadata'):
            out.get('properties', {}).pop(key, None)
    if schema.get('x-kubernetes-int-or-string'):
        out.pop('type', None)
        out['type'] = ['integer', 'string']
    if schema.get('nullable'):
        if 'type' in out:
            out['type'] = [*(out['type'] if isinstance(out['type'], list) else [out['type']]), 'null']
        if 'enum' in out:
            out['enum'] = [*out['enum'], None]
    # JSON Schema's "integer" accepts 1.0; Kubernetes too (JSON has one number type).
    return out


_SCHEMA_TYPES = ('array', 'boolean', 'integer', 'number', 'object', 'string')


def _check_schema(schema: Mapping[str, Any], path: str) -> list[FieldError]:
    """The CRD schema checks that keep the validator from failing: types and patterns."""
    errors = []
    if 'type' in schema and schema['type'] not in _SCHEMA_TYPES:
        supported = ', '.join(f'"{t}"' for t in _SCHEMA_TYPES)
        errors.append(FieldError(f'{path}.type', 'FieldValueNotSupported',
                                 f'Unsupported value: {_go_repr(schema["type"])}: supported values: {supported}'))
    if 'pattern' in schema:
        try:
            re.compile(schema['pattern'])
        except (re.error, TypeError) as e:
            errors.append(FieldError(f'{path}.pattern', 'FieldValueInvalid',
                                     f'Invalid value: {_go_repr(schema["pattern"])}: must be a valid regex: {e}'))
    for key, sub in (schema.get('properties') or {}).items():
        errors.extend(_check_schema(sub, f'{path}.properties[{key}]'))
    for key in ('items', 'additionalProperties', 'not'):
        if isinstance(schema.get(key), Mapping):
            errors.extend(_check_schema(schema[key], f'{path}.{key}'))
    for key in ('allOf', 'anyOf', 'oneOf'):
        for j, sub in enumerate(schema.get(key) or []):
            errors.extend(_check_schema(sub, f'{path}.{key}[{j}]'))
    return errors


def _apply_defaults(value: Any, schema: Mapping[str, Any]) -> None:
    if isinstance(value, dict):
        props = schema.get('properties') or {}
        for key, sub in props.items():
            if key not in value and 'default' in sub:
                value[key] = copy.deepcopy(sub['default'])
            if key in value:
                _apply_defaults(value[key], sub)
        addl = schema.get('additionalProperties')
        if isinstance(addl, Mapping):
            for key in value:
                if key not in props:
                    _apply_defaults(value[key], addl)
    elif isinstance(value, list) and isinstance(schema.get('items'), Mapping):
        for item in value:
            _apply_defaults(item, schema['items'])


_JSON_TYPES = {str: 'string', bool: 'boolean', int: 'integer', float: 'number',
               list: 'array', dict: 'object', type(None): 'null'}


def _field_errors(e: jsonschema.ValidationError) -> list[FieldError]:
    path = _path_str(e.absolute_path)
    where = path or '<root>'
    v, inst = e.validator_value, e.instance
    match e.validator:
        case 'required':
            missing = [k for k in v if isinstance(inst, Mapping) and k not in inst]
            return [FieldError(f'{path}.{k}' if path else k, 'FieldValueRequired', 'Required value')
                    for k in missing]
        case 'enum':
            supported = ', '.join(_go_repr(x) for x in v)
            return [FieldError(where, 'FieldValueNotSupported',
                               f'Unsupported value: {_go_repr(inst)}: supported values: {supported}')]
        case 'type':
            actual = _JSON_TYPES.get(type(inst), 'object')
            wanted = v if isinstance(v, str) else ' or '.join(t for t in v if t != 'null')
            return [FieldError(where, 'FieldValueTypeInvalid',
                               f'Invalid value: "{actual}": {where} in body must be of type {wanted}: "{actual}"')]
        case 'maxLength':
            return [FieldError(where, 'FieldValueTooLong', f'Too long: may not be more than {v} bytes')]
        case 'maxItems':
            return [FieldError(where, 'FieldValueTooMany', f'Too many: {len(inst)}: must have at most {v} items')]
        case 'minimum':
            op = 'greater than' if e.schema.get('exclusiveMinimum') else 'greater than or equal to'
            detail = f'{where} in body should be {op} {v}'
        case 'maximum':
            op = 'less than' if e.schema.get('exclusiveMaximum') else 'less than or equal to'
            detail = f'{where} in body should be {op} {v}'
        case 'minLength':
            detail = f'{where} in body should be at least {v} chars long'
        case 'pattern':
            detail = f"{where} in body should match '{v}'"
        case 'minItems':
            detail = f'{where} in body should have at least {v} items'
        case 'format':
            detail = f'{where} in body must be of type {v}: {_go_repr(inst)}'
        case 'uniqueItems':
            return [FieldError(where, 'FieldValueDuplicate', f'Duplicate value: {_go_repr(inst)}')]
        case 'multipleOf':
            detail = f'{where} in body should be a multiple of {v}'
        case _:
            detail = e.message
    return [FieldError(where, 'FieldValueInvalid', f'Invalid value: {_go_repr(inst)}: {detail}')]


# --------------------------------------------------------------------------- resource types


@attrs.define
class ResourceType:
    """What the server knows about one group/version/plural."""
    group: str
    version: str
    plural: str
    kind: str
    singular: str
    namespaced: bool
    shortnames: list[str] = attrs.field(factory=list)
    categories: list[str] = attrs.field(factory=list)
    #: Subresources: 'status' and 'scale' have semantics here; others are only listed.
    subresources: set[str] = attrs.field(factory=set)
    #: The CRD version's schema, or None for built-in kinds (not validated).
    schema: StructuralSchema | None = None
    #: Scale subresource paths: specReplicasPath, statusReplicasPath, labelSelectorPath.
    scale: dict[str, str] | None = None
    printer_columns: list[dict[str, Any]] = attrs.field(factory=list)
    #: The CRD's name when it is a custom resource.
    crd: str | None = None
    #: The version objects are stored in (a CRD's ``storage: true`` one); others are
    #: served from it with only ``apiVersion`` changed (the CRD conversion strategy None).
    storage_version: str | None = None

    @property
    def has_generation(self) -> bool:
        return self.crd is not None or (self.group, self.plural) in _BUILTIN_GENERATION

    @property
    def resource(self) -> kmock.resource:
        return kmock.resource(self.group, self.version, self.plural)

    @property
    def storage(self) -> kmock.resource:
        """The key of the objects in kmock's array: one set of objects for all served versions."""
        return kmock.resource(self.group, self.storage_version or self.version, self.plural)

    def convert(self, obj: dict[str, Any]) -> dict[str, Any]:
        """A stored object as served at this version (conversion strategy None)."""
        return obj if obj.get('apiVersion') == self.api_version else {**obj, 'apiVersion': self.api_version}

    @property
    def api_version(self) -> str:
        return f'{self.group}/{self.version}' if self.group else self.version

    @property
    def qualified(self) -> str:
        """``deployments.apps``, ``pods``: the name used in error messages."""
        return f'{self.plural}.{self.group}' if self.group else self.plural

    @property
    def kind_qualified(self) -> str:
        """``Deployment.apps``, ``Pod``: the name used in Invalid messages."""
        return f'{self.kind}.{self.group}' if self.group else self.kind

    def not_found(self, name: str) -> ApiError:
        return ApiError(404, 'NotFound', f'{self.qualified} "{name}" not found',
                        {'name': name, 'group': self.group, 'kind': self.plural})

    def invalid(self, name: str, errors: list[FieldError]) -> ApiError:
        text = str(errors[0]) if len(errors) == 1 else '[' + ', '.join(map(str, errors)) + ']'
        causes = [{'reason': e.type, 'message': e.detail, 'field': e.path} for e in errors]
        return ApiError(422, 'Invalid', f'{self.kind_qualified} "{name}" is invalid: {text}',
                        {'name': name, 'group': self.group, 'kind': self.kind, 'causes': causes})

    def conflict(self, name: str) -> ApiError:
        return ApiError(409, 'Conflict',
                        f'Operation cannot be fulfilled on {self.qualified} "{name}": the object has '
                        f'been modified; please apply your changes to the latest version and try again',
                        {'name': name, 'group': self.group, 'kind': self.plural})


@attrs.define
class _Event:
    rv: int
    type: str
    resource: kmock.resource
    namespace: str | None
    object: dict[str, Any]
    old: dict[str, Any] | None  # the previous state of a MODIFIED object (for selectors)


@attrs.define
class _Target:
    """A parsed request path."""
    rtype: ResourceType
    namespace: str | None
    name: str | None
    subresource: str | None


# --------------------------------------------------------------------------- the emulator


@attrs.define(kw_only=True)
class KubeEmulator(kmock.KubernetesEmulator):
    """A kmock emulator with a real API server's semantics (see the module docstring)."""

    #: Where Service cluster IPs come from (loopback by default: a process kubelet binds them).
    service_cidr: str = '127.1.0.0/16'

    _types: dict[tuple[str, str, str], ResourceType] = attrs.field(factory=dict, init=False)
    _rv: int = attrs.field(default=0, init=False)
    _events: list[_Event] = attrs.field(factory=list, init=False)
    _tick: asyncio.Future[None] | None = attrs.field(default=None, init=False)
    _stopping: bool = attrs.field(default=False, init=False)
    _gc_wakeup: asyncio.Event = attrs.field(factory=asyncio.Event, init=False)
    _gc_task: asyncio.Task[None] | None = attrs.field(default=None, init=False)
    _allocated_ips: set[str] = attrs.field(factory=set, init=False)
    #: Keys of deleted objects, oldest first: their histories are dropped after a while.
    _deleted_keys: collections.deque[tuple[Any, ...]] = attrs.field(factory=collections.deque, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.resources.load_bundled()
        for res in self.resources:
            self._register_builtin(res)
        for ns in ('default', 'kube-system', 'kube-public', 'kube-node-lease'):
            self._store_new(self._types['', 'v1', 'namespaces'], None, {
                'apiVersion': 'v1', 'kind': 'Namespace', 'metadata': {'name': ns},
                'spec': {'finalizers': ['kubernetes']}, 'status': {'phase': 'Active'}})

    # ------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> KubeEmulator:
        await super().__aenter__()
        if self._gc_task is None:
            self._stopping = False
            self._gc_task = asyncio.create_task(self._collect_garbage())
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self._entered == 1:
            await self.stop_watches()
            if self._gc_task is not None:
                self._gc_task.cancel()
                await asyncio.gather(self._gc_task, return_exceptions=True)
                self._gc_task = None
        await super().__aexit__(*exc)

    async def stop_watches(self) -> None:
        """End all watch streams (so that clients see EOF, not a hang, at shutdown)."""
        self._stopping = True
        self._notify()

    # ------------------------------------------------------------- registry

    def _register_builtin(self, res: kmock.resource) -> None:
        info = self.resources[res]
        if res.group is None or res.version is None or res.plural is None or '/' in res.plural:
            return
        rtype = ResourceType(
            group=res.group, version=res.version, plural=res.plural,
            kind=info.kind or res.plural.capitalize(), singular=info.singular or res.plural,
            namespaced=bool(info.namespaced), shortnames=sorted(info.shortnames),
            categories=sorted(info.categories), subresources=set(info.subresources))
        if (res.group, res.plural) in _BUILTIN_SCALE:
            rtype.subresources.add('scale')
            rtype.scale = {'specReplicasPath': '.spec.replicas', 'statusReplicasPath': '.status.replicas',
                           'labelSelectorPath': '.spec.selector'}
        self._types[res.group, res.version, res.plural] = rtype

    def register_crd(self, crd: Mapping[str, Any]) -> list[ResourceType]:
        """Serve the resources of a CustomResourceDefinition (as the API server does at once)."""
        spec = crd['spec']
        names = spec['names']
        added = []
        storage = next((v['name'] for v in spec['versions'] if v.get('storage')), spec['versions'][0]['name'])
        for ver in spec['versions']:
            if not ver.get('served', True):
                continue
            subs = ver.get('subresources') or {}
            schema = (ver.get('schema') or {}).get('openAPIV3Schema')
            rtype = ResourceType(
                group=spec['group'], version=ver['name'], plural=names['plural'], kind=names['kind'],
                singular=names.get('singular') or names['kind'].lower(),
                namespaced=spec.get('scope', 'Namespaced') == 'Namespaced',
                shortnames=list(names.get('shortNames') or []),
                categories=list(names.get('categories') or []),
                subresources={s for s in ('status', 'scale') if s in subs},
                schema=StructuralSchema(schema) if schema else None,
                scale=dict(subs['scale']) if 'scale' in subs else None,
                printer_columns=list(ver.get('additionalPrinterColumns') or []),
                crd=crd['metadata']['name'], storage_version=storage)
            self._types[rtype.group, rtype.version, rtype.plural] = rtype
            self.resources[rtype.resource] = kmock.ResourceInfo(
                namespaced=rtype.namespaced, kind=rtype.kind, singular=rtype.singular,
                verbs=_VERBS, shortnames=rtype.shortnames, categories=rtype.categories,
                subresources=rtype.subresources)
            added.append(rtype)
        return added

    async def apply(self, doc: Mapping[str, Any]) -> dict[str, Any]:
        """Create or replace one object (as ``kubectl apply`` would, minus the patching)."""
        group, _, version = doc['apiVersion'].rpartition('/')
        rtype = next((t for t in self._types.values() if (t.group, t.version, t.kind) == (group, version, doc['kind'])),
                     None)
        if rtype is None:
            raise ApiError(404, 'NotFound', f'no matches for kind "{doc["kind"]}" in version "{doc["apiVersion"]}"')
        name = doc['metadata']['name']
        namespace = doc['metadata'].get('namespace', 'default') if rtype.namespaced else None
        async with self._lock:
            old = self._get_live(rtype, namespace, name)
            if old is None:
                obj, _ = self._create(_Target(rtype, namespace, None, None), dict(doc), {})
            else:
                meta = {**doc['metadata'], 'resourceVersion': old['metadata']['resourceVersion']}
                obj, _ = self._replace(_Target(rtype, namespace, name, None), {**doc, 'metadata': meta}, {})
        return rtype.convert(obj)

    def _unregister_crd(self, crd_name: str) -> None:
        for key, rtype in list(self._types.items()):
            if rtype.crd == crd_name:
                del self._types[key]
                del self.resources[rtype.resource]

    def _find_type(self, group: str, version: str, plural: str) -> ResourceType:
        rtype = self._types.get((group, version, plural))
        if rtype is None:
            raise ApiError(404, 'NotFound', 'the server could not find the requested resource',
                           {'causes': [{'reason': 'UnexpectedServerResponse', 'message': '404 page not found'}]})
        return rtype

    # ------------------------------------------------------------- storage

    def _key(self, rtype: ResourceType, namespace: str | None, name: str) -> tuple[Any, ...]:
        return (rtype.storage, namespace if rtype.namespaced else None, name)

    def _get_live(self, rtype: ResourceType, namespace: str | None, name: str) -> dict[str, Any] | None:
        key = self._key(rtype, namespace, name)
        if key not in self._objects:
            return None
        obj = self._objects[key]
        return None if obj.deleted else obj.raw

    def _live_items(self, rtype: ResourceType | None = None,
                    namespace: str | None = None) -> list[tuple[ResourceType, dict[str, Any]]]:
        out = []
        for (res, ns, _), obj in self._objects.items():
            if obj.deleted:
                continue
            if rtype is not None and res != rtype.storage:
                continue
            if namespace is not None and ns != namespace:
                continue
            t = self._types.get((res.group, res.version, res.plural))
            if t is not None:
                out.append((t, obj.raw))
        return out

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _emit(self, etype: str, rtype: ResourceType, obj: dict[str, Any], old: dict[str, Any] | None = None) -> None:
        event = _Event(self._rv, etype, rtype.storage, obj['metadata'].get('namespace'),
                       copy.deepcopy(obj), old)
        self._events.append(event)
        if len(self._events) > _MAX_EVENTS:
            del self._events[:len(self._events) - _MAX_EVENTS]
        self._notify()
        self._gc_wakeup.set()

    def _notify(self) -> None:
        if self._tick is not None and not self._tick.done():
            self._tick.set_result(None)
        self._tick = None

    def _store_new(self, rtype: ResourceType, namespace: str | None, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj['metadata']
        meta['uid'] = str(uuid.uuid4())
        meta['resourceVersion'] = self._next_rv()
        meta['creationTimestamp'] = _now()
        if rtype.has_generation:
            meta['generation'] = 1
        if namespace is not None:
            meta['namespace'] = namespace
        key = self._key(rtype, namespace, meta['name'])
        if key in self._objects:
            self._objects[key].create(obj)  # soft-deleted before: continue its history
        else:
            self._objects[key] = obj
        self._emit('ADDED', rtype, obj)
        return obj

    def _store_update(self, rtype: ResourceType, old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
        meta = new['metadata']
        meta['resourceVersion'] = self._next_rv()
        key = self._key(rtype, meta.get('namespace'), meta['name'])
        history = self._objects[key].history
        history.append(new)
        if len(history) > _MAX_HISTORY:
            del history[:len(history) - _MAX_HISTORY]
        self._emit('MODIFIED', rtype, new, old)
        return new

    def _store_remove(self, rtype: ResourceType, obj: dict[str, Any]) -> None:
        meta = obj['metadata']
        key = self._key(rtype, meta.get('namespace'), meta['name'])
        self._objects[key].delete()
        self._deleted_keys.append(key)
        while len(self._deleted_keys) > _MAX_DELETED:
            old_key = self._deleted_keys.popleft()
            if old_key in self._objects and self._objects[old_key].deleted:
                del self._objects[old_key]
        if rtype.resource == _SERVICES:
            self._allocated_ips.discard((obj.get('spec') or {}).get('clusterIP'))
        if rtype.resource == _CRD_RESOURCE:
            self._unregister_crd(meta['name'])
        removed = copy.deepcopy(obj)
        removed['metadata']['resourceVersion'] = self._next_rv()
        self._emit('DELETED', rtype, removed)

    # ------------------------------------------------------------- HTTP entry

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        # kmock's own entry point parses every path for its DSL and fails on valid ones
        # (e.g. /api/v1/namespaces); this server parses API paths itself.
        body = await raw_request.read()
        request = rendering.Request(
            id=len(self._requests), raw_request=raw_request, url=raw_request.url,
            method=raw_request.method, params=dict(raw_request.query), headers=dict(raw_request.headers),
            cookies=dict(raw_request.cookies), body=body, text=body.decode('utf-8', 'replace'))
        # The sandbox runs for hours: keep kmock's request log bounded.
        if len(self._requests) > _MAX_REQUESTS:
            del self._requests[:len(self._requests) - _MAX_REQUESTS // 2]
        self._requests.append(request)
        try:
            return await self._handle(request)
        except Exception as e:
            if not self._errors:
                raise
            self._errors[-1].append(e)  # an emulator bug: kept for assertions in tests
            return await self._render_error(e)

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        path = request.url.path
        try:
            if path.rstrip('/') in ('/version', '/api', '/apis') or path.startswith(('/api/', '/apis/')):
                return await self._route(request, path)
            if path.startswith('/openapi/'):
                return self._serve_openapi(path)
            if path.rstrip('/') in ('/healthz', '/livez', '/readyz'):
                return aiohttp.web.Response(text='ok')
        except ApiError as e:
            return aiohttp.web.json_response(e.status(), status=e.code)
        try:
            # Other paths: kmock's own reactions (the discovery root "/", user-defined ones).
            return await super(kmock.KubernetesEmulator, self)._handle(request)
        except kmock.KubernetesError as e:  # e.g. an unknown endpoint: a 404, not an emulator bug
            return await self._render_error(e)

    async def _route(self, request: rendering.Request, path: str) -> aiohttp.web.StreamResponse:
        parts = [p for p in path.split('/') if p]
        method = request.method.value
        if parts == ['version']:
            return _json(self._version_info())
        if parts == ['api']:
            return _json({'kind': 'APIVersions', 'versions': ['v1'], 'serverAddressByClientCIDRs': [
                {'clientCIDR': '0.0.0.0/0', 'serverAddress': f'{request.url.host}:{request.url.port}'}]})
        if parts == ['apis']:
            return _json(self._api_group_list())
        if parts[0] == 'apis' and len(parts) == 2:
            group = self._api_group(parts[1])
            if group is None:
                raise ApiError(404, 'NotFound', 'the server could not find the requested resource')
            return _json(group)
        if (parts[0] == 'api' and len(parts) == 2) or (parts[0] == 'apis' and len(parts) == 3):
            group, version = ('', parts[1]) if parts[0] == 'api' else (parts[1], parts[2])
            return _json(self._api_resource_list(group, version))
        target = self._parse_target(parts)
        if target.subresource not in (None, 'status', 'scale', 'binding', 'eviction'):
            raise ApiError(404, 'NotFound', 'the server could not find the requested resource')  # exec, log...
        params = request.params
        if method == 'GET' and params.get('watch') in ('true', '1'):
            return await self._watch(request, target)
        body = _load_body(request) if method in ('POST', 'PUT', 'PATCH', 'DELETE') else None
        as_table = 'as=Table' in request.headers.get('Accept', '')
        async with self._lock:
            if method == 'GET' and target.name is None:
                result = self._list(target, params)
                return _json(self._to_table(target.rtype, result['items'], result) if as_table else result)
            if method == 'GET':
                obj = self._read(target)
                return _json(self._to_table(target.rtype, [obj], None) if as_table and not target.subresource else obj)
            if method == 'POST' and target.rtype.resource == _PODS and target.subresource == 'binding':
                return _json(self._bind(target, body), 201)
            if method == 'POST' and target.rtype.resource == _PODS and target.subresource == 'eviction':
                return _json(self._evict(target, body), 201)
            if method == 'POST' and target.rtype.group == 'authorization.k8s.io' and target.name is None:
                return _json(self._review_access(target, body), 201)
            if method == 'POST' and target.name is None:
                return self._respond(self._create(target, body, params), 201, target, params)
            if method == 'PUT' and target.name is not None:
                return self._respond(self._replace(target, body, params), 200, target, params)
            if method == 'PATCH' and target.name is not None:
                ctype = request.headers.get('Content-Type', '').split(';')[0].strip()
                return self._respond(self._patch(target, body, ctype, params), 200, target, params)
            if method == 'DELETE' and target.name is not None:
                code, result = self._delete(target, body, params)
                return _json(target.rtype.convert(result) if result.get('kind') != 'Status' else result, code)
            if method == 'DELETE':
                return _json(self._delete_collection(target, body, params))
        raise ApiError(405, 'MethodNotAllowed', f'the server does not allow this method on the requested resource')

    def _respond(self, result: tuple[dict[str, Any], list[str]], code: int, target: _Target,
                 params: Mapping[str, str]) -> aiohttp.web.StreamResponse:
        obj, warnings = result
        response = _json(target.rtype.convert(obj) if obj.get('kind') != 'Scale' else obj, code)
        for warning in warnings:
            response.headers.add('Warning', f'299 - {json.dumps(warning)}')
        return response

    def _parse_target(self, parts: list[str]) -> _Target:
        if parts[0] == 'api':
            group, version, rest = '', parts[1], parts[2:]
        else:
            group, version, rest = parts[1], parts[2], parts[3:]
        namespace = None
        # /namespaces/<ns>/<plural>/... unless it is the namespace object itself (/namespaces/<ns>/status).
        if len(rest) >= 3 and rest[0] == 'namespaces' and (group, version, rest[2]) in self._types \
                and self._types[group, version, rest[2]].namespaced:
            namespace, rest = rest[1], rest[2:]
        if not rest or len(rest) > 3:
            raise ApiError(404, 'NotFound', 'the server could not find the requested resource')
        rtype = self._find_type(group, version, rest[0])
        name = rest[1] if len(rest) >= 2 else None
        sub = rest[2] if len(rest) == 3 else None
        if sub is not None and sub not in rtype.subresources:
            raise ApiError(404, 'NotFound', 'the server could not find the requested resource')
        if rtype.namespaced and namespace is None and name is not None:
            raise ApiError(404, 'NotFound', 'the server could not find the requested resource')
        return _Target(rtype, namespace, name, sub)

    # ------------------------------------------------------------- discovery

    def _version_info(self) -> dict[str, Any]:
        return {'major': '1', 'minor': '32', 'gitVersion': 'v1.32.0-kmock', 'gitCommit': '',
                'gitTreeState': 'clean', 'buildDate': '2024-12-11T00:00:00Z', 'goVersion': 'go1.23.4',
                'compiler': 'gc', 'platform': 'linux/amd64'}

    def _groups(self) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for (group, version, _) in self._types:
            if group and version not in groups.setdefault(group, []):
                groups[group].append(version)
        for versions in groups.values():
            versions.sort(key=_version_priority)
        return groups

    def _api_group(self, name: str) -> dict[str, Any] | None:
        versions = self._groups().get(name)
        if not versions:
            return None
        gvs = [{'groupVersion': f'{name}/{v}', 'version': v} for v in versions]
        return {'kind': 'APIGroup', 'apiVersion': 'v1', 'name': name, 'versions': gvs, 'preferredVersion': gvs[0]}

    def _api_group_list(self) -> dict[str, Any]:
        groups = [self._api_group(name) for name in sorted(self._groups())]
        return {'kind': 'APIGroupList', 'apiVersion': 'v1', 'groups': groups}

    def _api_resource_list(self, group: str, version: str) -> dict[str, Any]:
        types = [t for (g, v, _), t in sorted(self._types.items()) if (g, v) == (group, version)]
        if not types:
            raise ApiError(404, 'NotFound', 'the server could not find the requested resource')
        resources = []
        for t in types:
            resources.append({'name': t.plural, 'singularName': t.singular, 'namespaced': t.namespaced,
                              'kind': t.kind, 'verbs': _VERBS, 'shortNames': t.shortnames,
                              'categories': t.categories, 'storageVersionHash': ''})
            for sub in sorted(t.subresources):
                kind = 'Scale' if sub == 'scale' else t.kind
                entry = {'name': f'{t.plural}/{sub}', 'singularName': '', 'namespaced': t.namespaced,
                         'kind': kind, 'verbs': ['get', 'patch', 'update']}
                if sub == 'scale':
                    entry.update(group='autoscaling', version='v1')
                resources.append(entry)
        return {'kind': 'APIResourceList', 'apiVersion': 'v1',
                'groupVersion': f'{group}/{version}' if group else version, 'resources': resources}

    def _serve_openapi(self, path: str) -> aiohttp.web.StreamResponse:
        # kubectl only needs a valid document to go on; it then validates server-side
        # (fieldValidation=Strict), which this emulator implements for custom resources.
        if path.rstrip('/') == '/openapi/v2':
            return _json({'swagger': '2.0', 'info': {'title': 'Kubernetes', 'version': 'v1.32.0'},
                          'paths': {}, 'definitions': {}})
        if path.rstrip('/') == '/openapi/v3':
            paths = {}
            for (group, version, _) in self._types:
                gv = f'apis/{group}/{version}' if group else f'api/{version}'
                paths[gv] = {'serverRelativeURL': f'/openapi/v3/{gv}'}
            return _json({'paths': paths})
        # A group-version document: one path per resource whose PATCH declares its kind and
        # the fieldValidation parameter (what kubectl checks before validating server-side).
        gv = path.rstrip('/').removeprefix('/openapi/v3/').split('/')
        group, version = ('', gv[1]) if gv[0] == 'api' and len(gv) == 2 else \
            (gv[1], gv[2]) if gv[0] == 'apis' and len(gv) == 3 else (None, None)
        paths = {}
        for (g, v, plural), t in self._types.items():
            if (g, v) != (group, version):
                continue
            prefix = f'/apis/{g}/{v}' if g else f'/api/{v}'
            scope = '/namespaces/{namespace}' if t.namespaced else ''
            paths[f'{prefix}{scope}/{plural}/{{name}}'] = {'patch': {
                'x-kubernetes-group-version-kind': {'group': g, 'version': v, 'kind': t.kind},
                'parameters': [{'name': name, 'in': 'query', 'schema': {'type': 'string', 'uniqueItems': True}}
                               for name in ('dryRun', 'fieldManager', 'fieldValidation', 'force')],
                'responses': {'200': {'description': 'OK'}}}}
        if not paths:
            raise ApiError(404, 'NotFound', 'the server could not find the requested resource')
        return _json({'openapi': '3.0.0', 'info': {'title': 'Kubernetes', 'version': 'v1.32.0'},
                      'paths': paths, 'components': {'schemas': {}}})

    # ------------------------------------------------------------- reads

    def _read(self, target: _Target) -> dict[str, Any]:
        assert target.name is not None
        obj = self._get_live(target.rtype, target.namespace, target.name)
        if obj is None:
            raise target.rtype.not_found(target.name)
        if target.subresource == 'scale':
            return self._to_scale(target.rtype, obj)
        return target.rtype.convert(obj)

    def _selectors(self, rtype: ResourceType, params: Mapping[str, str], name: str | None = None):
        labels = parse_label_selector(params.get('labelSelector', ''))
        allowed = {'metadata.name', 'metadata.namespace'} | _FIELD_LABELS.get((rtype.group, rtype.plural), set())
        fields = parse_field_selector(params.get('fieldSelector', ''), allowed)
        if name is not None:
            fields.append(('metadata.name', True, name))

        def matches(obj: Mapping[str, Any]) -> bool:
            obj_labels = obj.get('metadata', {}).get('labels') or {}
            return all(r.matches(obj_labels) for r in labels) and \
                all((_field_value(obj, f) == v) == eq for f, eq, v in fields)
        return matches

    def _list(self, target: _Target, params: Mapping[str, str]) -> dict[str, Any]:
        matches = self._selectors(target.rtype, params)
        items = [target.rtype.convert(obj) for _, obj in self._live_items(target.rtype, target.namespace)
                 if matches(obj)]
        def order(o: Mapping[str, Any]) -> list[str]:  # etcd's key order: namespace, then name
            return [o['metadata'].get('namespace') or '', o['metadata']['name']]

        items.sort(key=order)
        meta: dict[str, Any] = {'resourceVersion': str(self._rv)}
        if params.get('continue'):
            # The next page, after the last key of the previous one; the list keeps the
            # resourceVersion of its first page, so a watch from it misses nothing.
            try:
                token = json.loads(base64.b64decode(params['continue']))
                start, meta['resourceVersion'] = list(token['start']), str(int(token['rv']))
            except (ValueError, KeyError, TypeError) as e:
                raise ApiError(400, 'BadRequest', f'continue key is not valid: {e}')
            items = [o for o in items if order(o) > start]
        limit = int(params.get('limit') or 0)
        if 0 < limit < len(items):
            token = {'v': 'meta.k8s.io/v1', 'rv': int(meta['resourceVersion']), 'start': order(items[limit - 1])}
            meta['continue'] = base64.b64encode(json.dumps(token).encode()).decode()
            meta['remainingItemCount'] = len(items) - limit
            items = items[:limit]
        return {'kind': f'{target.rtype.kind}List', 'apiVersion': target.rtype.api_version,
                'metadata': meta, 'items': items}

    # ------------------------------------------------------------- writes

    def _check_namespace(self, target: _Target, creating: bool) -> None:
        if not target.rtype.namespaced:
            return
        ns = self._get_live(self._types['', 'v1', 'namespaces'], None, target.namespace or '')
        if ns is None:
            raise ApiError(404, 'NotFound', f'namespaces "{target.namespace}" not found',
                           {'name': target.namespace, 'kind': 'namespaces'})
        if creating and ns['metadata'].get('deletionTimestamp'):
            raise ApiError(403, 'Forbidden', f'{target.rtype.qualified} "" is forbidden: unable to create new '
                           f'content in namespace {target.namespace} because it is being terminated',
                           {'kind': target.rtype.plural, 'group': target.rtype.group})

    def _create(self, target: _Target, body: Any, params: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
        rtype = target.rtype
        if not isinstance(body, dict):
            raise ApiError(400, 'BadRequest', 'the body of the request was not a JSON object')
        if target.subresource:
            raise ApiError(405, 'MethodNotAllowed', 'the server does not allow this method on the requested resource')
        obj = copy.deepcopy(body)
        obj.setdefault('apiVersion', rtype.api_version)
        obj.setdefault('kind', rtype.kind)
        if obj['kind'] != rtype.kind or obj['apiVersion'] != rtype.api_version:
            raise ApiError(400, 'BadRequest', f'the API version in the data ({obj["apiVersion"]}) does not match '
                           f'the expected API version ({rtype.api_version})' if obj['apiVersion'] != rtype.api_version
                           else f'{obj["kind"]} is not suitable for {rtype.kind}')
        meta = obj.setdefault('metadata', {})
        if not isinstance(meta, dict):
            raise ApiError(400, 'BadRequest', 'metadata must be an object')
        if rtype.namespaced:
            if meta.get('namespace') and target.namespace and meta['namespace'] != target.namespace:
                raise ApiError(400, 'BadRequest', 'the namespace of the provided object does not match '
                               'the namespace sent on the request')
            target = _Target(rtype, target.namespace or meta.get('namespace'), None, None)
            if not target.namespace:
                raise ApiError(404, 'NotFound', 'the server could not find the requested resource')
        else:
            meta.pop('namespace', None)
        for key in ('uid', 'resourceVersion', 'creationTimestamp', 'deletionTimestamp',
                    'deletionGracePeriodSeconds', 'generation', 'selfLink'):
            meta.pop(key, None)
        if not meta.get('name') and meta.get('generateName'):
            for _ in range(100):
                name = meta['generateName'] + ''.join(random.choices(_GENERATE_ALPHABET, k=5))
                if self._get_live(rtype, target.namespace, name) is None:
                    meta['name'] = name
                    break
        name = meta.get('name') or ''
        self._check_namespace(target, creating=True)
        if 'status' in rtype.subresources:
            obj.pop('status', None)  # the strategies of kinds with a status subresource reset it
        _builtin_defaults(rtype, obj)
        if name and self._get_live(rtype, target.namespace, name) is not None:
            raise ApiError(409, 'AlreadyExists', f'{rtype.qualified} "{name}" already exists',
                           {'name': name, 'group': rtype.group, 'kind': rtype.plural})
        warnings = self._admit(rtype, None, obj, params)
        if params.get('dryRun') == 'All':
            return obj, warnings
        if rtype.resource == _SERVICES and obj['spec']['clusterIP'] != 'None':
            self._allocated_ips.add(obj['spec']['clusterIP'])
        if rtype.resource == _CRD_RESOURCE:
            obj['status'] = _crd_status(obj)
        obj['apiVersion'] = f'{rtype.group}/{rtype.storage_version}' if rtype.storage_version else obj['apiVersion']
        obj = self._store_new(rtype, target.namespace if rtype.namespaced else None, obj)
        if rtype.resource == _CRD_RESOURCE:
            self.register_crd(obj)
        return obj, warnings

    def _admit(self, rtype: ResourceType, old: dict[str, Any] | None, obj: dict[str, Any],
               params: Mapping[str, str]) -> list[str]:
        """Defaults, pruning and validation of a new object state; returns warnings."""
        meta = obj['metadata']
        name = meta.get('name') or ''
        errors: list[FieldError] = []
        if not name:
            errors.append(FieldError('metadata.name', 'FieldValueRequired',
                                     'Required value: name or generateName is required'))
        elif old is None:
            label_only = rtype.resource in (_NAMESPACES, _SERVICES)
            pattern = _DNS1123_LABEL if label_only else _DNS1123_SUBDOMAIN
            if not pattern.match(name) or len(name) > (63 if label_only else 253):
                what = 'RFC 1123 label' if label_only else 'RFC 1123 subdomain'
                errors.append(FieldError('metadata.name', 'FieldValueInvalid',
                                         f'Invalid value: {_go_repr(name)}: a lowercase {what} must consist of lower '
                                         f"case alphanumeric characters, '-' or '.', and must start and end with an "
                                         f'alphanumeric character'))
        errors.extend(_check_labels(meta))
        warnings: list[str] = []
        if rtype.schema is not None:
            unknown = rtype.schema.prune(obj)
            mode = params.get('fieldValidation', 'Warn')  # the API server's default
            if unknown and mode == 'Strict':
                fields = ', '.join(f'unknown field "{p.lstrip(".")}"' for p in unknown)
                raise ApiError(400, 'BadRequest', f'{rtype.kind} in version "{rtype.version}" cannot be handled as '
                               f'a {rtype.kind}: strict decoding error: {fields}')
            if mode == 'Warn':
                warnings = [f'unknown field "{p.lstrip(".")}"' for p in unknown]
            rtype.schema.default(obj)
            errors.extend(rtype.schema.validate(obj))
        if old is not None and (meta.get('deletionTimestamp')):
            added = set(meta.get('finalizers') or []) - set(old['metadata'].get('finalizers') or [])
            if added:
                errors.append(FieldError('metadata.finalizers', 'FieldValueForbidden',
                                         f'Forbidden: no new finalizers can be added if the object is being deleted, '
                                         f'found new finalizers []string{{{", ".join(map(json.dumps, sorted(added)))}}}'))
        if rtype.resource == _SERVICES:
            errors.extend(self._admit_service(old, obj))
        if rtype.resource == _CRD_RESOURCE:
            errors.extend(self._admit_crd(old, obj))
        if errors:
            raise rtype.invalid(name, errors)
        return warnings

    def _admit_service(self, old: dict[str, Any] | None, obj: dict[str, Any]) -> list[FieldError]:
        if old is None:
            obj.setdefault('status', {'loadBalancer': {}})  # as the API server returns it
        spec = obj.setdefault('spec', {})
        spec.setdefault('type', 'ClusterIP')
        spec.setdefault('sessionAffinity', 'None')
        for port in spec.get('ports') or []:
            port.setdefault('protocol', 'TCP')
            port.setdefault('targetPort', port.get('port'))
        if old is not None:
            old_ip = (old.get('spec') or {}).get('clusterIP')
            if not spec.get('clusterIP'):
                spec['clusterIP'] = old_ip
                spec['clusterIPs'] = [old_ip]
            elif spec['clusterIP'] != old_ip:
                return [FieldError('spec.clusterIPs[0]', 'FieldValueInvalid',
                                   f'Invalid value: []string{{{json.dumps(spec["clusterIP"])}}}: may not change '
                                   f'once set')]
            return []
        if spec.get('clusterIP') == 'None':
            spec['clusterIPs'] = ['None']
            return []
        network = ipaddress.ip_network(self.service_cidr)
        if spec.get('clusterIP'):
            if spec['clusterIP'] in self._allocated_ips:
                return [FieldError('spec.clusterIPs', 'FieldValueInvalid',
                                   f'Invalid value: []string{{{json.dumps(spec["clusterIP"])}}}: failed to '
                                   f'allocate IP {spec["clusterIP"]}: provided IP is already allocated')]
        else:
            for host in network.hosts():
                if str(host) not in self._allocated_ips:
                    spec['clusterIP'] = str(host)
                    break
            else:
                return [FieldError('spec.clusterIPs', 'FieldValueInvalid', 'Invalid value: []: range is full')]
        if ipaddress.ip_address(spec['clusterIP']) not in network:
            return [FieldError('spec.clusterIPs', 'FieldValueInvalid',
                               f'Invalid value: []string{{{json.dumps(spec["clusterIP"])}}}: failed to allocate IP '
                               f'{spec["clusterIP"]}: the provided IP ({spec["clusterIP"]}) is not in the valid '
                               f'range. The range of valid IPs is {self.service_cidr}')]
        spec['clusterIPs'] = [spec['clusterIP']]
        return []  # allocated when stored (see _create), released on deletion

    def _admit_crd(self, old: dict[str, Any] | None, obj: dict[str, Any]) -> list[FieldError]:
        spec = obj.get('spec') or {}
        names = spec.get('names') or {}
        errors = []
        expected = f'{names.get("plural")}.{spec.get("group")}'
        if obj['metadata'].get('name') != expected:
            errors.append(FieldError('metadata.name', 'FieldValueInvalid',
                                     f'Invalid value: {_go_repr(obj["metadata"].get("name"))}: must be spec.names.'
                                     f'plural+"."+spec.group'))
        for i, ver in enumerate(spec.get('versions') or []):
            schema = (ver.get('schema') or {}).get('openAPIV3Schema')
            if schema is not None:
                errors.extend(_check_schema(schema, f'spec.versions[{i}].schema.openAPIV3Schema'))
        return errors

    def _finish_write(self, target: _Target, old: dict[str, Any], new: dict[str, Any],
                      params: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
        """Turn a requested new state into the stored one (the common path of PUT and PATCH)."""
        rtype = target.rtype
        name = old['metadata']['name']
        if not isinstance(new, dict) or not isinstance(new.get('metadata', {}), dict):
            raise ApiError(400, 'BadRequest', 'the body of the request was not a valid object')
        new = copy.deepcopy(new)  # patches share unchanged parts with the stored version
        new_meta = new.setdefault('metadata', {})
        rv = new_meta.get('resourceVersion')
        if rv and rv != old['metadata']['resourceVersion']:
            raise rtype.conflict(name)
        if new_meta.get('name', name) != name:
            raise ApiError(400, 'BadRequest', f'the name of the object ({new_meta["name"]}) does not match '
                           f'the name on the URL ({name})')
        if target.subresource == 'status':
            # Only .status changes through /status.
            status = new.get('status')
            new = copy.deepcopy(old)
            if status is None:
                new.pop('status', None)
            else:
                new['status'] = status
        elif 'status' in rtype.subresources:
            # The main endpoint ignores .status when there is a status subresource.
            new.pop('status', None)
            if 'status' in old:
                new['status'] = copy.deepcopy(old['status'])
        new['apiVersion'], new['kind'] = old['apiVersion'], old['kind']
        meta = new['metadata']
        # Fields only the server writes.
        for key in ('uid', 'creationTimestamp', 'deletionTimestamp', 'deletionGracePeriodSeconds',
                    'generation', 'namespace'):
            if key in old['metadata']:
                meta[key] = old['metadata'][key]
            else:
                meta.pop(key, None)
        meta['name'] = name
        warnings = self._admit(rtype, old, new, params)
        ignored = {'metadata'} | ({'status'} if rtype.schema is None or 'status' in rtype.subresources else set())
        if {k: v for k, v in new.items() if k not in ignored} != {k: v for k, v in old.items() if k not in ignored}:
            if rtype.has_generation:
                meta['generation'] = int(old['metadata'].get('generation', 1)) + 1
            if rtype.resource == _PODS and target.subresource is None:
                _check_pod_update(rtype, old, new)
        meta['resourceVersion'] = old['metadata']['resourceVersion']
        if new == old:
            return old, warnings  # a no-op write: no new resourceVersion, no event
        if params.get('dryRun') == 'All':
            return new, warnings
        stored = self._store_update(rtype, old, new)
        if rtype.resource == _CRD_RESOURCE:
            self._unregister_crd(name)
            self.register_crd(stored)
        if meta.get('deletionTimestamp') and not meta.get('finalizers') and rtype.resource != _NAMESPACES:
            grace = meta.get('deletionGracePeriodSeconds')
            if not grace or _parse_time(meta['deletionTimestamp']) <= datetime.datetime.now(tz=datetime.UTC):
                self._store_remove(rtype, stored)
        return stored, warnings

    def _replace(self, target: _Target, body: Any, params: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
        assert target.name is not None
        rtype = target.rtype
        old = self._get_live(rtype, target.namespace, target.name)
        if old is None:
            raise rtype.not_found(target.name)
        if target.subresource == 'scale':
            return self._write_scale(target, old, body, params)
        # Custom resources and CRDs do not allow unconditional updates (their strategies say so).
        if (rtype.crd is not None or rtype.resource == _CRD_RESOURCE) and isinstance(body, Mapping) \
                and not (body.get('metadata') or {}).get('resourceVersion'):
            raise rtype.invalid(target.name, [FieldError('metadata.resourceVersion', 'FieldValueInvalid',
                                                         'Invalid value: 0x0: must be specified for an update')])
        return self._finish_write(target, old, copy.deepcopy(body), params)

    def _patch(self, target: _Target, body: Any, ctype: str,
               params: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
        assert target.name is not None
        rtype = target.rtype
        old = self._get_live(rtype, target.namespace, target.name)
        if old is None:
            raise rtype.not_found(target.name)
        base = self._to_scale(rtype, old) if target.subresource == 'scale' else rtype.convert(old)
        new = self.apply_patch(rtype, base, body, ctype)
        if target.subresource == 'scale':
            return self._write_scale(target, old, new, params)
        return self._finish_write(target, old, new, params)

    def apply_patch(self, rtype: ResourceType, base: dict[str, Any], body: Any, ctype: str) -> Any:
        if ctype == 'application/json-patch+json':
            try:
                return jsonpatch.JsonPatch(body).apply(copy.deepcopy(base))
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as e:
                # As apimachinery's NewGenericServerResponse(422): generic message, detail in causes.
                raise ApiError(422, 'Invalid', 'the server rejected our request due to an error in our request',
                               {'causes': [{'reason': 'UnexpectedServerResponse', 'message': str(e)}]})
        if ctype == 'application/merge-patch+json':
            return merge_patch(base, body)
        if ctype == 'application/strategic-merge-patch+json' and rtype.crd is None:
            return strategic_merge_patch(base, body)
        raise ApiError(415, 'UnsupportedMediaType', f'the body of the request was in an unknown format - accepted '
                       f'media types include: application/json-patch+json, application/merge-patch+json'
                       + ('' if rtype.crd else ', application/strategic-merge-patch+json'))

    def _bind(self, target: _Target, body: Any) -> dict[str, Any]:
        """POST pods/<name>/binding: what a scheduler does to assign a pod to a node."""
        assert target.name is not None
        pod = self._get_live(target.rtype, target.namespace, target.name)
        if pod is None:
            raise target.rtype.not_found(target.name)
        node = ((body or {}).get('target') or {}).get('name') if isinstance(body, Mapping) else None
        if not node:
            raise ApiError(422, 'Invalid', f'Binding "{target.name}" is invalid: target.name: Required value')
        if (pod.get('spec') or {}).get('nodeName'):
            raise ApiError(409, 'Conflict', f'Operation cannot be fulfilled on pods/binding "{target.name}": '
                           f'pod {target.name} is already assigned to node "{pod["spec"]["nodeName"]}"',
                           {'name': target.name, 'kind': 'pods/binding'})
        new = copy.deepcopy(pod)
        new['spec']['nodeName'] = node
        self._store_update(target.rtype, pod, new)
        return {'kind': 'Status', 'apiVersion': 'v1', 'metadata': {}, 'status': 'Success', 'code': 201}

    def _evict(self, target: _Target, body: Any) -> dict[str, Any]:
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

    def _review_access(self, target: _Target, body: Any) -> dict[str, Any]:
        """Access reviews: everything is allowed, as with the AlwaysAllow authorizer (no RBAC here)."""
        review = dict(body) if isinstance(body, Mapping) else {}
        review.setdefault('apiVersion', target.rtype.api_version)
        review.setdefault('kind', target.rtype.kind)
        review.setdefault('metadata', {})
        if target.rtype.kind.endswith('RulesReview'):
            review['status'] = {'resourceRules': [{'verbs': ['*'], 'apiGroups': ['*'], 'resources': ['*']}],
                                'nonResourceRules': [{'verbs': ['*'], 'nonResourceURLs': ['*']}],
                                'incomplete': False}
        else:
            review['status'] = {'allowed': True}
        return review

    def _to_scale(self, rtype: ResourceType, obj: dict[str, Any]) -> dict[str, Any]:
        assert rtype.scale is not None
        spec = eval_jsonpath(obj, rtype.scale['specReplicasPath'])
        status = eval_jsonpath(obj, rtype.scale.get('statusReplicasPath', ''))
        scale: dict[str, Any] = {
            'kind': 'Scale', 'apiVersion': 'autoscaling/v1',
            'metadata': {k: obj['metadata'][k] for k in ('name', 'namespace', 'uid', 'resourceVersion',
                                                         'creationTimestamp') if k in obj['metadata']},
            'spec': {'replicas': spec[0] if spec else 0},
            'status': {'replicas': status[0] if status else 0}}
        selector = eval_jsonpath(obj, rtype.scale['labelSelectorPath']) if rtype.scale.get('labelSelectorPath') else []
        if selector and isinstance(selector[0], Mapping):
            labels = selector[0].get('matchLabels') or {}
            scale['status']['selector'] = ','.join(f'{k}={v}' for k, v in sorted(labels.items()))
        elif selector:
            scale['status']['selector'] = selector[0]
        return scale

    def _write_scale(self, target: _Target, old: dict[str, Any], scale: Any,
                     params: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
        rtype = target.rtype
        assert rtype.scale is not None
        replicas = (scale.get('spec') or {}).get('replicas') if isinstance(scale, Mapping) else None
        if not isinstance(replicas, int) or replicas < 0:
            raise ApiError(422, 'Invalid', f'Scale.autoscaling "{old["metadata"]["name"]}" is invalid: '
                           f'spec.replicas: Invalid value: {_go_repr(replicas)}: must be greater than or equal to 0')
        rv = (scale.get('metadata') or {}).get('resourceVersion')
        if rv and rv != old['metadata']['resourceVersion']:
            raise rtype.conflict(old['metadata']['name'])
        new = copy.deepcopy(old)
        _set_dotted(new, rtype.scale['specReplicasPath'], replicas)
        main = _Target(rtype, target.namespace, target.name, None)
        stored, warnings = self._finish_write(main, old, new, {**params, 'fieldValidation': 'Ignore'})
        return self._to_scale(rtype, stored), warnings

    # ------------------------------------------------------------- deletion

    def _delete(self, target: _Target, body: Any, params: Mapping[str, str]) -> tuple[int, dict[str, Any]]:
        assert target.name is not None
        rtype = target.rtype
        if target.subresource:
            raise ApiError(405, 'MethodNotAllowed', 'the server does not allow this method on the requested resource')
        obj = self._get_live(rtype, target.namespace, target.name)
        if obj is None:
            raise rtype.not_found(target.name)
        options = dict(body) if isinstance(body, Mapping) else {}
        for key in ('propagationPolicy', 'gracePeriodSeconds'):
            if key in params:
                options[key] = int(params[key]) if key == 'gracePeriodSeconds' else params[key]
        if 'orphanDependents' in params or 'orphanDependents' in options:
            orphan = str(params.get('orphanDependents', options.get('orphanDependents'))).lower() == 'true'
            options.setdefault('propagationPolicy', 'Orphan' if orphan else 'Background')
        pre = options.get('preconditions') or {}
        if pre.get('uid') and pre['uid'] != obj['metadata']['uid']:
            raise ApiError(409, 'Conflict', f'Precondition failed: UID in precondition: {pre["uid"]}, '
                           f'UID in object meta: {obj["metadata"]["uid"]}')
        if pre.get('resourceVersion') and pre['resourceVersion'] != obj['metadata']['resourceVersion']:
            raise ApiError(409, 'Conflict', f'Precondition failed: ResourceVersion in precondition: '
                           f'{pre["resourceVersion"]}, ResourceVersion in object meta: '
                           f'{obj["metadata"]["resourceVersion"]}')
        if params.get('dryRun') == 'All' or 'All' in (options.get('dryRun') or []):
            return 200, obj
        result = self.delete_object(rtype, obj, options.get('propagationPolicy', 'Background'),
                                    options.get('gracePeriodSeconds'))
        if result is None:
            return 200, {'kind': 'Status', 'apiVersion': 'v1', 'metadata': {}, 'status': 'Success',
                         'details': {'name': target.name, 'group': rtype.group, 'kind': rtype.plural,
                                     'uid': obj['metadata']['uid']}}
        return 200, result

    def delete_object(self, rtype: ResourceType, obj: dict[str, Any], propagation: str = 'Background',
                      grace: int | None = None) -> dict[str, Any] | None:
        """Delete (or mark for deletion) one object; the stored object if it stays, else None."""
        meta = obj['metadata']
        uid = meta['uid']
        if propagation == 'Orphan':
            for dtype, dep in self._live_items():
                refs = dep['metadata'].get('ownerReferences') or []
                if any(r.get('uid') == uid for r in refs):
                    new = copy.deepcopy(dep)
                    new['metadata']['ownerReferences'] = [r for r in refs if r.get('uid') != uid]
                    if not new['metadata']['ownerReferences']:
                        del new['metadata']['ownerReferences']
                    self._store_update(dtype, dep, new)
        finalizers = list(meta.get('finalizers') or [])
        if propagation == 'Foreground' and 'foregroundDeletion' not in finalizers and not meta.get('deletionTimestamp'):
            finalizers.append('foregroundDeletion')
        if rtype.resource == _CRD_RESOURCE and _CRD_FINALIZER not in finalizers and not meta.get('deletionTimestamp'):
            finalizers.append(_CRD_FINALIZER)
        # A pod on a node is the kubelet's to stop (unless it has finished already).
        if rtype.resource == _PODS and (obj.get('spec') or {}).get('nodeName') \
                and (obj.get('status') or {}).get('phase') not in ('Succeeded', 'Failed'):
            default_grace = (obj.get('spec') or {}).get('terminationGracePeriodSeconds', 30)
            grace = default_grace if grace is None else int(grace)
        else:
            grace = 0
        terminating_ns = rtype.resource == _NAMESPACES
        if not finalizers and grace == 0 and not terminating_ns:
            self._store_remove(rtype, obj)
            return None
        new = copy.deepcopy(obj)
        new_meta = new['metadata']
        if new_meta.get('deletionTimestamp'):
            # Already being deleted: only a shorter grace period changes anything.
            if grace >= int(new_meta.get('deletionGracePeriodSeconds') or 0):
                return obj
        new_meta['deletionTimestamp'] = _now(grace)
        new_meta['deletionGracePeriodSeconds'] = grace
        if finalizers:
            new_meta['finalizers'] = finalizers
        if terminating_ns:
            new.setdefault('status', {})['phase'] = 'Terminating'
        stored = self._store_update(rtype, obj, new)
        if grace == 0 and not finalizers and not terminating_ns:
            self._store_remove(rtype, stored)
            return None
        return stored

    def _delete_collection(self, target: _Target, body: Any, params: Mapping[str, str]) -> dict[str, Any]:
        listed = self._list(target, params)
        options = dict(body) if isinstance(body, Mapping) else {}
        propagation = params.get('propagationPolicy', options.get('propagationPolicy', 'Background'))
        grace = params.get('gracePeriodSeconds', options.get('gracePeriodSeconds'))
        for obj in listed['items']:
            self.delete_object(target.rtype, obj, propagation, None if grace is None else int(grace))
        return {'kind': 'Status', 'apiVersion': 'v1', 'metadata': {}, 'status': 'Success'}

    async def _collect_garbage(self) -> None:
        """The garbage collector, namespace and CRD finalizers: the controllers the server runs."""
        while True:
            await self._gc_wakeup.wait()
            self._gc_wakeup.clear()
            async with self._lock:
                try:
                    self._gc_pass()
                except Exception as e:  # an emulator bug: keep collecting, and let tests see it
                    logger.exception('The garbage collector failed.')
                    if self._errors:
                        self._errors[-1].append(e)

    def _gc_pass(self) -> None:
        items = self._live_items()
        by_uid = {obj['metadata']['uid']: (t, obj) for t, obj in items}
        dependents: dict[str, list[str]] = {}
        for dtype, obj in items:
            meta = obj['metadata']
            refs = meta.get('ownerReferences') or []
            for ref in refs:
                dependents.setdefault(ref.get('uid'), []).append(meta['uid'])
            if not refs or meta.get('deletionTimestamp'):
                continue
            dangling = [r for r in refs if r.get('uid') not in by_uid]
            foreground = [r for r in refs if r.get('uid') in by_uid and 'foregroundDeletion' in
                          (by_uid[r['uid']][1]['metadata'].get('finalizers') or [])]
            if len(dangling) + len(foreground) == len(refs):
                self.delete_object(dtype, obj, 'Foreground' if foreground else 'Background')
            elif dangling:
                new = copy.deepcopy(obj)
                new['metadata']['ownerReferences'] = [r for r in refs if r not in dangling]
                self._store_update(dtype, obj, new)
        for otype, obj in items:
            meta = obj['metadata']
            if not meta.get('deletionTimestamp'):
                continue
            current = self._get_live(otype, meta.get('namespace'), meta['name'])
            if current is None or current['metadata']['uid'] != meta['uid']:
                continue
            finalizers = list(current['metadata'].get('finalizers') or [])
            if 'foregroundDeletion' in finalizers:
                live_deps = [u for u in dependents.get(meta['uid'], []) if u in by_uid
                             and self._still_live(*by_uid[u])]
                if not live_deps:
                    finalizers.remove('foregroundDeletion')
            if otype.resource == _CRD_RESOURCE and _CRD_FINALIZER in finalizers:
                crs = [(t, o) for t, o in self._live_items() if t.crd == meta['name']]
                for t, o in crs:
                    if not o['metadata'].get('deletionTimestamp'):
                        self.delete_object(t, o)
                if not crs:
                    finalizers.remove(_CRD_FINALIZER)
            if otype.resource == _NAMESPACES:
                contents = [(t, o) for t, o in self._live_items(namespace=meta['name']) if t.namespaced]
                for t, o in contents:
                    if not o['metadata'].get('deletionTimestamp'):
                        self.delete_object(t, o)
                if not contents and not finalizers:
                    self._store_remove(otype, current)
                    continue
            if finalizers != list(current['metadata'].get('finalizers') or []):
                new = copy.deepcopy(current)
                new['metadata']['finalizers'] = finalizers
                if not finalizers:
                    del new['metadata']['finalizers']
                stored = self._store_update(otype, current, new)
                if not finalizers and otype.resource != _NAMESPACES:
                    self._store_remove(otype, stored)

    def _still_live(self, rtype: ResourceType, obj: dict[str, Any]) -> bool:
        current = self._get_live(rtype, obj['metadata'].get('namespace'), obj['metadata']['name'])
        return current is not None and current['metadata']['uid'] == obj['metadata']['uid']

    # ------------------------------------------------------------- watch

    async def _watch(self, request: rendering.Request, target: _Target) -> aiohttp.web.StreamResponse:
        params = request.params
        rtype = target.rtype
        matches = self._selectors(rtype, params, target.name)
        # timeoutSeconds=0 or none: the server's own (long) timeout, here until shutdown.
        timeout = float(params['timeoutSeconds']) if params.get('timeoutSeconds') else None
        timeout = timeout or None
        since = params.get('resourceVersion') or ''
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout is not None else None
        as_table = 'as=Table' in request.headers.get('Accept', '')
        first = True

        def encode(etype: str, obj: dict[str, Any]) -> bytes:
            # kubectl get -w asks for tables: each event carries a one-row Table.
            nonlocal first
            if as_table and etype != 'ERROR':
                obj = self._to_table(rtype, [obj], None)
                if not first:
                    obj['columnDefinitions'] = []  # as the API server: only the first event has them
                first = False
            return json.dumps({'type': etype, 'object': obj}).encode() + b'\n'

        def visible(obj: Mapping[str, Any], namespace: str | None) -> bool:
            return (target.namespace is None or namespace == target.namespace) and matches(obj)

        response = aiohttp.web.StreamResponse(headers={'Content-Type': 'application/json'})
        assert request._raw_request is not None
        await response.prepare(request._raw_request)
        async with self._lock:
            if since in ('', '0'):
                initial = [{'type': 'ADDED', 'object': rtype.convert(obj)}
                           for _, obj in self._live_items(rtype, target.namespace) if matches(obj)]
                cursor = self._rv
            else:
                initial = []
                cursor = int(since) if since.isdigit() else 0
                oldest = self._events[0].rv if self._events else self._rv + 1
                if cursor < oldest - 1 and cursor < self._rv:
                    initial = [{'type': 'ERROR', 'object': ApiError(
                        410, 'Expired', f'too old resource version: {since} ({oldest - 1})').status()}]
                    cursor = -1
        try:
            for event in initial:
                await response.write(encode(event['type'], event['object']))
            while cursor >= 0 and not self._stopping:
                index = bisect.bisect_right(self._events, cursor, key=lambda e: e.rv)
                for event in self._events[index:]:
                    cursor = event.rv
                    if event.resource != rtype.storage:
                        continue
                    now_in = visible(event.object, event.namespace)
                    was_in = event.old is not None and visible(event.old, event.namespace)
                    etype = event.type
                    if etype == 'MODIFIED' and now_in and not was_in:
                        etype = 'ADDED'
                    elif etype == 'MODIFIED' and was_in and not now_in:
                        etype, now_in = 'DELETED', True
                    if now_in:
                        await response.write(encode(etype, rtype.convert(event.object)))
                if self._events and self._events[-1].rv > cursor:
                    continue  # events came while writing
                if self._tick is None:
                    self._tick = loop.create_future()
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    if params.get('allowWatchBookmarks') == 'true':
                        # As the API server does before closing a watch at its timeout.
                        bookmark = {'kind': rtype.kind, 'apiVersion': rtype.api_version,
                                    'metadata': {'resourceVersion': str(cursor)}}
                        await response.write(json.dumps({'type': 'BOOKMARK', 'object': bookmark}).encode() + b'\n')
                    break
                await asyncio.wait([self._tick], timeout=remaining)
            await response.write_eof()
        except ConnectionError:
            pass  # the client went away
        return response

    # ------------------------------------------------------------- tables

    def _to_table(self, rtype: ResourceType, items: list[dict[str, Any]],
                  listed: dict[str, Any] | None) -> dict[str, Any]:
        columns = [{'name': 'Name', 'type': 'string', 'format': 'name', 'priority': 0,
                    'description': 'Name must be unique within a namespace.'}]
        getters: list[Any] = [lambda o: o['metadata']['name']]
        if rtype.crd is not None and rtype.printer_columns:
            for col in rtype.printer_columns:
                columns.append({'name': col['name'], 'type': col.get('type', 'string'),
                                'format': col.get('format', ''), 'priority': col.get('priority', 0),
                                'description': col.get('description', '')})
                getters.append(lambda o, c=col: _cell(o, c))
        elif (rtype.group, rtype.plural) in _BUILTIN_COLUMNS:
            for name, ctype, priority, getter in _BUILTIN_COLUMNS[rtype.group, rtype.plural]:
                columns.append({'name': name, 'type': ctype, 'format': '', 'priority': priority, 'description': ''})
                getters.append(getter)
        else:
            columns.append({'name': 'Age', 'type': 'string', 'format': '', 'priority': 0,
                            'description': 'CreationTimestamp is a timestamp representing the server time '
                                           'when this object was created.'})
            getters.append(lambda o: _age(o['metadata'].get('creationTimestamp')))
        rows = [{'cells': [g(o) for g in getters],
                 'object': {'kind': 'PartialObjectMetadata', 'apiVersion': 'meta.k8s.io/v1',
                            'metadata': o['metadata']}} for o in items]
        meta = {'resourceVersion': listed['metadata']['resourceVersion']} if listed else {}
        return {'kind': 'Table', 'apiVersion': 'meta.k8s.io/v1', 'metadata': meta,
                'columnDefinitions': columns, 'rows': rows}


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
    return _age(o['metadata'].get('creationTimestamp'))


# The columns of kubectl's printers for the built-in kinds one looks at in the sandbox.
_BUILTIN_COLUMNS: dict[tuple[str, str], list[tuple[str, str, int, Any]]] = {
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
    ('', 'namespaces'): [
        ('Status', 'string', 0, lambda o: (o.get('status') or {}).get('phase', '')),
        ('Age', 'string', 0, _created),
    ],
}


_LABEL_NAME = re.compile(r'^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$')
_LABEL_VALUE_MSG = ("a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', "
                    "and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or "
                    "'12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')")
_NAME_PART_MSG = ("name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with "
                  "an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for "
                  "validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')")


def _check_key(key: str, field: str) -> list[FieldError]:
    """A label or annotation key: an optional DNS-subdomain prefix and a name part."""
    prefix, _, name = key.rpartition('/')
    detail = None
    if not name or not _LABEL_NAME.match(name):
        detail = _NAME_PART_MSG
    elif len(name) > 63:
        detail = 'name part must be no more than 63 characters'
    elif '/' in key and (not prefix or len(prefix) > 253 or not _DNS1123_SUBDOMAIN.match(prefix)):
        detail = 'prefix part a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, ' \
                 "'-' or '.', and must start and end with an alphanumeric character"
    return [] if detail is None else [FieldError(field, 'FieldValueInvalid', f'Invalid value: {_go_repr(key)}: {detail}')]


def _check_labels(meta: Mapping[str, Any]) -> list[FieldError]:
    """Label and annotation syntax, as ObjectMeta validation does it."""
    errors = []
    for key, value in (meta.get('labels') or {}).items():
        errors.extend(_check_key(key, 'metadata.labels'))
        if not isinstance(value, str) or (value and not _LABEL_NAME.match(value)):
            errors.append(FieldError('metadata.labels', 'FieldValueInvalid',
                                     f'Invalid value: {_go_repr(value)}: {_LABEL_VALUE_MSG}'))
        elif len(value) > 63:
            errors.append(FieldError('metadata.labels', 'FieldValueInvalid',
                                     f'Invalid value: {_go_repr(value)}: must be no more than 63 characters'))
    annotations = meta.get('annotations') or {}
    for key in annotations:
        errors.extend(_check_key(key, 'metadata.annotations'))
    if sum(len(k) + len(str(v)) for k, v in annotations.items()) > 256 * 1024:
        errors.append(FieldError('metadata.annotations', 'FieldValueTooLong', 'Too long: must have at most 262144 bytes'))
    return errors


def _check_pod_update(rtype: ResourceType, old: dict[str, Any], new: dict[str, Any]) -> None:
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
        fields = ','.join(f'`spec.{f}`' for f in _POD_MUTABLE)
        raise rtype.invalid(old['metadata']['name'], [FieldError(
            'spec', 'FieldValueForbidden', f'Forbidden: pod updates may not change fields other than {fields}')])


def _builtin_defaults(rtype: ResourceType, obj: dict[str, Any]) -> None:
    """The few built-in defaults and initial statuses that clients here read."""
    if rtype.resource == _NAMESPACES:
        obj.setdefault('spec', {}).setdefault('finalizers', ['kubernetes'])
        obj['status'] = {'phase': 'Active'}
    elif rtype.resource == _PODS:
        spec = obj.setdefault('spec', {})
        spec.setdefault('restartPolicy', 'Always')
        spec.setdefault('terminationGracePeriodSeconds', 30)
        spec.setdefault('dnsPolicy', 'ClusterFirst')
        obj['status'] = {'phase': 'Pending'}
    elif (rtype.group, rtype.plural) in _BUILTIN_SCALE:
        obj.setdefault('spec', {}).setdefault('replicas', 1)


def _crd_status(crd: Mapping[str, Any]) -> dict[str, Any]:
    """The status the API server's CRD controllers write: names accepted, established."""
    now = _now()
    names = dict(crd['spec']['names'])
    names.setdefault('singular', names['kind'].lower())
    names.setdefault('listKind', f'{names["kind"]}List')
    return {'acceptedNames': names, 'storedVersions': [
        v['name'] for v in crd['spec']['versions'] if v.get('storage')], 'conditions': [
        {'type': 'NamesAccepted', 'status': 'True', 'reason': 'NoConflicts',
         'message': 'no conflicts found', 'lastTransitionTime': now},
        {'type': 'Established', 'status': 'True', 'reason': 'InitialNamesAccepted',
         'message': 'the initial names have been accepted', 'lastTransitionTime': now}]}


def _age(ts: str | None) -> str:
    if not ts:
        return '<unknown>'
    return human_duration((datetime.datetime.now(tz=datetime.UTC) - _parse_time(ts)).total_seconds())


def _cell(obj: Mapping[str, Any], column: Mapping[str, Any]) -> Any:
    values = eval_jsonpath(obj, column['jsonPath'])
    if not values:
        return None
    if column.get('type') == 'date' and isinstance(values[0], str):
        return _age(values[0])  # what kubectl shows for date columns: an age
    if len(values) > 1:
        return ','.join(v if isinstance(v, str) else json.dumps(v) for v in values)
    value = values[0]
    if column.get('type') == 'string' and not isinstance(value, str):
        if isinstance(value, (dict, list)):
            return json.dumps(value)
        return str(value).lower() if isinstance(value, bool) else str(value)
    return value


def _version_priority(version: str) -> tuple[int, int, int]:
    """Kubernetes' version ordering: GA > beta > alpha, higher numbers first."""
    m = re.fullmatch(r'v(\d+)(?:(alpha|beta)(\d+))?', version)
    if not m:
        return (3, 0, 0)
    stage = {'alpha': 2, 'beta': 1, None: 0}[m.group(2)]
    return (stage, -int(m.group(1)), -int(m.group(3) or 0))


def _json(data: Any, status: int = 200) -> aiohttp.web.Response:
    return aiohttp.web.json_response(data, status=status)


def _load_body(request: rendering.Request) -> Any:
    if not request.body:
        return None
    ctype = request.headers.get('Content-Type', '').split(';')[0].strip()
    if ctype in ('application/vnd.kubernetes.protobuf', 'application/cbor', 'application/apply-patch+cbor'):
        # As the API server answers for kinds it has no such codec for (custom resources).
        raise ApiError(415, 'UnsupportedMediaType', f'the body of the request was in an unknown format - accepted '
                       f'media types include: application/json, application/yaml')
    try:
        return json.loads(request.body)
    except ValueError:
        raise ApiError(400, 'BadRequest', 'the body of the request could not be decoded as JSON')
