# -*- test-case-name: tests.test_api -*-
"""
The root of the public site: ``/api`` (REST), ``/p/`` (HTTP proxy),
``/ws/`` (tunnels) and ``/healthz``; anything else is a JSON 404.

The :class:`RexecSite` never writes a request's query string to the access
log (a browser's first visit carries ``?token=``), never shows tracebacks, and
identifies itself only as ``rexecpf``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from io import BytesIO
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer, IRequest
from twisted.web.resource import IResource, Resource
from zope.interface import implementer

from rexecpf.api import MAX_BODY_BYTES
from rexecpf.auth import bearer_token
from rexecpf.backends import IContainerBackend
from rexecpf.http._twisted import HTTPChannel, Request
from rexecpf.http.errors import error_body, error_response, write_error, write_json
from rexecpf.model import (
    INVALID_REQUEST,
    METHOD_NOT_ALLOWED,
    NOT_FOUND,
    REQUEST_TOO_LARGE,
    APIError,
    ErrorKind,
)
from rexecpf.store import Checkable

__all__ = ["Health", "LimitedRequest", "RequestBodyStream", "RexecSite", "Root", "release_from_http_channel"]


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
    """
    ``/healthz``: 200 when the store and the backend answer, else 503.  The
    store is given as a :class:`rexecpf.store.CachedCheck`, so that answering
    writes nothing to disk (but at most once every few seconds).
    """

    isLeaf = True
    _log = Logger()

    def __init__(self, store: Checkable, backend: IContainerBackend) -> None:
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


#: Bytes of a streamed body kept while nothing reads them yet (the proxy is
#: still authenticating or connecting); past this the client is paused.
STREAM_HIGH_WATER = 64 * 1024


@implementer(IBodyProducer)
class RequestBodyStream:
    """
    The body of a request, as it arrives: an ``IBodyProducer`` (the proxy
    registers it as its container connection's producer).  Before :meth:`startProducing` (at
    most :data:`STREAM_HIGH_WATER` bytes, then the client is paused) the body
    is kept; afterwards each chunk goes straight to the consumer.  While the
    consumer is paused, so is the client's socket.

    :param length: the ``Content-Length``, or ``None`` for a chunked body.
    :param set_paused: called with ``True`` to stop reading from the client,
        with ``False`` to read again.
    """

    def __init__(self, length: int | None, set_paused: Callable[[bool], None]) -> None:
        self.length: Any = UNKNOWN_LENGTH if length is None else length
        self._set_paused = set_paused
        self._kept: list[bytes] = []
        self._kept_bytes = 0
        self._consumer: Any = None
        self._done: Deferred[None] | None = None
        self._consumer_paused = False
        #: the whole body has arrived
        self.complete = False
        self._failure: Failure | None = None
        #: nobody wants the rest: it is read and dropped
        self.dropping = False

    # from the request

    def received(self, data: bytes) -> None:
        """A chunk of the body arrived."""
        if self.dropping or self._failure is not None or not data:
            return
        if self._consumer is None:
            self._kept.append(data)
            self._kept_bytes += len(data)
        else:
            self._consumer.write(data)
        self._flow()

    def ended(self) -> None:
        """The whole body has arrived."""
        self.complete = True
        self._flow()
        if self._consumer is not None:
            self._fire()

    def failed(self, reason: Failure) -> None:
        """The body will not arrive whole (the client went away, or it was refused)."""
        if self.complete or self._failure is not None:
            return
        self._failure = reason
        self._kept, self._kept_bytes = [], 0
        self._flow()
        self._fire()

    def drop(self) -> None:
        """
        Nobody will read the rest of the body: read it from the client and
        drop it; the Deferred of :meth:`startProducing` never fires.
        """
        self.dropping = True
        self._done = None
        self._kept, self._kept_bytes = [], 0
        self._flow()

    # IBodyProducer

    def startProducing(self, consumer: Any) -> Deferred[None]:
        """
        :return: a Deferred firing with ``None`` once the whole body was
            written to ``consumer``, or failing if it cannot arrive whole.
        """
        self._consumer = consumer
        self._done = Deferred(lambda _: self.stopProducing())
        kept, self._kept, self._kept_bytes = self._kept, [], 0
        for data in kept:
            consumer.write(data)
        done = self._done
        self._flow()
        self._fire()
        return done

    def pauseProducing(self) -> None:
        self._consumer_paused = True
        self._flow()

    def resumeProducing(self) -> None:
        self._consumer_paused = False
        self._flow()

    def stopProducing(self) -> None:
        """The consumer is gone: the rest of the body is dropped."""
        self.drop()

    def _fire(self) -> None:
        done = self._done
        if done is None or not (self.complete or self._failure is not None):
            return
        self._done = None
        if self._failure is not None:
            done.errback(self._failure)
        else:
            done.callback(None)

    def _flow(self) -> None:
        waiting = not (self.complete or self.dropping or self._failure is not None) and (
            self._consumer_paused if self._consumer is not None else self._kept_bytes >= STREAM_HIGH_WATER
        )
        self._set_paused(waiting)


class LimitedRequest(Request):
    """
    A request whose body is refused with 413 as soon as it is known to be too
    large for its path (:meth:`RexecSite.max_body_for`): from ``Content-Length``
    before any body byte is read, or while a chunked body grows past it.  The
    body is then never spooled to memory or a temporary file, and the request
    never reaches a resource (or, one that streams, is gone for it).

    Where :meth:`RexecSite.streams_body` says so (the proxied paths), a
    request with a body is processed as soon as its head is complete: the
    body is not stored (``content`` stays empty) but arrives through
    :attr:`body_stream`; a response finished before the body has all
    arrived waits, as far as the connection is concerned, for the rest of it
    to be read and dropped.
    """

    _limit: int | None = None
    _received = 0
    _refused = False
    _abort_call: Any = None
    _link: Any = None
    #: the body, as it arrives, when this request streams it
    body_stream: RequestBodyStream | None = None
    _waiting_for_body = False
    _paused = False
    _idle: Any = None

    def gotLength(self, length: int | None) -> None:
        self._link = self.channel
        site = getattr(self.channel, "site", None)
        policy = getattr(site, "max_body_for", None)
        channel: Any = self.channel
        path = channel.target()
        self._limit = policy(path) if policy is not None else None
        if self._limit is not None and length is not None and length > self._limit:
            self._refuse()
            return
        streams = getattr(site, "streams_body", None)
        if length != 0 and streams is not None and streams(path):
            self._process_early(length)
            return
        super().gotLength(length)

    def _process_early(self, length: int | None) -> None:
        channel: Any = self.channel
        self.content = BytesIO()
        self.body_stream = RequestBodyStream(length, self._set_paused)
        # Twisted answers "Expect: 100-continue" once gotLength returns, after
        # any answer made now: answer it first.
        expect = self.requestHeaders.getRawHeaders(b"expect", [])
        command, target, version = channel.request_line()
        if expect and expect[0].lower() == b"100-continue" and version == b"HTTP/1.1":
            channel.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.requestHeaders.removeHeader(b"expect")
        super().requestReceived(command, _origin_form(target, self.requestHeaders), version)

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
        if self.body_stream is not None:
            self.body_stream.received(data)
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            # The whole refused body has been read: nothing is left unread, so
            # closing now does not reset the connection under the client.
            self._close()
            return
        if self.body_stream is not None:
            # Processed when its head arrived; now the body is whole.
            if self._paused:
                # The channel has just put its idle timeout aside for the
                # response, but ours was already: put ours there instead.
                self._set_paused(False)
                self._link.put_timeout_aside()
            self.body_stream.ended()
            if self._waiting_for_body:
                super().cleanup()
            return
        super().requestReceived(command, _origin_form(path, self.requestHeaders), version)

    def cleanup(self) -> None:
        stream = self.body_stream
        if stream is not None and not stream.complete and not self._refused:
            # Answered before the body has all arrived: the channel may go on
            # to the next request only once the rest is read (and dropped).
            self._waiting_for_body = True
            stream.drop()
            return
        super().cleanup()

    def _set_paused(self, paused: bool) -> None:
        """
        Stop (or start again) reading from the client while its streamed body
        waits for a consumer; its idle timeout does not run meanwhile.
        """
        channel = self._link
        if channel is None or channel.transport is None or self.disconnected:
            self._paused = paused  # nothing to read, and no idle timer to start again
            return
        if paused:
            # (again, should the channel have resumed it meanwhile)
            channel.transport.pauseProducing()
            if not self._paused:
                self._paused = True
                self._idle = channel.setTimeout(None)
        elif self._paused:
            self._paused = False
            channel.setTimeout(self._idle)
            channel.transport.resumeProducing()

    def hold_reads(self) -> None:
        """The channel has just resumed reading from the client: paused again if the body waits for its consumer."""
        if self._paused:
            self._set_paused(True)

    def _refuse(self) -> None:
        self._refused = True
        if self.body_stream is not None and (self.startedWriting or self.finished):
            # An answer is on its way (or done): no 413 can follow it.
            self._abort()
            return
        self.content = None
        # no "100 Continue" after the final answer
        self.requestHeaders.removeHeader(b"expect")
        channel = self._link
        error = REQUEST_TOO_LARGE(f"a request body here may be at most {self._limit} bytes")
        require = getattr(getattr(channel, "site", None), "authenticate_api", None)
        if require is not None and _not_proxied(channel.target()):
            # The API answers 401 before anything else, a body too large
            # included: the client without a good token learns that first.
            try:
                require(bearer_token(self.requestHeaders.getRawHeaders(b"authorization", [None])[0]))
            except APIError as unauthorized:
                error = unauthorized
        channel.transport.write(error_response(error))
        channel.persistent = False
        from twisted.internet import reactor

        clock = getattr(channel, "callLater", None) or reactor.callLater
        self._abort_call = clock(_DISCARD_SECONDS, self._abort)
        if self.body_stream is not None:
            # Already processed: whatever handles it stops as if the client
            # had gone, and the rest of the body is read and dropped.
            self._set_paused(False)
            refused = Failure(ValueError("the request body is too large"))
            # (not self.connectionLost: the abort timer just set stays)
            server.Request.connectionLost(self, refused)
            self.body_stream.failed(refused)

    def _cancel_abort(self) -> None:
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        self._abort_call = None

    def _close(self) -> None:
        self._cancel_abort()
        if self._link is not None:
            self._link.loseConnection()

    def _abort(self) -> None:
        self._cancel_abort()
        if self._link is not None and self._link.transport is not None:
            transport: Any = self._link.transport
            transport.abortConnection()

    def connectionLost(self, reason: Any) -> None:
        self._cancel_abort()
        super().connectionLost(reason)
        if self.body_stream is not None:
            self.body_stream.failed(reason)


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
    if len(headers.getRawHeaders(b"host", [])) <= 1:
        # (several Host lines stay, to be refused: RexecSite.getResourceFor)
        headers.setRawHeaders(b"host", [authority])
    return rest if rest.startswith(b"/") else b"/" + rest


class RexecChannel(HTTPChannel):
    """
    The site's protocol: a request it cannot read gets a JSON error before
    the connection closes (a line over ``MAX_LENGTH``, 16 KiB: 414 or 431,
    where Twisted closes without a word; one it cannot parse, such as
    smuggling framing, control bytes in a header or a garbled request line:
    400, where Twisted writes a bare ``400 Bad Request``).
    """

    def line_too_long(self, in_request_line: bool) -> None:
        kind = ErrorKind(414, "URI Too Long") if in_request_line else ErrorKind(431, "Request Header Fields Too Large")
        self.transport.write(error_response(kind("the request line or a header is too long")))  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]

    def bad_request(self) -> None:
        self.transport.write(error_response(INVALID_REQUEST("the request is not well-formed HTTP/1.1")))  # type: ignore[union-attr]
        self.loseConnection()


def _not_proxied(path: bytes) -> bool:
    """:return: whether ``path`` is the API's, or a target in absolute or asterisk form (never proxied)."""
    target = path.split(b"?", 1)[0]
    return target == b"/api" or target.startswith(b"/api/") or not target.startswith(b"/")


#: A ``Host`` value (RFC 9112 3.2, RFC 3986 3.2.2): a name or address
#: (an IP literal in brackets) and an optional port; it may be empty.
_HOST_VALUE = re.compile(rb"(?:\[[0-9A-Za-z:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(?::[0-9]*)?\Z")


def _host_error(request: server.Request) -> APIError | None:
    """
    :return: the error for a request whose ``Host`` cannot say which site
        it is for (RFC 9112 3.2: 400 for more than one ``Host`` line, or an
        invalid value), else ``None``.  Routing (``/api``, ``/p/``, a
        forward's own host under ``proxy_domain``) and what reaches a
        container would otherwise each pick their own.
    """
    hosts = request.requestHeaders.getRawHeaders(b"host", [])
    if len(hosts) > 1:
        return INVALID_REQUEST("a request has one Host header (RFC 9112 3.2)")
    if not hosts and request.clientproto == b"HTTP/1.1":
        return INVALID_REQUEST("the Host header is required (RFC 9112 3.2)")
    if hosts and not _HOST_VALUE.match(hosts[0]):
        return INVALID_REQUEST("the Host header is not a host and port (RFC 9112 3.2)")
    return None


class _Refused(Resource):
    """Answers a request refused before routing with ``error``, then closes the connection."""

    isLeaf = True

    def __init__(self, error: APIError) -> None:
        super().__init__()
        self._error = error

    def render(self, request: Any) -> bytes:
        # The proxy's error page (an HTML one for browsers).
        # What else the connection carries is not to be trusted either.
        request.setHeader(b"connection", b"close")
        request.channel.persistent = False
        return error_body(request, self._error)


class RexecSite(server.Site):
    """
    A Site that logs without query strings, shows no tracebacks, refuses
    over-large bodies early (:meth:`max_body_for`), refuses a request with
    several ``Host`` headers or a bad one (400, :meth:`getResourceFor`) and
    closes idle connections (``timeOut``, :data:`IDLE_TIMEOUT_SECONDS`).
    """

    displayTracebacks = False
    #: HTTP/1.1 only (rexecpf offers no HTTP/2): the channel itself, not
    #: Twisted's wrapper that would switch to HTTP/2 after ALPN
    protocol = RexecChannel  # type: ignore[assignment]

    def __init__(
        self,
        resource: IResource,
        proxy_body_bytes: int | None = None,
        authenticate_api: Callable[[str | None], Any] | None = None,
        **kwargs: Any,
    ) -> None:
        #: the limit for request bodies outside /api (the proxied ones)
        self.proxy_body_bytes = proxy_body_bytes
        #: ``Authenticator.require``: an API request refused for its body's
        #: size is 401 first if its token is not good
        self.authenticate_api = authenticate_api
        kwargs.setdefault("requestFactory", LimitedRequest)
        kwargs.setdefault("timeout", IDLE_TIMEOUT_SECONDS)
        # The API reads bodies as JSON whatever their Content-Type; nothing
        # here wants form or multipart parsing of hostile bodies.
        kwargs.setdefault("parsePOSTFormSubmission", False)
        super().__init__(resource, **kwargs)
        self.displayTracebacks = False

    def getResourceFor(self, request: Any) -> Any:
        """:return: the resource for ``request``, or a 400 for its ``Host`` (:func:`_host_error`)."""
        error = _host_error(request)
        if error is not None:
            return _Refused(error)
        return super().getResourceFor(request)

    def max_body_for(self, path: bytes) -> int | None:
        """
        :param path: the request target as sent (path and query).
        :return: the most body bytes a request to ``path`` may send, or
            ``None`` for no limit here (the resource enforces its own).
        """
        if _not_proxied(path):
            return MAX_BODY_BYTES
        return self.proxy_body_bytes

    def streams_body(self, path: bytes) -> bool:
        """
        :param path: the request target as sent.
        :return: whether a request body to ``path`` streams to the resource
            as it arrives (:class:`LimitedRequest`) rather than being stored
            first: those limited by ``proxy_body_bytes``.
        """
        return self.proxy_body_bytes is not None and not _not_proxied(path)

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
