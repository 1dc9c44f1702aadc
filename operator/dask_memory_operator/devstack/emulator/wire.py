"""
The wire: JSON (or protobuf) request bodies in, JSON responses out.

JSON bodies are parsed as they are. Protobuf bodies (client-go's typed clientsets:
Helm's release Secrets, kubectl's imperative ``create namespace/secret/configmap``)
are decoded by ``protobuf`` for the kinds it knows, into the JSON object the client
would have sent; other kinds' protobuf bodies, and CBOR bodies, get the 415 a real
server gives for kinds it has no such codec for. Responses are JSON whatever the
request's Accept header prefers: client-go lists ``application/json`` after protobuf
and decodes either. kubectl's imperative commands for other built-in kinds (``create
deployment``, ``run``...) still send protobuf: use ``kubectl apply -f`` for those.
"""
from __future__ import annotations

import json
from typing import Any

import aiohttp.web
from kmock._internal import rendering  # internals: kmock is pinned

from .errors import ApiError
from .protobuf import decode_body

PROTOBUF = 'application/vnd.kubernetes.protobuf'


def json_response(data: Any, status: int = 200) -> aiohttp.web.Response:
    return aiohttp.web.json_response(data, status=status)


def load_body(request: rendering.Request) -> Any:
    if not request.body:
        return None
    ctype = request.headers.get('Content-Type', '').split(';')[0].strip()
    if ctype == PROTOBUF:
        return decode_body(request.body)
    if ctype in ('application/cbor', 'application/apply-patch+cbor'):
        # As the API server answers for kinds it has no such codec for (custom resources).
        raise ApiError(415, 'UnsupportedMediaType', 'the body of the request was in an unknown format - accepted '
                       'media types include: application/json, application/yaml')
    try:
        return json.loads(request.body)
    except ValueError:
        raise ApiError(400, 'BadRequest', 'the body of the request could not be decoded as JSON')
