# -*- test-case-name: tests.test_proxy -*-
"""
The proxy's resources: ``/p/{id}/...`` (:class:`ProxyResource`) and, with
``[server] proxy_domain``, ``pf-xxxx.{proxy_domain}`` (:class:`HostRouter`);
and :class:`ProxyService`, what they share: who a request is for, then one
:class:`rexecpf.proxy.exchange.Exchange` for it.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet import task
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

from rexecpf.api import PublicURLs
from rexecpf.auth import Authenticator, bearer_token
from rexecpf.domains import split_slug_label
from rexecpf.forwards import ForwardService
from rexecpf.http._twisted import request_disconnected
from rexecpf.http.errors import error_body, finish_with_error, wants_html
from rexecpf.metrics import Metrics
from rexecpf.model import (
    FORWARD_NOT_FOUND,
    INTERNAL_ERROR,
    NOT_FOUND,
    UNAUTHORIZED,
    APIError,
    Container,
    PortForward,
    Principal,
)
from rexecpf.proxy.exchange import Exchange, Upgrade
from rexecpf.proxy.pool import POOLED_IDLE_SECONDS, ConnectionPool
from rexecpf.proxy.sessions import (
    SESSION_COOKIE,
    SessionCookies,
    check_origin,
    origin,
    session_subject,
    session_values,
    split_token,
)

__all__ = ["HostRouter", "ProxyResource", "ProxyService"]

_FORWARD_LABEL = re.compile(r"pf-[a-z0-9]{1,64}\Z")

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
        self.pool = ConnectionPool(reactor, max_per_host, POOLED_IDLE_SECONDS)
        self.secure_cookies = urls.public_url.startswith("https:")
        self._public_origin = origin(urls.public_url)
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

    def handle(self, request: Any, forward_id: str, prefix: bytes, stable_host: str | None = None) -> Any:
        """
        Serve one request for a forward.

        :param request: the request.
        :param forward_id: the forward.
        :param prefix: ``/p/{id}`` as it appears in the request URI, or
            ``b""`` under host routing.
        :param stable_host: the custom domain or stable host
            (``{slug}--{user}.{proxy_domain}``) the request came to: the
            forward's own origin, and what its session cookie is for (so
            that it outlives the forward: the next forward of that name
            takes it); ``None`` for ``/p/`` and ``pf-xxxx`` hosts.
        :return: ``NOT_DONE_YET``.
        """
        request.defaultContentType = None
        if self.sessions.known:
            # The common case, without a Deferred when nothing waits.
            try:
                work = self._authorize(request, forward_id, prefix, stable_host)
            except Exception:  # noqa: BLE001 - answered by failed() below
                work = fail()
        else:
            work = self.sessions.ready().addCallback(
                lambda _: self._authorize(request, forward_id, prefix, stable_host)
            )
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
            if finish_with_error(request, error):
                self.answered(error.code)

        work.addErrback(failed)
        return server.NOT_DONE_YET

    def may_authenticate(self, request: Any, stable_host: str) -> bool:
        """
        :return: whether a request to a custom domain or stable host carries
            a credential that may let it in (a rexecpf token in
            ``Authorization`` or ``?token=``, or a valid session cookie for
            the host); ``True`` as well while the session key is not loaded.
            Without one, the request is 401 before the host is looked up,
            so that whether it names a forward is not told.
        """
        if not self.sessions.known:
            return True
        tokens, _ = split_token(request.uri.partition(b"?")[2], self.authenticator.is_token)
        if tokens:
            return True
        for value in request.requestHeaders.getRawHeaders(b"authorization", []):
            if self.authenticator.authenticate(bearer_token(value)) is not None:
                return True
        subject = session_subject(stable_host)
        return any(self.sessions.check(value, subject) for value in session_values(request))

    def answered(self, code: int) -> None:
        """Count one proxied request answered with ``code`` (by the container or by us)."""
        if self.metrics is not None:
            self.metrics.proxy_response(code)

    def _authorize(
        self, request: Any, forward_id: str, prefix: bytes, stable_host: str | None = None
    ) -> Deferred[None] | None:
        uri: bytes = request.uri
        # what a session cookie names: the forward, or the stable host
        subject = forward_id if stable_host is None else session_subject(stable_host)
        path, _, query = uri.partition(b"?")
        tokens, rest_query = split_token(query, self.authenticator.is_token)
        if tokens:
            # A rexecpf token in the URL is consumed here, whoever it
            # belongs to: it never reaches the container (someone else's
            # is 404, as their forward would be).
            holder = self.authenticator.authenticate(tokens[-1])
            if holder is None:
                raise UNAUTHORIZED("the token is not valid", headers={"WWW-Authenticate": 'Bearer realm="rexecpf"'})

            def start_session(_: object) -> None:
                assert holder is not None
                self._start_session(request, holder, subject, prefix, path, rest_query)

            return self.forwards.reach(holder, forward_id).addCallback(start_session)

        headers: Headers = request.requestHeaders
        principal: Principal | None = None
        for value in headers.getRawHeaders(b"authorization", []):
            principal = self.authenticator.authenticate(bearer_token(value))
            if principal is not None:
                break
        if principal is None:
            for value in session_values(request):
                user = self.sessions.check(value, subject)
                principal = self.authenticator.user(user) if user else None
                if principal is not None:
                    if prefix:
                        own = self._public_origin
                    elif stable_host is not None:
                        own = origin(self.urls.host_url(stable_host))
                    else:
                        own = origin(self.urls.proxy_url(forward_id))
                    check_origin(request, own)
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
        if request.finished or request_disconnected(request):
            return
        # connections_per_user: 429 over the cap (the exchange is tracked in this same turn)
        self.forwards.admit(forward.id, "proxy", principal.name)
        exchange_class = Upgrade if request.requestHeaders.hasHeader(b"upgrade") else Exchange
        exchange_class(self, request, principal, forward, container, prefix).start()

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
        if request.finished or request_disconnected(request):
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


class _StableHostResource(Resource):
    """Everything at a custom domain or a stable host: the forward it names now."""

    isLeaf = True

    def __init__(self, service: ProxyService, host: str) -> None:
        super().__init__()
        self._service = service
        self._host = host

    def render(self, request: Any) -> Any:
        service = self._service
        preflight = request.method == b"OPTIONS" and request.requestHeaders.hasHeader(b"access-control-request-method")
        if not preflight and not service.may_authenticate(request, self._host):
            # 401 whether or not the host names a forward (as for pf-xxxx hosts)
            return service.handle(request, "", b"", self._host)
        found = service.forwards.find_host(self._host)
        if not found.called:
            request.notifyFinish().addErrback(lambda _: found.cancel())

        def failed(failure: Failure) -> None:
            if failure.check(CancelledError):
                return
            error = failure.value
            if not isinstance(error, APIError):
                self._service._log.failure("host lookup failed", failure)
                error = INTERNAL_ERROR("the proxy failed")
            if finish_with_error(request, error):
                service.answered(error.code)

        found.addCallbacks(lambda forward: service.handle(request, forward.id, b"", self._host), failed)
        return server.NOT_DONE_YET


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
    Serves ``pf-xxxx.{proxy_domain}`` and stable hosts
    ``{slug}--{user}.{proxy_domain}`` (any port), and every verified custom
    domain known to this node: every path of such a host goes to that
    forward, never to ``/api`` or another forward.  Other hosts under
    ``proxy_domain`` are 404; other hosts go to the ordinary routes.

    :param proxy_domain: ``[server] proxy_domain`` (empty: custom domains only).
    """

    def __init__(self, service: ProxyService, proxy_domain: str) -> None:
        self._service = service
        domain = proxy_domain.lower().strip(".")
        self._suffix = "." + domain if domain else None

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
        if self._suffix is None or not host.endswith(self._suffix):
            # other hosts, the bare proxy_domain too: it may well be the
            # public host of the API itself
            if self._service.forwards.host_forward(host) is not None:
                return _StableHostResource(self._service, host)
            return None
        label = host[: -len(self._suffix)]
        if _FORWARD_LABEL.match(label):
            return _ForwardResource(self._service, label.replace("-", "_"), False)
        if split_slug_label(label) is not None:
            return _StableHostResource(self._service, host)
        return _NotFound(self._service, FORWARD_NOT_FOUND(f"no port forward at {host!r}"))
