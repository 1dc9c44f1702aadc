"""
ServiceAccounts as a cluster has them: a ``default`` one per namespace, and TokenRequest.

Pods run as a ServiceAccount and talk to the API with its token, so the RBAC rules
granted to that account are what a workload may do. Two parts of a real cluster
are emulated here:

- The serviceaccount controller of kube-controller-manager gives every namespace a
  ``default`` ServiceAccount and puts it back when deleted. Here the account is made
  in the same write as its namespace (so a pod created right after its namespace
  finds it, where a real cluster would race for a few milliseconds), and the
  controller pass run after every write (with the garbage collector) restores it.
- ``POST /api/v1/namespaces/{ns}/serviceaccounts/{name}/token``, the ``token``
  subresource (``kubectl create token NAME [--duration 1h] [--audience X]
  [--bound-object-kind Pod --bound-object-name P]``): a ``TokenRequest`` answered
  with a JWT signed by the emulator (``tokens``), kube's claims (``iss``, ``sub``
  ``system:serviceaccount:NS:NAME``, ``aud``, ``exp``, ``iat``, ``nbf``, ``jti``,
  ``kubernetes.io`` with the namespace, the service account and the bound pod, by
  name and uid). Default lifetime one hour, at least ten minutes, as the API server's
  validation says; a ``boundObjectRef`` to a Pod (or a Secret) binds the token to
  that object's uid.

``validate_service_account_token`` is kube's service-account token validator: a
token is valid while its signature, issuer, audience (one of the API server's
audiences), ``nbf``/``exp`` hold, its ServiceAccount exists with the uid in the
token (deleted and recreated is another account), and the object it is bound to
exists with its uid (a pod whose deletion began more than 60 s ago invalidates it,
as the validator's grace).

Approximated: no legacy Secret-based tokens, no ``node`` claim, no
``--service-account-extend-token-expiration`` (a kubelet's token lives what it asked
for), and the signing key lives in the emulator's memory.
"""
from __future__ import annotations

import datetime
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from .errors import ApiError, FieldError
from .meta import now, parse_time
from .resources import NAMESPACES, ResourceType, Target
from .tokens import ISSUER, TokenSigner, looks_like_jwt

DEFAULT_EXPIRATION = 3600  # TokenRequest's default expirationSeconds
MIN_EXPIRATION = 600  # "may not specify a duration less than 10 minutes"
MAX_EXPIRATION = 1 << 32
#: How long after its deletion began a bound pod still vouches for its tokens (the validator's grace).
_DELETED_POD_GRACE = datetime.timedelta(seconds=60)


@attrs.frozen
class ServiceAccountToken:
    """Who a valid token speaks for (the claims the authenticator turns into a user)."""
    namespace: str
    name: str
    uid: str
    token_id: str
    pod_name: str | None = None
    pod_uid: str | None = None

    @property
    def username(self) -> str:
        return f'system:serviceaccount:{self.namespace}:{self.name}'


class ServiceAccounts:
    """Default ServiceAccounts, TokenRequest and token validation (a mixin of ``KubeEmulator``)."""

    #: The audiences the API server accepts (``--api-audiences``); set on ``KubeEmulator``.
    api_audiences: list[str]
    _token_signer: TokenSigner

    # ------------------------------------------------------------- the serviceaccount controller

    def _store_new(self, rtype: ResourceType, namespace: str | None, obj: dict[str, Any]) -> dict[str, Any]:
        obj = super()._store_new(rtype, namespace, obj)  # type: ignore[misc]
        if rtype.resource == NAMESPACES:
            self._ensure_default_service_account(obj)
        return obj

    def update_default_service_accounts(self) -> None:
        """The controller's pass: every active namespace has its ``default`` ServiceAccount."""
        for _, ns in self._live_items(self._types['', 'v1', 'namespaces']):
            self._ensure_default_service_account(ns)

    def _ensure_default_service_account(self, namespace: Mapping[str, Any]) -> None:
        name = namespace['metadata']['name']
        if namespace['metadata'].get('deletionTimestamp') or (namespace.get('status') or {}).get('phase') == \
                'Terminating':
            return
        sa_type = self._types['', 'v1', 'serviceaccounts']
        if self._get_live(sa_type, name, 'default') is None:
            self._store_new(sa_type, name, {'apiVersion': 'v1', 'kind': 'ServiceAccount',
                                            'metadata': {'name': 'default'}})

    # ------------------------------------------------------------- TokenRequest

    def _request_token(self, target: Target, body: Any) -> dict[str, Any]:
        """POST serviceaccounts/<name>/token: a signed JWT for the account (201)."""
        assert target.name is not None and target.namespace is not None
        if not isinstance(body, Mapping):
            raise ApiError(400, 'BadRequest', 'the body of the request was not a JSON object')
        sa = self._get_live(target.rtype, target.namespace, target.name)
        if sa is None:
            raise target.rtype.not_found(target.name)
        spec = dict(body.get('spec') or {})
        expiration = spec.get('expirationSeconds') or DEFAULT_EXPIRATION
        audiences = list(spec.get('audiences') or self.api_audiences)
        _check_expiration(target.name, expiration)
        bound = self._bound_object(target.namespace, spec.get('boundObjectRef'))
        issued = int(time.time())
        claims = {
            'aud': audiences, 'exp': issued + int(expiration), 'iat': issued, 'iss': ISSUER,
            'jti': str(uuid.uuid4()), 'nbf': issued, 'sub': f'system:serviceaccount:{target.namespace}:{target.name}',
            'kubernetes.io': {'namespace': target.namespace,
                              'serviceaccount': {'name': target.name, 'uid': sa['metadata']['uid']}},
        }
        if bound is not None:
            kind, obj = bound
            claims['kubernetes.io'][kind.lower()] = {'name': obj['metadata']['name'], 'uid': obj['metadata']['uid']}
        token = self._token_signer.sign(claims)
        if bound is not None:
            spec['boundObjectRef'] = {**spec['boundObjectRef'], 'uid': bound[1]['metadata']['uid']}
        return {'kind': 'TokenRequest', 'apiVersion': 'authentication.k8s.io/v1',
                'metadata': {'name': target.name, 'namespace': target.namespace, 'creationTimestamp': None},
                'spec': {'audiences': audiences, 'expirationSeconds': int(expiration),
                         'boundObjectRef': spec.get('boundObjectRef')},
                'status': {'token': token, 'expirationTimestamp': now(int(expiration))}}

    def _bound_object(self, namespace: str, ref: Any) -> tuple[str, dict[str, Any]] | None:
        """The Pod or Secret a token is bound to (404 when missing, 409 when its uid moved on)."""
        if not ref:
            return None
        kind, api_version = ref.get('kind', ''), ref.get('apiVersion', '')
        if kind not in ('Pod', 'Secret') or api_version not in ('v1', ''):
            group = api_version.rpartition('/')[0] if '/' in api_version else ''
            version = api_version.rpartition('/')[2]
            raise ApiError(400, 'BadRequest', f'cannot bind token to object of type {group}/{version}, Kind={kind}'
                           if group else f'cannot bind token to object of type /{version}, Kind={kind}')
        rtype = self._types['', 'v1', 'pods' if kind == 'Pod' else 'secrets']
        obj = self._get_live(rtype, namespace, ref.get('name') or '')
        if obj is None:
            raise rtype.not_found(ref.get('name') or '')
        if ref.get('uid') and ref['uid'] != obj['metadata']['uid']:
            raise ApiError(409, 'Conflict', f'Operation cannot be fulfilled on {kind} "{ref.get("name")}": the UID in '
                           f'the bound object reference ({ref["uid"]}) does not match the UID in record. The object '
                           f'might have been deleted and then recreated',
                           {'name': ref.get('name'), 'group': '', 'kind': kind})
        return kind, obj

    # ------------------------------------------------------------- validation

    def validate_service_account_token(self, token: str) -> ServiceAccountToken | None:
        """Who a bearer token speaks for, or None when it is not a valid token of this server."""
        if not looks_like_jwt(token):
            return None
        claims = self._token_signer.verify(token)
        if claims is None or claims.get('iss') != ISSUER:
            return None
        if not _audience_ok(claims.get('aud'), self.api_audiences) or not _times_ok(claims):
            return None
        private = claims.get('kubernetes.io')
        if not isinstance(private, Mapping):
            return None
        namespace = private.get('namespace')
        account = private.get('serviceaccount') or {}
        sa = self._get_live(self._types['', 'v1', 'serviceaccounts'], namespace, account.get('name') or '')
        if sa is None or sa['metadata']['uid'] != account.get('uid'):
            return None  # deleted, or deleted and recreated: another account
        pod = private.get('pod')
        if pod is not None and not self._bound_object_alive('pods', namespace, pod):
            return None
        secret = private.get('secret')
        if secret is not None and not self._bound_object_alive('secrets', namespace, secret):
            return None
        return ServiceAccountToken(namespace=namespace, name=account['name'], uid=account['uid'],
                                   token_id=str(claims.get('jti') or ''),
                                   pod_name=pod.get('name') if pod else None, pod_uid=pod.get('uid') if pod else None)

    def _bound_object_alive(self, plural: str, namespace: str, ref: Mapping[str, Any]) -> bool:
        obj = self._get_live(self._types['', 'v1', plural], namespace, ref.get('name') or '')
        if obj is None or obj['metadata']['uid'] != ref.get('uid'):
            return False
        deleting = obj['metadata'].get('deletionTimestamp')
        return not deleting or datetime.datetime.now(tz=datetime.UTC) - parse_time(deleting) < _DELETED_POD_GRACE


def _check_expiration(name: str, expiration: Any) -> None:
    if not isinstance(expiration, int) or isinstance(expiration, bool):
        raise ApiError(400, 'BadRequest', 'the body of the request was in an unknown format: '
                       'spec.expirationSeconds must be an integer')
    detail = 'may not specify a duration less than 10 minutes' if expiration < MIN_EXPIRATION else \
        'may not specify a duration larger than 2^32 seconds' if expiration > MAX_EXPIRATION else None
    if detail is not None:
        error = FieldError('spec.expirationSeconds', 'FieldValueInvalid', f'Invalid value: {expiration}: {detail}')
        raise ApiError(422, 'Invalid', f'TokenRequest.authentication.k8s.io "{name}" is invalid: {error}',
                       {'name': name, 'group': 'authentication.k8s.io', 'kind': 'TokenRequest', 'causes': [
                           {'reason': error.type, 'message': error.detail, 'field': error.path}]})


def _audience_ok(aud: Any, accepted: Iterable[str]) -> bool:
    audiences = [aud] if isinstance(aud, str) else list(aud or [])
    return any(a in accepted for a in audiences)


def _times_ok(claims: Mapping[str, Any]) -> bool:
    current = time.time()
    try:
        return float(claims['exp']) > current and float(claims.get('nbf', 0)) <= current + 1
    except (KeyError, TypeError, ValueError):
        return False
