"""
The OpenAPI schemas of built-in kinds, as kube-apiserver 1.36 publishes them.

They come from the PyPI package ``kubernetes-validate`` (pinned), which ships the
API server's OpenAPI definitions as JSON Schema (2020-12). A write of a built-in kind
is checked against its schema, the way the API server's decoding and validation see
it: a value of the wrong JSON type is a 400 BadRequest decode error with Go's
``json: cannot unmarshal ...`` message; a missing required field is a 422 "Required
value"; an enum miss a 422 "Unsupported value". ObjectMeta is not checked here (the
server validates it in code, see ``meta``), nor are unknown fields (kept, not pruned).
Validators are compiled once per kind and kept.
"""
from __future__ import annotations

import functools
import importlib.resources
import json
from collections.abc import Mapping
from typing import Any

import jsonschema

from .errors import ApiError, FieldError, go_repr

#: The Kubernetes version whose schemas are used (kubernetes-validate's folder name).
KUBERNETES_VERSION = 'v1.36.0'
_DEF_PREFIX = '#/$defs/'


@functools.cache
def _definitions() -> dict[str, Any]:
    """All definitions (~770, 1.6 MB of JSON): loaded once, on the first built-in write."""
    folder = importlib.resources.files('kubernetes_validate') / 'kubernetes-json-schema' / f'{KUBERNETES_VERSION}-local'
    return json.loads((folder / '_definitions.json').read_text())['$defs']


@functools.cache
def _kinds() -> dict[tuple[str, str, str], str]:
    """(group, version, kind) -> definition name, from ``x-kubernetes-group-version-kind``."""
    kinds = {}
    for name, schema in _definitions().items():
        for gvk in schema.get('x-kubernetes-group-version-kind') or []:
            kinds[gvk['group'], gvk['version'], gvk['kind']] = name
    return kinds


@functools.cache
def schema_for(group: str, version: str, kind: str) -> BuiltinSchema | None:
    name = _kinds().get((group, version, kind))
    return None if name is None else BuiltinSchema(name)


def patch_meta_root(group: str, version: str, kind: str) -> tuple[Mapping[str, Any], Mapping[str, Any]] | None:
    """A kind's definition and all definitions (for strategic merge patches' list strategies)."""
    name = _kinds().get((group, version, kind))
    return None if name is None else (_definitions()[name], _definitions())


class BuiltinSchema:
    """One built-in kind's schema and its compiled validator."""

    def __init__(self, definition: str) -> None:
        self.definition = definition
        defs = _definitions()
        root = dict(defs[definition])
        root['properties'] = {k: v for k, v in root['properties'].items() if k not in ('apiVersion', 'kind', 'metadata')}
        root['required'] = [k for k in root.get('required') or [] if k != 'metadata']
        self.root = root
        # The definitions ride along (not copied) so that "#/$defs/..." references resolve.
        self.validator = jsonschema.Draft202012Validator({**root, '$defs': defs})

    def check(self, obj: Mapping[str, Any], api_version: str) -> list[FieldError]:
        """Field errors of ``obj``; raises the 400 a Go decoder would for a wrong JSON type."""
        body = {k: v for k, v in obj.items() if k not in ('apiVersion', 'kind', 'metadata')}
        errors = sorted(self.validator.iter_errors(body), key=lambda e: [str(p) for p in e.absolute_path])
        for e in errors:
            if e.instance is not None and e.validator in ('type', 'oneOf'):
                raise self._decode_error(obj['kind'], api_version, list(e.absolute_path), e.instance)
        return [f for e in errors for f in _field_errors(e)]

    def _decode_error(self, kind: str, api_version: str, path: list[Any], value: Any) -> ApiError:
        struct, fields, schema = self._locate(path)
        version = api_version.rpartition('/')[2]
        json_type = _json_type(value)
        return ApiError(400, 'BadRequest', f'{kind} in version "{version}" cannot be handled as a {kind}: json: '
                        f'cannot unmarshal {json_type} into Go struct field {struct}.{".".join(fields)} of type '
                        f'{self._go_type(schema)}')

    def _locate(self, path: list[Any]) -> tuple[str, list[str], Mapping[str, Any]]:
        """The Go struct holding the field at ``path``, the JSON path Go reports, and its schema."""
        defs = _definitions()
        struct, fields, schema = _short(self.definition), [], self.root
        for part in path:
            while '$ref' in schema:
                name = schema['$ref'].removeprefix(_DEF_PREFIX)
                struct, schema = _short(name), defs[name]
            if isinstance(part, int):  # Go's path has no indices
                schema = schema.get('items') or {}
            elif part in (schema.get('properties') or {}):
                fields.append(part)
                schema = schema['properties'][part]
            else:
                schema = schema.get('additionalProperties') or {}
        return struct, fields, schema

    def _go_type(self, schema: Mapping[str, Any]) -> str:
        if '$ref' in schema:
            package, _, name = schema['$ref'].removeprefix(_DEF_PREFIX).rpartition('.')
            return f'{package.rpartition(".")[2]}.{name}'
        types = schema.get('type') or []
        types = [t for t in ([types] if isinstance(types, str) else types) if t != 'null']
        match types[0] if types else 'object':
            case 'array':
                return '[]' + self._go_type(schema.get('items') or {})
            case 'object':
                addl = schema.get('additionalProperties')
                return f'map[string]{self._go_type(addl)}' if isinstance(addl, Mapping) else 'map[string]interface {}'
            case 'integer':
                return schema.get('format') or 'int'
            case 'number':
                return 'float64'
            case 'boolean':
                return 'bool'
            case other:
                return other


def _short(definition: str) -> str:
    return definition.rpartition('.')[2]


def _json_type(value: Any) -> str:
    """How Go's decoder names a JSON value it cannot put in a field."""
    if isinstance(value, bool):
        return 'bool'
    if isinstance(value, float) and not value.is_integer():
        return f'number {value!r}'
    if isinstance(value, (int, float)):
        return 'number'
    return {str: 'string', dict: 'object', list: 'array'}.get(type(value), 'value')


def _field_errors(e: jsonschema.ValidationError) -> list[FieldError]:
    path = '.'.join(f'[{p}]' if isinstance(p, int) else p for p in e.absolute_path).replace('.[', '[')
    if e.validator == 'required':
        missing = [k for k in e.validator_value if k not in e.instance]
        return [FieldError(f'{path}.{k}' if path else k, 'FieldValueRequired', 'Required value') for k in missing]
    if e.validator == 'type':  # null where a value is needed: decoded as empty, then required
        return [FieldError(path, 'FieldValueRequired', 'Required value')]
    if e.validator == 'enum':
        supported = ', '.join(go_repr(v) for v in e.validator_value if v is not None)
        return [FieldError(path, 'FieldValueNotSupported',
                           f'Unsupported value: {go_repr(e.instance)}: supported values: {supported}')]
    if e.validator == 'oneOf':
        return []  # null IntOrString/Quantity: both branches accept it
    return [FieldError(path, 'FieldValueInvalid', f'Invalid value: {go_repr(e.instance)}: {e.message}')]
