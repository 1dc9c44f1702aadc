"""
Service-account tokens: JWTs signed by the emulator, as kube-apiserver's token issuer.

A real cluster signs bound service-account tokens (TokenRequest, the kubelet's
projected volumes) with ``--service-account-signing-key-file``, RS256 by default,
and checks them with the matching public key. Here each emulator makes its own
RSA key on first use (kept in memory: tokens do not survive a restart of the
emulator, as with a real cluster whose signing key changed). The claims are kube's
(``serviceaccount.Claims``): ``iss``, ``sub``, ``aud``, ``exp``, ``iat``, ``nbf``,
``jti`` and the private ``kubernetes.io`` claim naming the namespace, the service
account and the pod a token is bound to.

No JWT library is a dependency: RS256 is a PKCS#1 v1.5 SHA-256 signature over
``base64url(header).base64url(payload)``, done with ``cryptography``.
"""
from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

#: kube-apiserver's default issuer and API audience (``--service-account-issuer``,
#: ``--api-audiences``) as clusters set them up.
ISSUER = 'https://kubernetes.default.svc.cluster.local'


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b'=').decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + '=' * (-len(text) % 4))


class TokenSigner:
    """Signs and verifies RS256 JWTs with one RSA key, made on first use (~50 ms)."""

    def __init__(self) -> None:
        self._key: rsa.RSAPrivateKey | None = None

    @property
    def key(self) -> rsa.RSAPrivateKey:
        if self._key is None:
            self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return self._key

    def sign(self, claims: Mapping[str, Any]) -> str:
        header = {'alg': 'RS256', 'kid': self._key_id()}
        signing_input = f'{_b64(json.dumps(header, separators=(",", ":")).encode())}.' \
                        f'{_b64(json.dumps(claims, separators=(",", ":")).encode())}'
        signature = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f'{signing_input}.{_b64(signature)}'

    def verify(self, token: str) -> dict[str, Any] | None:
        """The claims of a token this signer made, or None (malformed, other key, forged)."""
        parts = token.split('.')
        if len(parts) != 3 or self._key is None:
            return None
        try:
            header = json.loads(_unb64(parts[0]))
            if not isinstance(header, dict) or header.get('alg') != 'RS256':
                return None
            self._key.public_key().verify(_unb64(parts[2]), f'{parts[0]}.{parts[1]}'.encode(),
                                          padding.PKCS1v15(), hashes.SHA256())
            claims = json.loads(_unb64(parts[1]))
        except (ValueError, InvalidSignature):
            return None
        return claims if isinstance(claims, dict) else None

    def _key_id(self) -> str:
        """kube's key id: the base64url SHA-256 of the DER public key."""
        der = self.key.public_key().public_bytes(serialization.Encoding.DER,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)
        digest = hashes.Hash(hashes.SHA256())
        digest.update(der)
        return _b64(digest.finalize())


def looks_like_jwt(token: str) -> bool:
    """What kube's token authenticator checks before trying a token as a JWT."""
    return token.count('.') == 2
