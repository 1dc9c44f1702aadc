"""
ObjectMeta: the fields the server writes and the syntax it checks.

The server owns ``uid``, ``resourceVersion``, ``creationTimestamp``, ``generation``
and the deletion fields; clients (kopf above all) rely on them. Names must be DNS-1123
subdomains (labels for namespaces and services), label and annotation keys and values
follow apimachinery's validation, with its messages.
"""
from __future__ import annotations

import datetime
import re
from collections.abc import Mapping
from typing import Any

from .errors import FieldError, go_repr

DNS1123_SUBDOMAIN = re.compile(r'^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')
DNS1123_LABEL = re.compile(r'^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')
GENERATE_ALPHABET = 'bcdfghjklmnpqrstvwxz2456789'  # as k8s.io/apimachinery/pkg/util/rand


def now(offset: float = 0) -> str:
    t = datetime.datetime.now(tz=datetime.UTC) + datetime.timedelta(seconds=offset)
    return t.strftime('%Y-%m-%dT%H:%M:%SZ')


def parse_time(s: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(s.replace('Z', '+00:00'))



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
    elif '/' in key and (not prefix or len(prefix) > 253 or not DNS1123_SUBDOMAIN.match(prefix)):
        detail = 'prefix part a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, ' \
                 "'-' or '.', and must start and end with an alphanumeric character"
    return [] if detail is None else [FieldError(field, 'FieldValueInvalid', f'Invalid value: {go_repr(key)}: {detail}')]


def check_labels(meta: Mapping[str, Any]) -> list[FieldError]:
    """Label and annotation syntax, as ObjectMeta validation does it."""
    errors = []
    for key, value in (meta.get('labels') or {}).items():
        errors.extend(_check_key(key, 'metadata.labels'))
        if not isinstance(value, str) or (value and not _LABEL_NAME.match(value)):
            errors.append(FieldError('metadata.labels', 'FieldValueInvalid',
                                     f'Invalid value: {go_repr(value)}: {_LABEL_VALUE_MSG}'))
        elif len(value) > 63:
            errors.append(FieldError('metadata.labels', 'FieldValueInvalid',
                                     f'Invalid value: {go_repr(value)}: must be no more than 63 characters'))
    annotations = meta.get('annotations') or {}
    for key in annotations:
        errors.extend(_check_key(key, 'metadata.annotations'))
    if sum(len(k) + len(str(v)) for k, v in annotations.items()) > 256 * 1024:
        errors.append(FieldError('metadata.annotations', 'FieldValueTooLong', 'Too long: must have at most 262144 bytes'))
    return errors

