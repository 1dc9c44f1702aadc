"""
The emulator itself: ``KubeEmulator``, its HTTP entry point and request routing.
"""
from __future__ import annotations

import asyncio
import collections
import json
import os
from collections.abc import Mapping
from typing import Any

import aiohttp.web
import attrs
import kmock
from kmock._internal import rendering  # internals: kmock is pinned

from . import auth_protobuf
from .admission import Admission
from .audit import Auditing
from .authn import Authentication
from .deletion import Deletion
from .discovery import Discovery
from .errors import ApiError
from .wire import json_response, load_body
from .eviction import Eviction
from .resources import BUILTIN_SCALE, PODS, SERVICEACCOUNTS, VERBS, ResourceType, Target
from .rbac import Authorization
from .schema import StructuralSchema
from .serviceaccounts import ServiceAccounts
from .services import ServiceIPs
from .storage import Storage, WatchEvent
from .tokens import ISSUER, TokenSigner
from .tables import to_table
from .writes import Writes

#: Groups of kmock's bundled resources not served as stored kinds (the reviews are not objects;
#: SelfSubjectAccessReview is answered by ``rbac``, TokenRequest is ``serviceaccounts/token``).
_NOT_SERVED_GROUPS = {'authentication.k8s.io', 'authorization.k8s.io'}
auth_protobuf.register()  # kubectl's protobuf TokenRequest and SelfSubjectAccessReview bodies
_MAX_REQUESTS = 5_000  # requests kept in kmock's request log (the sandbox runs for hours)
#: kube-apiserver reads at most this much of a request body (its MaxRequestBodyBytes
#: default, 3 MiB), not aiohttp's 1 MiB: a 1.3 MB object is taken, as it is there
MAX_REQUEST_BODY = 3 * 1024 * 1024


@attrs.define(kw_only=True)
class KubeEmulator(Auditing, Authentication, Authorization, Admission, ServiceAccounts, Storage, Writes, Deletion,
                   Eviction, ServiceIPs, Discovery, kmock.KubernetesEmulator):
    """A kmock emulator with a real API server's semantics (see the package docstring).

    Each concern is a mixin in a module of its name; this class holds the state they
    share and routes requests to them.
    """

    #: Where Service cluster IPs come from (loopback by default: a process kubelet binds them).
    service_cidr: str = '127.1.0.0/16'
    #: How many watch events are kept: a watch (or a list's continue token) from an older
    #: resourceVersion gets 410 Expired, and clients relist (the watch cache's window).
    watch_window: int = 10_000
    #: Seconds between the BOOKMARK events of a watch that takes them (kube-apiserver's
    #: watch cache: about a minute), besides the one before the watch's timeout.
    bookmark_interval: float = 60.0
    #: The audiences a service-account token must name to be accepted (``--api-audiences``).
    api_audiences: list[str] = attrs.field(factory=lambda: [ISSUER])
    #: Where the audit log's JSON lines go (``--audit-log-path``); None: in memory only.
    audit_log_path: str | os.PathLike[str] | None = None
    #: How many audit events are kept in memory (``audit_events()``).
    audit_memory: int = 10_000

    _types: dict[tuple[str, str, str], ResourceType] = attrs.field(factory=dict, init=False)
    _rv: int = attrs.field(default=0, init=False)
    _events: list[WatchEvent] = attrs.field(factory=list, init=False)
    _tick: asyncio.Future[None] | None = attrs.field(default=None, init=False)
    _stopping: bool = attrs.field(default=False, init=False)
    _gc_wakeup: asyncio.Event = attrs.field(factory=asyncio.Event, init=False)
    _gc_task: asyncio.Task[None] | None = attrs.field(default=None, init=False)
    _allocated_ips: set[str] = attrs.field(factory=set, init=False)
    _token_signer: TokenSigner = attrs.field(factory=TokenSigner, init=False)
    _audit_file: Any = attrs.field(default=None, init=False)
    _audit_memory: collections.deque[dict[str, Any]] = attrs.field(init=False)
    #: Keys of deleted objects, oldest first: their histories are dropped after a while.
    _deleted_keys: collections.deque[tuple[Any, ...]] = attrs.field(factory=collections.deque, init=False)

    @_audit_memory.default
    def _audit_memory_default(self) -> collections.deque[dict[str, Any]]:
        return collections.deque(maxlen=self.audit_memory)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.resources.load_bundled()
        for res in self.resources:
            self._register_builtin(res)
        for ns in ('default', 'kube-system', 'kube-public', 'kube-node-lease'):
            self._store_new(self._types['', 'v1', 'namespaces'], None, {
                'apiVersion': 'v1', 'kind': 'Namespace', 'metadata': {'name': ns},
                'spec': {'finalizers': ['kubernetes']}, 'status': {'phase': 'Active'}})
        self._create_bootstrap_policy()

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
            self._close_audit_log()
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
        if res.group in _NOT_SERVED_GROUPS:
            return
        rtype = ResourceType(
            group=res.group, version=res.version, plural=res.plural,
            kind=info.kind or res.plural.capitalize(), singular=info.singular or res.plural,
            namespaced=bool(info.namespaced), shortnames=sorted(info.shortnames),
            categories=sorted(info.categories), subresources=set(info.subresources))
        if (res.group, res.plural) in BUILTIN_SCALE:
            rtype.subresources.add('scale')
            rtype.scale = {'specReplicasPath': '.spec.replicas', 'statusReplicasPath': '.status.replicas',
                           'labelSelectorPath': '.spec.selector'}
        self._types[res.group, res.version, res.plural] = rtype

    def register_crd(self, crd: Mapping[str, Any]) -> ResourceType:
        """Serve the resource of a CustomResourceDefinition (as the API server does at once).

        Only the storage version is served: no CRD here has more than one, and serving
        several means converting between them, which is not emulated.
        """
        spec = crd['spec']
        names = spec['names']
        ver = next((v for v in spec['versions'] if v.get('storage')), spec['versions'][0])
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
            crd=crd['metadata']['name'])
        self._types[rtype.group, rtype.version, rtype.plural] = rtype
        self.resources[rtype.resource] = kmock.ResourceInfo(
            namespaced=rtype.namespaced, kind=rtype.kind, singular=rtype.singular,
            verbs=VERBS, shortnames=rtype.shortnames, categories=rtype.categories,
            subresources=rtype.subresources)
        return rtype

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
                obj, _ = self._create(Target(rtype, namespace, None, None), dict(doc), {})
            else:
                meta = {**doc['metadata'], 'resourceVersion': old['metadata']['resourceVersion']}
                obj, _ = self._replace(Target(rtype, namespace, name, None), {**doc, 'metadata': meta}, {})
        return obj

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

    # ------------------------------------------------------------- HTTP entry

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        # kmock's own entry point parses every path for its DSL and fails on valid ones
        # (e.g. /api/v1/namespaces); this server parses API paths itself.
        raw_request = raw_request.clone(client_max_size=MAX_REQUEST_BODY + 1)
        try:
            body = await raw_request.read()
        except aiohttp.web.HTTPRequestEntityTooLarge:  # as apiserver's limitedReadBody answers
            error = ApiError(413, 'RequestEntityTooLarge', f'Request entity too large: limit is {MAX_REQUEST_BODY}')
            return json_response(error.status(), status=413)
        request = rendering.Request(
            id=len(self._requests), raw_request=raw_request, url=raw_request.url,
            method=raw_request.method, params=dict(raw_request.query), headers=dict(raw_request.headers),
            cookies=dict(raw_request.cookies), body=body, text=body.decode('utf-8', 'replace'))
        # The sandbox runs for hours: keep kmock's request log bounded.
        if len(self._requests) > _MAX_REQUESTS:
            del self._requests[:len(self._requests) - _MAX_REQUESTS // 2]
        self._requests.append(request)
        try:
            return await self._serve(request)  # authentication, authorization and audit, then _handle
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
            return json_response(self._version_info())
        if parts == ['api']:
            return json_response({'kind': 'APIVersions', 'versions': ['v1'], 'serverAddressByClientCIDRs': [
                {'clientCIDR': '0.0.0.0/0', 'serverAddress': f'{request.url.host}:{request.url.port}'}]})
        if parts == ['apis']:
            return json_response(self._api_group_list())
        if parts[0] == 'apis' and len(parts) == 2:
            group = self._api_group(parts[1])
            if group is None:
                raise ApiError(404, 'NotFound', 'the server could not find the requested resource')
            return json_response(group)
        if (parts[0] == 'api' and len(parts) == 2) or (parts[0] == 'apis' and len(parts) == 3):
            group, version = ('', parts[1]) if parts[0] == 'api' else (parts[1], parts[2])
            return json_response(self._api_resource_list(group, version))
        target = self._parse_target(parts)
        if target.subresource not in (None, 'status', 'scale', 'eviction', 'token'):
            raise ApiError(404, 'NotFound', 'the server could not find the requested resource')  # exec, log...
        params = request.params
        if method == 'GET' and params.get('watch') in ('true', '1'):
            return await self._watch(request, target)
        body = load_body(request, target.rtype.kind) if method in ('POST', 'PUT', 'PATCH', 'DELETE') else None
        as_table = 'as=Table' in request.headers.get('Accept', '')
        ctype = request.headers.get('Content-Type', '').split(';')[0].strip()
        # Mutating admission webhooks: called outside the lock (they may take seconds).
        hook_warnings: list[str] = []
        if method == 'POST' and target.name is None:
            body, hook_warnings = await self._admit_create_webhooks(target, body, params)
        elif method in ('PUT', 'PATCH') and target.name is not None and target.subresource in (None, 'status') \
                and self._has_update_webhooks(target):
            return self._respond(await self._update_with_webhooks(target, body, method, ctype, params), 200,
                                 target, params)
        async with self._lock:
            if method == 'GET' and target.name is None:
                result = self._list(target, params)
                return json_response(to_table(target.rtype, result['items'], result) if as_table else result)
            if method == 'GET':
                obj = self._read(target)
                return json_response(to_table(target.rtype, [obj], None) if as_table and not target.subresource else obj)
            if method == 'POST' and target.rtype.resource == PODS and target.subresource == 'eviction':
                return json_response(self._evict(target, body), 201)
            if method == 'POST' and target.rtype.resource == SERVICEACCOUNTS and target.subresource == 'token':
                return json_response(self._request_token(target, body), 201)
            if method == 'POST' and target.name is None:
                obj, warnings = self._create(target, body, params)
                return self._respond((obj, hook_warnings + warnings), 201, target, params)
            if method == 'PUT' and target.name is not None:
                return self._respond(self._replace(target, body, params), 200, target, params)
            if method == 'PATCH' and target.name is not None:
                return self._respond(self._patch(target, body, ctype, params), 200, target, params)
            if method == 'DELETE' and target.name is not None:
                code, result = self._delete(target, body, params)
                return json_response(result, code)
            if method == 'DELETE':
                return json_response(self._delete_collection(target, body, params))
        raise ApiError(405, 'MethodNotAllowed', 'the server does not allow this method on the requested resource')

    def _respond(self, result: tuple[dict[str, Any], list[str]], code: int, target: Target,
                 params: Mapping[str, str]) -> aiohttp.web.StreamResponse:
        obj, warnings = result
        response = json_response(obj, code)
        for warning in warnings:
            response.headers.add('Warning', f'299 - {json.dumps(warning)}')
        return response

    def _parse_target(self, parts: list[str]) -> Target:
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
        return Target(rtype, namespace, name, sub)

    # ------------------------------------------------------------- reads

    def _read(self, target: Target) -> dict[str, Any]:
        assert target.name is not None
        obj = self._get_live(target.rtype, target.namespace, target.name)
        if obj is None:
            raise target.rtype.not_found(target.name)
        if target.subresource == 'scale':
            return self._to_scale(target.rtype, obj)
        return obj
