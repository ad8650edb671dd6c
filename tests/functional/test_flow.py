"""
Back-pressure through a tunnel on real sockets: a reader that stops reading
pauses the writer at the other end; nothing piles up in rexecpf; every byte
arrives once reading resumes.
"""

from __future__ import annotations

import hashlib
import os

from twisted.internet.defer import inlineCallbacks
from twisted.internet.interfaces import IPushProducer
from twisted.trial.unittest import TestCase
from twisted.web.http import HTTPChannel
from zope.interface import implementer

from tests.functional.inprocess import (
    TOKENS,
    Daemon,
    close_ws,
    connect_ws,
    sink_server,
    sleep,
    source_server,
)

ALICE = TOKENS["alice"]
TOTAL = 48 * 1024 * 1024
BOUND = 8 * 1024 * 1024


def buffered(transport) -> int:
    """
    Bytes held in a Twisted TCP transport's write buffer (its private
    ``dataBuffer`` and ``_tempDataBuffer``: pinned by these tests).
    """
    return len(transport.dataBuffer) + sum(len(chunk) for chunk in transport._tempDataBuffer)


def tunnel_protocols(daemon, forward_id):
    return [tracked._protocol for tracked in daemon.forwards._live.get(forward_id, ())]


@implementer(IPushProducer)
class Sender:
    """Sends ``total`` random bytes as 64 KiB binary messages, as fast as the socket takes them."""

    def __init__(self, client, total):
        self.client = client
        self.left = total
        self.digest = hashlib.sha256()
        self.chunk = os.urandom(64 * 1024)
        self.paused = False

    def start(self):
        self.client.transport.registerProducer(self, True)
        self.resumeProducing()

    def resumeProducing(self):
        self.paused = False
        while not self.paused and self.left > 0:
            chunk = self.chunk[: min(self.left, len(self.chunk))]
            self.left -= len(chunk)
            self.digest.update(chunk)
            self.client.sendMessage(chunk, isBinary=True)
        if self.left <= 0:
            self.client.transport.unregisterProducer()

    def pauseProducing(self):
        self.paused = True

    def stopProducing(self):
        self.paused = True


class FlowTests(TestCase):
    @inlineCallbacks
    def setUp(self):
        self.daemon = Daemon(self.mktemp(), tunnel_bytes_per_second=1 << 30)
        yield self.daemon.start()
        self.addCleanup(self.daemon.stop)

    @inlineCallbacks
    def open(self, forward_id):
        client, factory = yield connect_ws(
            self.daemon.ws_url(forward_id), ["Bearer", ALICE], port=self.daemon.port
        )
        self.addCleanup(close_ws, client, factory)
        return client, factory

    @inlineCallbacks
    def test_takeover_unregisters_http_channel(self):
        """
        Once the WebSocket is open, the server socket's registered producer
        is the relay's (the HTTPChannel of the takeover was unregistered),
        and the container connection's producer is the relay's too.
        """
        source = yield source_server(1024)
        self.addCleanup(source.stop)
        forward = yield self.daemon.create(source.port, name="takeover")
        # A source that sends little and closes: keep the tunnel by reading later.
        client, factory = yield self.open(forward["id"])
        client.transport.pauseProducing()
        [server] = tunnel_protocols(self.daemon, forward["id"])
        self.assertNotIsInstance(server.transport.producer, HTTPChannel)
        self.assertIs(server.transport.producer, server.relay._pauser_b)
        self.assertIs(server.backend.transport.producer, server.relay._pauser_a)
        client.transport.resumeProducing()

    @inlineCallbacks
    def test_slow_websocket_reader(self):
        """
        A WebSocket client that stops reading while the container sends 48
        MiB: the container is paused, rexecpf's buffers stay under 8 MiB,
        and after resuming every byte arrives (SHA-256) before close 1000.
        """
        source = yield source_server(TOTAL)
        self.addCleanup(source.stop)
        forward = yield self.daemon.create(source.port)
        client, factory = yield self.open(forward["id"])
        client.transport.pauseProducing()
        [server] = tunnel_protocols(self.daemon, forward["id"])
        peak = 0
        for _ in range(20):
            yield sleep(0.1)
            peak = max(peak, buffered(server.transport), buffered(server.backend.transport))
        sent = TOTAL - source.factory.protocols[0].left
        self.assertLess(peak, BOUND)
        self.assertLess(sent, TOTAL // 2, "the container was not paused")
        client.transport.resumeProducing()
        code, _ = yield factory.closed
        self.assertEqual(code, 1000)
        self.assertEqual(client.count, TOTAL)
        self.assertEqual(client.digest.hexdigest(), source.factory.protocols[0].digest.hexdigest())

    @inlineCallbacks
    def test_slow_container_reader(self):
        """
        A container that stops reading while the client sends 48 MiB: the
        client's socket is no longer read, rexecpf's buffers stay under 8
        MiB, and after resuming every byte arrives (SHA-256).
        """
        sink = yield sink_server(TOTAL)
        self.addCleanup(sink.stop)
        forward = yield self.daemon.create(sink.port)
        client, factory = yield self.open(forward["id"])
        yield sleep(0.05)
        [container] = sink.factory.protocols
        container.transport.pauseProducing()
        [server] = tunnel_protocols(self.daemon, forward["id"])
        sender = Sender(client, TOTAL)
        sender.start()
        peak = 0
        for _ in range(20):
            yield sleep(0.1)
            peak = max(peak, buffered(server.transport), buffered(server.backend.transport))
        self.assertLess(peak, BOUND)
        self.assertGreater(sender.left, TOTAL // 2, "the client was not paused")
        self.assertLess(buffered(client.transport), BOUND)
        container.transport.resumeProducing()
        digest = yield sink.factory.done
        self.assertEqual(digest, sender.digest.hexdigest())
