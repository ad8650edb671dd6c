# -*- test-case-name: tests.test_proxy -*-
"""
The HTTP reverse proxy: ``/p/{id}/...`` and, with ``[server] proxy_domain``,
``pf-xxxx.{proxy_domain}``.

What it does, against the twelve faults of ``twisted.web.proxy``:

- HTTP/1.1 through :class:`twisted.web.client.Agent` with a persistent
  :class:`HTTPConnectionPool` and an endpoint factory (IPv6 bracketed, no
  ``connectTCP``);
- the response body streams with back-pressure: the backend transport is the
  request's streaming producer, so a slow client stops the container's reads;
- the request body (already spooled by ``twisted.web``; over the limit it is
  refused with 413 while it arrives, see :class:`rexecpf.web.LimitedRequest`) is streamed
  from ``request.content`` with a :class:`FileBodyProducer`, never copied;
- hop-by-hop headers go both ways (plus every name ``Connection`` lists),
  every value of a repeated header is kept, ``Host`` is the client's, and
  ``X-Forwarded-For/-Proto/-Host/-Prefix`` are added;
- 502 when the container does not answer, 504 when no response headers come
  within ``response_timeout``; a backend that dies mid-body aborts the client
  connection (a short or unterminated response, never a complete-looking one);
- a client that goes away stops the backend;
- an ``Upgrade`` request is sent over a raw connection; a 101 takes the client
  connection over from the ``HTTPChannel`` and splices both with
  :class:`rexecpf.relay.Relay`;
- rexecpf's own credentials (its bearer header, its session cookie, the
  ``token`` parameter) never reach the container.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import ipaddress
import re
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import unquote_plus

from twisted.application.service import Service
from twisted.internet import task
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
)
from twisted.internet.error import ConnectError, ConnectionDone, DNSLookupError
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.client import (
    Agent,
    FileBodyProducer,
    HTTPConnectionPool,
    PotentialDataLoss,
    ResponseDone,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import (
    UNKNOWN_LENGTH,
    IAgentEndpointFactory,
    IBodyProducer,
    IRequest,
)
from twisted.web.resource import Resource
from zope.interface import implementer

from rexecpf.api import PublicURLs, write_json
from rexecpf.auth import Authenticator, bearer_token
from rexecpf.forwards import ForwardService
from rexecpf.model import (
    BAD_GATEWAY,
    FORWARD_NOT_FOUND,
    GATEWAY_TIMEOUT,
    INTERNAL_ERROR,
    NOT_FOUND,
    UNAUTHORIZED,
    APIError,
    Container,
    PortForward,
    Principal,
)
from rexecpf.relay import Relay, RelayStats, TCPEnd

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

#: Request headers the proxy sets itself (the client's values are dropped).
_OWN_REQUEST_HEADERS = frozenset(
    {b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-prefix", b"content-length", b"expect"}
)

#: Largest response head accepted from a container on an Upgrade request.
MAX_UPGRADE_HEAD = 64 * 1024

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


def _finish_with_error(request: Any, error: APIError) -> None:
    """Answer ``error`` if nothing was sent yet; else abort the connection."""
    if getattr(request, "_disconnected", False) or request.finished:
        return
    if request.startedWriting:
        _abort_client(request)
        return
    request.responseHeaders = Headers()
    request.setHeader(b"server", server.version)
    request.setHeader(b"date", http.datetimeToString())
    request.write(error_body(request, error))
    request.finish()


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


def _split_token(query: bytes) -> tuple[list[bytes] | None, bytes]:
    """
    :return: the values of the ``token`` parameter (``None`` when absent) and
        the query string without it (other parameters byte for byte).
    """
    if not query:
        return None, query
    tokens: list[bytes] = []
    kept = []
    for part in query.split(b"&"):
        name = part.partition(b"=")[0]
        try:
            decoded = unquote_plus(name.decode("ascii"))
        except UnicodeDecodeError:
            decoded = ""
        if decoded == "token":
            tokens.append(part.partition(b"=")[2])
        else:
            kept.append(part)
    if not tokens:
        return None, query
    return tokens, b"&".join(kept)


# --- headers -------------------------------------------------------------------


def _connection_names(headers: Headers) -> set[bytes]:
    names = set()
    for value in headers.getRawHeaders(b"connection", []):
        for token in value.split(b","):
            token = token.strip().lower()
            if token:
                names.add(token)
    return names


def _agent_connection_names(response: Any) -> set[bytes]:
    """
    :return: the names the container listed in its response ``Connection``
        header.  ``Agent`` files ``Connection`` among its connection-control
        headers, out of ``response.headers``; they are read from its parser
        (private: tests.functional.test_proxy pins this down).
    """
    producer = getattr(getattr(response, "_transport", None), "_producer", None)
    protocol = getattr(producer, "protocol", None)
    protocol = getattr(protocol, "_wrappedProtocol", protocol)
    parser = getattr(protocol, "_parser", None)
    headers = getattr(parser, "connHeaders", None)
    return _connection_names(headers) if headers is not None else set()


def _end_to_end(headers: Headers, also_drop: Iterable[bytes] = ()) -> list[tuple[bytes, list[bytes]]]:
    """:return: the headers without hop-by-hop ones, every value kept, in order."""
    drop = set(HOP_BY_HOP) | _connection_names(headers) | set(also_drop)
    return [(name, values) for name, values in headers.getAllRawHeaders() if name.lower() not in drop]


def _client_ip(request: IRequest) -> bytes:
    address = request.getClientAddress()
    host = getattr(address, "host", None)
    return host.encode("ascii") if host else b"unknown"


@implementer(IAgentEndpointFactory)
class _ContainerEndpoints:
    """Endpoints to container ports: TCP4/TCP6 for addresses, names resolved."""

    def __init__(self, reactor: Any, timeout: float) -> None:
        self._reactor = reactor
        self._timeout = timeout

    def endpointForURI(self, uri: Any) -> Any:
        return self.endpoint(uri.host.decode("ascii"), uri.port)

    def endpoint(self, host: str, port: int) -> Any:
        """:return: a client endpoint for ``host`` (address or name) and ``port``."""
        host = host.strip("[]")
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return HostnameEndpoint(self._reactor, host.encode("idna"), port, timeout=self._timeout)
        if ip.version == 6:
            return TCP6ClientEndpoint(self._reactor, host, port, timeout=self._timeout)
        return TCP4ClientEndpoint(self._reactor, host, port, timeout=self._timeout)


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
    ) -> None:
        self.reactor = reactor
        self.authenticator = authenticator
        self.forwards = forwards
        self.urls = urls
        self.sessions = SessionCookies(session_key, reactor, session_seconds, authenticator.credential)
        self.body_limit = body_limit
        self.response_timeout = response_timeout
        self.upgrade_rate = upgrade_rate
        self.upgrade_idle = upgrade_idle
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = max_per_host
        self.pool.retryAutomatically = True
        self.endpoints = _ContainerEndpoints(reactor, response_timeout)
        self.agent = Agent.usingEndpointFactory(reactor, self.endpoints, pool=self.pool)
        self.cooperator = task.Cooperator(
            scheduler=lambda work: reactor.callLater(0, work), started=True
        )
        self.secure_cookies = urls.public_url.startswith("https:")

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self.cooperator.stop()
        return self.pool.closeCachedConnections()  # type: ignore[no-any-return]

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
            if failure.check(APIError):
                _finish_with_error(request, failure.value)
                return
            self._log.failure("proxy request failed", failure)
            _finish_with_error(request, INTERNAL_ERROR("the proxy failed"))

        work.addErrback(failed)
        return server.NOT_DONE_YET

    def _authorize(self, request: Any, forward_id: str, prefix: bytes) -> Deferred[None] | None:
        uri: bytes = request.uri
        path, _, query = uri.partition(b"?")
        tokens, rest_query = _split_token(query)
        if tokens is not None:
            token = unquote_plus(tokens[-1].decode("ascii", "replace"))
            principal = self.authenticator.authenticate(token)
            if principal is None:
                raise UNAUTHORIZED("the token is not valid", headers={"WWW-Authenticate": 'Bearer realm="rexecpf"'})
            return self.forwards.reach(principal, forward_id).addCallback(
                lambda _: self._start_session(request, principal, forward_id, prefix, path, rest_query)
            )

        strip_authorization = False
        principal: Principal | None = None
        token = bearer_token(request.getHeader(b"authorization"))
        if token is not None:
            principal = self.authenticator.authenticate(token)
            strip_authorization = principal is not None
        if principal is None:
            for value in _session_values(request):
                user = self.sessions.check(value, forward_id)
                principal = self.authenticator.user(user) if user else None
                if principal is not None:
                    break
        if principal is None:
            raise UNAUTHORIZED(
                "a bearer token, or a session from opening the proxy URL with ?token=, is required",
                headers={"WWW-Authenticate": 'Bearer realm="rexecpf"'},
            )

        def reached(found: tuple[PortForward, Container]) -> Deferred[None] | None:
            forward, container = found
            if request.finished or request._disconnected:
                return None
            exchange_class = _Upgrade if request.requestHeaders.hasHeader(b"upgrade") else _Exchange
            exchange = exchange_class(self, request, forward, container, prefix, strip_authorization)
            exchange.start()
            return None

        return self.forwards.reach(principal, forward_id).addCallback(reached)

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
        self._log.info("session started for {user} on {forward_id}", user=principal.name, forward_id=forward_id)

    # --- the request sent to the container

    def request_headers(
        self, request: Any, forward_id: str, prefix: bytes, strip_authorization: bool, upgrade: bool
    ) -> Headers:
        """
        :return: the headers for the container: end-to-end ones only (every
            value), rexecpf's credentials removed, ``X-Forwarded-*`` added.
        """
        incoming: Headers = request.requestHeaders
        drop = set(_OWN_REQUEST_HEADERS)
        if strip_authorization:
            drop.add(b"authorization")
        headers = Headers()
        for name, values in _end_to_end(incoming, drop):
            lower = name.lower()
            if lower == b"cookie":
                values = _without_session_cookie(values)
                if not values:
                    continue
            elif lower == b"x-forwarded-for":
                continue  # appended to below
            headers.setRawHeaders(name, values)
        if upgrade:
            headers.setRawHeaders(b"connection", [b"upgrade"])
            headers.setRawHeaders(b"upgrade", incoming.getRawHeaders(b"upgrade", []))
        chain = incoming.getRawHeaders(b"x-forwarded-for", [])
        chain = [b", ".join(chain + [_client_ip(request)])]
        headers.setRawHeaders(b"x-forwarded-for", chain)
        # behind a TLS front end, the https of public_url is what the client used
        secure = self.secure_cookies or request.isSecure()
        headers.setRawHeaders(b"x-forwarded-proto", [b"https" if secure else b"http"])
        host = incoming.getRawHeaders(b"host")
        if host:
            headers.setRawHeaders(b"x-forwarded-host", host[:1])
        if prefix:
            headers.setRawHeaders(b"x-forwarded-prefix", [prefix])
        return headers

    def response_headers(
        self,
        request: Any,
        headers: Headers,
        prefix: bytes,
        keep: Iterable[bytes] = (),
        connection_names: Iterable[bytes] = (),
    ) -> None:
        """Copy the container's end-to-end response headers onto ``request``."""
        out: Headers = request.responseHeaders
        out.removeHeader(b"server")
        keep_set = set(keep)
        drop = HOP_BY_HOP | _connection_names(headers) | set(connection_names)
        for name, values in headers.getAllRawHeaders():
            lower = name.lower()
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
    The spooled request body, streamed by a :class:`FileBodyProducer`; the
    response-header timer is held while it is being sent.
    """

    def __init__(self, content: Any, cooperator: Any, sending: Callable[[bool], None]) -> None:
        self._inner = FileBodyProducer(content, cooperator)
        self.length = self._inner.length
        self._sending = sending

    def startProducing(self, consumer: Any) -> Deferred[None]:
        self._sending(True)
        done: Deferred[None] = self._inner.startProducing(consumer)

        def sent(result: Any) -> Any:
            self._sending(False)
            return result

        return done.addBoth(sent)

    def pauseProducing(self) -> None:
        self._inner.pauseProducing()

    def resumeProducing(self) -> None:
        self._inner.resumeProducing()

    def stopProducing(self) -> None:
        self._inner.stopProducing()


def _body_of(request: Any, cooperator: Any, sending: Callable[[bool], None]) -> _RequestBody | None:
    framed = request.requestHeaders.hasHeader(b"content-length") or request.requestHeaders.hasHeader(
        b"transfer-encoding"
    )
    if not framed:
        return None
    request.content.seek(0, 0)
    return _RequestBody(request.content, cooperator, sending)


class _Exchange:
    """One request through the Agent, from sending it to the last body byte."""

    _log = Logger()

    def __init__(
        self,
        service: ProxyService,
        request: Any,
        forward: PortForward,
        container: Container,
        prefix: bytes,
        strip_authorization: bool,
    ) -> None:
        self.service = service
        self.request = request
        self.forward = forward
        self.container = container
        self.prefix = prefix
        self.strip_authorization = strip_authorization
        self.pending: Deferred[Any] | None = None
        self.timer: Any = None
        self.timed_out = False
        self.body: _ResponseBody | None = None
        self.done = False
        self.untrack: Callable[[], None] = lambda: None

    def target(self) -> bytes:
        """:return: path and query for the container."""
        uri: bytes = self.request.uri
        if self.prefix and uri.startswith(self.prefix):
            uri = uri[len(self.prefix):]
        if not uri.startswith(b"/"):
            uri = b"/" + uri
        return uri

    def start(self) -> None:
        service, request = self.service, self.request
        self.untrack = service.forwards.track(self.forward.id, self)
        request.notifyFinish().addBoth(self._client_done)
        headers = service.request_headers(request, self.forward.id, self.prefix, self.strip_authorization, False)
        body = _body_of(request, service.cooperator, self._sending_body)
        url = b"http://" + _authority(self.container, self.forward.container_port) + self.target()
        self._arm()
        self.pending = service.agent.request(request.method, url, headers, body)
        self.pending.addCallbacks(self._response, self._failed)

    # the response-header timer

    def _arm(self) -> None:
        self._disarm()
        self.timer = self.service.reactor.callLater(self.service.response_timeout, self._time_out)

    def _disarm(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def _sending_body(self, sending: bool) -> None:
        if self.pending is None or self.pending.called:
            return
        if sending:
            self._disarm()
        else:
            self._arm()

    def _time_out(self) -> None:
        self.timer = None
        self.timed_out = True
        if self.pending is not None:
            self.pending.cancel()

    # outcomes

    def _response(self, response: Any) -> None:
        self.pending = None
        self._disarm()
        request = self.request
        if self.done:
            response.deliverBody(_Drop())
            return
        limit = self.service.body_limit
        if response.length is not UNKNOWN_LENGTH and response.length > limit:
            response.deliverBody(_Drop())
            self._end(BAD_GATEWAY(f"the response body ({response.length} bytes) is over the limit of {limit} bytes"))
            return
        request.setResponseCode(response.code, response.phrase)
        self.service.response_headers(
            request, response.headers, self.prefix, connection_names=_agent_connection_names(response)
        )
        if response.length is not UNKNOWN_LENGTH and request.method != b"HEAD":
            # Agent keeps Content-Length among its connection headers: pass
            # it on, so that a body cut short is seen to be short.
            request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % response.length])
        self.body = _ResponseBody(self, limit)
        response.deliverBody(self.body)

    def _failed(self, failure: Failure) -> None:
        self.pending = None
        self._disarm()
        if self.done:
            return
        if self.timed_out:
            self._end(GATEWAY_TIMEOUT(f"no response headers within {self.service.response_timeout:g} s"))
        elif failure.check(CancelledError):
            self._end(None)
        elif failure.check(ConnectError, DNSLookupError, ResponseNeverReceived):
            self._end(BAD_GATEWAY(f"the container port does not answer: {_reason(failure)}"))
        else:
            self._log.info("proxy to {forward_id} failed: {error}", forward_id=self.forward.id, error=_reason(failure))
            self._end(BAD_GATEWAY(f"the container port failed: {_reason(failure)}"))

    def _end(self, error: APIError | None) -> None:
        if self.done:
            return
        self.done = True
        self.untrack()
        if error is not None:
            _finish_with_error(self.request, error)

    def finish(self) -> None:
        """The whole body is delivered."""
        if self.done:
            return
        self.done = True
        self.untrack()
        request = self.request
        if request.producer is not None:
            request.unregisterProducer()
        if not request.finished and not request._disconnected:
            request.finish()

    def broken(self, why: str, at_once: bool = False) -> None:
        """
        The body cannot be delivered whole: end the client connection without
        finishing the response (what was written is flushed first, unless
        ``at_once``).
        """
        if self.done:
            return
        self.done = True
        self.untrack()
        self._log.info("proxied response of {forward_id} broken: {why}", forward_id=self.forward.id, why=why)
        _abort_client(self.request, None if at_once else self.service.reactor)

    def _client_done(self, result: Any) -> None:
        if isinstance(result, Failure) and not self.done:
            # The client went away: stop the backend.
            self.done = True
            self.untrack()
            self._disarm()
            if self.pending is not None:
                self.pending.cancel()
            if self.body is not None:
                self.body.stop()

    def shutdown(self, reason: str) -> None:
        """The forward is gone: close now."""
        if self.done:
            return
        if self.pending is not None:
            self._end(FORWARD_NOT_FOUND(f"the port forward is gone: {reason}"))
            pending, self.pending = self.pending, None
            self._disarm()
            pending.cancel()
            return
        if self.body is not None:
            self.body.stop()
        self.broken(reason, at_once=True)


def _reason(failure: Failure) -> str:
    value = failure.value
    reasons = getattr(value, "reasons", None)
    if reasons:
        return "; ".join(r.getErrorMessage() for r in reasons)
    return failure.getErrorMessage()


#: Read size from the container and write-buffer threshold towards the
#: client while a body streams (Twisted's default is 64 KiB): fewer, larger
#: reads and fewer pause/resume turns; memory stays bounded by about twice
#: this per proxied request.
STREAM_BUFFER = 256 * 1024


def _widen(transport: Any) -> None:
    """Raise a Twisted TCP transport's ``bufferSize`` (its read size and its producer-pause threshold)."""
    if transport is not None and getattr(transport, "bufferSize", STREAM_BUFFER) < STREAM_BUFFER:
        transport.bufferSize = STREAM_BUFFER


class _Drop(Protocol):
    """Stops a response body that will not be read."""

    def connectionMade(self) -> None:
        self.transport.stopProducing()


class _ResponseBody(Protocol):
    """
    The container's response body, written to the client with the backend
    transport as the request's streaming producer.
    """

    def __init__(self, exchange: _Exchange, limit: int) -> None:
        self.exchange = exchange
        self.limit = limit
        self.received = 0
        self.stopped = False

    def connectionMade(self) -> None:
        request = self.exchange.request
        if self.exchange.done:
            self.stop()
            return
        _widen(getattr(self.transport, "_producer", None))
        _widen(getattr(request.channel, "transport", None))
        request.registerProducer(self.transport, True)

    def dataReceived(self, data: bytes) -> None:
        if self.exchange.done:
            return
        self.received += len(data)
        if self.received > self.limit:
            self.stop()
            why = f"the response body grew past {self.limit} bytes"
            if not self.exchange.request.startedWriting:
                self.exchange._end(BAD_GATEWAY(why))
            else:
                self.exchange.broken(why)
            return
        self.exchange.request.write(data)

    def stop(self) -> None:
        if not self.stopped and self.transport is not None:
            self.stopped = True
            self.transport.stopProducing()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if reason.check(ResponseDone, PotentialDataLoss):
            self.exchange.finish()
        else:
            self.exchange.broken(f"the container's response ended early: {_reason(reason)}")


# --- Upgrade requests -----------------------------------------------------------


@implementer(IPushProducer)
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


class _UpgradeBackend(TCPEnd):
    """
    The container side of an Upgrade request: sends the request head (and
    body), reads the response head; after a 101 it is a relay end, otherwise
    it streams the response to the client.
    """

    def __init__(self, upgrade: _Upgrade) -> None:
        super().__init__()
        self.upgrade = upgrade
        self.head = b""
        self.head_done = False
        self.decoder: Any = None

    def connectionMade(self) -> None:
        self.upgrade.connected(self)

    def dataReceived(self, data: bytes) -> None:
        if self.head_done:
            if self.decoder is not None:
                try:
                    self.decoder.dataReceived(data)
                except http._MalformedChunkedDataError as error:
                    self.upgrade.broken(f"bad response framing: {error}")
                    self._t.abortConnection()
            else:
                super().dataReceived(data)
            return
        self.head += data
        end = self.head.find(b"\r\n\r\n")
        if end < 0:
            if len(self.head) > MAX_UPGRADE_HEAD:
                self.upgrade.head_failed("the response head is too large")
                self._t.abortConnection()
            return
        head, rest = self.head[:end], self.head[end + 4:]
        self.head = b""
        self.head_done = True
        self.upgrade.got_head(self, head, rest)

    def readConnectionLost(self) -> None:
        if self.decoder is not None or not self.head_done:
            self._t.loseConnection()
            return
        super().readConnectionLost()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.head_done:
            self.upgrade.head_failed("the container closed the connection before answering")
            return
        if self.decoder is not None:
            self.upgrade.body_lost(reason)
            return
        super().connectionLost(reason)


class _Upgrade(_Exchange):
    """An ``Upgrade`` request: raw connection, then 101 -> relay, else a normal response."""

    def start(self) -> None:
        service, request = self.service, self.request
        self.untrack = service.forwards.track(self.forward.id, self)
        request.notifyFinish().addBoth(self._client_done)
        self.backend: _UpgradeBackend | None = None
        self.relay: Relay | None = None
        self.client: _ClientEnd | None = None
        self.body_bytes = 0
        endpoint = service.endpoints.endpoint(self.container.address or "", self.forward.container_port)
        self._arm()
        self.pending = endpoint.connect(Factory.forProtocol(lambda: _UpgradeBackend(self)))
        self.pending.addErrback(self._failed)

    def _time_out(self) -> None:
        self.timer = None
        self.timed_out = True
        if self.pending is not None:
            self.pending.cancel()
        elif self.backend is not None and not self.backend.head_done:
            self.done = True
            self.untrack()
            self.backend._t.abortConnection()
            _finish_with_error(self.request, GATEWAY_TIMEOUT(
                f"no response headers within {self.service.response_timeout:g} s"))

    def connected(self, backend: _UpgradeBackend) -> None:
        self.pending = None
        self.backend = backend
        if self.done:
            backend._t.abortConnection()
            return
        request = self.request
        headers = self.service.request_headers(request, self.forward.id, self.prefix, self.strip_authorization, True)
        body = _body_of(request, self.service.cooperator, lambda sending: None)
        if body is not None:
            headers.setRawHeaders(b"content-length", [str(body.length).encode("ascii")])
        lines = [request.method + b" " + self.target() + b" HTTP/1.1"]
        for name, values in headers.getAllRawHeaders():
            lines.extend(name + b": " + value for value in values)
        backend._t.write(b"\r\n".join(lines) + b"\r\n\r\n")
        if body is not None and body.length:
            body.startProducing(backend._t)

    def head_failed(self, why: str) -> None:
        if self.done:
            return
        self._disarm()
        self._end(BAD_GATEWAY(why))

    def got_head(self, backend: _UpgradeBackend, head: bytes, rest: bytes) -> None:
        self._disarm()
        if self.done:
            backend._t.abortConnection()
            return
        try:
            status_line, *header_lines = head.split(b"\r\n")
            version, _, status = status_line.partition(b" ")
            code_bytes, _, phrase = status.partition(b" ")
            code = int(code_bytes)
            if not version.startswith(b"HTTP/1.") or not 100 <= code <= 599:
                raise ValueError(status_line)
            headers = Headers()
            for line in header_lines:
                name, sep, value = line.partition(b":")
                if not sep or not name or name != name.strip():
                    raise ValueError(line)
                headers.addRawHeader(name, value.strip(b" \t"))
        except ValueError:
            backend._t.abortConnection()
            self.head_failed("the container's response head is not HTTP/1.1")
            return
        if code == 101:
            self._switch(backend, code, phrase, headers, rest)
        else:
            self._plain(backend, code, phrase, headers, rest)

    def _switch(self, backend: _UpgradeBackend, code: int, phrase: bytes, headers: Headers, rest: bytes) -> None:
        request = self.request
        channel = request.channel
        transport = channel.transport
        # 101: keep Upgrade and Connection: upgrade, drop other hop-by-hop.
        request.responseHeaders = Headers()
        self.service.response_headers(request, headers, self.prefix, keep=(b"upgrade",))
        request.responseHeaders.setRawHeaders(b"connection", [b"Upgrade"])
        lines = [b"HTTP/1.1 101 " + (phrase or b"Switching Protocols")]
        for name, values in request.responseHeaders.getAllRawHeaders():
            lines.extend(name + b": " + value for value in values)
        # Take the connection over from the HTTPChannel (as Twisted's own
        # websocket support does): it stays the transport's protocol, but its
        # data and connection loss now go to our end; it stops being the
        # transport's producer so that the relay can register its own.
        backend._t.pauseProducing()
        if rest:
            TCPEnd.dataReceived(backend, rest)
        client = _ClientEnd(transport)
        self.client = client
        buffered = b"".join(channel._dataBuffer)
        channel._dataBuffer = []
        channel.dataReceived = client.dataReceived
        channel.connectionLost = client.connectionLost
        transport.pauseProducing()
        if getattr(transport, "producer", None) is not None:
            transport.unregisterProducer()
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
        if buffered:
            relay.received(client, buffered)
        relay.start()
        self._log.info("upgraded connection to {forward_id} open", forward_id=self.forward.id)

    def _relay_ended(self, stats: RelayStats) -> None:
        self.done = True
        self.untrack()

    def _plain(self, backend: _UpgradeBackend, code: int, phrase: bytes, headers: Headers, rest: bytes) -> None:
        request = self.request
        length_values = headers.getRawHeaders(b"content-length")
        chunked = any(b"chunked" in v.lower() for v in headers.getRawHeaders(b"transfer-encoding", []))
        limit = self.service.body_limit
        request.setResponseCode(code, phrase)
        no_body = request.method == b"HEAD" or code in (204, 304) or 100 <= code < 200
        if no_body:
            self.service.response_headers(request, headers, self.prefix, keep=(b"content-length",))
            backend.decoder = _Sink()
            backend._t.loseConnection()
            self.finish()
            return
        if chunked:
            decoder: Any = http._ChunkedTransferDecoder(self._body_data, self._body_end)
        elif length_values:
            try:
                length = int(length_values[0])
            except ValueError:
                backend._t.abortConnection()
                self.head_failed("bad Content-Length from the container")
                return
            if length > limit:
                backend._t.abortConnection()
                self.head_failed(f"the response body ({length} bytes) is over the limit of {limit} bytes")
                return
            decoder = http._IdentityTransferDecoder(length, self._body_data, self._body_end)
        else:
            decoder = _UntilClose(self._body_data)
        self.service.response_headers(request, headers, self.prefix, keep=(b"content-length",) if not chunked else ())
        backend.decoder = decoder
        request.registerProducer(backend._t, True)
        if rest:
            backend.dataReceived(rest)

    def _body_data(self, data: bytes) -> None:
        if self.done:
            return
        self.body_bytes += len(data)
        if self.body_bytes > self.service.body_limit:
            if self.backend is not None:
                self.backend._t.abortConnection()
            self.broken("the response body grew past the limit")
            return
        self.request.write(data)

    def _body_end(self, extra: bytes) -> None:
        if self.backend is not None:
            self.backend.decoder = _Sink()
            self.backend._t.loseConnection()
        self.finish()

    def body_lost(self, reason: Failure) -> None:
        if self.done:
            return
        if self.backend is not None and isinstance(self.backend.decoder, _UntilClose):
            self.finish()
        else:
            self.broken("the container's response ended early")

    def broken(self, why: str, at_once: bool = False) -> None:
        if self.backend is not None and self.backend.transport is not None:
            self.backend._t.abortConnection()
        super().broken(why, at_once)

    def _client_done(self, result: Any) -> None:
        if isinstance(result, Failure) and not self.done:
            self.done = True
            self.untrack()
            self._disarm()
            if self.pending is not None:
                self.pending.cancel()
            if self.backend is not None and self.backend.transport is not None:
                self.backend._t.abortConnection()

    def shutdown(self, reason: str) -> None:
        if self.relay is not None:
            self.relay.abort()
            return
        if self.done:
            return
        if self.backend is None or not self.backend.head_done:
            if self.backend is not None:
                self.backend._t.abortConnection()
            pending, self.pending = self.pending, None
            self._disarm()
            self._end(FORWARD_NOT_FOUND(f"the port forward is gone: {reason}"))
            if pending is not None:
                pending.cancel()
            return
        self.broken(reason, at_once=True)


class _Sink:
    def dataReceived(self, data: bytes) -> None:
        pass


class _UntilClose:
    """A body that ends when the connection closes."""

    def __init__(self, write: Callable[[bytes], None]) -> None:
        self._write = write

    def dataReceived(self, data: bytes) -> None:
        self._write(data)


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
            return b"moved to the trailing-slash URL\n"
        prefix = b"/".join(parts[:3])
        return self._service.handle(request, self._forward_id, prefix)


class _NotFound(Resource):
    isLeaf = True

    def __init__(self, error: APIError) -> None:
        super().__init__()
        self._error = error

    def render(self, request: Any) -> bytes:
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
            return _NotFound(NOT_FOUND("a port forward id is required: /p/{id}/"))
        return _ForwardResource(self._service, forward_id, True)

    def render(self, request: Any) -> bytes:
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
            return _NotFound(FORWARD_NOT_FOUND(f"no port forward at {host!r}"))
        return _ForwardResource(self._service, label.replace("-", "_"), False)
