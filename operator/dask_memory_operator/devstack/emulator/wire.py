"""
The wire: JSON request bodies in, JSON responses out.

Only JSON (and YAML-free JSON patches) is understood; protobuf and CBOR bodies get
the 415 a real server gives for kinds it has no such codec for. kubectl's imperative
commands for built-in kinds (``create deployment``, ``run``...) send protobuf: use
``kubectl apply -f`` instead.
"""
from __future__ import annotations

import json
from typing import Any

import aiohttp.web
from kmock._internal import rendering  # internals: kmock is pinned

from .errors import ApiError


def json_response(data: Any, status: int = 200) -> aiohttp.web.Response:
    return aiohttp.web.json_response(data, status=status)


def load_body(request: rendering.Request) -> Any:
    if not request.body:
        return None
    ctype = request.headers.get('Content-Type', '').split(';')[0].strip()
    if ctype in ('application/vnd.kubernetes.protobuf', 'application/cbor', 'application/apply-patch+cbor'):
        # As the API server answers for kinds it has no such codec for (custom resources).
        raise ApiError(415, 'UnsupportedMediaType', 'the body of the request was in an unknown format - accepted '
                       'media types include: application/json, application/yaml')
    try:
        return json.loads(request.body)
    except ValueError:
        raise ApiError(400, 'BadRequest', 'the body of the request could not be decoded as JSON')
