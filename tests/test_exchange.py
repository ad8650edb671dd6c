"""
Unit tests of :class:`rexecpf.proxy.exchange.Exchange` as a state machine:
in memory, on a clock.  An ending in each state releases everything the
exchange holds, once; any later ending does nothing.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from rexecpf.model import CloseReason
from rexecpf.proxy import ProxyResource
from rexecpf.proxy.exchange import Exchange, State, Upgrade
from rexecpf.web import RexecSite
from tests.test_proxy import channel_for, connect_container, make_proxy

#: a request whose body (10 bytes, 5 sent) is still on its way
POST_HALF = (b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n", b"hello")
UPGRADE = (b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: example\r\n", b"")


class ExchangeStateTests(SynchronousTestCase):
    """The states of one proxied request, and its one way out."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.service, self.forwards, self.forward = make_proxy(self.reactor, timeout=30.0)
        self.root = Resource()
        self.root.putChild(b"p", ProxyResource(self.service))
        #: exchanges as they are tracked, and how often each was untracked
        self.exchanges: list[Exchange] = []
        self.untracked: dict[int, int] = {}
        self.relays_ended: list[Any] = []
        track = self.forwards.track

        def tracking(forward_id: str, connection: Any, **kwargs: Any) -> Any:
            self.exchanges.append(connection)
            untrack = track(forward_id, connection, **kwargs)

            def counted() -> None:
                self.untracked[id(connection)] = self.untracked.get(id(connection), 0) + 1
                untrack()

            return counted

        relay_ended = self.forwards.relay_ended

        def ended(*args: Any) -> None:
            self.relays_ended.append(args)
            relay_ended(*args)

        self.patch(self.forwards, "track", tracking)
        self.patch(self.forwards, "relay_ended", ended)

    def send(self, head: bytes = b"GET /x HTTP/1.1\r\nHost: h\r\n", body: bytes = b"") -> tuple[Exchange, StringTransport]:
        """Send one request; :return: its exchange and the client's transport."""
        method, _, rest = head.partition(b" /")
        channel, client = channel_for(RexecSite(self.root, proxy_body_bytes=1_000_000))
        channel.dataReceived(
            method + b" /p/" + self.forward.id.encode() + b"/" + rest.rstrip(b"\r\n")
            + b"\r\nAuthorization: Bearer alice-token\r\n\r\n" + body
        )
        return self.exchanges[-1], client

    def in_state(self, state: State) -> tuple[Exchange, StringTransport, StringTransport | None]:
        """
        :return: an exchange brought to ``state``, the client's transport and
            the container connection's (``None`` while connecting).
        """
        head, body = UPGRADE if state is State.UPGRADED else POST_HALF
        exchange, client = self.send(head, body)
        if state is State.CONNECTING:
            return exchange, client, None
        protocol, container = connect_container(self.reactor)
        if state is State.STREAMING_BODY:
            protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        elif state is State.UPGRADED:
            protocol.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: example\r\nConnection: upgrade\r\n\r\n")
        self.assertIs(exchange.state, state)
        return exchange, client, container

    def assertReleased(self, exchange: Exchange, container: StringTransport | None, client_gone: bool = False) -> None:
        """
        Everything ``exchange`` held is let go, and it was untracked once
        (the producer of a request whose client went away stays: there is
        no channel left to unregister it from).
        """
        self.assertIs(exchange.state, State.DONE)
        self.assertIsNone(exchange.timer)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertIsNone(exchange.pending)
        self.assertIsNone(exchange.sending)
        self.assertIsNone(exchange.connection)
        if not client_gone:
            self.assertIsNone(exchange.request.producer)
        if container is not None:
            self.assertTrue(container.disconnecting)
            self.assertIsNone(container.producer)
        self.assertEqual(self.untracked[id(exchange)], 1)
        self.assertEqual(self.forwards.live_count(), 0)

    def test_states(self) -> None:
        """A request goes from connecting, to awaiting the head, to streaming the body, to done."""
        exchange, client = self.send(*POST_HALF)
        self.assertIs(exchange.state, State.CONNECTING)
        protocol, container = connect_container(self.reactor)
        self.assertIs(exchange.state, State.AWAITING_HEAD)
        exchange.request.channel.dataReceived(b"world")
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        self.assertIs(exchange.state, State.STREAMING_BODY)
        self.assertIs(exchange.request.producer, container)
        protocol.dataReceived(b"cd")
        self.assertTrue(client.value().endswith(b"abcd"))
        self.assertReleasedToPool(exchange)

    def assertReleasedToPool(self, exchange: Exchange) -> None:
        self.assertIs(exchange.state, State.DONE)
        self.assertIsNone(exchange.connection)
        self.assertIsNone(exchange.request.producer)
        self.assertEqual(self.service.pool.idle_count(), 1)
        self.assertEqual(self.untracked[id(exchange)], 1)

    def test_shutdown_in_each_state(self) -> None:
        """
        Shut down in each state, the exchange lets go of everything once: a
        503 before the head, a cut connection after it, an aborted relay
        once upgraded.
        """
        answers = {
            State.CONNECTING: b"HTTP/1.1 503 ",
            State.AWAITING_HEAD: b"HTTP/1.1 503 ",
            State.STREAMING_BODY: b"HTTP/1.1 200 ",
            State.UPGRADED: b"HTTP/1.1 101 ",
        }
        for state, answer in answers.items():
            with self.subTest(state=state):
                exchange, client, container = self.in_state(state)
                exchange.shutdown(CloseReason.GOING_AWAY)
                self.assertReleased(exchange, container)
                self.assertTrue(client.value().startswith(answer))
                if state in (State.STREAMING_BODY, State.UPGRADED):
                    self.assertTrue(client.disconnecting)
                self.assertEqual(len(self.relays_ended), 1 if state is State.UPGRADED else 0)
                self.relays_ended.clear()

    def test_client_gone_in_each_state(self) -> None:
        """A client that goes away in each state before the upgrade releases everything once."""
        for state in (State.CONNECTING, State.AWAITING_HEAD, State.STREAMING_BODY):
            with self.subTest(state=state):
                exchange, client, container = self.in_state(state)
                exchange.request.channel.connectionLost(Failure(ConnectionLost()))
                self.assertReleased(exchange, container, client_gone=True)

    def test_timeout_in_each_state(self) -> None:
        """The response-header timer ends the exchange with a 504 until the head came, and only then."""
        for state in (State.CONNECTING, State.AWAITING_HEAD):
            with self.subTest(state=state):
                exchange, client, container = self.in_state(state)
                if state is State.AWAITING_HEAD:
                    # The body is paused by nobody: it flows, so the timer is held.
                    self.assertIsNone(exchange.timer)
                    exchange.request.channel.dataReceived(b"world")
                self.reactor.advance(30)
                self.assertReleased(exchange, container)
                self.assertTrue(client.value().startswith(b"HTTP/1.1 504 "))

    def test_second_ending_does_nothing(self) -> None:
        """Once done, any other ending changes nothing: no second answer, no second untrack."""
        for state in (State.AWAITING_HEAD, State.STREAMING_BODY, State.UPGRADED):
            with self.subTest(state=state):
                exchange, client, container = self.in_state(state)
                exchange.shutdown(CloseReason.DELETED)
                written = client.value()
                exchange.shutdown(CloseReason.GOING_AWAY)
                exchange.bad_framing("late")
                exchange.body_lost(Failure(ConnectionDone()))
                exchange._time_out()
                exchange._client_done(Failure(ConnectionLost()))
                self.assertEqual(client.value(), written)
                self.assertReleased(exchange, container)
                self.assertEqual(len(self.relays_ended), 1 if state is State.UPGRADED else 0)
                self.relays_ended.clear()
                self.assertEqual(self.successResultOf(exchange.drain()), None)

    def test_upgrade_relay_holds_the_connections(self) -> None:
        """After a 101 the relay holds both connections: its end ends the exchange, reported once."""
        exchange, client, container = self.in_state(State.UPGRADED)
        assert isinstance(exchange, Upgrade) and exchange.relay is not None
        self.assertIsNone(exchange.connection)
        self.assertIsNone(exchange.timer)
        exchange.relay.abort()
        self.assertReleased(exchange, container)
        self.assertEqual(len(self.relays_ended), 1)

    def test_drain_waits_for_the_answer(self) -> None:
        """A graceful stop waits for the whole answer, which then closes the client connection."""
        exchange, client, container = self.in_state(State.STREAMING_BODY)
        drained = exchange.drain()
        self.assertNoResult(drained)
        assert exchange.connection is not None
        exchange.connection.dataReceived(b"cd")
        self.successResultOf(drained)
        self.assertIs(exchange.state, State.DONE)
        self.assertTrue(client.value().endswith(b"abcd"))
