# -*- test-case-name: tests.test_proxy -*-
"""
One proxied request, from sending it to the container to the last body
byte (:class:`Exchange`), or to the relay a 101 starts (:class:`Upgrade`).
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from rexecpf.endpoints import container_endpoint
from rexecpf.ends import TakenOverEnd, widen_transport
from rexecpf.http._twisted import request_disconnected
from rexecpf.http.errors import abort_client, finish_with_error
from rexecpf.model import (
    BAD_GATEWAY,
    FORWARD_NOT_FOUND,
    GATEWAY_TIMEOUT,
    INTERNAL_ERROR,
    UNAUTHORIZED,
    APIError,
    CloseReason,
    Container,
    ErrorKind,
    PortForward,
    Principal,
)
from rexecpf.proxy.headers import authority, request_head, response_headers
from rexecpf.proxy.parser import (
    ChunkedDecoder,
    Framing,
    LengthDecoder,
    ResponseHead,
    UntilCloseDecoder,
)
from rexecpf.proxy.pool import ContainerConnection
from rexecpf.relay import CONNECT_TIMEOUT, Relay, RelayStats
from rexecpf.web import RequestBodyStream, release_from_http_channel

if TYPE_CHECKING:
    from rexecpf.proxy.resource import ProxyService

__all__ = ["Answered", "ClientGone", "Cut", "Exchange", "Failed", "RelayEnded", "State", "Upgrade"]

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


def _nothing() -> None:
    pass


class State(Enum):
    """Where one proxied request is (:attr:`Exchange.state`)."""

    #: no container connection yet: one is taken from the pool or being made
    #: (again, once, after a kept-alive connection turned out closed); the
    #: response-header timer runs
    CONNECTING = "connecting"
    #: the request went to the container (its body as it arrives) and its
    #: response head has not come; the response-header timer runs, held
    #: while the request body flows
    AWAITING_HEAD = "awaiting head"
    #: the response head went to the client; its body streams, the container
    #: connection's transport being the client request's producer
    STREAMING_BODY = "streaming body"
    #: a 101: the relay holds both connections (:class:`Upgrade` only)
    UPGRADED = "upgraded"
    #: over: everything is released
    DONE = "done"


@attrs.frozen
class Answered:
    """
    The response went to the client whole: it is finished, and the container
    connection goes back to the pool if ``keep`` (and the request body was
    sent whole), else is closed.
    """

    keep: bool


@attrs.frozen
class Failed:
    """
    Nothing of the container's answer went to the client: it gets ``error``
    instead (``None``: nothing, the connection attempt was cancelled).
    """

    error: APIError | None


@attrs.frozen
class Cut:
    """
    The response cannot reach the client whole: its connection is ended
    without finishing the response, what was written flushed first unless
    ``at_once``.
    """

    why: str
    at_once: bool = False


@attrs.frozen
class ClientGone:
    """The client went away: the container side is stopped."""


@attrs.frozen
class RelayEnded:
    """The relay of an upgraded connection ended (both connections are closed)."""

    stats: RelayStats


#: How an exchange ends (:meth:`Exchange._close`).
Outcome = Answered | Failed | Cut | ClientGone | RelayEnded


class Exchange:
    """
    One proxied request, from sending it to the container to the last body
    byte, over a pooled connection (:class:`ContainerConnection`): a state
    machine (:class:`State`) whose every ending goes through :meth:`_close`.

    Its inputs: :meth:`start`, from the pool or the connection
    (:meth:`connected`, :meth:`got_head`, :meth:`head_failed`,
    :meth:`bad_framing`, :meth:`body_lost`, :meth:`crashed`), from the body
    decoder, the response-header timer, the client (its request finishing
    or failing), and the live-connection registry (:meth:`shutdown`,
    :meth:`drain`).  Any input that comes once it is :attr:`State.DONE` is
    ignored.
    """

    _log = Logger()

    #: whether the client asked for a protocol switch (:class:`Upgrade`)
    upgrade = False
    #: the relay of an upgraded connection (:class:`Upgrade`, after a 101)
    relay: Relay | None = None

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
        self.state = State.CONNECTING
        # What is held, each released in _close:
        #: the connection being made, until it is
        self.pending: Deferred[Any] | None = None
        self.connection: ContainerConnection | None = None
        #: the response-header timer
        self.timer: Any = None
        #: the request body while it is the container connection's producer
        self.sending: _RequestBody | None = None
        self.untrack: Callable[[], None] = _nothing
        #: fired once done, for a graceful stop (:meth:`drain`)
        self.drained: Deferred[None] | None = None
        self.retried = False
        self.body_sent = True
        #: whether the connection may carry another request after this one
        self.keep_alive = False
        self.body_bytes = 0

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
        endpoint = container_endpoint(service.reactor, *key, service.forwards.refuse_own_socket, CONNECT_TIMEOUT)
        self.pending = endpoint.connect(
            Factory.forProtocol(lambda: ContainerConnection(self, key, service.pool))
        )
        self.pending.addErrback(self._failed)

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
        if self.state is State.DONE:
            return succeed(None)
        if self.drained is None:
            self.drained = Deferred()
        return self.drained

    def shutdown(self, reason: str) -> None:
        """The forward is gone, its user's token was revoked, or rexecpf stops: close now."""
        if self.state in (State.CONNECTING, State.AWAITING_HEAD):
            self._close(Failed(_closed_error(reason)))
        else:
            self._close(Cut(reason, at_once=True))

    # the response-header timer

    def _arm(self) -> None:
        self._disarm()
        self.timer = self.service.reactor.callLater(self.service.response_timeout, self._time_out)

    def _disarm(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def _sending_body(self, sending: bool) -> None:
        if self.state is not State.AWAITING_HEAD:
            return
        if sending:
            self._disarm()
        else:
            self._arm()

    def _time_out(self) -> None:
        self.timer = None
        self._close(Failed(GATEWAY_TIMEOUT(f"no response headers within {self.service.response_timeout:g} s")))

    # the request

    def _failed(self, failure: Failure) -> None:
        """The connection to the container could not be made."""
        self.pending = None
        if self.state is not State.CONNECTING:
            return
        if failure.check(CancelledError):
            self._close(Failed(None))
        elif isinstance(failure.value, APIError):  # a name that resolves to a socket of ours: 403
            self._close(Failed(failure.value))
        elif failure.check(ConnectError, DNSLookupError):
            self._close(Failed(BAD_GATEWAY(f"the container port does not answer: {_reason(failure)}")))
        else:
            self._log.info("proxy to {forward_id} failed: {error}", forward_id=self.forward.id, error=_reason(failure))
            self._close(Failed(BAD_GATEWAY(f"the container port failed: {_reason(failure)}")))

    def connected(self, connection: ContainerConnection) -> None:
        """Send the request over ``connection``."""
        self.pending = None
        if self.state is not State.CONNECTING:
            connection.abort()
            return
        self.state = State.AWAITING_HEAD
        self.connection = connection
        request = self.request
        body = _body_of(request, self._sending_body)
        transport = connection._t
        transport.write(
            request_head(
                request,
                self.target(),
                self.prefix,
                self.upgrade,
                authority(self.container, self.forward.container_port),
                None if body is None or body.chunked else body.length,
                body is not None and body.chunked,
                is_token=self.service.authenticator.is_token,
                behind_https=self.service.secure_cookies,
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

    def head_failed(self, connection: ContainerConnection, why: str) -> None:
        """No (acceptable) response head came over ``connection``."""
        if self.state is not State.AWAITING_HEAD:
            return
        nothing_came = not connection.head_done and not connection.reader.received
        # (A streamed body cannot go again: what was sent of it is gone.)
        replayable = self.request.method in IDEMPOTENT and getattr(self.request, "body_stream", None) is None
        if connection.reused and nothing_came and not self.retried and replayable:
            # A kept-alive connection its server had closed: once more, on a
            # new one (the response-header timer keeps running).
            self._stop_sending()
            self.connection = None
            self.state = State.CONNECTING
            self.retried = True
            self._open(fresh=True)
            return
        self._close(Failed(BAD_GATEWAY(why)))

    def got_head(self, connection: ContainerConnection, head: ResponseHead, rest: bytes) -> None:
        """The response head came (interim ones skipped): pass it on, then its body (or switch protocols)."""
        if self.state is not State.AWAITING_HEAD:
            connection.abort()
            return
        self._disarm()
        if head.code == 101:
            self._switch(connection, head, rest)
            return
        self.state = State.STREAMING_BODY
        self.keep_alive = not self.upgrade and head.persistent(self.request.method)
        self._respond(connection, head, rest)

    def _switch(self, connection: ContainerConnection, head: ResponseHead, rest: bytes) -> None:
        """A 101: only an :class:`Upgrade` asks for one."""
        self._close(Failed(BAD_GATEWAY("the container switched protocols unasked")))

    def _respond(self, connection: ContainerConnection, head: ResponseHead, rest: bytes) -> None:
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
            codings = b", ".join(head.transfer_codings).decode("ascii")
            self._close(Failed(BAD_GATEWAY(f"the container used a transfer coding the proxy cannot pass on: {codings}")))
            return
        if framing is Framing.LENGTH and length is not None and length > limit:
            self._close(Failed(BAD_GATEWAY(f"the response body ({length} bytes) is over the limit of {limit} bytes")))
            return
        request.setResponseCode(head.code, head.reason)
        # Transfer-Encoding is hop-by-hop; with it, Content-Length means
        # nothing (RFC 9112 6.3) and is dropped.
        response_headers(request, head.fields, self.prefix, also_drop=(b"content-length",))
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
        if self.state is not State.STREAMING_BODY:
            return
        self.body_bytes += len(data)
        if self.body_bytes > self.service.body_limit:
            self._close(Cut("the response body grew past the limit"))
            return
        self.request.write(data)

    def _body_end(self, extra: bytes) -> None:
        """The body came whole (``extra``: bytes after it, which no server should send)."""
        if self.state is State.STREAMING_BODY:
            self._close(Answered(keep=self.keep_alive and not extra))

    def body_lost(self, reason: Failure) -> None:
        """The connection closed while the body came."""
        connection = self.connection
        if self.state is not State.STREAMING_BODY or connection is None:
            return
        if isinstance(connection.decoder, UntilCloseDecoder):
            self._close(Answered(keep=False))
        else:
            self._close(Cut(f"the container's response ended early: {_reason(reason)}"))

    def bad_framing(self, why: str) -> None:
        """
        The container's body is not framed as HTTP/1.1 says: 502 when none of
        it was passed on yet, else the response is cut.
        """
        self._close(Cut(why) if self.request.startedWriting else Failed(BAD_GATEWAY(why)))

    def crashed(self, connection: ContainerConnection) -> None:
        """
        Handling the container's answer raised (called from the ``except``
        block): logged; the client gets a 500, or a cut response if it
        already started.
        """
        self._log.failure("proxied response of {forward_id} failed", forward_id=self.forward.id)
        if self.state is State.DONE:
            # It may be back in the pool: a connection a bug left in an
            # unknown state is not used again.
            connection.abort()
        elif self.request.startedWriting:
            self._close(Cut("internal error", at_once=True))
        else:
            self._close(Failed(INTERNAL_ERROR("the proxy failed")))

    def _client_done(self, result: Any) -> None:
        if self.request.startedWriting:
            # Whatever wrote the head (the container's answer, or one of
            # ours), including a response cut short afterwards.
            self.service.answered(self.request.code)
        if isinstance(result, Failure):
            self._close(ClientGone())

    # the one way out

    def _close(self, outcome: Outcome) -> None:
        """
        End the exchange (once: later endings are ignored), releasing each
        thing it holds here and nowhere else: the response-header timer, a
        connection being made, the request body's producer slot, the
        container connection (pooled only when :class:`Answered` says so),
        the client request's producer; then the client gets what
        ``outcome`` says; last the exchange is no longer tracked and a
        graceful stop waits for it no more.  Once upgraded, the relay holds
        both connections: it is aborted, and ends the exchange when it
        reports (:class:`RelayEnded`).
        """
        if self.state is State.DONE:
            return
        if self.state is State.UPGRADED and not isinstance(outcome, RelayEnded):
            assert self.relay is not None
            self.relay.abort()  # -> RelayEnded
            return
        self.state = State.DONE
        self._disarm()
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.cancel()  # -> _failed, ignored
        # (before the connection is let go: a body not sent whole is its producer still)
        self._stop_sending()
        connection, self.connection = self.connection, None
        if connection is not None:
            if isinstance(outcome, Answered) and self.body_sent:
                connection.release(outcome.keep)
            else:
                # Answered before the whole request body was sent: the rest
                # will not be, and closing gently would wait for what is
                # still to be written, on a container that may never read it.
                connection.abort()
        request = self.request
        disconnected = request_disconnected(request)
        if request.producer is not None and not disconnected:
            request.unregisterProducer()
        if isinstance(outcome, Answered):
            if not request.finished and not disconnected:
                request.finish()
        elif isinstance(outcome, Failed):
            if outcome.error is not None:
                finish_with_error(request, outcome.error)
        elif isinstance(outcome, Cut):
            self._log.info("proxied response of {forward_id} broken: {why}", forward_id=self.forward.id, why=outcome.why)
            abort_client(request, None if outcome.at_once else self.service.reactor)
        elif isinstance(outcome, RelayEnded):
            self.service.forwards.relay_ended("upgrade", self.forward.id, self.principal.name, outcome.stats)
        # (dropped, not only called: they refer back to this exchange)
        untrack, self.untrack = self.untrack, _nothing
        untrack()
        drained, self.drained = self.drained, None
        if drained is not None:
            drained.callback(None)


class Upgrade(Exchange):
    """
    An ``Upgrade`` request: over a connection of its own, never pooled; a 101
    takes the client connection over and splices both with a relay, any
    other answer is passed on as a normal response.
    """

    upgrade = True

    def _switch(self, backend: ContainerConnection, head: ResponseHead, rest: bytes) -> None:
        if not self.body_sent:
            # The rest of the body would reach it as bytes of the new protocol.
            self._close(Failed(BAD_GATEWAY("the container switched protocols before it read the request body")))
            return
        request = self.request
        channel = request.channel
        transport = channel.transport
        self._stop_sending()
        # 101: keep Upgrade and Connection: upgrade, drop other hop-by-hop.
        request.responseHeaders = Headers()
        response_headers(request, head.fields, self.prefix, keep=(b"upgrade",))
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
            backend.dataReceived(rest)
        client = TakenOverEnd(transport)
        buffered = channel.hand_over(client)
        transport.pauseProducing()
        release_from_http_channel(transport)
        transport.write(b"\r\n".join(lines) + b"\r\n\r\n")
        relay = Relay(
            self.service.reactor,
            client,
            backend,
            on_end=lambda stats: self._close(RelayEnded(stats)),
            rate_a_to_b=self.service.upgrade_rate,
            rate_b_to_a=self.service.upgrade_rate,
            idle_seconds=self.service.upgrade_idle,
        )
        # The relay holds both connections from now on.
        self.relay = relay
        self.connection = None
        self.state = State.UPGRADED
        client.attach(relay)
        backend.attach(relay)
        self.service.answered(101)
        if buffered:
            relay.received(client, buffered)
        relay.start()
        self._log.info("upgraded connection to {forward_id} open", forward_id=self.forward.id)

    def drain(self) -> Deferred[None]:
        """A graceful stop: an upgraded connection is closed at once (as a tunnel is)."""
        if self.state is State.UPGRADED:
            self.shutdown(CloseReason.GOING_AWAY)
            return succeed(None)
        return super().drain()
