# -*- test-case-name: tests.test_auth -*-
"""
Bearer tokens -> :class:`Principal`.

Tokens are configured plain or as ``sha256:<hex>``.  Both are kept only as
SHA-256 digests, and a presented token is hashed once and compared against
every user's digest with :func:`hmac.compare_digest`, without stopping early,
so the time taken says nothing about which user (or how much of a token)
matched.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence

from rexecpf.model import UNAUTHORIZED, APIError, Principal

__all__ = ["Authenticator", "bearer_token"]


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def _digests(users: Mapping[str, str]) -> list[tuple[bytes, str]]:
    digests = []
    for name, token in users.items():
        if token.startswith("sha256:"):
            digest = bytes.fromhex(token[len("sha256:"):])
        else:
            digest = _digest(token)
        digests.append((digest, name))
    return digests


class Authenticator:
    """
    Maps a token to its user.

    :param users: user -> token, or user -> ``sha256:<hex>``.
    :param admins: users who may act on every container.
    """

    def __init__(self, users: Mapping[str, str], admins: Sequence[str] = ()) -> None:
        self._digests: list[tuple[bytes, str]] = _digests(users)
        self._known = frozenset(digest for digest, _ in self._digests)
        self._admins = frozenset(admins)

    def replace(self, users: Mapping[str, str], admins: Sequence[str] = ()) -> set[str]:
        """
        Take new users and admins in place (a configuration reload): every
        component holding this authenticator sees them at once.

        :return: the users whose token was revoked: removed, or given a new
            token.  Their open connections should be closed.
        """
        old = {name: digest for digest, name in self._digests}
        self._digests = _digests(users)
        self._known = frozenset(digest for digest, _ in self._digests)
        self._admins = frozenset(admins)
        new = {name: digest for digest, name in self._digests}
        return {name for name, digest in old.items() if new.get(name) != digest}

    def authenticate(self, token: str | None) -> Principal | None:
        """
        :param token: the presented token, or ``None``.
        :return: the user it belongs to, or ``None``.
        """
        if not token:
            return None
        presented = _digest(token)
        found: str | None = None
        for digest, name in self._digests:
            if hmac.compare_digest(presented, digest):
                found = name
        if found is None:
            return None
        return Principal(name=found, admin=found in self._admins)

    def is_token(self, text: str) -> bool:
        """
        :return: whether ``text`` is the token of some user: what the proxy
            must never pass on.  One digest and a set lookup (the proxy asks
            for every word of every ``Authorization`` value); the lookup's
            timing tells nothing about a token, only about its SHA-256.
        """
        return bool(text) and _digest(text) in self._known

    def user(self, name: str) -> Principal | None:
        """
        :return: the principal for a user name that is still configured
            (used for session cookies, which name the user), else ``None``.
        """
        if any(user == name for _, user in self._digests):
            return Principal(name=name, admin=name in self._admins)
        return None

    def credential(self, name: str) -> bytes | None:
        """
        :return: the SHA-256 digest of the user's current token (what a
            session cookie is bound to, so that a new token ends the
            sessions opened with the old one), or ``None`` for no such user.
        """
        for digest, user in self._digests:
            if user == name:
                return digest
        return None

    def require(self, token: str | None) -> Principal:
        """
        :return: the user the token belongs to.
        :raises APIError: 401 with ``WWW-Authenticate: Bearer``.
        """
        principal = self.authenticate(token)
        if principal is None:
            detail = "a bearer token is required" if not token else "the token is not valid"
            raise UNAUTHORIZED(detail, headers={"WWW-Authenticate": 'Bearer realm="rexecpf"'})
        return principal


def bearer_token(authorization: bytes | None) -> str | None:
    """
    :param authorization: the raw ``Authorization`` header value.
    :return: the token of a ``Bearer`` credential, or ``None``.
    """
    if not authorization:
        return None
    try:
        text = authorization.decode("ascii")
    except UnicodeDecodeError:
        return None
    scheme, _, token = text.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


__all__ += ["APIError"]
