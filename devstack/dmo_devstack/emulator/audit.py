"""
The audit log, and the front of every request: authentication, authorization, audit.

kube-apiserver's ``--audit-log-path`` writes one JSON line per request and stage, an
``audit.k8s.io/v1`` ``Event``; at level ``Metadata`` it names who asked for what and
what was answered, and carries the authorizer's decision in the annotations
``authorization.k8s.io/decision`` (``allow``/``forbid``) and
``authorization.k8s.io/reason`` (``RBAC: allowed by ClusterRoleBinding "b" of
ClusterRole "r" to ServiceAccount "sa/ns"``). A chart's RBAC is proven from it:
every rule must have allowed at least one recorded request
(``rbac.attributes_of_audit_event`` turns an event back into the authorization
checks it stands for, ``rbac.rule_allows`` matches them against rules).

Here every request is recorded at level Metadata, stage ``ResponseComplete`` once its
response is done (``auditID``, ``requestURI``, ``verb``, ``user``, ``sourceIPs``,
``userAgent``, ``objectRef`` {resource, subresource, namespace, name, apiGroup,
apiVersion} for resource requests, ``responseStatus`` {code, and for a failure
Status its status, reason and message}, the two timestamps, the annotations). A
watch also gets a ``ResponseStarted`` event when its stream opens (its
ResponseComplete comes when it ends, as on a real server). A request whose bearer
token is refused gets one ``ResponseStarted`` event with an empty user and code 401,
as kube's failed-authentication audit does. Requests without credentials are
recorded as the user ``system:admin`` in ``system:masters`` (see ``authn``), with
decision ``allow`` and an empty reason (the privileged-group authorizer's).

Approximated: no audit policy (everything at Metadata), no ``RequestReceived``
stage, the log is written synchronously (no batching backend, no rotation); the
last ``audit_memory`` events are also kept in memory (``audit_events()``).
The response of every request carries the ``Audit-Id`` header, as kube's.
"""
from __future__ import annotations

import collections
import contextvars
import datetime
import json
import os
import uuid
from typing import IO, Any

import aiohttp.web
from kmock._internal import rendering  # internals: kmock is pinned

from .authn import UserInfo, current_user
from .errors import ApiError
from .rbac import RequestAttributes, forbidden, request_attributes
from .wire import json_response, load_body

#: The audit event of the request being served (for the watch's ResponseStarted stage).
_current_event: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar('_current_event', default=None)
_SELF_SUBJECT_ACCESS_REVIEWS = '/apis/authorization.k8s.io/v1/selfsubjectaccessreviews'


def _micro_time(t: datetime.datetime | None = None) -> str:
    """metav1.MicroTime in JSON: RFC 3339 with microseconds."""
    t = t or datetime.datetime.now(tz=datetime.UTC)
    return t.strftime('%Y-%m-%dT%H:%M:%S.%fZ')


class Auditing:
    """The request front and the audit log (a mixin of ``KubeEmulator``)."""

    #: Where the JSON lines go (``--audit-log-path``); None: kept in memory only.
    audit_log_path: str | os.PathLike[str] | None
    _audit_file: IO[str] | None
    _audit_memory: collections.deque[dict[str, Any]]

    def audit_events(self) -> list[dict[str, Any]]:
        """The most recent audit events (as written to the log), oldest first."""
        return list(self._audit_memory)

    async def _serve(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        """Authenticate, authorize, then handle a request; audit it once its response is done."""
        event = self._audit_event(request)
        token = _current_event.set(event)
        response: aiohttp.web.StreamResponse | None = None
        try:
            response = await self._authorized(request, event)
            return response
        finally:
            _current_event.reset(token)
            if not event.pop('_done', False):
                self._audit_write(event, 'ResponseComplete', response)

    async def _authorized(self, request: rendering.Request, event: dict[str, Any]) -> aiohttp.web.StreamResponse:
        path = request.url.path
        try:
            user = self.authenticate(request.headers)  # type: ignore[attr-defined]
        except ApiError as e:
            response = self._with_audit_id(json_response(e.status(), e.code), event)
            self._describe_request(event, request_attributes(request.method.value, path, request.params,
                                                             UserInfo('')))
            event['user'] = {}
            self._audit_write(event, 'ResponseStarted', response)
            event['_done'] = True
            return response
        current_user.set(user)
        event['user'] = user.to_json()
        attrs = request_attributes(request.method.value, path, request.params, user)
        self._describe_request(event, attrs)
        checked, decision = self.authorize_all(attrs)  # type: ignore[attr-defined]
        event['annotations'] = {'authorization.k8s.io/decision': 'allow' if decision.allowed else 'forbid',
                                'authorization.k8s.io/reason': decision.reason}
        if not decision.allowed:
            error = forbidden(checked, decision.reason)
            return self._with_audit_id(json_response(error.status(), error.code), event)
        if path.rstrip('/') == _SELF_SUBJECT_ACCESS_REVIEWS and request.method.value == 'POST':
            try:
                review = self._self_subject_access_review(load_body(request), user)  # type: ignore[attr-defined]
            except ApiError as e:
                return self._with_audit_id(json_response(e.status(), e.code), event)
            return self._with_audit_id(json_response(review, 201), event)
        return self._with_audit_id(await self._handle(request), event)  # type: ignore[attr-defined]

    # ------------------------------------------------------------- events

    def _audit_event(self, request: rendering.Request) -> dict[str, Any]:
        raw = request._raw_request
        return {
            'kind': 'Event', 'apiVersion': 'audit.k8s.io/v1', 'level': 'Metadata', 'auditID': str(uuid.uuid4()),
            'stage': '', 'requestURI': str(request.url.raw_path_qs), 'verb': '', 'user': {},
            'sourceIPs': [raw.remote] if raw is not None and raw.remote else [],
            'userAgent': request.headers.get('User-Agent', ''),
            'requestReceivedTimestamp': _micro_time()}

    @staticmethod
    def _describe_request(event: dict[str, Any], attrs: RequestAttributes) -> None:
        event['verb'] = attrs.verb
        if attrs.resource_request:
            ref = {'resource': attrs.resource, 'namespace': attrs.namespace, 'name': attrs.name,
                   'apiGroup': attrs.api_group, 'apiVersion': attrs.api_version, 'subresource': attrs.subresource}
            event['objectRef'] = {k: v for k, v in ref.items() if v}  # omitempty, as the Go struct

    @staticmethod
    def _with_audit_id(response: aiohttp.web.StreamResponse, event: dict[str, Any]) -> aiohttp.web.StreamResponse:
        if not response.prepared:
            response.headers['Audit-Id'] = event['auditID']
        return response

    def _audit_response_started(self, code: int = 200) -> None:
        """A long-running request (a watch) opened its stream: the ResponseStarted stage."""
        event = _current_event.get()
        if event is not None:
            self._audit_write(event, 'ResponseStarted', None, code)

    def _audit_write(self, event: dict[str, Any], stage: str, response: aiohttp.web.StreamResponse | None,
                     code: int | None = None) -> None:
        out = {k: v for k, v in event.items() if not k.startswith('_')}
        out['stage'] = stage
        out['responseStatus'] = _response_status(response, code)
        out['stageTimestamp'] = _micro_time()
        # Keys in the order of the Go struct's fields, as the real log has them.
        order = ['kind', 'apiVersion', 'level', 'auditID', 'stage', 'requestURI', 'verb', 'user', 'sourceIPs',
                 'userAgent', 'objectRef', 'responseStatus', 'requestReceivedTimestamp', 'stageTimestamp',
                 'annotations']
        out = {k: out[k] for k in order if k in out}
        self._audit_memory.append(out)
        if self.audit_log_path is not None:
            if self._audit_file is None:
                self._audit_file = open(self.audit_log_path, 'a', encoding='utf-8')
            self._audit_file.write(json.dumps(out, separators=(',', ':')) + '\n')
            self._audit_file.flush()

    def _close_audit_log(self) -> None:
        if self._audit_file is not None:
            self._audit_file.close()
            self._audit_file = None


def _response_status(response: aiohttp.web.StreamResponse | None, code: int | None) -> dict[str, Any]:
    """``responseStatus``: the code, and for a failure Status its status, message and reason."""
    if code is not None:
        return {'metadata': {}, 'code': code}
    if response is None:
        return {'metadata': {}, 'code': 500}  # the handler failed (an emulator bug)
    status: dict[str, Any] = {'metadata': {}, 'code': response.status}
    body = getattr(response, 'body', None)
    if response.status >= 400 and isinstance(body, bytes | bytearray):
        try:
            doc = json.loads(body)
        except ValueError:
            return status
        if isinstance(doc, dict) and doc.get('kind') == 'Status':
            status.update({k: doc[k] for k in ('status', 'message', 'reason') if doc.get(k)})
    return status
