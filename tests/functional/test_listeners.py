"""
``local_port`` listeners on real sockets.
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from tests.functional.inprocess import Daemon, connect_tcp_roundtrip, echo_server, until


class _Held(Protocol):
    def connectionMade(self):
        self.factory.connected.callback(self)

    def connectionLost(self, reason):
        self.factory.lost.callback(None)


class ListenerTests(TestCase):
    @inlineCallbacks
    def setUp(self):
        self.directory = self.mktemp()
        self.daemon = Daemon(self.directory)
        yield self.daemon.start()
        self.addCleanup(lambda: self.daemon.stop())
        self.echo = yield echo_server()
        self.addCleanup(self.echo.stop)

    @inlineCallbacks
    def test_relays(self):
        """A connection to ``local_port`` reaches the container port."""
        forward = yield self.daemon.create(self.echo.port)
        echoed = yield connect_tcp_roundtrip(forward["local_port"], b"local hello")
        self.assertEqual(echoed, b"local hello")

    @inlineCallbacks
    def test_delete_closes(self):
        """
        Deleting the forward closes its listener and its open connections.
        """
        forward = yield self.daemon.create(self.echo.port)
        factory = Factory.forProtocol(_Held)
        factory.connected, factory.lost = Deferred(), Deferred()
        yield TCP4ClientEndpoint(reactor, "127.0.0.1", forward["local_port"]).connect(factory)
        yield factory.connected
        yield until(lambda: self.daemon.forwards.live_count(forward["id"]) == 1, what="the connection is tracked")
        yield self.daemon.delete(forward["id"])
        yield factory.lost.addTimeout(5, reactor)
        # the delete answered after the listener stopped listening
        with self.assertRaises(ConnectionRefusedError):
            yield connect_tcp_roundtrip(forward["local_port"], b"x")

    @inlineCallbacks
    def test_restored_at_startup(self):
        """
        After a restart, stored forwards get their listeners back.
        """
        forward = yield self.daemon.create(self.echo.port)
        yield self.daemon.stop()
        with self.assertRaises(ConnectionRefusedError):
            yield connect_tcp_roundtrip(forward["local_port"], b"x")
        self.daemon = Daemon(self.directory)
        yield self.daemon.start()  # fires once the stored forwards are restored
        echoed = yield connect_tcp_roundtrip(forward["local_port"], b"again")
        self.assertEqual(echoed, b"again")

    @inlineCallbacks
    def test_logged_and_counted(self):
        """
        A listener connection is counted as one while open, and when it ends
        logs its one line and is counted in the relay metrics.
        """
        from twisted.internet.testing import EventLoggingObserver
        from twisted.logger import formatEvent, globalLogPublisher

        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        forward = yield self.daemon.create(self.echo.port)
        factory = Factory.forProtocol(_Held)
        factory.connected, factory.lost = Deferred(), Deferred()
        yield TCP4ClientEndpoint(reactor, "127.0.0.1", forward["local_port"]).connect(factory)
        held = yield factory.connected
        metrics = self.daemon.components.metrics
        yield until(lambda: b'rexecpf_live_connections{kind="listener"} 1.0' in metrics.render())
        held.transport.write(b"12345")
        held.transport.loseConnection()
        yield factory.lost
        yield until(lambda: b'rexecpf_relays_total{kind="listener"} 1.0' in metrics.render())
        self.assertIn(b'rexecpf_relayed_bytes_total{direction="upstream",kind="listener"} 5.0', metrics.render())
        lines = [formatEvent(event) for event in logged if event.get("kind") == "listener"]
        self.assertEqual(len(lines), 1, lines)
        self.assertTrue(lines[0].startswith(f"listener {forward['id']} of - closed: 5 bytes in"), lines[0])
