"""
Authentication: who a request is, from its bearer token.

A real kube-apiserver runs a chain of authenticators; in a cluster's pods the one
that matters is the service-account token authenticator: ``Authorization: Bearer
<JWT>`` signed by the server (``serviceaccounts``) is the user
``system:serviceaccount:NS:NAME`` in the groups ``system:serviceaccounts``,
``system:serviceaccounts:NS`` and ``system:authenticated``, with the token's
``jti`` and bound pod in ``extra`` (as kube 1.32 does). A bearer token that no
authenticator accepts (forged, expired, of another audience, whose account or
bound pod is gone) is answered 401 with kube's Status (message and reason
``Unauthorized``).

Approximation: a request with **no** credentials (no ``Authorization`` header, or a
scheme other than Bearer) is not anonymous, as it would be on a real server, but the
unrestricted cluster administrator ``ADMIN`` (``system:admin`` in ``system:masters``,
what a kubeconfig with a client certificate of that group is): the stack's admin
kubeconfig carries no credentials, and every existing client and test relies on it.
RBAC is thus enforced for service-account requests, which is what proving a chart's
RBAC needs.
"""
from __future__ import annotations

import contextvars
from collections.abc import Mapping

import attrs

from .errors import ApiError

#: The group the privileged-group authorizer lets do anything (``user.SystemPrivilegedGroup``).
MASTERS_GROUP = 'system:masters'
AUTHENTICATED_GROUP = 'system:authenticated'


@attrs.frozen
class UserInfo:
    """``user.Info``: the user a request was authenticated as."""
    name: str
    uid: str = ''
    groups: tuple[str, ...] = ()
    extra: Mapping[str, tuple[str, ...]] = attrs.field(factory=dict)

    def to_json(self) -> dict[str, object]:
        """As ``authentication.k8s.io/v1`` ``UserInfo`` (in audit events and reviews)."""
        out: dict[str, object] = {'username': self.name}
        if self.uid:
            out['uid'] = self.uid
        out['groups'] = list(self.groups)
        if self.extra:
            out['extra'] = {k: list(v) for k, v in self.extra.items()}
        return out


#: Requests without credentials (see the module docstring).
ADMIN = UserInfo('system:admin', groups=(MASTERS_GROUP, AUTHENTICATED_GROUP))

#: The user of the request being served (set at its start, read by handlers that need it).
current_user: contextvars.ContextVar[UserInfo] = contextvars.ContextVar('current_user', default=ADMIN)


def unauthorized() -> ApiError:
    return ApiError(401, 'Unauthorized', 'Unauthorized')


def bearer_token(headers: Mapping[str, str]) -> str | None:
    """The token of an ``Authorization: Bearer`` header (None without one, as kube's bearer authenticator)."""
    value = headers.get('Authorization') or headers.get('authorization') or ''
    scheme, _, token = value.strip().partition(' ')
    if scheme.lower() != 'bearer':
        return None
    return token.strip() or None


class Authentication:
    """The service-account token authenticator (a mixin of ``KubeEmulator``)."""

    def authenticate(self, headers: Mapping[str, str]) -> UserInfo:
        """The user of a request's credentials; 401 ``ApiError`` for a bearer token not accepted."""
        token = bearer_token(headers)
        if token is None:
            return ADMIN
        identity = self.validate_service_account_token(token)  # type: ignore[attr-defined]
        if identity is None:
            raise unauthorized()
        extra: dict[str, tuple[str, ...]] = {}
        if identity.token_id:
            extra['authentication.kubernetes.io/credential-id'] = (f'JTI={identity.token_id}',)
        if identity.pod_name:
            extra['authentication.kubernetes.io/pod-name'] = (identity.pod_name,)
            extra['authentication.kubernetes.io/pod-uid'] = (identity.pod_uid or '',)
        return UserInfo(identity.username, uid=identity.uid, extra=extra, groups=(
            'system:serviceaccounts', f'system:serviceaccounts:{identity.namespace}', AUTHENTICATED_GROUP))
