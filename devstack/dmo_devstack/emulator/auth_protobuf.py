"""
The protobuf messages of ``TokenRequest`` and ``SelfSubjectAccessReview``.

kubectl's ``create token`` and ``auth can-i`` send their bodies as protobuf
(client-go's typed clients do for built-in kinds). The protobuf codec of request
bodies lives in ``protobuf`` (its ``KINDS`` table of messages by apiVersion and
kind); this module adds these two kinds to it, field numbers from
k8s.io/api/authentication/v1 and authorization/v1 ``generated.proto`` (checked
against the bodies kubectl 1.32 sends). Without that codec (an emulator built
without ``protobuf``) nothing is registered and such bodies stay a 415.
"""
from __future__ import annotations

from typing import Any


def register() -> bool:
    """Add the two kinds to ``protobuf.KINDS``; False when there is no protobuf codec."""
    try:
        from . import protobuf  # type: ignore[attr-defined]
    except ImportError:
        return False
    field: Any = protobuf.Field
    bound = {1: field('kind', 'string'), 2: field('apiVersion', 'string'), 3: field('name', 'string'),
             4: field('uid', 'string')}
    token_spec = {1: field('audiences', 'string', repeated=True), 3: field('boundObjectRef', 'message', bound),
                  4: field('expirationSeconds', 'int', keep=True)}
    resource_attributes = {
        1: field('namespace', 'string'), 2: field('verb', 'string'), 3: field('group', 'string'),
        4: field('version', 'string'), 5: field('resource', 'string'), 6: field('subresource', 'string'),
        7: field('name', 'string')}
    non_resource_attributes = {1: field('path', 'string'), 2: field('verb', 'string')}
    review_spec = {1: field('resourceAttributes', 'message', resource_attributes),
                   2: field('nonResourceAttributes', 'message', non_resource_attributes)}
    meta = protobuf.OBJECT_META
    protobuf.KINDS[('authentication.k8s.io/v1', 'TokenRequest')] = {
        1: field('metadata', 'message', meta), 2: field('spec', 'message', token_spec)}
    protobuf.KINDS[('authorization.k8s.io/v1', 'SelfSubjectAccessReview')] = {
        1: field('metadata', 'message', meta), 2: field('spec', 'message', review_spec)}
    return True
