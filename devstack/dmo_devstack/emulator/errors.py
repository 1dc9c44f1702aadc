"""
How the emulator answers errors: ``Status`` objects and field errors.

A real API server answers every failure with a ``Status`` object (``code``, ``reason``,
``message`` and often ``details.causes``); clients branch on the reason (kopf on
``Conflict``, kubectl prints the message). Validation failures are lists of
``field.Error`` (``spec.size: Invalid value: 11: ...``), quoted the Go way.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import attrs



class ApiError(Exception):
    """An error answered as a ``Status`` object, as the API server does."""

    def __init__(self, code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code: int = code
        self.reason: str = reason
        self.message: str = message
        self.details: dict[str, Any] | None = details
        #: ListMeta of the Status (a 410 for a stale continue token carries a fresh one).
        self.metadata: dict[str, Any] = {}

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = {
            'kind': 'Status', 'apiVersion': 'v1', 'metadata': dict(self.metadata), 'status': 'Failure',
            'message': self.message, 'reason': self.reason, 'code': self.code,
        }
        if self.details is not None:
            status['details'] = self.details
        return status



@attrs.define
class FieldError:
    """One field error in the API server's ``field.Error`` form."""
    path: str
    type: str  # the cause reason: FieldValueInvalid, FieldValueRequired, ...
    detail: str

    def __str__(self) -> str:
        return f'{self.path}: {self.detail}'


def go_repr(value: Any) -> str:
    """Values as the API server quotes them in field errors: scalars plainly, strings
    quoted, maps and lists as compact JSON (field.Error renders composites as JSON since
    Kubernetes 1.34; Go sorts map keys)."""
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if value is None:
        return 'null'
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value, separators=(',', ':'), sort_keys=True)


def path_str(path: Iterable[Any]) -> str:
    out = ''
    for part in path:
        out += f'[{part}]' if isinstance(part, int) else (f'.{part}' if out else str(part))
    return out
