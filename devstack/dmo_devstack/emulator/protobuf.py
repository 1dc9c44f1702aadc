"""
Protobuf request bodies (``application/vnd.kubernetes.protobuf``) of a few built-in kinds.

client-go's typed clientsets send protobuf for built-in kinds: Helm's release storage
(a Secret, or a ConfigMap with ``HELM_DRIVER=configmap``, and the ``DeleteOptions`` of
their deletion) and kubectl's imperative commands (``create namespace``, ``create
secret``, ``create configmap``) do. A real API server decodes such a body with
apimachinery's protobuf serializer (``runtime/serializer/protobuf``):

- the 4-byte magic ``k8s\\x00``, then a ``runtime.Unknown`` envelope:
  ``typeMeta`` (1: {1 apiVersion, 2 kind}), ``raw`` (2: the object's own message),
  ``contentEncoding`` (3), ``contentType`` (4) (both ignored when decoding, as there);
- ``raw`` is the type's message of its ``generated.proto`` (field numbers below, from
  k8s.io/api/core/v1 and k8s.io/apimachinery/pkg/apis/meta/v1). Unknown fields are
  skipped, as gogo-protobuf's generated ``Unmarshal`` does.

The decoded message is turned into the JSON object the same Go struct would serialize
to, so that the rest of the emulator sees what a JSON client sends: Go's non-pointer
fields are always written in protobuf, so empty strings, zeros and ``false`` of
``omitempty`` fields are dropped; pointer fields (``*bool``, ``*int64``) and required
ones (an owner reference's ``apiVersion``...) are kept even when zero; ``bytes`` become
base64 strings; a ``metav1.Time`` becomes RFC 3339 at whole seconds (its JSON form; an
empty message is the zero time, i.e. absent); ``FieldsV1`` its raw JSON.

Approximated: only the kinds in ``KINDS`` are decoded; a protobuf body of any other
kind gets the 415 a real server gives for kinds it has no protobuf codec for (custom
resources), although a real server would decode it. Responses are always JSON, which
client-go accepts (its Accept header lists ``application/json`` after protobuf).
"""
from __future__ import annotations

import base64
import datetime
import json
from collections.abc import Iterator
from typing import Any

import attrs

from .errors import ApiError

#: The prefix of every Kubernetes protobuf body (``k8s`` and a NUL).
MAGIC = b'k8s\x00'

_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5


class ProtobufError(ValueError):
    """A body that is not a well-formed protobuf message."""


@attrs.frozen
class Field:
    """One field of a message: its JSON name and how its value is read.

    ``kind`` is ``string``, ``bytes`` (base64 in JSON), ``raw`` (the bytes themselves),
    ``bool``, ``int`` (int32/int64 varints), ``time`` (metav1.Time), ``json`` (FieldsV1:
    raw JSON), ``message`` (``schema`` given),
    ``map`` (string keys; ``values`` is ``string`` or ``bytes``).
    ``keep``: a pointer or required field, whose zero value is kept (not ``omitempty``).
    """
    name: str
    kind: str
    schema: dict[int, Field] | None = None
    repeated: bool = False
    keep: bool = False
    values: str = 'string'


# k8s.io/apimachinery/pkg/apis/meta/v1/generated.proto
OWNER_REFERENCE = {
    5: Field('apiVersion', 'string', keep=True), 1: Field('kind', 'string', keep=True),
    3: Field('name', 'string', keep=True), 4: Field('uid', 'string', keep=True),
    6: Field('controller', 'bool', keep=True), 7: Field('blockOwnerDeletion', 'bool', keep=True)}
FIELDS_V1 = {1: Field('Raw', 'json')}
MANAGED_FIELDS_ENTRY = {
    1: Field('manager', 'string'), 2: Field('operation', 'string'), 3: Field('apiVersion', 'string'),
    4: Field('time', 'time'), 6: Field('fieldsType', 'string'), 7: Field('fieldsV1', 'message', FIELDS_V1),
    8: Field('subresource', 'string')}
OBJECT_META = {
    1: Field('name', 'string'), 2: Field('generateName', 'string'), 3: Field('namespace', 'string'),
    4: Field('selfLink', 'string'), 5: Field('uid', 'string'), 6: Field('resourceVersion', 'string'),
    7: Field('generation', 'int'), 8: Field('creationTimestamp', 'time'), 9: Field('deletionTimestamp', 'time'),
    10: Field('deletionGracePeriodSeconds', 'int', keep=True),
    11: Field('labels', 'map'), 12: Field('annotations', 'map'),
    13: Field('ownerReferences', 'message', OWNER_REFERENCE, repeated=True),
    14: Field('finalizers', 'string', repeated=True),
    17: Field('managedFields', 'message', MANAGED_FIELDS_ENTRY, repeated=True)}
PRECONDITIONS = {1: Field('uid', 'string', keep=True), 2: Field('resourceVersion', 'string', keep=True)}
DELETE_OPTIONS = {
    1: Field('gracePeriodSeconds', 'int', keep=True), 2: Field('preconditions', 'message', PRECONDITIONS),
    3: Field('orphanDependents', 'bool', keep=True), 4: Field('propagationPolicy', 'string', keep=True),
    5: Field('dryRun', 'string', repeated=True),
    6: Field('ignoreStoreReadErrorWithClusterBreakingPotential', 'bool', keep=True)}

# k8s.io/api/core/v1/generated.proto
SECRET = {
    1: Field('metadata', 'message', OBJECT_META), 2: Field('data', 'map', values='bytes'),
    3: Field('type', 'string'), 4: Field('stringData', 'map'), 5: Field('immutable', 'bool', keep=True)}
CONFIG_MAP = {
    1: Field('metadata', 'message', OBJECT_META), 2: Field('data', 'map'),
    3: Field('binaryData', 'map', values='bytes'), 4: Field('immutable', 'bool', keep=True)}
NAMESPACE_CONDITION = {
    1: Field('type', 'string', keep=True), 2: Field('status', 'string', keep=True),
    4: Field('lastTransitionTime', 'time'), 5: Field('reason', 'string'), 6: Field('message', 'string')}
NAMESPACE = {
    1: Field('metadata', 'message', OBJECT_META),
    2: Field('spec', 'message', {1: Field('finalizers', 'string', repeated=True)}),
    3: Field('status', 'message', {
        1: Field('phase', 'string'), 2: Field('conditions', 'message', NAMESPACE_CONDITION, repeated=True)})}

#: The kinds decoded here, by (apiVersion, kind) of the envelope. ``DeleteOptions`` is
#: registered in every group version (``metav1.AddToGroupVersion``).
KINDS: dict[tuple[str, str], dict[int, Field]] = {
    ('v1', 'Secret'): SECRET,
    ('v1', 'ConfigMap'): CONFIG_MAP,
    ('v1', 'Namespace'): NAMESPACE,
}
_ENVELOPE = {
    1: Field('typeMeta', 'message', {1: Field('apiVersion', 'string'), 2: Field('kind', 'string')}),
    2: Field('raw', 'raw', keep=True), 3: Field('contentEncoding', 'string'), 4: Field('contentType', 'string')}

# ------------------------------------------------------------------ the wire format


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ProtobufError('unexpected EOF')
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift >= 64:
            raise ProtobufError('proto: integer overflow')


def wire_fields(data: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """The (field number, wire type, value) of each field, in the order written."""
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wtype = key >> 3, key & 7
        if number <= 0:
            raise ProtobufError(f'proto: illegal tag {number} (wire type {wtype})')
        if wtype == _VARINT:
            value, pos = _read_varint(data, pos)
            yield number, wtype, value
        elif wtype in (_FIXED64, _FIXED32):
            size = 8 if wtype == _FIXED64 else 4
            if pos + size > len(data):
                raise ProtobufError('unexpected EOF')
            yield number, wtype, data[pos:pos + size]
            pos += size
        elif wtype == _LENGTH:
            size, pos = _read_varint(data, pos)
            if pos + size > len(data):
                raise ProtobufError('unexpected EOF')
            yield number, wtype, data[pos:pos + size]
            pos += size
        else:  # groups (3, 4) are not used by any Kubernetes type
            raise ProtobufError(f'proto: illegal wireType {wtype}')


def _int64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _rfc3339(data: bytes) -> str | None:
    seconds = 0
    for number, wtype, value in wire_fields(data):
        if number == 1 and wtype == _VARINT:
            assert isinstance(value, int)
            seconds = _int64(value)
    if not data:
        return None  # the zero time: metav1.Time.Unmarshal of an empty message
    when = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc) + datetime.timedelta(seconds=seconds)
    return when.strftime('%Y-%m-%dT%H:%M:%SZ')


def _scalar(field: Field, wtype: int, value: int | bytes) -> Any:
    kind = field.kind
    if kind in ('int', 'bool'):
        if wtype != _VARINT:
            raise ProtobufError(f'proto: wrong wireType = {wtype} for field {field.name}')
        assert isinstance(value, int)
        return bool(value) if kind == 'bool' else _int64(value)
    if wtype != _LENGTH:
        raise ProtobufError(f'proto: wrong wireType = {wtype} for field {field.name}')
    assert isinstance(value, bytes)
    if kind == 'string':
        try:
            return value.decode('utf-8')
        except UnicodeDecodeError:
            raise ProtobufError(f'proto: invalid UTF-8 in field {field.name}')
    if kind == 'bytes':
        return base64.b64encode(value).decode('ascii')
    if kind == 'raw':
        return value
    if kind == 'time':
        return _rfc3339(value)
    if kind == 'json':
        try:
            return json.loads(value) if value else None
        except ValueError:
            raise ProtobufError(f'invalid JSON in field {field.name}')
    if kind == 'message':
        assert field.schema is not None
        return decode_message(value, field.schema)
    raise AssertionError(kind)


def _map_entry(field: Field, value: int | bytes) -> tuple[str, Any]:
    if not isinstance(value, bytes):
        raise ProtobufError(f'proto: wrong wireType for field {field.name}')
    key, item = '', ''  # an entry without a value has the zero value: "" (also base64 of no bytes)
    for number, wtype, part in wire_fields(value):
        if number == 1:
            key = _scalar(Field(field.name, 'string'), wtype, part)
        elif number == 2:
            item = _scalar(Field(field.name, field.values), wtype, part)
    return key, item


def _is_zero(value: Any) -> bool:
    return value is None or value == '' or value is False or (value == 0 and not isinstance(value, bool))


def decode_message(data: bytes, schema: dict[int, Field]) -> dict[str, Any]:
    """One message as the JSON object of its Go struct (see the module docstring)."""
    out: dict[str, Any] = {}
    for number, wtype, value in wire_fields(data):
        field = schema.get(number)
        if field is None:
            continue  # unknown fields are skipped, as gogo-protobuf's Unmarshal does
        if field.kind == 'map':
            key, item = _map_entry(field, value)
            out.setdefault(field.name, {})[key] = item
        elif field.repeated:
            out.setdefault(field.name, []).append(_scalar(field, wtype, value))
        else:
            out[field.name] = _scalar(field, wtype, value)  # the last one wins, as in protobuf
    for number, field in schema.items():
        if field.name in out and not field.keep and field.kind != 'message' and _is_zero(out[field.name]):
            del out[field.name]
    if schema is FIELDS_V1:
        return out.get('Raw') or {}  # FieldsV1 is its raw JSON
    return out


# ------------------------------------------------------------------ bodies


def _bad_request(message: str) -> ApiError:
    return ApiError(400, 'BadRequest', message)


def _unsupported() -> ApiError:
    # As the API server answers for kinds it has no protobuf codec for (custom resources).
    return ApiError(415, 'UnsupportedMediaType', 'the body of the request was in an unknown format - accepted '
                    'media types include: application/json, application/yaml')


def decode_body(body: bytes) -> dict[str, Any]:
    """A protobuf request body as the JSON object a JSON client would have sent.

    A body that is not protobuf, or whose envelope lacks kind or version, is a 400 as
    the serializer's errors are (create.go's ``transformDecodeError``); a kind not in
    ``KINDS`` a 415. (A real server fills a missing kind or version from the endpoint;
    no client sends an envelope without them.)
    """
    if len(body) < len(MAGIC) or body[:len(MAGIC)] != MAGIC:
        raise _bad_request(f'provided data does not appear to be a protobuf message, expected prefix '
                           f'[{" ".join(str(b) for b in MAGIC)}]')
    if len(body) == len(MAGIC):
        raise _bad_request('empty body')
    try:
        envelope = decode_message(body[len(MAGIC):], _ENVELOPE)
    except ProtobufError as e:
        raise _bad_request(str(e))
    type_meta = envelope.get('typeMeta') or {}
    api_version, kind = type_meta.get('apiVersion', ''), type_meta.get('kind', '')
    if not kind:
        raise _bad_request(f"Object 'Kind' is missing in '{_go_type_meta(api_version, kind)}'")
    if not api_version:
        raise _bad_request(f"Object 'apiVersion' is missing in '{_go_type_meta(api_version, kind)}'")
    schema = DELETE_OPTIONS if kind == 'DeleteOptions' else KINDS.get((api_version, kind))
    if schema is None:
        raise _unsupported()
    try:
        obj = decode_message(envelope.get('raw') or b'', schema)
    except ProtobufError as e:
        raise _bad_request(f'{kind} in version "{api_version.rpartition("/")[2]}" cannot be handled as a {kind}: {e}')
    return {'kind': kind, 'apiVersion': api_version, **obj}


def _go_type_meta(api_version: str, kind: str) -> str:
    """runtime.TypeMeta as Go's %#v prints it (in the missing-kind errors)."""
    return f'runtime.TypeMeta{{APIVersion:"{api_version}", Kind:"{kind}"}}'
