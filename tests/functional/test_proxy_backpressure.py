"""
Back-pressure through the HTTP proxy on real sockets: a client that stops
reading while the container streams a large body.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionAborted
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from tests.functional.proxyenv import RawClient, listen, real_reactor, sleep, start_rexec

MiB = 1024 * 1024
TOTAL = 256 * MiB
CHUNK = 256 * 1024
#: What the proxy itself may hold for a stalled client (its write buffer to
#: the client plus a read or two from the container).
PROXY_BOUND = 2 * MiB
#: What may sit between a stalled client and the container: kernel socket
#: buffers on two hops plus the proxy's bound.
IN_FLIGHT_BOUND = 24 * MiB


class Streamer(Protocol):
    """The container: answers one request with TOTAL random bytes, written as a pull producer."""

    def __init__(self) -> None:
        self.sent = 0
        self.digest = hashlib.sha256()
        self.started = False

    def dataReceived(self, data: bytes) -> None:
        if self.started or b"\r\n\r\n" not in data:
            return
        self.started = True
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: %d\r\n\r\n" % TOTAL
        )
        self.transport.registerProducer(self, False)  # type: ignore[attr-defined]

    def resumeProducing(self) -> None:
        assert self.transport is not None
        if self.sent >= TOTAL:
            self.transport.unregisterProducer()  # type: ignore[attr-defined]
            return
        chunk = os.urandom(min(CHUNK, TOTAL - self.sent))
        self.digest.update(chunk)
        self.sent += len(chunk)
        self.transport.write(chunk)

    def stopProducing(self) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True

    lost = False


class HeadThenBody(Protocol):
    """Keeps an HTTP message's head (``head``), then hands each piece of its body to :meth:`body_received`."""

    head = b""
    in_body = False

    def dataReceived(self, data: bytes) -> None:
        if not self.in_body:
            self.head += data
            if b"\r\n\r\n" not in self.head:
                return
            self.in_body = True
            self.head, _, data = self.head.partition(b"\r\n\r\n")
            self.head_received()
        self.body_received(data)

    def head_received(self) -> None:
        pass

    def body_received(self, data: bytes) -> None:
        raise NotImplementedError


class StallingClient(HeadThenBody):
    """Sends one GET, stalls after the first bytes, reads everything once resumed."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.body = 0
        self.digest = hashlib.sha256()
        self.first: Deferred[None] = Deferred()
        self.done: Deferred[None] = Deferred()
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        if not self.first.called:
            self.transport.pauseProducing()  # type: ignore[union-attr]
            self.first.callback(None)
        super().dataReceived(data)

    def body_received(self, data: bytes) -> None:
        self.body += len(data)
        self.digest.update(data)
        if self.body >= TOTAL and not self.done.called:
            self.done.callback(None)

    def connectionLost(self, reason: Any = None) -> None:
        if not self.done.called:
            self.done.errback(reason)
        self.lost.callback(None)


def _buffered(transport: Any) -> int:
    """:return: bytes a Twisted TCP transport holds unsent (FileDescriptor internals)."""
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


class BackPressureTests(TestCase):
    """A slow client pauses the container; memory does not grow with the body."""

    timeout = 120

    @inlineCallbacks
    def test_stalled_client(self) -> Any:
        """
        While the client does not read, the proxy holds less than PROXY_BOUND,
        and the container is paused after at most IN_FLIGHT_BOUND; resumed,
        all 256 MiB arrive intact.
        """
        rex = yield start_rexec(self, limits={"proxy_body_bytes": 2 * TOTAL})
        container = Streamer()
        port = yield listen(self, Factory.forProtocol(lambda: container))
        fw = yield rex.forward(port)
        client = StallingClient(
            f"GET /p/{fw.id}/big HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer alice-token\r\n\r\n".encode()
        )
        yield connectProtocol(TCP4ClientEndpoint(real_reactor(), "127.0.0.1", rex.port), client)
        yield client.first
        yield sleep(1.5)
        sent_before = container.sent
        yield sleep(1.0)
        self.assertEqual(container.sent, sent_before, "the container kept writing to a stalled client")
        self.assertLess(container.sent, IN_FLIGHT_BOUND)
        (exchange,) = rex.forwards._live[fw.id]
        held = _buffered(exchange.request.channel.transport)
        self.assertLess(held, PROXY_BOUND)
        self.assertTrue(exchange.request.channel.transport.producerPaused)
        client.transport.resumeProducing()
        yield client.done
        self.assertEqual(client.body, TOTAL)
        self.assertEqual(client.digest.hexdigest(), container.digest.hexdigest())
        client.transport.loseConnection()
        yield client.lost
        yield sleep(0.1)

    @inlineCallbacks
    def test_client_goes_away(self) -> Any:
        """A client that disconnects mid-body stops the container's connection; nothing stays tracked."""
        rex = yield start_rexec(self, limits={"proxy_body_bytes": 2 * TOTAL})
        container = Streamer()
        port = yield listen(self, Factory.forProtocol(lambda: container))
        fw = yield rex.forward(port)
        client = StallingClient(
            f"GET /p/{fw.id}/big HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer alice-token\r\n\r\n".encode()
        )
        yield connectProtocol(TCP4ClientEndpoint(real_reactor(), "127.0.0.1", rex.port), client)
        yield client.first
        self.assertEqual(rex.forwards.live_count(fw.id), 1)
        client.transport.abortConnection()
        yield client.lost
        # The download ended unfinished (and its failure is consumed here, not
        # left unhandled for a later test to trip over).
        yield self.assertFailure(client.done, ConnectionAborted)
        for _ in range(20):
            if container.lost:
                break
            yield sleep(0.05)
        self.assertTrue(container.lost)
        self.assertEqual(rex.forwards.live_count(fw.id), 0)
        self.assertLess(container.sent, IN_FLIGHT_BOUND)


UPLOAD = 64 * MiB


class StallingContainer(HeadThenBody):
    """
    The container of an upload: stops reading once the request head is in,
    reads the rest when resumed, then answers with the SHA-256 of the body.
    """

    def __init__(self) -> None:
        self.received = 0
        self.digest = hashlib.sha256()
        self.stalled: Deferred[None] = Deferred()

    def head_received(self) -> None:
        assert self.transport is not None
        self.transport.pauseProducing()  # type: ignore[attr-defined]
        self.stalled.callback(None)

    def body_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.received += len(data)
        self.digest.update(data)
        if self.received >= UPLOAD:
            answer = self.digest.hexdigest().encode()
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer))


class UploadBackPressureTests(TestCase):
    """A slow container pauses the upload; memory does not grow with the body."""

    timeout = 120

    @inlineCallbacks
    def test_stalled_container(self) -> Any:
        """
        While the container does not read, the proxy holds less than
        PROXY_BOUND of the request body and stops reading the client's
        socket, well before the end of the body; resumed, all 64 MiB arrive
        intact.
        """
        rex = yield start_rexec(self, limits={"proxy_body_bytes": 2 * UPLOAD})
        container = StallingContainer()
        port = yield listen(self, Factory.forProtocol(lambda: container))
        fw = yield rex.forward(port)
        body = os.urandom(UPLOAD)
        client = RawClient(
            f"POST /p/{fw.id}/up HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer alice-token\r\n"
            f"Connection: close\r\nContent-Length: {UPLOAD}\r\n\r\n".encode() + body
        )
        yield connectProtocol(TCP4ClientEndpoint(real_reactor(), "127.0.0.1", rex.port), client)
        yield container.stalled
        yield sleep(1.5)
        (exchange,) = rex.forwards._live[fw.id]
        self.assertLess(_buffered(exchange.connection.transport), PROXY_BOUND)
        self.assertNotIn(exchange.request.channel.transport, real_reactor().getReaders())
        # (the body bytes the request was given, by LimitedRequest's count)
        position = exchange.request._received
        yield sleep(1.0)
        self.assertEqual(exchange.request._received, position, "the body kept being read for a stalled container")
        self.assertLess(position, UPLOAD // 2)
        container.transport.resumeProducing()
        data = yield client.ended.addTimeout(30, real_reactor())
        self.assertEqual(container.received, UPLOAD)
        self.assertTrue(data.startswith(b"HTTP/1.1 200 "), data[:200])
        self.assertTrue(data.endswith(hashlib.sha256(body).hexdigest().encode()))
