# -*- test-case-name: tests.test_api -*-
"""
The root of the public site: ``/api`` (REST), ``/p/`` (HTTP proxy),
``/ws/`` (tunnels) and ``/healthz``; anything else is a JSON 404.

The :class:`RexecSite` never writes a request's query string to the access
log (a browser's first visit carries ``?token=``), never shows tracebacks, and
identifies itself only as ``rexecpf``.
"""

from __future__ import annotations

import json
import re
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource

from rexecpf.api import MAX_BODY_BYTES, write_error, write_json
from rexecpf.backends import IContainerBackend
from rexecpf.model import INVALID_REQUEST, METHOD_NOT_ALLOWED, NOT_FOUND, REQUEST_TOO_LARGE, APIError
from rexecpf.store import IForwardStore

__all__ = ["Health", "LimitedRequest", "RexecSite", "Root", "release_from_http_channel"]


def release_from_http_channel(transport: Any) -> None:
    """
    Finish taking a connection over from ``twisted.web`` (a WebSocket tunnel,
    a proxied upgrade): the ``HTTPChannel`` registered itself as the
    transport's producer when it connected, and nothing unregisters it.  Left
    there, it would get the transport's pause and resume signals, and the new
    owner could not register its own producer (``FileDescriptor`` refuses a
    second one; STYLE.md 2.3).

    :param transport: the connection's transport.
    """
    if getattr(transport, "producer", None) is not None:
        transport.unregisterProducer()


class NotFoundResource(Resource):
    isLeaf = True

    def render(self, request: IRequest) -> bytes:
        return write_error(request, NOT_FOUND("no such path"))


class Health(Resource):
    """``/healthz``: 200 when the store and the backend answer, else 503."""

    isLeaf = True
    _log = Logger()

    def __init__(self, store: IForwardStore, backend: IContainerBackend) -> None:
        super().__init__()
        self._store = store
        self._backend = backend

    def render(self, request: IRequest) -> Any:
        if request.method not in (b"GET", b"HEAD"):
            return write_error(
                request,
                METHOD_NOT_ALLOWED(
                    f"{request.method.decode('ascii', 'replace')[:16]} is not allowed here",
                    headers={"Allow": "GET, HEAD"},
                ),
            )
        return super().render(request)

    def render_GET(self, request: IRequest) -> Any:
        if request.postpath not in ([], [b""]):
            return write_error(request, NOT_FOUND("no such path"))
        checks = [self._store.check(), self._backend.check()]

        def healthy(_: object) -> None:
            request.write(write_json(request, 200, {"status": "ok"}))
            request.finish()

        def unhealthy(failure: Failure) -> None:
            error = failure.value
            if isinstance(error, Exception) and hasattr(error, "subFailure"):
                error = error.subFailure.value
            detail = error.detail if isinstance(error, APIError) else "internal error"
            if not isinstance(error, APIError):
                self._log.failure("health check failed", failure)
            request.write(write_json(request, 503, {"status": "unavailable", "detail": detail}))
            request.finish()

        finished: Deferred[None] = request.notifyFinish()  # type: ignore[attr-defined]
        finished.addErrback(lambda _: None)  # a client gone before the answer is no error
        gatherResults(checks, consumeErrors=True).addCallbacks(healthy, unhealthy).addErrback(
            lambda failure: None if finished.called else self._log.failure("healthz", failure)
        )
        return server.NOT_DONE_YET


class Root(Resource):
    """
    :param api: the Klein resource for ``/api``.
    :param health: ``/healthz``.
    :param proxy: ``/p/`` (may be ``None`` until mounted).
    :param tunnel: ``/ws/`` (may be ``None`` until mounted).
    :param host_router: a resource that serves requests whose Host names a
        forward under ``proxy_domain`` (or ``None``).
    """

    def __init__(
        self,
        api: IResource,
        health: IResource,
        proxy: IResource | None = None,
        tunnel: IResource | None = None,
        host_router: Any = None,
    ) -> None:
        super().__init__()
        self._children: dict[bytes, IResource] = {b"api": api, b"healthz": health}
        if proxy is not None:
            self._children[b"p"] = proxy
        if tunnel is not None:
            self._children[b"ws"] = tunnel
        self._host_router = host_router
        self._not_found = NotFoundResource()

    def getChildWithDefault(self, path: bytes, request: IRequest) -> IResource:
        if self._host_router is not None:
            routed = self._host_router.route(request)
            if routed is not None:
                return routed  # type: ignore[no-any-return]
        return self._children.get(path, self._not_found)

    def render(self, request: IRequest) -> bytes:
        return write_error(request, NOT_FOUND("see /api/openapi.json"))


#: How long a connection may stay silent (no request bytes) before it is closed.
IDLE_TIMEOUT_SECONDS = 60

#: Bodies refused early are read and dropped up to this many bytes (so the
#: client sees the 413 rather than a reset), then the connection is aborted.
_DISCARD_BYTES = 64 * 1024 * 1024
#: ... or for this long.
_DISCARD_SECONDS = 10.0


class LimitedRequest(server.Request):
    """
    A request whose body is refused with 413 as soon as it is known to be too
    large for its path (:meth:`RexecSite.max_body_for`): from ``Content-Length``
    before any body byte is read, or while a chunked body grows past it.  The
    body is then never spooled to memory or a temporary file, and the request
    never reaches a resource.
    """

    _limit: int | None = None
    _received = 0
    _refused = False
    _abort_call: Any = None

    def gotLength(self, length: int | None) -> None:
        site = getattr(self.channel, "site", None)
        policy = getattr(site, "max_body_for", None)
        path = getattr(self.channel, "_path", b"") or b""
        self._limit = policy(path) if policy is not None else None
        if self._limit is not None and length is not None and length > self._limit:
            self._refuse()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            self._received += len(data)
            if self._received > _DISCARD_BYTES:
                self._abort()
            return
        self._received += len(data)
        if self._limit is not None and self._received > self._limit:
            self._refuse()
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            # The whole refused body has been read: nothing is left unread, so
            # closing now does not reset the connection under the client.
            self._close()
            return
        super().requestReceived(command, _origin_form(path, self.requestHeaders), version)

    def _refuse(self) -> None:
        self._refused = True
        self.content = None
        # no "100 Continue" after the final answer
        self.requestHeaders.removeHeader(b"expect")
        body = json.dumps(
            REQUEST_TOO_LARGE(f"a request body here may be at most {self._limit} bytes").body()
        ).encode("utf-8") + b"\n"
        transport: Any = self.channel.transport
        transport.write(
            b"HTTP/1.1 413 Request Entity Too Large\r\n"
            b"Content-Type: application/json\r\n"
            b"Cache-Control: no-store\r\n"
            b"Connection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        self.channel.persistent = False
        from twisted.internet import reactor

        clock = getattr(self.channel, "callLater", None) or reactor.callLater
        self._abort_call = clock(_DISCARD_SECONDS, self._abort)

    def _cancel_abort(self) -> None:
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        self._abort_call = None

    def _close(self) -> None:
        self._cancel_abort()
        if self.channel is not None:
            self.channel.loseConnection()

    def _abort(self) -> None:
        self._cancel_abort()
        if self.channel is not None:
            transport: Any = self.channel.transport
            transport.abortConnection()

    def connectionLost(self, reason: Any) -> None:
        self._cancel_abort()
        super().connectionLost(reason)


_ABSOLUTE_FORM = re.compile(rb"^https?://([^/?#]*)([^#]*)", re.IGNORECASE)


def _origin_form(target: bytes, headers: Any) -> bytes:
    """
    An absolute-form target (``GET http://host/path``) names its host itself,
    and that host wins over any ``Host`` header (RFC 9112 3.2.2): make it the
    ``Host`` and serve the path.  Routing (``/api``, ``/p/``, a forward's own
    host under ``proxy_domain``) and what reaches a container then agree on
    one host; the two can never point at different forwards.

    :return: the origin-form target (``/path?query``).
    """
    match = _ABSOLUTE_FORM.match(target)
    if match is None:
        return target
    authority, rest = match.groups()
    headers.setRawHeaders(b"host", [authority])
    return rest if rest.startswith(b"/") else b"/" + rest


def _line_too_long(channel: Any) -> None:
    """
    A request line or header line over the channel's ``MAX_LENGTH`` (16 KiB):
    answer 414 or 431 and close, where Twisted would close without a word.
    """
    first_line = getattr(channel, "_HTTPChannel__first_line", 0)
    status = b"414 URI Too Long" if first_line else b"431 Request Header Fields Too Large"
    kind = REQUEST_TOO_LARGE("the request line or a header is too long")
    body = json.dumps(
        {"error": {"code": int(status[:3]), "message": status[4:].decode(), "detail": kind.detail}}
    ).encode("utf-8") + b"\n"
    channel.transport.write(
        b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (status, len(body), body)
    )
    channel.transport.loseConnection()


def _bad_request(channel: Any) -> None:
    """
    A request Twisted cannot parse (smuggling framing, control bytes in a
    header, a garbled request line): answer a JSON 400 and close, where
    Twisted writes a bare ``400 Bad Request`` with no body.
    """
    body = json.dumps(
        INVALID_REQUEST("the request is not well-formed HTTP/1.1").body()
    ).encode("utf-8") + b"\n"
    channel.transport.write(
        b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    channel.loseConnection()


class RexecSite(server.Site):
    """
    A Site that logs without query strings, shows no tracebacks, refuses
    over-large bodies early (:meth:`max_body_for`) and closes idle connections
    (``timeOut``, :data:`IDLE_TIMEOUT_SECONDS`).
    """

    displayTracebacks = False

    def __init__(self, resource: IResource, proxy_body_bytes: int | None = None, **kwargs: Any) -> None:
        #: the limit for request bodies outside /api (the proxied ones)
        self.proxy_body_bytes = proxy_body_bytes
        kwargs.setdefault("requestFactory", LimitedRequest)
        kwargs.setdefault("timeout", IDLE_TIMEOUT_SECONDS)
        # The API reads bodies as JSON whatever their Content-Type; nothing
        # here wants form or multipart parsing of hostile bodies.
        kwargs.setdefault("parsePOSTFormSubmission", False)
        super().__init__(resource, **kwargs)
        self.displayTracebacks = False

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        channel = getattr(protocol, "_channel", protocol)
        if hasattr(channel, "lineLengthExceeded"):
            channel.lineLengthExceeded = lambda line: _line_too_long(channel)
        if hasattr(channel, "_respondToBadRequestAndDisconnect"):
            channel._respondToBadRequestAndDisconnect = lambda: _bad_request(channel)
        return protocol

    def max_body_for(self, path: bytes) -> int | None:
        """
        :param path: the request target as sent (path and query).
        :return: the most body bytes a request to ``path`` may send, or
            ``None`` for no limit here (the resource enforces its own).
        """
        target = path.split(b"?", 1)[0]
        if target == b"/api" or target.startswith(b"/api/") or not target.startswith(b"/"):
            # the API, and targets in absolute or asterisk form (never proxied)
            return MAX_BODY_BYTES
        return self.proxy_body_bytes

    def log(self, request: Any) -> None:
        # The query string may hold a token (?token=...): log the path only.
        path = request.uri.split(b"?", 1)[0][:2048].decode("ascii", "replace")
        self._access_log.info(
            "{client} {method} {path} {code} {length}",
            client=request.getClientAddress().host
            if hasattr(request.getClientAddress(), "host")
            else "-",
            method=request.method.decode("ascii", "replace")[:16],
            path=path,
            code=request.code,
            length=request.sentLength,
        )

    _access_log = Logger(namespace="rexecpf.access")


server.version = b"rexecpf"  # no Twisted version in the Server header
