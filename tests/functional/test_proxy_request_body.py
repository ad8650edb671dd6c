"""
Request bodies through the HTTP proxy on real sockets: they stream to the
container as they arrive, with back-pressure towards the client, and never
touch a temporary file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase
from twisted.web import http

from tests.functional.proxyenv import (
    RawClient,
    listen,
    real_reactor,
    sleep,
    split_response,
    start_rexec,
)

MiB = 1024 * 1024
#: The back-pressure test's body.
TOTAL = 256 * MiB
BLOCK = os.urandom(256 * 1024)
#: What may sit between the client and a container that stopped reading:
#: kernel socket buffers on two hops plus what the proxy holds (about a read
#: or two, and the container transport's write buffer).
IN_FLIGHT_BOUND = 16 * MiB


class Container(Protocol):
    """
    A raw HTTP/1.1 server: reads requests one after another, counts and hashes
    each body as it arrives (Content-Length or chunked), answers JSON with the
    body's length and SHA-256 and the head it got.  The test may stop its
    reads (:meth:`stop_reading`) and wait for a count (:meth:`until`).
    """

    def __init__(self, factory: ContainerFactory) -> None:
        self.factory = factory
        self.buffer = b""
        self.in_body = False

    def connectionMade(self) -> None:
        self.factory.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        if self.in_body:
            self.decoder.dataReceived(data)
            return
        self.buffer += data
        if b"\r\n\r\n" not in self.buffer:
            return
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        self.buffer = b""
        self.factory.heads.append(head)
        self.digest = hashlib.sha256()
        self.length = 0
        lines = head.lower().split(b"\r\n")
        length = [int(line.split(b":")[1]) for line in lines if line.startswith(b"content-length:")]
        if b"transfer-encoding: chunked" in lines:
            self.decoder: Any = http._ChunkedTransferDecoder(self.body, self.end)
        else:
            self.decoder = http._IdentityTransferDecoder(length[0] if length else 0, self.body, self.end)
        self.in_body = True
        if self.factory.answer_at_head:
            early = b'{"early": true}'
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(early), early))  # type: ignore[union-attr]
        if self.factory.stop_after_head:
            self.transport.pauseProducing()  # type: ignore[union-attr]
        if rest or not length or length[0] == 0:
            self.decoder.dataReceived(rest)

    def body(self, data: bytes) -> None:
        self.length += len(data)
        self.digest.update(data)
        self.factory.received += len(data)
        self.factory.wake()
        if self.factory.stop_after_first and self.transport is not None:
            self.factory.stop_after_first = False
            self.transport.pauseProducing()

    def end(self, rest: bytes) -> None:
        self.in_body = False
        answer = json.dumps({"length": self.length, "sha256": self.digest.hexdigest()}).encode()
        assert self.transport is not None
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer))
        if rest:
            self.dataReceived(rest)

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.lost += 1
        self.factory.wake()


class ContainerFactory(Factory):
    def __init__(self) -> None:
        self.connections: list[Container] = []
        self.heads: list[bytes] = []
        self.received = 0
        self.lost = 0
        self.stop_after_first = False
        self.stop_after_head = False
        #: answer each request as soon as its head is in (and read its body all the same)
        self.answer_at_head = False
        self._waiting: list[tuple[Any, Deferred[None]]] = []

    def buildProtocol(self, addr: Any) -> Container:
        return Container(self)

    def until(self, condition: Any, timeout: float = 5.0) -> Deferred[None]:
        """:return: a Deferred firing once ``condition()`` holds (failing after ``timeout`` s)."""
        waiter: Deferred[None] = Deferred()
        self._waiting.append((condition, waiter))
        self.wake()
        return waiter.addTimeout(timeout, real_reactor())

    def wake(self) -> None:
        for condition, waiter in list(self._waiting):
            if condition():
                self._waiting.remove((condition, waiter))
                waiter.callback(None)

    def resume(self) -> None:
        for connection in self.connections:
            connection.transport.resumeProducing()  # type: ignore[union-attr]


class Uploader(Protocol):
    """Sends a request head, then TOTAL bytes of body as fast as its transport takes them (a pull producer)."""

    def __init__(self, head: bytes) -> None:
        self.head = head
        self.sent = 0
        self.digest = hashlib.sha256()
        self.data = b""
        self.answered: Deferred[bytes] = Deferred()
        self.ended: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.head)
        self.transport.registerProducer(self, False)  # type: ignore[attr-defined]

    def resumeProducing(self) -> None:
        assert self.transport is not None
        if self.sent >= TOTAL:
            self.transport.unregisterProducer()  # type: ignore[attr-defined]
            return
        self.digest.update(BLOCK)
        self.sent += len(BLOCK)
        self.transport.write(BLOCK)

    def stopProducing(self) -> None:
        pass

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if b"}" in data and not self.answered.called:
            self.answered.callback(self.data)

    def connectionLost(self, reason: Any = None) -> None:
        if not self.answered.called:
            self.answered.errback(reason)
        self.ended.callback(None)


#: The answer of :class:`AnsweringContainer`.
DOWNLOAD = 64 * MiB


class AnsweringContainer(Protocol):
    """
    A container that answers DOWNLOAD bytes as soon as it has a request
    head, as fast as the proxy takes them, and does not read the request
    body: all but the last byte of the answer at once, the last one on
    :meth:`finish`.
    """

    def __init__(self) -> None:
        self.answered = False
        self.sent = 0
        self.lost: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        if self.answered or b"\r\n\r\n" not in data:
            return
        self.answered = True
        self.transport.pauseProducing()  # type: ignore[attr-defined]
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % DOWNLOAD)
        self.transport.registerProducer(self, False)  # type: ignore[attr-defined]

    def resumeProducing(self) -> None:
        assert self.transport is not None
        if self.sent >= DOWNLOAD - 1:
            self.transport.unregisterProducer()  # type: ignore[attr-defined]
            return
        chunk = BLOCK[: DOWNLOAD - 1 - self.sent]
        self.sent += len(chunk)
        self.transport.write(chunk)

    def stopProducing(self) -> None:
        pass

    def finish(self) -> None:
        assert self.transport is not None
        self.transport.write(b"!")

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)


class ReadingUploader(Uploader):
    """An :class:`Uploader` that counts the body of its answer (not kept) and says when a count is reached."""

    def __init__(self, head: bytes) -> None:
        super().__init__(head)
        self.answer_head = b""
        self.body = -1
        self._waiting: list[tuple[int, Deferred[None]]] = []
        self.answered.addErrback(lambda _: None)  # (its JSON answer is not what this one reads)

    def has(self, count: int) -> Deferred[None]:
        """:return: a Deferred firing once ``count`` bytes of the answer's body came."""
        waiter: Deferred[None] = Deferred()
        self._waiting.append((count, waiter))
        self._wake()
        return waiter

    def dataReceived(self, data: bytes) -> None:
        if self.body < 0:
            self.answer_head += data
            if b"\r\n\r\n" not in self.answer_head:
                return
            self.answer_head, _, data = self.answer_head.partition(b"\r\n\r\n")
            self.body = 0
        self.body += len(data)
        self._wake()

    def _wake(self) -> None:
        for count, waiter in list(self._waiting):
            if self.body >= count:
                self._waiting.remove((count, waiter))
                waiter.callback(None)


def _head(forward_id: str, framing: str, token: str = "alice-token") -> bytes:
    return (
        f"POST /p/{forward_id}/upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n{framing}\r\n\r\n"
    ).encode()


class StreamingTests(TestCase):
    """The container reads a request body while the client is still sending it."""

    timeout = 120

    @inlineCallbacks
    def setUp(self) -> Any:
        self.rex = yield start_rexec(self, limits={"proxy_body_bytes": 2 * TOTAL})
        self.container = ContainerFactory()
        self.fw = yield self.rex.forward((yield listen(self, self.container)))
        self.temp_files = 0
        real = tempfile.TemporaryFile

        def counting(*args: Any, **kwargs: Any) -> Any:
            self.temp_files += 1
            return real(*args, **kwargs)

        self.patch(tempfile, "TemporaryFile", counting)
        self.before = 0

    @inlineCallbacks
    def connect(self, payload: bytes = b"") -> Any:
        client = RawClient(payload)
        yield connectProtocol(TCP4ClientEndpoint(real_reactor(), "127.0.0.1", self.rex.port), client)
        return client

    @inlineCallbacks
    def close(self, client: Any, abort: bool = False) -> Any:
        """Close a client connection and let the server see it go."""
        (client.transport.abortConnection if abort else client.transport.loseConnection)()
        yield client.ended
        yield sleep(0.1)

    @inlineCallbacks
    def slow_upload(self, framing: str, encode: Any, pause: float = 0.0, head: bytes | None = None) -> Any:
        """
        Send four 100 kB pieces, each only once the container has received
        everything before it (and ``pause`` seconds more); :return: the head
        the container got.
        """
        pieces = [os.urandom(100_000) for _ in range(4)]
        client = yield self.connect(head or _head(self.fw.id, framing))
        sent = 0
        for piece in pieces:
            client.transport.write(encode(piece))
            sent += len(piece)
            # (Were the body stored first, nothing would reach the container before the last piece.)
            yield self.container.until(lambda sent=sent: self.container.received - self.before >= sent)
            if pause:
                yield sleep(pause)
        if framing.startswith("Transfer-Encoding"):
            client.transport.write(b"0\r\n\r\n")
        data = yield client.received(b"}").addTimeout(5, real_reactor())
        code, _, body = split_response(data)
        self.assertEqual(code, 200)
        document = json.loads(body)
        whole = b"".join(pieces)
        self.assertEqual(document, {"length": len(whole), "sha256": hashlib.sha256(whole).hexdigest()})
        self.assertEqual(self.temp_files, 0)
        yield self.close(client)
        return self.container.heads[-1].lower()

    @inlineCallbacks
    def test_content_length_streams(self) -> Any:
        """
        A Content-Length body sent slowly reaches the container piece by
        piece, before the client has sent the rest; the container gets the
        same Content-Length and the same bytes; no temporary file is made.
        """
        head = yield self.slow_upload("Content-Length: 400000", lambda piece: piece)
        self.assertIn(b"content-length: 400000", head)
        self.assertNotIn(b"transfer-encoding", head)

    @inlineCallbacks
    def test_chunked_streams(self) -> Any:
        """A chunked body streams the same way, and stays chunked towards the container."""
        head = yield self.slow_upload(
            "Transfer-Encoding: chunked", lambda piece: b"%x\r\n%s\r\n" % (len(piece), piece)
        )
        self.assertIn(b"transfer-encoding: chunked", head)
        self.assertNotIn(b"content-length", head)

    @inlineCallbacks
    def test_slow_upload_is_no_timeout(self) -> Any:
        """
        An upload that takes longer than the response timeout, its bytes
        flowing, gets its answer (here over a kept-alive container
        connection, on which the body starts at once).
        """
        self.rex.proxy.response_timeout = 0.5
        client = yield self.connect(_head(self.fw.id, "Content-Length: 2") + b"hi")
        yield client.received(b"}").addTimeout(5, real_reactor())
        yield self.close(client)
        self.before = self.container.received
        yield self.slow_upload("Content-Length: 400000", lambda piece: piece, pause=0.3)
        self.assertEqual(len(self.container.connections), 1)

    @inlineCallbacks
    def test_upgrade_request_body(self) -> Any:
        """An Upgrade request's chunked body streams too, still chunked, before a plain answer."""
        head = (
            f"POST /p/{self.fw.id}/up HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer alice-token\r\n"
            "Connection: upgrade\r\nUpgrade: example\r\nTransfer-Encoding: chunked\r\n\r\n"
        ).encode()
        seen = yield self.slow_upload(
            "Transfer-Encoding: chunked", lambda piece: b"%x\r\n%s\r\n" % (len(piece), piece), head=head
        )
        self.assertIn(b"upgrade: example", seen)
        self.assertIn(b"transfer-encoding: chunked", seen)

    @inlineCallbacks
    def test_back_pressure(self) -> Any:
        """
        A container that stops reading the body stops the client after at
        most IN_FLIGHT_BOUND of its 256 MiB, the proxy no longer reading its
        socket; once the container reads again, every byte arrives intact.
        """
        self.container.stop_after_first = True
        client = Uploader(_head(self.fw.id, f"Content-Length: {TOTAL}"))
        yield connectProtocol(TCP4ClientEndpoint(real_reactor(), "127.0.0.1", self.rex.port), client)
        yield self.container.until(lambda: self.container.received > 0)
        sent_before = -1
        for _ in range(20):  # until the client has sent nothing for a second
            if client.sent == sent_before:
                break
            sent_before = client.sent
            yield sleep(1.0)
        self.assertEqual(client.sent, sent_before, "the client kept sending to a container that does not read")
        self.assertLess(client.sent, IN_FLIGHT_BOUND)
        (exchange,) = self.rex.forwards._live[self.fw.id]
        self.assertNotIn(exchange.request.channel.transport, real_reactor().getReaders())
        self.container.resume()
        data = yield client.answered.addTimeout(100, real_reactor())
        code, _, body = split_response(data)
        self.assertEqual(code, 200)
        self.assertEqual(json.loads(body), {"length": TOTAL, "sha256": client.digest.hexdigest()})
        self.assertEqual(self.temp_files, 0)
        yield self.close(client)

    @inlineCallbacks
    def test_never_read_504(self) -> Any:
        """
        A container that never reads the body nor answers: 504 after the
        response timeout, though the client is not done sending.
        """
        self.rex.proxy.response_timeout = 0.5
        self.container.stop_after_head = True
        client = yield self.connect(_head(self.fw.id, f"Content-Length: {32 * MiB}") + b"x" * (32 * MiB))
        data = yield client.received(b"}\n").addTimeout(10, real_reactor())
        code, _, _ = split_response(data)
        self.assertEqual(code, 504)
        yield self.close(client, abort=True)

    @inlineCallbacks
    def test_client_gone_mid_body(self) -> Any:
        """A client that goes away mid-body ends the container's request; nothing stays tracked."""
        client = yield self.connect(_head(self.fw.id, "Content-Length: 1000000") + b"x" * 1000)
        yield self.container.until(lambda: self.container.received >= 1000)
        yield self.close(client, abort=True)
        yield self.container.until(lambda: self.container.lost == 1)
        self.assertEqual(self.rex.forwards.live_count(self.fw.id), 0)

    @inlineCallbacks
    def test_refused_body_not_forwarded(self) -> Any:
        """
        A body with bad credentials, or to an unknown forward, is answered
        401 or 404 and never reaches a container; a request pipelined after
        it is then served on the same connection.
        """
        body = b"x" * 300_000
        bad = _head(self.fw.id, f"Content-Length: {len(body)}", token="wrong") + body
        unknown = _head("pf_nosuchforward000000000", f"Content-Length: {len(body)}") + body
        good = _head(self.fw.id, "Content-Length: 2") + b"ok"
        client = yield self.connect(bad + unknown + good)
        data = yield client.received(b'"sha256"').addTimeout(10, real_reactor())
        codes = [int(line.split(b" ")[1]) for line in data.split(b"\r\n") if line.startswith(b"HTTP/1.1 ")]
        self.assertEqual(codes, [401, 404, 200])
        self.assertEqual(len(self.container.heads), 1)
        self.assertEqual(self.container.received, 2)
        self.assertEqual(self.temp_files, 0)
        yield self.close(client)

    @inlineCallbacks
    def test_pipelined_after_streamed(self) -> Any:
        """Two uploads pipelined in one write are both proxied, in order, on one connection."""
        first, second = os.urandom(200_000), os.urandom(50_000)
        payload = (
            _head(self.fw.id, f"Content-Length: {len(first)}") + first
            + _head(self.fw.id, f"Content-Length: {len(second)}") + second
        )
        client = yield self.connect(payload)
        yield client.received(hashlib.sha256(second).hexdigest().encode()).addTimeout(10, real_reactor())
        self.assertIn(hashlib.sha256(first).hexdigest().encode(), client.data)
        self.assertLess(
            client.data.index(hashlib.sha256(first).hexdigest().encode()),
            client.data.index(hashlib.sha256(second).hexdigest().encode()),
        )
        yield self.close(client)

    @inlineCallbacks
    def test_answer_before_body_end(self) -> Any:
        """
        A container that answers as soon as it has the request head: the
        client gets the answer while it is still sending the body; the rest
        of the body is read and dropped, and the next request on the same
        client connection is served.
        """
        self.container.answer_at_head = True
        client = yield self.connect(_head(self.fw.id, "Content-Length: 1000000") + b"x" * 1000)
        data = yield client.received(b'"early"').addTimeout(5, real_reactor())
        self.assertEqual(split_response(data)[0], 200)
        self.container.answer_at_head = False
        client.transport.write(b"x" * 999_000 + _head(self.fw.id, "Content-Length: 2") + b"ok")
        data = yield client.received(b'"sha256"').addTimeout(5, real_reactor())
        self.assertEqual(data.count(b"HTTP/1.1 "), 2)
        code, _, body = split_response(data.partition(b'{"early": true}')[2])
        self.assertEqual(code, 200)
        self.assertEqual(json.loads(body)["length"], 2)
        self.assertEqual(len(self.container.heads), 2)
        yield self.close(client)

    @inlineCallbacks
    def test_answer_streams_while_upload_waits(self) -> Any:
        """
        A container that answers 64 MiB at once and does not read the
        upload: the answer streams to the client, whose upload stays paused
        all along (no read of it is let in each time the proxy's writes to
        the client drain): at most IN_FLIGHT_BOUND of its 256 MiB sent.  Once
        the answer is whole, the proxy drops its connection to the container
        at once (a gentle close would wait for upload bytes it never reads).
        """
        container = AnsweringContainer()
        fw = yield self.rex.forward((yield listen(self, Factory.forProtocol(lambda: container))))
        client = ReadingUploader(_head(fw.id, f"Content-Length: {TOTAL}"))
        yield connectProtocol(TCP4ClientEndpoint(real_reactor(), "127.0.0.1", self.rex.port), client)
        yield client.has(DOWNLOAD - 1).addTimeout(60, real_reactor())
        self.assertLess(client.sent, IN_FLIGHT_BOUND)
        (exchange,) = self.rex.forwards._live[fw.id]
        to_container = exchange.connection.transport
        container.finish()
        yield client.has(DOWNLOAD).addTimeout(5, real_reactor())
        for _ in range(50):
            if not to_container.connected:
                break
            yield sleep(0.1)
        self.assertFalse(to_container.connected, "the proxy kept a connection open for a body nobody reads")
        yield self.close(client, abort=True)
        container.transport.resumeProducing()  # to see the connection gone
        yield container.lost.addTimeout(5, real_reactor())
