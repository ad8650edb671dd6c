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

from tests.functional.inprocess import Daemon, connect_tcp_roundtrip, echo_server, free_port, sleep, until


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


class PortHandoverTests(TestCase):
    """
    A ``local_port`` freed by one forward and taken by the next, as another
    node's change feed brings them (a create picks the lowest free port, so
    the port of a forward just deleted is the next one's).
    """

    @inlineCallbacks
    def setUp(self):
        self.daemon = Daemon(self.mktemp())
        yield self.daemon.start()
        self.addCleanup(lambda: self.daemon.stop())
        self.echo = yield echo_server()
        self.addCleanup(self.echo.stop)
        self.local_port = free_port()
        # (Its first resync done: the changes below are applied as the feed
        # would, and the store then made to agree, so no resync undoes them.)
        yield until(lambda: self.daemon.components.follower.resyncs, what="the first resync")

    def elsewhere(self, rev):
        from rexecpf.model import PortForward, new_forward_id

        forward = PortForward(
            id=new_forward_id(), container_id="c1", container_port=self.echo.port,
            local_port=self.local_port, name=None, created_ms=rev, owner="alice",
        )
        return forward

    @inlineCallbacks
    def test_delete_then_add_in_one_turn(self):
        """
        The delete of the forward holding a port and the add of the next
        one on that port, applied in one turn of the reactor (one batch of
        the feed): the next one is listened on once the first has let go.
        """
        from rexecpf.feed import Change

        forwards = self.daemon.forwards
        listeners = self.daemon.components.local_listeners
        first = self.elsewhere(1)
        forwards.apply(Change(rev=1, op="add", forward=first))
        yield until(lambda: first.id in listeners.ports, what="the first forward listens")
        second = self.elsewhere(2)
        forwards.apply(Change(rev=2, op="delete", ids=(first.id,)))
        forwards.apply(Change(rev=3, op="add", forward=second))
        yield self.daemon.components.store.add(second, 10)
        yield until(lambda: second.id in listeners.ports, what="the second forward listens")
        echoed = yield connect_tcp_roundtrip(self.local_port, b"handed over")
        self.assertEqual(echoed, b"handed over")

    @inlineCallbacks
    def test_add_heard_before_the_delete(self):
        """
        The next forward heard of first (a cache miss read it from the
        store while the feed was behind), then the delete of the forward
        holding its port: it is listened on once that one has let go.
        """
        from rexecpf.feed import Change

        forwards = self.daemon.forwards
        listeners = self.daemon.components.local_listeners
        first = self.elsewhere(1)
        forwards.apply(Change(rev=1, op="add", forward=first))
        yield until(lambda: first.id in listeners.ports, what="the first forward listens")
        second = self.elsewhere(2)
        forwards.apply(Change(rev=3, op="add", forward=second))
        yield sleep(0.05)
        self.assertNotIn(second.id, listeners.ports)
        forwards.apply(Change(rev=2, op="delete", ids=(first.id,)))
        yield self.daemon.components.store.add(second, 10)
        yield until(lambda: second.id in listeners.ports, what="the second forward listens")
        echoed = yield connect_tcp_roundtrip(self.local_port, b"handed over")
        self.assertEqual(echoed, b"handed over")
