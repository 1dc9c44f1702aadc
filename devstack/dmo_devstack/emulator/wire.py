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

JSON nested deeper than Go's ``encoding/json`` allows (``maxNestingDepth``, 10,000
objects and arrays) is refused before it is parsed, with the API server's 400: a
create or replace fails in the decoder's ``Interpret`` ("couldn't get version/kind;
json parse error: invalid character '{' exceeded max depth", through
``transformDecodeError``), a merge patch in evanphx/json-patch ("Invalid JSON
Patch"), other patches with the decoder's own text. Anything up to that depth is
taken, as the API server takes it (into ``x-kubernetes-preserve-unknown-fields``
fields, or pruned): the emulator's process gets the recursion limit it needs.
"""
from __future__ import annotations

import json
import re
from typing import Any

import aiohttp.web
from kmock._internal import rendering  # internals: kmock is pinned

from .errors import ApiError
from .protobuf import decode_body
from dask_memory_operator.untrusted import API_MAX_NESTING, raise_recursion_limit

PROTOBUF = 'application/vnd.kubernetes.protobuf'


def json_response(data: Any, status: int = 200) -> aiohttp.web.Response:
    return aiohttp.web.json_response(data, status=status)


#: A JSON string (skipped whole) or a bracket
_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def too_deep(body: bytes, limit: int = API_MAX_NESTING) -> str | None:
    """The bracket that nests ``body`` past ``limit`` levels (as Go's scanner
    counts them: ``limit`` levels are fine), or None. One pass, no parsing."""
    depth = 0
    for match in _TOKENS.finditer(body):
        token = match.group()
        if token in (b'{', b'['):
            depth += 1
            if depth > limit:
                return token.decode()
        elif token in (b'}', b']'):
            depth -= 1
    return None


def _depth_error(body: bytes, char: str, kind: str | None, method: str, ctype: str) -> ApiError:
    syntax = f"invalid character '{char}' exceeded max depth"
    if method == 'PATCH':
        if ctype == 'application/merge-patch+json':
            return ApiError(400, 'BadRequest', 'Invalid JSON Patch')
        return ApiError(400, 'BadRequest', syntax)
    # apiserver's handlers/rest: summarizeData(body, 30)
    head = body[:30].decode('utf-8', 'replace') if body[:1] == b'{' else body[:30].hex()
    summary = head + (' ...' if len(body) > 30 else '')
    return ApiError(400, 'BadRequest', f'the object provided is unrecognized (must be of type {kind}): '
                    f"couldn't get version/kind; json parse error: {syntax} ({summary})")


def load_body(request: rendering.Request, kind: str | None = None) -> Any:
    if not request.body:
        return None
    ctype = request.headers.get('Content-Type', '').split(';')[0].strip()
    if ctype == PROTOBUF:
        return decode_body(request.body)
    if ctype in ('application/cbor', 'application/apply-patch+cbor'):
        # As the API server answers for kinds it has no such codec for (custom resources).
        raise ApiError(415, 'UnsupportedMediaType', 'the body of the request was in an unknown format - accepted '
                       'media types include: application/json, application/yaml')
    char = too_deep(request.body)
    if char is not None:
        raise _depth_error(request.body, char, kind, request.method.value, ctype)
    raise_recursion_limit()  # json.loads (and copies, validation) recurse once or twice a level
    try:
        return json.loads(request.body)
    except ValueError:
        raise ApiError(400, 'BadRequest', 'the body of the request could not be decoded as JSON')
