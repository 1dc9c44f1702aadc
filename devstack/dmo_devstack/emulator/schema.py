"""
CRD structural schemas: pruning, defaulting and validation, as the API server does them.

Order as in the apiextensions-apiserver: unknown fields are pruned (outside
``x-kubernetes-preserve-unknown-fields``), nulls of non-nullable fields dropped,
``default`` values applied, then the object validated. The OpenAPI v3.0 schema is
translated to JSON Schema Draft 4 (its dialect) for the ``jsonschema`` library, with
``x-kubernetes-int-or-string`` and ``nullable`` mapped; its errors are turned into the
API server's field errors and messages. ``x-kubernetes-list-type`` ``map``/``set``
uniqueness is checked as ``listtype.ValidateListSetsAndMaps`` does it. CEL rules
(``x-kubernetes-validations``) are not evaluated.
"""
from __future__ import annotations

import base64
import copy
import datetime
import json
import re
from collections.abc import Mapping
from typing import Any

import jsonschema

from .errors import FieldError, go_repr, path_str

class StructuralSchema:
    """One CRD version's openAPIV3Schema: pruning, defaulting and validation."""

    def __init__(self, schema: Mapping[str, Any]) -> None:
        self.schema: Mapping[str, Any] = schema
        #: The validator is compiled once; the DaskCluster schema is ~6000 lines.
        self.validator = jsonschema.Draft4Validator(to_jsonschema(schema, top=True), format_checker=FORMATS)

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
        apply_defaults(obj, self.schema)

    def validate(self, obj: Mapping[str, Any]) -> list[FieldError]:
        body = {k: v for k, v in obj.items() if k not in ('apiVersion', 'kind', 'metadata')}
        errors = []
        for e in sorted(self.validator.iter_errors(body), key=lambda e: list(map(str, e.absolute_path))):
            errors.extend(field_errors(e))
        errors.extend(list_type_errors(self.schema, body, ''))
        return errors


# The formats the API server checks (kube-openapi's strfmt registry) that matter here;
# others (int32, int64, double, password...) are not checked, by the API server either.
FORMATS = jsonschema.FormatChecker(formats=['email', 'ipv4', 'ipv6', 'uuid', 'date'])


@FORMATS.checks('date-time', raises=ValueError)
def _is_date_time(value: object) -> bool:
    if not isinstance(value, str):
        return True
    if not re.fullmatch(r'\d{4}-\d\d-\d\d[Tt ]\d\d:\d\d:\d\d(\.\d+)?([Zz]|[+-]\d\d:\d\d)', value):
        return False
    datetime.datetime.fromisoformat(value.upper().replace('Z', '+00:00').replace(' ', 'T'))
    return True


@FORMATS.checks('byte', raises=(ValueError, TypeError))
def _is_base64(value: object) -> bool:
    if isinstance(value, str):
        base64.b64decode(value, validate=True)
    return True


def to_jsonschema(schema: Mapping[str, Any], top: bool = False) -> dict[str, Any]:
    """Translate an OpenAPI v3 structural schema into plain JSON Schema (Draft 4)."""
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in ('properties', 'patternProperties'):
            out[key] = {k: to_jsonschema(v) for k, v in value.items()}
        elif key in ('items', 'not') and isinstance(value, Mapping):
            out[key] = to_jsonschema(value)
        elif key == 'additionalProperties' and isinstance(value, Mapping):
            out[key] = to_jsonschema(value)
        elif key in ('allOf', 'anyOf', 'oneOf'):
            out[key] = [to_jsonschema(v) for v in value]
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


def check_schema(schema: Mapping[str, Any], path: str) -> list[FieldError]:
    """The CRD schema checks that keep the validator from failing: types and patterns."""
    errors = []
    if 'type' in schema and schema['type'] not in _SCHEMA_TYPES:
        supported = ', '.join(f'"{t}"' for t in _SCHEMA_TYPES)
        errors.append(FieldError(f'{path}.type', 'FieldValueNotSupported',
                                 f'Unsupported value: {go_repr(schema["type"])}: supported values: {supported}'))
    if 'pattern' in schema:
        try:
            re.compile(schema['pattern'])
        except (re.error, TypeError) as e:
            errors.append(FieldError(f'{path}.pattern', 'FieldValueInvalid',
                                     f'Invalid value: {go_repr(schema["pattern"])}: must be a valid regex: {e}'))
    for key, sub in (schema.get('properties') or {}).items():
        errors.extend(check_schema(sub, f'{path}.properties[{key}]'))
    for key in ('items', 'additionalProperties', 'not'):
        if isinstance(schema.get(key), Mapping):
            errors.extend(check_schema(schema[key], f'{path}.{key}'))
    for key in ('allOf', 'anyOf', 'oneOf'):
        for j, sub in enumerate(schema.get(key) or []):
            errors.extend(check_schema(sub, f'{path}.{key}[{j}]'))
    return errors


def apply_defaults(value: Any, schema: Mapping[str, Any]) -> None:
    if isinstance(value, dict):
        props = schema.get('properties') or {}
        for key, sub in props.items():
            if key not in value and 'default' in sub:
                value[key] = copy.deepcopy(sub['default'])
            if key in value:
                apply_defaults(value[key], sub)
        addl = schema.get('additionalProperties')
        if isinstance(addl, Mapping):
            for key in value:
                if key not in props:
                    apply_defaults(value[key], addl)
    elif isinstance(value, list) and isinstance(schema.get('items'), Mapping):
        for item in value:
            apply_defaults(item, schema['items'])


_JSON_TYPES = {str: 'string', bool: 'boolean', int: 'integer', float: 'number',
               list: 'array', dict: 'object', type(None): 'null'}


def field_errors(e: jsonschema.ValidationError) -> list[FieldError]:
    path = path_str(e.absolute_path)
    where = path or '<root>'
    v, inst = e.validator_value, e.instance
    match e.validator:
        case 'required':
            missing = [k for k in v if isinstance(inst, Mapping) and k not in inst]
            return [FieldError(f'{path}.{k}' if path else k, 'FieldValueRequired', 'Required value')
                    for k in missing]
        case 'enum':
            supported = ', '.join(go_repr(x) for x in v)
            return [FieldError(where, 'FieldValueNotSupported',
                               f'Unsupported value: {go_repr(inst)}: supported values: {supported}')]
        case 'type':
            actual = _JSON_TYPES.get(type(inst), 'object')
            wanted = v if isinstance(v, str) else ' or '.join(t for t in v if t != 'null')
            return [FieldError(where, 'FieldValueTypeInvalid',
                               f'Invalid value: "{actual}": {where} in body must be of type {wanted}: "{actual}"')]
        case 'maxLength':
            return [FieldError(where, 'FieldValueTooLong', f'Too long: may not be more than {v} bytes')]
        case 'maxItems' | 'maxProperties':  # both field.TooMany (apiextensions' validation.go)
            return [FieldError(where, 'FieldValueTooMany', f'Too many: {len(inst)}: must have at most {v} items')]
        case 'minProperties':
            detail = f'{where} in body should have at least {v} properties'  # go-openapi's tooFewProperties
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
            detail = f'{where} in body must be of type {v}: {go_repr(inst)}'
        case 'uniqueItems':
            return [FieldError(where, 'FieldValueDuplicate', f'Duplicate value: {go_repr(inst)}')]
        case 'multipleOf':
            detail = f'{where} in body should be a multiple of {v}'
        case _:
            detail = e.message
    return [FieldError(where, 'FieldValueInvalid', f'Invalid value: {go_repr(inst)}: {detail}')]


# --------------------------------------------------------------------------- list types


def list_type_errors(schema: Mapping[str, Any], value: Any, path: str) -> list[FieldError]:
    """Uniqueness of ``x-kubernetes-list-type`` ``set`` items and ``map`` keys (listtype validation)."""
    if isinstance(value, Mapping):
        return _object_list_errors(schema, value, path)
    if not isinstance(value, list):
        return []
    errors = []
    if schema.get('x-kubernetes-list-type') == 'set':
        errors += [_duplicate(path, i, value[i]) for i in _repeated(value)]
    elif schema.get('x-kubernetes-list-type') == 'map':
        errors += _list_map_errors(schema.get('x-kubernetes-list-map-keys') or [], value, path)
    if isinstance(schema.get('items'), Mapping):
        for i, item in enumerate(value):
            errors += list_type_errors(schema['items'], item, f'{path}[{i}]')
    return errors


def _object_list_errors(schema: Mapping[str, Any], value: Mapping[str, Any], path: str) -> list[FieldError]:
    errors = []
    props = schema.get('properties') or {}
    addl = schema.get('additionalProperties')
    for key, sub in value.items():
        if isinstance(addl, Mapping):  # field.Path.Key(): path[key]
            errors += list_type_errors(addl, sub, f'{path}[{key}]')
        if key in props:
            errors += list_type_errors(props[key], sub, f'{path}.{key}' if path else key)
    return errors


def _list_map_errors(keys: list[str], items: list[Any], path: str) -> list[FieldError]:
    for i, item in enumerate(items):
        if item is not None and not isinstance(item, Mapping):
            return [FieldError(f'{path}[{i}]', 'FieldValueInvalid',
                               f'Invalid value: {go_repr(item)}: must be an object for an array of '
                               f'list-type map')]
    # An item's key: its key fields that are set (a missing one is "unspecified").
    key_values = [{k: item[k] for k in keys if k in item} if item else {} for item in items]
    return [_duplicate(path, i, key_values[i]) for i in _repeated(key_values)]


def _repeated(values: list[Any]) -> list[int]:
    """Indices of the second appearance of each repeated value (as validateListSet reports)."""
    seen: dict[str, int] = {}
    second = []
    for i, value in enumerate(values):
        key = json.dumps(value, sort_keys=True)
        seen[key] = seen.get(key, 0) + 1
        if seen[key] == 2:
            second.append(i)
    return second


def _duplicate(path: str, index: int, value: Any) -> FieldError:
    return FieldError(f'{path}[{index}]', 'FieldValueDuplicate', f'Duplicate value: {go_repr(value)}')
