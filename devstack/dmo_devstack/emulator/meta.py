"""
ObjectMeta: the fields the server writes and the syntax it checks.

The server owns ``uid``, ``resourceVersion``, ``creationTimestamp``, ``generation``
and the deletion fields; clients (kopf above all) rely on them. Names must be DNS-1123
subdomains (labels for namespaces and services), label and annotation keys and values
follow apimachinery's validation, with its messages.
"""
from __future__ import annotations

import datetime
import json
import re
from collections.abc import Mapping
from typing import Any

from .errors import FieldError, go_repr

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
    elif '/' in key and (not prefix or dns1123_subdomain_errors(prefix)):
        detail = 'prefix part ' + (dns1123_subdomain_errors(prefix) or ['must be non-empty'])[0]
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


# --------------------------------------------------------------------------- names (apimachinery's IsDNS1123Label...)

_DNS1123_LABEL_FMT = '[a-z0-9]([-a-z0-9]*[a-z0-9])?'
_DNS1123_SUBDOMAIN_FMT = r'[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*'
_DNS1035_LABEL_FMT = '[a-z]([-a-z0-9]*[a-z0-9])?'


def _regex_error(message: str, fmt: str, *examples: str) -> str:
    """validation.RegexError: the message, examples and the regex."""
    shown = ' or '.join(f"'{e}', " for e in examples)
    return f"{message} (e.g. {shown}regex used for validation is '{fmt}')"


def _format_errors(value: str, max_length: int, fmt: str, message: str, *examples: str) -> list[str]:
    errors = [f'must be no more than {max_length} characters'] if len(value) > max_length else []
    if not re.fullmatch(fmt, value):
        errors.append(_regex_error(message, fmt, *examples))
    return errors


def dns1123_label_errors(value: str) -> list[str]:
    return _format_errors(value, 63, _DNS1123_LABEL_FMT, "a lowercase RFC 1123 label must consist of lower case "
                          "alphanumeric characters or '-', and must start and end with an alphanumeric character",
                          'my-name', '123-abc')


def dns1123_subdomain_errors(value: str) -> list[str]:
    return _format_errors(value, 253, _DNS1123_SUBDOMAIN_FMT, "a lowercase RFC 1123 subdomain must consist of lower "
                          "case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric "
                          "character", 'example.com')


def dns1035_label_errors(value: str) -> list[str]:
    return _format_errors(value, 63, _DNS1035_LABEL_FMT, "a DNS-1035 label must consist of lower case alphanumeric "
                          "characters or '-', start with an alphabetic character, and end with an alphanumeric "
                          "character", 'my-name', 'abc-123')


def invalid(path: str, value: Any, messages: list[str]) -> list[FieldError]:
    """One ``Invalid value`` field error per message, as the validators report them."""
    return [FieldError(path, 'FieldValueInvalid', f'Invalid value: {go_repr(value)}: {m}') for m in messages]


# --------------------------------------------------------------------------- ownerReferences

_OWNER_FIELDS = ('apiVersion', 'kind', 'name', 'uid', 'controller', 'blockOwnerDeletion')  # the Go struct's order


def check_owner_references(meta: Mapping[str, Any]) -> list[FieldError]:
    """ValidateOwnerReferences: each reference complete, at most one controller."""
    refs = meta.get('ownerReferences') or []
    path = 'metadata.ownerReferences'
    errors = []
    controller = None
    for ref in refs:
        version = (ref.get('apiVersion') or '').rpartition('/')[2]
        for key, value, what in (('apiVersion', version, 'version'), ('kind', ref.get('kind'), 'kind'),
                                 ('name', ref.get('name'), 'name'), ('uid', ref.get('uid'), 'uid')):
            if not value:
                errors += invalid(f'{path}.{key}', ref.get(key) or '', [f'{what} must not be empty'])
        if ref.get('controller'):
            current = f'{ref.get("kind")}/{ref.get("name")}'
            if controller is None:
                controller = current
            else:
                ordered = [{k: r[k] for k in _OWNER_FIELDS if r.get(k) is not None} for r in refs]
                errors.append(FieldError(path, 'FieldValueInvalid', f'Invalid value: {json.dumps(ordered, separators=(",", ":"))}: '
                                         f'Only one reference can have Controller set to true. Found "true" in '
                                         f'references for {controller} and {current}'))
    return errors
