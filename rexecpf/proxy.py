# -*- test-case-name: tests.test_proxy -*-
"""
The HTTP reverse proxy: ``/p/{id}/...`` and, with ``[server] proxy_domain``,
``pf-xxxx.{proxy_domain}``.

What it does, against the twelve faults of ``twisted.web.proxy``:

- HTTP/1.1 over kept-alive connections to the container (a small pool per
  address and port, made through endpoints: IPv6 bracketed, no
  ``connectTCP``); the response head is read by the proxy itself and the
  body decoded by its framing (Content-Length, chunked, or until close):
  ``twisted.web.client.Agent``'s per-request machinery was most of a
  proxied request's cost;
- the response body streams with back-pressure: the backend transport is the
  request's streaming producer, so a slow client stops the container's reads;
- the request body streams too: the request is processed as soon as its
  head is complete, and the body goes to the container as it arrives, framed
  as the client sent it (Content-Length or chunked), as the container
  connection's producer: a container that does not read pauses the client
  (:class:`rexecpf.web.RequestBodyStream`; over the limit it is refused with
  413 while it arrives, see :class:`rexecpf.web.LimitedRequest`);
- hop-by-hop headers go both ways (plus every name ``Connection`` lists),
  every value of a repeated header is kept, ``Host`` is the client's, and
  ``X-Forwarded-For/-Proto/-Host/-Prefix`` are added;
- 502 when the container does not answer, 504 when no response headers come
  within ``response_timeout``; a backend that dies mid-body aborts the client
  connection (a short or unterminated response, never a complete-looking one);
- a client that goes away stops the backend;
- an ``Upgrade`` request is sent over a connection of its own; a 101 takes the client
  connection over from the ``HTTPChannel`` and splices both with
  :class:`rexecpf.relay.Relay`;
- rexecpf's own credentials never reach the container: its session cookie,
  every ``Authorization`` value holding a rexecpf token (of any user, in any
  scheme, case or spacing: :func:`_carries_token`), and a ``token`` query
  parameter that is a rexecpf token (consumed: cookie and redirect); an
  app's own ``Authorization`` values and ``token`` parameter pass;
- a request authenticated by the session cookie that is unsafe or an upgrade
  is refused (403) from an ``Origin`` other than the forward's own
  (:meth:`ProxyService._check_origin`);
- a CORS preflight without credentials is answered 204 with no CORS
  permission, or passed to the container if its forward says so
  (``pass_preflight``; :meth:`ProxyService._preflight`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import re
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import unquote_plus, urlsplit

from twisted.application.service import Service
from twisted.internet import task
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import ConnectError, ConnectionDone, DNSLookupError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer, IRequest
from twisted.web.resource import Resource
from zope.interface import implementer

from rexecpf.api import PublicURLs, write_json
from rexecpf.auth import Authenticator, bearer_token
from rexecpf.endpoints import container_endpoint
from rexecpf.forwards import ForwardService
from rexecpf.http1 import (
    ChunkedDecoder,
    Framing,
    HeadReader,
    LengthDecoder,
    ProtocolError,
    ResponseHead,
    UntilCloseDecoder,
)
from rexecpf.metrics import Metrics
from rexecpf.model import (
    BAD_GATEWAY,
    FORBIDDEN,
    FORWARD_NOT_FOUND,
    GATEWAY_TIMEOUT,
    INTERNAL_ERROR,
    NOT_FOUND,
    UNAUTHORIZED,
    APIError,
    CloseReason,
    Container,
    ErrorKind,
    PortForward,
    Principal,
)
from rexecpf.relay import CONNECT_TIMEOUT, IRelayEnd, Relay, RelayStats, TCPEnd, widen_transport
from rexecpf.web import RequestBodyStream, release_from_http_channel

__all__ = [
    "SESSION_COOKIE",
    "HostRouter",
    "ProxyResource",
    "ProxyService",
]

#: The name of rexecpf's browser session cookie.
SESSION_COOKIE = b"rexecpf_session"

#: Hop-by-hop headers (RFC 9110 7.6.1, and the ones ``_newclient`` manages),
#: lower case.  Names listed in ``Connection`` are removed as well.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)

#: Methods that change nothing (RFC 9110 9.2.1): not origin-checked.
SAFE_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE"})

#: Request headers the proxy sets itself (the client's values are dropped).
_OWN_REQUEST_HEADERS = frozenset(
    {b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-prefix", b"content-length", b"expect"}
)

#: Seconds a kept-alive connection to a container may stay idle and still
#: be used: below the keep-alive timeout of common servers (2 s and more).
POOLED_IDLE_SECONDS = 2.0

_ERROR_PAGE = (
    "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{code} {message}</title></head>"
    "<body><h1>{code} {message}</h1><p>{detail}</p><p><small>rexecpf</small></p></body></html>\n"
)

_FORWARD_LABEL = re.compile(r"pf-[a-z0-9]{1,64}\Z")


# --- errors -----------------------------------------------------------------


def wants_html(request: IRequest) -> bool:
    """:return: whether the client is a browser (its ``Accept`` names text/html)."""
    accept = b",".join(request.requestHeaders.getRawHeaders(b"accept", []))
    return b"text/html" in accept.lower()


def error_body(request: IRequest, error: APIError) -> bytes:
    """
    Set the status and headers of an error the proxy itself makes.

    :return: the body: a short HTML page for browsers, JSON otherwise.
    """
    for name, value in error.headers.items():
        request.setHeader(name.encode("ascii"), value.encode("ascii"))
    if not wants_html(request):
        return write_json(request, error.code, error.body())
    request.setResponseCode(error.code)
    request.setHeader(b"content-type", b"text/html; charset=utf-8")
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"x-content-type-options", b"nosniff")
    return _ERROR_PAGE.format(
        code=error.code, message=html.escape(error.message), detail=html.escape(error.detail)
    ).encode("utf-8")


def _finish_with_error(request: Any, error: APIError) -> bool:
    """
    Answer ``error`` if nothing was sent yet; else abort the connection.

    :return: whether ``error`` was the answer.
    """
    if getattr(request, "_disconnected", False) or request.finished:
        return False
    if request.startedWriting:
        _abort_client(request)
        return False
    request.responseHeaders = Headers()
    request.setHeader(b"server", server.version)
    request.setHeader(b"date", http.datetimeToString())
    request.write(error_body(request, error))
    request.finish()
    return True


#: Seconds a broken response may take to flush before its connection is aborted.
BROKEN_FLUSH_SECONDS = 30.0


def _abort_client(request: Any, clock: IReactorTime | None = None) -> None:
    """
    End the client connection without finishing the response, so that it
    cannot look complete (a short body, or no terminating chunk).

    :param clock: when given, what was already written is flushed first (for
        at most :data:`BROKEN_FLUSH_SECONDS`); otherwise the connection is
        dropped at once.
    """
    channel = getattr(request, "channel", None)
    transport = getattr(channel, "transport", None)
    if transport is None:
        return
    abort = getattr(transport, "abortConnection", None)
    if clock is None or abort is None:
        (abort or transport.loseConnection)()
        return
    transport.loseConnection()

    def too_slow() -> None:
        if getattr(transport, "connected", False):
            abort()

    call = clock.callLater(BROKEN_FLUSH_SECONDS, too_slow)
    request.notifyFinish().addBoth(lambda _: call.cancel() if call.active() else None)


# --- session cookies ----------------------------------------------------------


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


def _cookie_pairs(header: bytes) -> list[bytes]:
    return [part.strip() for part in header.split(b";") if part.strip()]


def _session_values(request: IRequest) -> list[bytes]:
    values = []
    for header in request.requestHeaders.getRawHeaders(b"cookie", []):
        for pair in _cookie_pairs(header):
            name, _, value = pair.partition(b"=")
            if name.strip() == SESSION_COOKIE:
                values.append(value.strip().strip(b'"'))
    return values


def _without_session_cookie(values: list[bytes]) -> list[bytes]:
    """:return: the Cookie header values with rexecpf's cookie removed (others kept)."""
    kept = []
    for header in values:
        pairs = [p for p in _cookie_pairs(header) if p.partition(b"=")[0].strip() != SESSION_COOKIE]
        if pairs:
            kept.append(b"; ".join(pairs))
    return kept


def _decoded(text: bytes) -> str:
    """:return: a query name or value percent-decoded (``""`` if it is not ASCII)."""
    try:
        return unquote_plus(text.decode("ascii"))
    except UnicodeDecodeError:
        return ""


def _split_token(query: bytes, is_token: Callable[[str], bool]) -> tuple[list[str] | None, bytes]:
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


def _carries_token(value: bytes, is_token: Callable[[str], bool]) -> bool:
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


def _origin(url: str) -> tuple[str, str, int] | None:
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


# --- headers -------------------------------------------------------------------


def _connection_names(headers: Headers) -> set[bytes]:
    """:return: the (lower-case) names a ``Connection`` header lists."""
    return _tokens(headers.getRawHeaders(b"connection", []))


def _tokens(values: Iterable[bytes]) -> set[bytes]:
    """:return: the lower-case tokens of comma-separated header values."""
    names = set()
    for value in values:
        for token in value.split(b","):
            token = token.strip().lower()
            if token:
                names.add(token)
    return names


#: A response head's fields: lower-case name -> (the name as first sent, every value in order).
Fields = dict[bytes, tuple[bytes, list[bytes]]]


def _values(fields: Fields, lower_name: bytes) -> list[bytes]:
    """:return: every value of a field (``[]`` when absent)."""
    field = fields.get(lower_name)
    return field[1] if field is not None else []


def _client_ip(request: IRequest) -> bytes:
    address = request.getClientAddress()
    host = getattr(address, "host", None)
    return host.encode("ascii") if host else b"unknown"


class _ContainerEndpoints:
    """
    Endpoints to container ports (:func:`rexecpf.endpoints.container_endpoint`:
    TCP4/TCP6 for addresses, names resolved; never the daemon's own sockets).
    """

    def __init__(self, reactor: Any, timeout: float, refuse: Callable[[str, int], None]) -> None:
        self._reactor = reactor
        self._timeout = timeout
        self._refuse = refuse

    def endpoint(self, host: str, port: int) -> Any:
        """:return: a client endpoint for ``host`` (address or name) and ``port``."""
        return container_endpoint(self._reactor, host, port, self._refuse, self._timeout)


def _authority(container: Container, port: int) -> bytes:
    address = container.address or ""
    if ":" in address and not address.startswith("["):
        address = f"[{address}]"
    return f"{address}:{port}".encode("ascii")


# --- the service ----------------------------------------------------------------


class ProxyService(Service):
    """
    Everything the proxy shares between requests: the connection pool, the
    session key, the limits.

    :param reactor: the reactor (time, TCP).
    :param authenticator: tokens and users.
    :param forwards: forward lookups and live-connection tracking.
    :param urls: the public URLs.
    :param session_key: returns a Deferred firing with the cookie-signing key
        (``lambda: store.secret("session")``); called on first use.
    :param session_seconds: lifetime of a session cookie.
    :param body_limit: ``[limits] proxy_body_bytes``, each direction.
    :param response_timeout: seconds to wait for response headers (504 after).
    :param upgrade_rate: bytes/second each way on an upgraded connection.
    :param upgrade_idle: idle seconds before an upgraded connection closes.
    :param max_per_host: idle kept-alive connections kept per container
        address and port.
    :param metrics: where every answer is counted by status (``None``: not
        counted); upgraded connections are counted as relays, through
        :meth:`ForwardService.relay_ended`.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        authenticator: Authenticator,
        forwards: ForwardService,
        urls: PublicURLs,
        session_key: Callable[[], Deferred[bytes]],
        session_seconds: float = 12 * 3600.0,
        body_limit: int = 100 * 1024 * 1024,
        response_timeout: float = 60.0,
        upgrade_rate: float | None = None,
        upgrade_idle: float | None = None,
        max_per_host: int = 128,
        metrics: Metrics | None = None,
    ) -> None:
        self.reactor = reactor
        self.metrics = metrics
        self.authenticator = authenticator
        self.forwards = forwards
        self.urls = urls
        self.sessions = SessionCookies(session_key, reactor, session_seconds, authenticator.credential)
        self.body_limit = body_limit
        self.response_timeout = response_timeout
        self.upgrade_rate = upgrade_rate
        self.upgrade_idle = upgrade_idle
        self.pool = _ConnectionPool(reactor, max_per_host, POOLED_IDLE_SECONDS)
        self.endpoints = _ContainerEndpoints(reactor, CONNECT_TIMEOUT, forwards.refuse_own_socket)
        self.secure_cookies = urls.public_url.startswith("https:")
        self._public_origin = _origin(urls.public_url)
        self._pruning = task.LoopingCall(self.pool.prune)
        self._pruning.clock = reactor

    def startService(self) -> None:
        super().startService()
        # Connections left idle once traffic stops are closed by us, not
        # kept until their server gives up on them.
        self._pruning.start(POOLED_IDLE_SECONDS, now=False)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self._pruning.running:
            self._pruning.stop()
        self.pool.close()
        return None

    # --- entry point

    def handle(self, request: Any, forward_id: str, prefix: bytes) -> Any:
        """
        Serve one request for a forward.

        :param request: the request.
        :param forward_id: the forward.
        :param prefix: ``/p/{id}`` as it appears in the request URI, or
            ``b""`` under host routing.
        :return: ``NOT_DONE_YET``.
        """
        request.defaultContentType = None
        if self.sessions.known:
            # The common case, without a Deferred when nothing waits.
            try:
                work = self._authorize(request, forward_id, prefix)
            except Exception:  # noqa: BLE001 - answered by failed() below
                work = fail()
        else:
            work = self.sessions.ready().addCallback(lambda _: self._authorize(request, forward_id, prefix))
        if work is None:
            return server.NOT_DONE_YET
        if not work.called:
            # A client that disconnects while we authenticate: stop there.
            request.notifyFinish().addErrback(lambda _: work.cancel())

        def failed(failure: Failure) -> None:
            if failure.check(CancelledError):
                return
            error = failure.value
            if not isinstance(error, APIError):
                self._log.failure("proxy request failed", failure)
                error = INTERNAL_ERROR("the proxy failed")
            if _finish_with_error(request, error):
                self.answered(error.code)

        work.addErrback(failed)
        return server.NOT_DONE_YET

    def answered(self, code: int) -> None:
        """Count one proxied request answered with ``code`` (by the container or by us)."""
        if self.metrics is not None:
            self.metrics.proxy_response(code)

    def _authorize(self, request: Any, forward_id: str, prefix: bytes) -> Deferred[None] | None:
        uri: bytes = request.uri
        path, _, query = uri.partition(b"?")
        tokens, rest_query = _split_token(query, self.authenticator.is_token)
        if tokens:
            # A rexecpf token in the URL is consumed here, whoever it
            # belongs to: it never reaches the container (someone else's
            # is 404, as their forward would be).
            holder = self.authenticator.authenticate(tokens[-1])
            if holder is None:
                raise UNAUTHORIZED("the token is not valid", headers={"WWW-Authenticate": 'Bearer realm="rexecpf"'})

            def start_session(_: object) -> None:
                assert holder is not None
                self._start_session(request, holder, forward_id, prefix, path, rest_query)

            return self.forwards.reach(holder, forward_id).addCallback(start_session)

        headers: Headers = request.requestHeaders
        principal: Principal | None = None
        for value in headers.getRawHeaders(b"authorization", []):
            principal = self.authenticator.authenticate(bearer_token(value))
            if principal is not None:
                break
        if principal is None:
            for value in _session_values(request):
                user = self.sessions.check(value, forward_id)
                principal = self.authenticator.user(user) if user else None
                if principal is not None:
                    self._check_origin(request, forward_id, prefix)
                    break
        if principal is None:
            if request.method == b"OPTIONS" and headers.hasHeader(b"access-control-request-method"):
                return self._preflight(request, forward_id, prefix)
            detail = (
                "the token is not valid"
                if tokens is not None
                else "a bearer token, or a session from opening the proxy URL with ?token=, is required"
            )
            raise UNAUTHORIZED(detail, headers={"WWW-Authenticate": 'Bearer realm="rexecpf"'})
        return self.forwards.reach(principal, forward_id).addCallback(self._exchange, request, principal, prefix)

    def _exchange(
        self, found: tuple[PortForward, Container], request: Any, principal: Principal, prefix: bytes
    ) -> None:
        """Send ``request`` to the forward's container, for ``principal``."""
        forward, container = found
        if request.finished or request._disconnected:
            return
        # connections_per_user: 429 over the cap (the exchange is tracked in this same turn)
        self.forwards.admit(forward.id, "proxy", principal.name)
        exchange_class = _Upgrade if request.requestHeaders.hasHeader(b"upgrade") else _Exchange
        exchange_class(self, request, principal, forward, container, prefix).start()

    def _check_origin(self, request: Any, forward_id: str, prefix: bytes) -> None:
        """
        A request authenticated by the session cookie that may change
        something (an unsafe method, or an upgrade) must come from the
        forward's own origin when it says where it comes from: so that a
        page elsewhere cannot ride the cookie.  Under ``/p/`` that is the
        origin of ``public_url``; under host routing only the forward's
        ``pf-xxxx.{proxy_domain}`` origin (``public_url``'s origin serves
        every forward under ``/p/``, so it is not trusted there).  No
        ``Origin`` (not a browser, or a same-origin request of an old one)
        passes: the cookie is SameSite=Lax.

        :raises APIError: 403 for another origin, or ``null``.
        """
        if request.method in SAFE_METHODS and not request.requestHeaders.hasHeader(b"upgrade"):
            return
        origins = request.requestHeaders.getRawHeaders(b"origin")
        if origins is None:
            return
        own = self._public_origin if prefix else _origin(self.urls.proxy_url(forward_id))
        for value in origins:
            if own is None or _origin(value.decode("latin-1")) != own:
                shown = value[:200].decode("latin-1")
                raise FORBIDDEN(
                    f"the session cookie is not accepted from the origin {shown!r} for this request "
                    "(an unsafe method or an upgrade): only from the forward's own origin "
                    "(public_url must be the URL the browser uses)"
                )

    def _preflight(self, request: Any, forward_id: str, prefix: bytes) -> Deferred[None] | None:
        """
        A CORS preflight (``OPTIONS`` with ``Access-Control-Request-Method``;
        a browser sends it without credentials): passed to the container,
        with no credentials, when the forward says so (``pass_preflight``);
        else answered 204 with no ``Access-Control-Allow-*`` header, so that
        the browser's cross-origin request fails (the same for a forward
        that does not exist: nothing is told about it).
        """
        forward = self.forwards.cached(forward_id)
        if forward is None or not forward.pass_preflight:
            request.setResponseCode(204)
            request.finish()
            self.answered(204)
            return None
        owner = Principal(forward.owner)
        return self.forwards.target(forward_id).addCallback(self._exchange, request, owner, prefix)

    def _start_session(
        self,
        request: Any,
        principal: Principal,
        forward_id: str,
        prefix: bytes,
        path: bytes,
        rest_query: bytes,
    ) -> None:
        if request.finished or request._disconnected:
            return
        cookie = self.sessions.make(principal.name, forward_id)
        request.addCookie(
            SESSION_COOKIE,
            cookie.encode("ascii"),
            path=(prefix + b"/") if prefix else b"/",
            max_age=str(int(self.sessions.lifetime)).encode("ascii"),
            secure=self.secure_cookies or request.isSecure(),
            httpOnly=True,
            sameSite="lax",
        )
        # A reference relative to the path itself keeps working behind a
        # front proxy that mounts rexecpf under a prefix.
        last = path.rsplit(b"/", 1)[-1]
        location = b"./" + last + (b"?" + rest_query if rest_query else b"")
        request.setResponseCode(303)
        request.setHeader(b"location", location)
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"referrer-policy", b"no-referrer")
        if wants_html(request):
            request.setHeader(b"content-type", b"text/html; charset=utf-8")
            request.write(b'<!DOCTYPE html>\n<p><a href="' + html.escape(location.decode("ascii", "replace")).encode("utf-8") + b'">continue</a></p>\n')
        request.finish()
        self.answered(303)
        self._log.info("session started for {user} on {forward_id}", user=principal.name, forward_id=forward_id)

    # --- the request sent to the container

    def request_head(
        self,
        request: Any,
        target: bytes,
        prefix: bytes,
        upgrade: bool,
        default_host: bytes,
        content_length: int | None,
        chunked: bool = False,
    ) -> bytes:
        """
        :param target: the path and query for the container.
        :param default_host: the ``Host`` when the client sent none (HTTP/1.0).
        :param content_length: the length of the body sent, if any.
        :param chunked: whether the body is sent chunked (its length unknown).
        :return: the request head for the container: end-to-end headers only
            (every value, in order), rexecpf's credentials removed (its
            cookie, and every ``Authorization`` value that holds a rexecpf
            token, of any user: :func:`_carries_token`; other values, the
            app's own credentials, pass), ``X-Forwarded-*`` added.
        """
        incoming: Headers = request.requestHeaders
        drop = _OWN_REQUEST_HEADERS | _connection_names(incoming)
        lines = [request.method + b" " + target + b" HTTP/1.1"]
        forwarded_for: list[bytes] = []
        host: bytes | None = None
        for name, values in incoming.getAllRawHeaders():
            lower = name.lower()
            if lower in HOP_BY_HOP or lower in drop:
                continue
            if lower == b"authorization":
                values = [value for value in values if not _carries_token(value, self.authenticator.is_token)]
            elif lower == b"cookie":
                values = _without_session_cookie(list(values))
            elif lower == b"x-forwarded-for":
                forwarded_for = list(values)
                continue  # appended to below
            elif lower == b"host" and values:
                host = values[0]
            lines.extend(name + b": " + value for value in values)
        if upgrade:
            lines.append(b"Connection: upgrade")
            lines.extend(b"Upgrade: " + value for value in incoming.getRawHeaders(b"upgrade", []))
        forwarded_for.append(_client_ip(request))
        lines.append(b"X-Forwarded-For: " + b", ".join(forwarded_for))
        # behind a TLS front end, the https of public_url is what the client used
        secure = self.secure_cookies or request.isSecure()
        lines.append(b"X-Forwarded-Proto: https" if secure else b"X-Forwarded-Proto: http")
        if host is None:
            lines.append(b"Host: " + default_host)
        else:
            lines.append(b"X-Forwarded-Host: " + host)
        if prefix:
            lines.append(b"X-Forwarded-Prefix: " + prefix)
        if content_length is not None:
            lines.append(b"Content-Length: %d" % content_length)
        elif chunked:
            lines.append(b"Transfer-Encoding: chunked")
        lines.append(b"\r\n")
        return b"\r\n".join(lines)

    def response_headers(
        self,
        request: Any,
        fields: Fields,
        prefix: bytes,
        keep: Iterable[bytes] = (),
        also_drop: Iterable[bytes] = (),
    ) -> None:
        """
        Copy the container's end-to-end response fields onto ``request``.

        :param keep: hop-by-hop names kept all the same.
        :param also_drop: end-to-end names dropped all the same.
        """
        out: Headers = request.responseHeaders
        out.removeHeader(b"server")
        keep_set = set(keep)
        drop = HOP_BY_HOP | _tokens(_values(fields, b"connection")) | set(also_drop)
        for lower, (name, values) in fields.items():
            if lower in keep_set:
                out.setRawHeaders(name, values)
                continue
            if lower in drop:
                continue
            if lower == b"location" and prefix:
                values = [_rewrite_location(value, prefix) for value in values]
            out.setRawHeaders(name, values)


def _rewrite_location(value: bytes, prefix: bytes) -> bytes:
    """``/login`` -> ``{prefix}/login``; relative, scheme-relative and absolute URLs unchanged."""
    if value.startswith(b"/") and not value.startswith(b"//"):
        if value == prefix or value.startswith(prefix + b"/"):
            return value  # the application already honours X-Forwarded-Prefix
        return prefix + value
    return value


# --- one proxied request ----------------------------------------------------------


@implementer(IBodyProducer)
class _RequestBody:
    """
    The request body on its way to the container, framed as the client sent
    it: each piece of the client's :class:`rexecpf.web.RequestBodyStream` as
    it arrives (as one chunk when the length is unknown).  The
    response-header timer is held while the body flows, and runs while the
    container does not read it (or once it is sent).

    :param stream: the body.
    :param sending: called with ``True`` when the body starts or resumes
        flowing, with ``False`` when it is paused or over.
    """

    def __init__(self, stream: RequestBodyStream, sending: Callable[[bool], None]) -> None:
        self._stream = stream
        self.length = stream.length
        #: whether it goes chunked (its length is unknown)
        self.chunked = stream.length is UNKNOWN_LENGTH
        self._sending = sending

    def startProducing(self, consumer: Any) -> Deferred[None]:
        """:return: a Deferred firing once the whole body is written, failing if it cannot arrive whole."""
        self._sending(True)
        done = self._stream.startProducing(_ChunkedWriter(consumer) if self.chunked else consumer)

        def sent(result: Any) -> Any:
            self._sending(False)
            if self.chunked and not isinstance(result, Failure):
                consumer.write(b"0\r\n\r\n")
            return result

        return done.addBoth(sent)

    def pauseProducing(self) -> None:
        self._sending(False)
        self._stream.pauseProducing()

    def resumeProducing(self) -> None:
        self._sending(True)
        self._stream.resumeProducing()

    def stopProducing(self) -> None:
        self._stream.stopProducing()


class _ChunkedWriter:
    """Writes each piece of a body of unknown length as one HTTP/1.1 chunk."""

    def __init__(self, consumer: Any) -> None:
        self._consumer = consumer

    def write(self, data: bytes) -> None:
        if data:
            self._consumer.write(b"%x\r\n%s\r\n" % (len(data), data))


def _body_of(request: Any, sending: Callable[[bool], None]) -> _RequestBody | None:
    """
    :return: the body to send, or ``None`` when the request has none.  It
        streams as it arrives (:attr:`rexecpf.web.LimitedRequest.body_stream`),
        except where :meth:`rexecpf.web.RexecSite.streams_body` says no
        (under host routing, an ``/api`` path): there ``twisted.web`` stored
        it, at most the API's body limit, and it is sent from memory.
    """
    stream = getattr(request, "body_stream", None)
    if stream is None:
        headers = request.requestHeaders
        if not (headers.hasHeader(b"content-length") or headers.hasHeader(b"transfer-encoding")):
            return None
        request.content.seek(0, 0)
        stored = request.content.read()
        stream = RequestBodyStream(len(stored), lambda paused: None)
        stream.received(stored)
        stream.ended()
    return _RequestBody(stream, sending)


#: Methods sent again, once, on a new connection when a kept-alive connection
#: turns out to be closed before any byte of the answer (RFC 9110 9.2.2):
#: the container cannot have acted on them twice.
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})

#: The answer to a request still waiting for its response headers when its
#: server is stopping (after the grace period).
SERVICE_UNAVAILABLE = ErrorKind(503, "Service unavailable")


def _closed_error(reason: str) -> APIError:
    """
    :param reason: why :meth:`ForwardService` shut the exchange down.
    :return: the answer to a request closed before its response headers came.
    """
    if reason in (CloseReason.DELETED, CloseReason.CONTAINER_STOPPED):
        return FORWARD_NOT_FOUND(f"the port forward is gone: {reason}")
    if reason == CloseReason.GOING_AWAY:
        return SERVICE_UNAVAILABLE("rexecpf is stopping")
    if reason == CloseReason.TOKEN_REVOKED:
        return UNAUTHORIZED(
            "the token of this session was revoked",
            headers={"WWW-Authenticate": 'Bearer realm="rexecpf"'},
        )
    return BAD_GATEWAY(f"the proxied request was closed: {reason}")


def _reason(failure: Failure) -> str:
    value = failure.value
    reasons = getattr(value, "reasons", None)
    if reasons:
        return "; ".join(r.getErrorMessage() for r in reasons)
    return failure.getErrorMessage()


class _ConnectionPool:
    """
    Kept-alive connections to container ports, idle between two requests.

    :param clock: the time source.
    :param max_idle: connections kept per address and port; more are closed.
    :param idle_seconds: a connection idle longer is not used again (closed
        when it would be taken, or by :meth:`prune`): shorter than the
        keep-alive timeout of common servers, so that a request rarely meets
        a connection its server is closing.
    """

    def __init__(self, clock: IReactorTime, max_idle: int, idle_seconds: float) -> None:
        self._clock = clock
        self.max_idle = max_idle
        self.idle_seconds = idle_seconds
        self._idle: dict[tuple[str, int], list[_ContainerConnection]] = {}

    def take(self, key: tuple[str, int]) -> _ContainerConnection | None:
        """:return: an idle connection to ``key`` (address, port), or ``None``."""
        idle = self._idle.get(key)
        now = self._clock.seconds()
        while idle:
            connection = idle.pop()  # the most recently used first
            if now - connection.idle_since <= self.idle_seconds:
                return connection
            connection._t.loseConnection()
        return None

    def put(self, connection: _ContainerConnection) -> None:
        """Keep ``connection`` (a response was read from it whole) for the next request."""
        idle = self._idle.setdefault(connection.key, [])
        if len(idle) >= self.max_idle:
            connection._t.loseConnection()
            return
        connection.idle_since = self._clock.seconds()
        idle.append(connection)

    def prune(self) -> None:
        """Close the connections idle longer than ``idle_seconds`` (the oldest are first)."""
        now = self._clock.seconds()
        for key, idle in list(self._idle.items()):
            while idle and now - idle[0].idle_since > self.idle_seconds:
                idle.pop(0)._t.loseConnection()
            if not idle:
                del self._idle[key]

    def forget(self, connection: _ContainerConnection) -> None:
        """``connection`` is closed: it is not idle any more."""
        idle = self._idle.get(connection.key)
        if idle is not None and connection in idle:
            idle.remove(connection)
            if not idle:
                del self._idle[connection.key]

    def idle_count(self) -> int:
        """:return: how many connections are idle in the pool."""
        return sum(len(idle) for idle in self._idle.values())

    def close(self) -> None:
        """Close every idle connection."""
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                connection._t.loseConnection()


class _ContainerConnection(TCPEnd):
    """
    A connection to a container port.  For each exchange it carries the
    request and reads the response head; the body is decoded by its framing
    and handed to the exchange, with this connection's transport as the
    client request's producer.  A response read whole from a connection that
    may stay open leaves it in the pool for the next request; after a 101 it
    is a relay end.
    """

    def __init__(self, exchange: _Exchange, key: tuple[str, int], pool: _ConnectionPool) -> None:
        super().__init__()
        self.exchange: _Exchange | None = exchange
        self.key = key
        self.pool = pool
        self.reader = HeadReader()
        self.head_done = False
        self.decoder: Any = None
        self.relaying = False
        #: whether it served an earlier exchange (kept alive in the pool)
        self.reused = False
        self.idle_since = 0.0

    def connectionMade(self) -> None:
        widen_transport(self.transport)
        assert self.exchange is not None
        self.exchange.connected(self)

    def reuse(self, exchange: _Exchange) -> None:
        """Serve ``exchange``: this connection was taken from the pool."""
        self.exchange = exchange
        self.reused = True

    def release(self, keep: bool) -> None:
        """
        The exchange is over: back to the pool when ``keep`` (the response was
        read whole and the connection may stay open), else closed.
        """
        self.exchange = None
        self.reader, self.head_done, self.decoder = HeadReader(), False, None
        transport = self._t
        if transport is None or not getattr(transport, "connected", True):
            return
        if keep:
            # A slow client may have left it paused: an idle connection reads,
            # so that its closing is noticed.
            transport.resumeProducing()
            self.pool.put(self)
        else:
            transport.loseConnection()

    def abort(self) -> None:
        self.exchange = None
        if self.transport is not None:
            self._t.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self.relaying:
            super().dataReceived(data)
            return
        exchange = self.exchange
        if exchange is None:
            # Idle, or closing: a server has nothing to say between answers.
            self._t.abortConnection()
            return
        if self.head_done:
            self.body_received(exchange, data)
            return
        try:
            head = self.reader.feed(data)
        except ProtocolError as error:
            exchange.head_failed(self, f"the container's response head is not valid HTTP/1.1: {error}")
            return
        if head is None:
            return
        self.head_done = True
        try:
            exchange.got_head(self, head, self.reader.rest)
        except Exception:
            # A bug, not the container's fault: the request must not hang.
            exchange.crashed(self)

    def body_received(self, exchange: _Exchange, data: bytes) -> None:
        """Decode ``data`` by the response's framing (bad framing: the response is broken)."""
        try:
            self.decoder.dataReceived(data)
        except ProtocolError as error:
            exchange.bad_framing(f"bad response framing: {error}")

    def readConnectionLost(self) -> None:
        if self.relaying:
            super().readConnectionLost()
        else:
            self._t.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.relaying:
            super().connectionLost(reason)
            return
        exchange, self.exchange = self.exchange, None
        if exchange is None:
            self.pool.forget(self)
        elif not self.head_done:
            exchange.head_failed(self, "the container closed the connection before answering")
        else:
            exchange.body_lost(reason)


def _nothing() -> None:
    pass


class _Exchange:
    """
    One proxied request, from sending it to the container to the last body
    byte, over a pooled connection (:class:`_ContainerConnection`).
    """

    _log = Logger()

    #: whether the client asked for a protocol switch (:class:`_Upgrade`)
    upgrade = False

    def __init__(
        self,
        service: ProxyService,
        request: Any,
        principal: Principal,
        forward: PortForward,
        container: Container,
        prefix: bytes,
    ) -> None:
        self.service = service
        self.request = request
        self.principal = principal
        self.forward = forward
        self.container = container
        self.prefix = prefix
        #: the connection being made, until it is
        self.pending: Deferred[Any] | None = None
        self.connection: _ContainerConnection | None = None
        self.timer: Any = None
        self.timed_out = False
        self.retried = False
        self.sending: _RequestBody | None = None
        self.body_sent = True
        #: whether the connection may carry another request after this one
        self.keep_alive = False
        self.body_bytes = 0
        self.done = False
        self.untrack: Callable[[], None] = _nothing
        #: fired once done, for a graceful stop (:meth:`drain`)
        self.drained: Deferred[None] | None = None

    def target(self) -> bytes:
        """:return: path and query for the container."""
        uri: bytes = self.request.uri
        if self.prefix and uri.startswith(self.prefix):
            uri = uri[len(self.prefix):]
        if not uri.startswith(b"/"):
            uri = b"/" + uri
        return uri

    def start(self) -> None:
        self.untrack = self.service.forwards.track(
            self.forward.id, self, user=self.principal.name, kind="proxy"
        )
        self.request.notifyFinish().addBoth(self._client_done)
        self._arm()
        self._open(fresh=self.upgrade)

    def _open(self, fresh: bool) -> None:
        """Take an idle connection from the pool (unless ``fresh``), else connect."""
        service = self.service
        key = (self.container.address or "", self.forward.container_port)
        if not fresh:
            connection = service.pool.take(key)
            if connection is not None:
                connection.reuse(self)
                self.connected(connection)
                return
        endpoint = service.endpoints.endpoint(*key)
        self.pending = endpoint.connect(
            Factory.forProtocol(lambda: _ContainerConnection(self, key, service.pool))
        )
        self.pending.addErrback(self._failed)

    def _settle(self) -> None:
        """Done, one way or another: no longer tracked; a graceful stop waits no more."""
        self.done = True
        # (dropped, not only called: it refers back to this exchange)
        untrack, self.untrack = self.untrack, _nothing
        untrack()
        drained, self.drained = self.drained, None
        if drained is not None:
            drained.callback(None)

    def drain(self) -> Deferred[None]:
        """
        A graceful stop: let the response finish, then close the client
        connection rather than wait for its next request.

        :return: a Deferred firing once this exchange is done.
        """
        channel = getattr(self.request, "channel", None)
        if channel is not None:
            if not self.request.startedWriting:
                self.request.setHeader(b"connection", b"close")
            channel.persistent = False
        if self.done:
            return succeed(None)
        if self.drained is None:
            self.drained = Deferred()
        return self.drained

    # the response-header timer

    def _arm(self) -> None:
        self._disarm()
        self.timer = self.service.reactor.callLater(self.service.response_timeout, self._time_out)

    def _disarm(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def _sending_body(self, sending: bool) -> None:
        connection = self.connection
        if self.done or connection is None or connection.head_done:
            return
        if sending:
            self._disarm()
        else:
            self._arm()

    def _time_out(self) -> None:
        self.timer = None
        self.timed_out = True
        if self.pending is not None:
            self.pending.cancel()  # -> _failed
            return
        self._stop_sending()
        connection, self.connection = self.connection, None
        self._end(GATEWAY_TIMEOUT(f"no response headers within {self.service.response_timeout:g} s"))
        if connection is not None:
            connection.abort()

    # the request

    def connected(self, connection: _ContainerConnection) -> None:
        """Send the request over ``connection``."""
        self.pending = None
        if self.done:
            connection.abort()
            return
        self.connection = connection
        request = self.request
        body = _body_of(request, self._sending_body)
        transport = connection._t
        transport.write(
            self.service.request_head(
                request,
                self.target(),
                self.prefix,
                self.upgrade,
                _authority(self.container, self.forward.container_port),
                None if body is None or body.chunked else body.length,
                body is not None and body.chunked,
            )
        )
        if body is not None and body.length:
            # The container's socket paces the body: a container that does
            # not read pauses it, and so the client's socket.
            self.sending = body
            self.body_sent = False
            transport.registerProducer(body, True)
            body.startProducing(transport).addCallbacks(self._body_sent, lambda failure: None)

    def _body_sent(self, _: object) -> None:
        self.body_sent = True
        self._stop_sending()

    def _stop_sending(self) -> None:
        """The request body is sent, or will not be: stop it and let go of the connection's producer slot."""
        body, self.sending = self.sending, None
        if body is None:
            return
        if not self.body_sent:
            body.stopProducing()
        transport = self.connection._t if self.connection is not None else None
        if transport is not None and getattr(transport, "producer", None) is body:
            transport.unregisterProducer()

    # the response

    def head_failed(self, connection: _ContainerConnection, why: str) -> None:
        """No (acceptable) response head came over ``connection``."""
        if self.done:
            return
        self._stop_sending()
        self.connection = None
        nothing_came = not connection.head_done and not connection.reader.received
        # (A streamed body cannot go again: what was sent of it is gone.)
        replayable = self.request.method in IDEMPOTENT and getattr(self.request, "body_stream", None) is None
        if connection.reused and nothing_came and not self.retried and replayable:
            # A kept-alive connection its server had closed: once more, on a new one.
            self.retried = True
            self._open(fresh=True)
            return
        self._disarm()
        connection.abort()
        self._end(BAD_GATEWAY(why))

    def got_head(self, connection: _ContainerConnection, head: ResponseHead, rest: bytes) -> None:
        """The response head came (interim ones skipped): pass it on, then its body (or switch protocols)."""
        if self.done:
            connection.abort()
            return
        self._disarm()
        if head.code == 101:
            self._switch(connection, head, rest)
            return
        self.keep_alive = not self.upgrade and head.persistent(self.request.method)
        self._respond(connection, head, rest)

    def _switch(self, connection: _ContainerConnection, head: ResponseHead, rest: bytes) -> None:
        """A 101: only an :class:`_Upgrade` asks for one."""
        self.head_failed(connection, "the container switched protocols unasked")

    def _respond(self, connection: _ContainerConnection, head: ResponseHead, rest: bytes) -> None:
        """
        Pass the response on: its status, reason and fields as parsed, its
        ``Content-Length`` written again from the number; the body decoded by
        its framing and re-framed by ``twisted.web`` for the client.  A
        transfer coding other than chunked cannot be passed on (the client
        would get coded bytes it is not told about, and ``twisted.web``
        writes ``Transfer-Encoding`` itself): 502, as nginx answers.
        """
        request = self.request
        limit = self.service.body_limit
        framing = head.framing(request.method)
        length = head.content_length
        if any(coding != b"chunked" for coding in head.transfer_codings):
            self.keep_alive = False
            codings = b", ".join(head.transfer_codings).decode("ascii")
            self.head_failed(connection, f"the container used a transfer coding the proxy cannot pass on: {codings}")
            return
        if framing is Framing.LENGTH and length is not None and length > limit:
            self.keep_alive = False
            self.head_failed(connection, f"the response body ({length} bytes) is over the limit of {limit} bytes")
            return
        request.setResponseCode(head.code, head.reason)
        # Transfer-Encoding is hop-by-hop; with it, Content-Length means
        # nothing (RFC 9112 6.3) and is dropped.
        self.service.response_headers(request, head.fields, self.prefix, also_drop=(b"content-length",))
        if length is not None:
            request.setHeader(b"content-length", b"%d" % length)
        if framing is Framing.NONE or (framing is Framing.LENGTH and length == 0):
            self._body_end(rest)
            return
        if framing is Framing.CHUNKED:
            decoder: Any = ChunkedDecoder(self._body_data, self._body_end)
        elif framing is Framing.LENGTH:
            assert length is not None
            decoder = LengthDecoder(length, self._body_data, self._body_end)
        else:
            decoder = UntilCloseDecoder(self._body_data)
        connection.decoder = decoder
        # Towards the client too: bigger sends, and a write buffer that may
        # hold a whole read from the container before the container is paused.
        widen_transport(getattr(request.channel, "transport", None))
        request.registerProducer(connection._t, True)
        if rest:
            connection.body_received(self, rest)

    def _body_data(self, data: bytes) -> None:
        if self.done:
            return
        self.body_bytes += len(data)
        if self.body_bytes > self.service.body_limit:
            self.broken("the response body grew past the limit")
            return
        self.request.write(data)

    def _body_end(self, extra: bytes) -> None:
        """The body came whole (``extra``: bytes after it, which no server should send)."""
        # (before the connection is let go: a body not sent whole is its producer still)
        self._stop_sending()
        connection, self.connection = self.connection, None
        if connection is not None and not self.body_sent:
            # Answered before the whole request body was sent: the rest will
            # not be, and closing gently would wait for what is still to be
            # written, on a container that may never read it.
            connection.abort()
            connection = None
        keep = self.keep_alive and self.body_sent and not extra and not self.done
        self.finish(connection, keep)

    def body_lost(self, reason: Failure) -> None:
        """The connection closed while the body came."""
        connection = self.connection
        if self.done or connection is None:
            return
        if isinstance(connection.decoder, UntilCloseDecoder):
            self.connection = None
            self.finish(None, False)
        else:
            self.broken(f"the container's response ended early: {_reason(reason)}")

    # outcomes

    def crashed(self, connection: _ContainerConnection) -> None:
        """
        Handling the container's answer raised (called from the ``except``
        block): logged; the client gets a 500, or a cut response if it
        already started.
        """
        self._log.failure("proxied response of {forward_id} failed", forward_id=self.forward.id)
        self._stop_sending()
        connection.abort()
        self._disarm()
        if self.request.startedWriting:
            self.broken("internal error", at_once=True)
        else:
            self.connection = None
            self._end(INTERNAL_ERROR("the proxy failed"))

    def _failed(self, failure: Failure) -> None:
        """The connection to the container could not be made."""
        self.pending = None
        self._disarm()
        if self.done:
            return
        if self.timed_out:
            self._end(GATEWAY_TIMEOUT(f"no response headers within {self.service.response_timeout:g} s"))
        elif failure.check(CancelledError):
            self._end(None)
        elif isinstance(failure.value, APIError):  # a name that resolves to a socket of ours: 403
            self._end(failure.value)
        elif failure.check(ConnectError, DNSLookupError):
            self._end(BAD_GATEWAY(f"the container port does not answer: {_reason(failure)}"))
        else:
            self._log.info("proxy to {forward_id} failed: {error}", forward_id=self.forward.id, error=_reason(failure))
            self._end(BAD_GATEWAY(f"the container port failed: {_reason(failure)}"))

    def _end(self, error: APIError | None) -> None:
        if self.done:
            return
        self._settle()
        if error is not None:
            _finish_with_error(self.request, error)

    def finish(self, connection: _ContainerConnection | None, keep: bool) -> None:
        """The whole body is delivered: ``connection`` goes back to the pool if ``keep``."""
        if self.done:
            if connection is not None:
                connection.abort()
            return
        self._settle()
        request = self.request
        if request.producer is not None:
            request.unregisterProducer()
        if connection is not None:
            connection.release(keep)
        if not request.finished and not request._disconnected:
            request.finish()

    def broken(self, why: str, at_once: bool = False) -> None:
        """
        The body cannot be delivered whole: end the client connection without
        finishing the response (what was written is flushed first, unless
        ``at_once``), and the container connection.
        """
        connection, self.connection = self.connection, None
        if connection is not None:
            connection.abort()
        if self.done:
            return
        self._settle()
        self._stop_sending()
        self._log.info("proxied response of {forward_id} broken: {why}", forward_id=self.forward.id, why=why)
        _abort_client(self.request, None if at_once else self.service.reactor)

    def bad_framing(self, why: str) -> None:
        """
        The container's body is not framed as HTTP/1.1 says: 502 when none of
        it was passed on yet, else the response is :meth:`broken`.
        """
        request = self.request
        if self.done or request.startedWriting:
            self.broken(why)
            return
        connection, self.connection = self.connection, None
        if connection is not None:
            connection.abort()
        self._stop_sending()
        if request.producer is not None:
            request.unregisterProducer()
        self._end(BAD_GATEWAY(why))

    def _client_done(self, result: Any) -> None:
        if self.request.startedWriting:
            # Whatever wrote the head (the container's answer, or one of
            # ours), including a response cut short afterwards.
            self.service.answered(self.request.code)
        if isinstance(result, Failure) and not self.done:
            # The client went away: stop the container.
            self._settle()
            self._disarm()
            self._stop_sending()
            if self.pending is not None:
                self.pending.cancel()
            connection, self.connection = self.connection, None
            if connection is not None:
                connection.abort()

    def shutdown(self, reason: str) -> None:
        """The forward is gone, its user's token was revoked, or rexecpf stops: close now."""
        if self.done:
            return
        connection = self.connection
        if connection is None or not connection.head_done:
            pending, self.pending = self.pending, None
            self.connection = None
            self._disarm()
            self._stop_sending()
            self._end(_closed_error(reason))
            if connection is not None:
                connection.abort()
            if pending is not None:
                pending.cancel()
            return
        self.broken(reason, at_once=True)


# --- Upgrade requests -----------------------------------------------------------


@implementer(IRelayEnd)
class _ClientEnd:
    """
    The client side of an upgraded connection, taken over from its
    ``HTTPChannel``: an :class:`rexecpf.relay.IRelayEnd`.
    """

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.relay: Relay | None = None

    @property
    def producer(self) -> Any:
        return self.transport

    @property
    def consumer(self) -> Any:
        return self.transport

    def dataReceived(self, data: bytes) -> None:
        if self.relay is not None:
            self.relay.received(self, data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.relay is not None:
            self.relay.lost(self, reason.check(ConnectionDone) is not None)

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    def close(self, code: int, reason: str) -> None:
        self.transport.loseConnection()

    def abort(self) -> None:
        self.transport.abortConnection()


class _Upgrade(_Exchange):
    """
    An ``Upgrade`` request: over a connection of its own, never pooled; a 101
    takes the client connection over and splices both with a relay, any
    other answer is passed on as a normal response.
    """

    upgrade = True
    relay: Relay | None = None

    def _switch(self, backend: _ContainerConnection, head: ResponseHead, rest: bytes) -> None:
        if not self.body_sent:
            # The rest of the body would reach it as bytes of the new protocol.
            self.head_failed(backend, "the container switched protocols before it read the request body")
            return
        request = self.request
        channel = request.channel
        transport = channel.transport
        self._stop_sending()
        # 101: keep Upgrade and Connection: upgrade, drop other hop-by-hop.
        request.responseHeaders = Headers()
        self.service.response_headers(request, head.fields, self.prefix, keep=(b"upgrade",))
        request.responseHeaders.setRawHeaders(b"connection", [b"Upgrade"])
        lines = [b"HTTP/1.1 101 " + (head.reason or b"Switching Protocols")]
        for name, values in request.responseHeaders.getAllRawHeaders():
            lines.extend(name + b": " + value for value in values)
        # Take the connection over from the HTTPChannel (as Twisted's own
        # websocket support does): it stays the transport's protocol, but its
        # data and connection loss now go to our end; it stops being the
        # transport's producer so that the relay can register its own.
        backend.relaying = True
        backend._t.pauseProducing()
        if rest:
            TCPEnd.dataReceived(backend, rest)
        client = _ClientEnd(transport)
        buffered = b"".join(channel._dataBuffer)
        channel._dataBuffer = []
        channel.dataReceived = client.dataReceived
        channel.connectionLost = client.connectionLost
        transport.pauseProducing()
        release_from_http_channel(transport)
        transport.write(b"\r\n".join(lines) + b"\r\n\r\n")
        relay = Relay(
            self.service.reactor,
            client,
            backend,
            on_end=self._relay_ended,
            rate_a_to_b=self.service.upgrade_rate,
            rate_b_to_a=self.service.upgrade_rate,
            idle_seconds=self.service.upgrade_idle,
        )
        self.relay = relay
        client.relay = relay
        backend.attach(relay)
        self.service.answered(101)
        if buffered:
            relay.received(client, buffered)
        relay.start()
        self._log.info("upgraded connection to {forward_id} open", forward_id=self.forward.id)

    def _relay_ended(self, stats: RelayStats) -> None:
        self._settle()
        self.service.forwards.relay_ended("upgrade", self.forward.id, self.principal.name, stats)

    def drain(self) -> Deferred[None]:
        """A graceful stop: an upgraded connection is closed at once (as a tunnel is)."""
        if self.relay is not None:
            self.shutdown(CloseReason.GOING_AWAY)
            return succeed(None)
        return super().drain()

    def shutdown(self, reason: str) -> None:
        if self.relay is not None:
            self.relay.abort()
            return
        super().shutdown(reason)


# --- resources -------------------------------------------------------------------


class _ForwardResource(Resource):
    """Everything below one forward's prefix."""

    isLeaf = True

    def __init__(self, service: ProxyService, forward_id: str, prefix_routed: bool) -> None:
        super().__init__()
        self._service = service
        self._forward_id = forward_id
        self._path_routed = prefix_routed

    def render(self, request: Any) -> Any:
        if not self._path_routed:
            return self._service.handle(request, self._forward_id, b"")
        path = request.uri.partition(b"?")[0]
        parts = path.split(b"/", 3)  # b"", b"p", id, rest
        if len(parts) < 4:
            # /p/{id} -> /p/{id}/ keeping the query string (relative, so that
            # it also works behind a front proxy that adds a prefix)
            query = request.uri.partition(b"?")[2]
            request.setResponseCode(308)
            request.setHeader(b"location", parts[-1] + b"/" + (b"?" + query if query else b""))
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            self._service.answered(308)
            return b"moved to the trailing-slash URL\n"
        prefix = b"/".join(parts[:3])
        return self._service.handle(request, self._forward_id, prefix)


class _NotFound(Resource):
    isLeaf = True

    def __init__(self, service: ProxyService, error: APIError) -> None:
        super().__init__()
        self._service = service
        self._error = error

    def render(self, request: Any) -> bytes:
        self._service.answered(self._error.code)
        return error_body(request, self._error)


class ProxyResource(Resource):
    """``/p/``: ``/p/{id}/...`` for each forward."""

    def __init__(self, service: ProxyService) -> None:
        super().__init__()
        self._service = service

    def getChild(self, path: bytes, request: Any) -> Any:
        try:
            forward_id = path.decode("ascii")
        except UnicodeDecodeError:
            forward_id = ""
        if not forward_id:
            return _NotFound(self._service, NOT_FOUND("a port forward id is required: /p/{id}/"))
        return _ForwardResource(self._service, forward_id, True)

    def render(self, request: Any) -> bytes:
        self._service.answered(404)
        return error_body(request, NOT_FOUND("a port forward id is required: /p/{id}/"))


class HostRouter:
    """
    Serves ``pf-xxxx.{proxy_domain}`` (any port): every path of such a host
    goes to that forward, never to ``/api`` or another forward.  Other hosts
    under the domain are 404.
    """

    def __init__(self, service: ProxyService, proxy_domain: str) -> None:
        self._service = service
        self._suffix = "." + proxy_domain.lower().strip(".")

    def route(self, request: Any) -> Any:
        """:return: the resource for a proxy host, or ``None`` for other hosts."""
        raw = request.getHeader(b"host")
        if not raw:
            return None
        host = raw.decode("ascii", "replace").lower()
        if host.startswith("["):
            return None
        host = host.rsplit(":", 1)[0] if ":" in host else host
        host = host.rstrip(".")
        if not host.endswith(self._suffix):
            # other hosts, the bare proxy_domain too: it may well be the
            # public host of the API itself
            return None
        label = host[: -len(self._suffix)]
        if not _FORWARD_LABEL.match(label):
            return _NotFound(self._service, FORWARD_NOT_FOUND(f"no port forward at {host!r}"))
        return _ForwardResource(self._service, label.replace("-", "_"), False)
