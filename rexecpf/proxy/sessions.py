# -*- test-case-name: tests.test_proxy -*-
"""
Who a proxied request is for: the session cookie
(:class:`SessionCookies`), the ``?token=`` that starts a session, rexecpf's
credentials told from the app's own (the cookie, ``Authorization`` values,
``token`` parameters), and the ``Origin`` a cookie is accepted from.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote_plus, urlsplit

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

from rexecpf.model import FORBIDDEN

__all__ = [
    "SAFE_METHODS",
    "SESSION_COOKIE",
    "SessionCookies",
    "carries_token",
    "check_origin",
    "origin",
    "session_subject",
    "split_token",
]

#: The name of rexecpf's browser session cookie.
SESSION_COOKIE = b"rexecpf_session"

#: Methods that change nothing (RFC 9110 9.2.1): not origin-checked.
SAFE_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE"})

def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class SessionCookies:
    """
    Signs and checks browser session cookies: ``v1.{user}.{forward}.{expires}.{mac}``,
    HMAC-SHA256 with a key kept in the store (so sessions survive restarts).

    :param key_source: called once, on first use: returns a Deferred firing
        with the signing key (``store.secret("session")``).
    :param clock: the time source for expiry.
    :param lifetime: seconds a session lasts.
    :param credential: user -> the digest of their current token
        (:meth:`rexecpf.auth.Authenticator.credential`), signed into the MAC
        and not into the cookie: a user given a new token (or removed) loses
        the sessions of the old one.
    """

    def __init__(
        self,
        key_source: Callable[[], Deferred[bytes]],
        clock: IReactorTime,
        lifetime: float,
        credential: Callable[[str], bytes | None] = lambda user: b"",
    ) -> None:
        self._credential = credential
        self._key: bytes | None = None
        self._source = key_source
        self._waiters: list[Deferred[None]] = []
        self._clock = clock
        self.lifetime = lifetime

    @property
    def known(self) -> bool:
        """:return: whether the key is loaded (cookies can be made and checked now)."""
        return self._key is not None

    def ready(self) -> Deferred[None]:
        """:return: a Deferred firing once the key is known (fails if the store cannot give it)."""
        if self._key is not None:
            return succeed(None)
        waiting: Deferred[None] = Deferred()
        first = not self._waiters
        self._waiters.append(waiting)
        if first:
            self._source().addCallbacks(self._got_key, self._lost_key)
        return waiting

    def _got_key(self, key: bytes) -> None:
        self._key = key
        waiters, self._waiters = self._waiters, []
        for waiting in waiters:
            waiting.callback(None)

    def _lost_key(self, failure: Failure) -> None:
        waiters, self._waiters = self._waiters, []  # the next request tries again
        for waiting in waiters:
            waiting.errback(failure)

    def _mac(self, payload: str, credential: bytes) -> str:
        assert self._key is not None
        signed = payload.encode("ascii") + b"." + credential
        return _b64(hmac.new(self._key, signed, hashlib.sha256).digest()[:24])

    def make(self, user: str, forward_id: str) -> str:
        """:return: a cookie value naming ``user`` for ``forward_id`` until it expires."""
        expires = int(self._clock.seconds() + self.lifetime)
        payload = f"v1.{_b64(user.encode('utf-8'))}.{forward_id}.{expires}"
        return f"{payload}.{self._mac(payload, self._credential(user) or b'')}"

    def check(self, value: bytes, forward_id: str) -> str | None:
        """:return: the user a valid, unexpired cookie for ``forward_id`` names, else ``None``."""
        if self._key is None:
            return None
        try:
            text = value.decode("ascii")
            version, encoded_user, forward, expires, mac = text.split(".")
            payload = f"{version}.{encoded_user}.{forward}.{expires}"
            user = _unb64(encoded_user).decode("utf-8")
            credential = self._credential(user)
            if version != "v1" or credential is None:
                return None
            if not hmac.compare_digest(mac, self._mac(payload, credential)):
                return None
            if forward != forward_id or int(expires) <= self._clock.seconds():
                return None
            return user
        except (ValueError, UnicodeError):
            return None


def session_subject(host: str) -> str:
    """
    :return: what a session cookie names for a custom domain or a stable
        host: the host (encoded: a cookie's fields are separated by dots),
        so that the session outlives the forward behind it.
    """
    return "host-" + _b64(host.encode("ascii"))


def cookie_pairs(header: bytes) -> list[bytes]:
    return [part.strip() for part in header.split(b";") if part.strip()]


def session_values(request: IRequest) -> list[bytes]:
    values = []
    for header in request.requestHeaders.getRawHeaders(b"cookie", []):
        for pair in cookie_pairs(header):
            name, _, value = pair.partition(b"=")
            if name.strip() == SESSION_COOKIE:
                values.append(value.strip().strip(b'"'))
    return values


def without_session_cookie(values: list[bytes]) -> list[bytes]:
    """:return: the Cookie header values with rexecpf's cookie removed (others kept)."""
    kept = []
    for header in values:
        pairs = [p for p in cookie_pairs(header) if p.partition(b"=")[0].strip() != SESSION_COOKIE]
        if pairs:
            kept.append(b"; ".join(pairs))
    return kept


def _decoded(text: bytes) -> str:
    """:return: a query name or value percent-decoded (``""`` if it is not ASCII)."""
    try:
        return unquote_plus(text.decode("ascii"))
    except UnicodeDecodeError:
        return ""


def split_token(query: bytes, is_token: Callable[[str], bool]) -> tuple[list[str] | None, bytes]:
    """
    :param is_token: whether a string is a rexecpf token
        (:meth:`rexecpf.auth.Authenticator.is_token`).
    :return: the values of the ``token`` parameters that are rexecpf tokens
        (decoded; ``[]`` when every ``token`` parameter is the app's own,
        ``None`` when there is none), and the query string without those
        (everything else, the app's own ``token`` parameters included, byte
        for byte).
    """
    if not query:
        return None, query
    tokens: list[str] | None = None
    kept = []
    for part in query.split(b"&"):
        name, _, value = part.partition(b"=")
        if _decoded(name) == "token":
            tokens = tokens if tokens is not None else []
            token = _decoded(value)
            if is_token(token):
                tokens.append(token)
                continue
        kept.append(part)
    if not tokens:
        return tokens, query
    return tokens, b"&".join(kept)


#: A run of the characters a rexecpf token is made of (letters, digits, ``-._~``).
_TOKEN_WORD = re.compile(r"[A-Za-z0-9._~-]+")


def carries_token(value: bytes, is_token: Callable[[str], bool]) -> bool:
    """
    :return: whether an ``Authorization`` value holds a rexecpf token
        anywhere, whatever its scheme or spacing: as a word of it (a run of
        token characters), or as a word of the ``user:password`` a ``Basic``
        credential encodes.
    """
    text = value.decode("latin-1")
    texts = [text]
    scheme, _, credentials = text.strip().partition(" ")
    if scheme.lower() == "basic":
        try:
            texts.append(base64.b64decode(credentials.strip(), validate=True).decode("latin-1"))
        except ValueError:
            pass  # not base64: its words were looked at as they are
    return any(is_token(word) for part in texts for word in _TOKEN_WORD.findall(part))


def origin(url: str) -> tuple[str, str, int] | None:
    """
    :return: the origin of an ``http(s)`` URL or ``Origin`` value as
        (scheme, host, port), the default port filled in; ``None`` for
        anything else (``null`` included).
    """
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        return None
    return scheme, parts.hostname.lower(), port or (443 if scheme == "https" else 80)


def check_origin(request: Any, own: tuple[str, str, int] | None) -> None:
    """
    A request authenticated by the session cookie that may change
    something (an unsafe method, or an upgrade) must come from the
    forward's own origin when it says where it comes from: so that a
    page elsewhere cannot ride the cookie.  Under ``/p/`` that is the
    origin of ``public_url``; under host routing only the forward's
    ``pf-xxxx.{proxy_domain}`` origin (or the custom domain's or stable
    host's, with ``public_url``'s scheme and port) (``public_url``'s origin serves
    every forward under ``/p/``, so it is not trusted there).  No
    ``Origin`` (not a browser, or a same-origin request of an old one)
    passes: the cookie is SameSite=Lax.

    :param own: the origin the request must come from (:func:`origin`).
    :raises APIError: 403 for another origin, or ``null``.
    """
    if request.method in SAFE_METHODS and not request.requestHeaders.hasHeader(b"upgrade"):
        return
    origins = request.requestHeaders.getRawHeaders(b"origin")
    if origins is None:
        return
    for value in origins:
        if own is None or origin(value.decode("latin-1")) != own:
            shown = value[:200].decode("latin-1")
            raise FORBIDDEN(
                f"the session cookie is not accepted from the origin {shown!r} for this request "
                "(an unsafe method or an upgrade): only from the forward's own origin "
                "(public_url must be the URL the browser uses)"
            )
