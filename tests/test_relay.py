"""
Unit tests for L{rexecpf.relay}: in memory, on a L{Clock}.
"""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import CancelledError, TimeoutError
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import (
    ConnectingCancelledError,
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
)
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from rexecpf.ends import TRANSPORT_BUFFER, IRelayEnd, TakenOverEnd, TCPEnd, TransportEnd, widen_transport
from rexecpf.relay import BURST_SECONDS, Relay, RelayStats, splice_to_endpoint


class HalfCloseTransport(StringTransport):
    """
    A L{StringTransport} that can shut down its writing side.
    """

    write_closed = False

    def loseWriteConnection(self) -> None:
        """
        Record the half-close.
        """
        self.write_closed = True


class FakeWebSocketEnd:
    """
    An end shaped like the tunnel's WebSocket end: a raw transport as producer
    and consumer, close codes recorded.
    """

    def __init__(self) -> None:
        """
        A connected end whose raw transport is paused (as during the handshake).
        """
        self.transport: Any = StringTransport()
        self.transport.pauseProducing()
        self.closes: list[tuple[int, str]] = []
        self.aborted = False

    @property
    def producer(self) -> StringTransport:
        """
        :return: the raw transport.
        """
        return self.transport

    @property
    def consumer(self) -> StringTransport:
        """
        :return: the raw transport.
        """
        return self.transport

    def write(self, data: bytes) -> None:
        """
        :param data: sent as a binary message (here: written raw).
        """
        self.transport.write(data)

    def close(self, code: int, reason: str) -> None:
        """
        :param code: recorded.
        :param reason: recorded.
        """
        self.closes.append((code, reason))

    def abort(self) -> None:
        """
        Record the abort.
        """
        self.aborted = True


def connected_end(transport: StringTransport | None = None) -> TCPEnd:
    """
    :param transport: the transport to use; a new L{StringTransport} by default.
    :return: a L{TCPEnd} connected to C{transport}.
    """
    end = TCPEnd()
    end.makeConnection(transport if transport is not None else StringTransport())
    return end


class RelayFixture:
    """
    Two connected L{TCPEnd}s joined by a started L{Relay} on a L{Clock}.
    """

    def __init__(self, start: bool = True, **kwargs: Any) -> None:
        """
        :param start: whether to start the relay.
        :param kwargs: passed to L{Relay}.
        """
        self.clock = Clock()
        self.ended: list[RelayStats] = []
        self.a = kwargs.pop("a", None) or connected_end()
        self.b = kwargs.pop("b", None) or connected_end()
        self.relay = Relay(self.clock, self.a, self.b, self.ended.append, **kwargs)
        for end in (self.a, self.b):
            if isinstance(end, TCPEnd):
                end.attach(self.relay)
        if start:
            self.relay.start()

    @property
    def ta(self) -> Any:
        """
        :return: the transport of end C{a}.
        """
        return self.a.transport

    @property
    def tb(self) -> Any:
        """
        :return: the transport of end C{b}.
        """
        return self.b.transport


class InterfaceTests(SynchronousTestCase):
    """
    The ends and the pauser provide the interfaces they claim.
    """

    def test_tcp_end_provides_relay_end(self) -> None:
        """
        A connected L{TCPEnd} provides L{IRelayEnd}, its transport being both
        producer and consumer.
        """
        end = connected_end()
        self.assertTrue(verifyObject(IRelayEnd, end))
        self.assertIs(end.producer, end.transport)
        self.assertIs(end.consumer, end.transport)

    def test_taken_over_end_provides_relay_end(self) -> None:
        """
        A L{TakenOverEnd} (a connection another protocol still owns) provides
        L{IRelayEnd} too, its transport being both producer and consumer.
        """
        transport = StringTransport()
        end = TakenOverEnd(transport)
        self.assertTrue(verifyObject(IRelayEnd, end))
        self.assertIs(end.producer, transport)
        self.assertIs(end.consumer, transport)

    def test_websocket_end_is_a_transport_end(self) -> None:
        """
        The WebSocket end shares a L{TransportEnd}'s producer, consumer and
        abort: one implementation for the family.
        """
        from rexecpf.wsend import WebSocketEndMixin

        self.assertTrue(issubclass(WebSocketEndMixin, TransportEnd))
        self.assertTrue(IRelayEnd.implementedBy(WebSocketEndMixin))
        for name in ("producer", "consumer", "abort"):
            self.assertNotIn(name, vars(WebSocketEndMixin))

    def test_pauser_is_push_producer(self) -> None:
        """
        What the relay registers on each transport is an L{IPushProducer}.
        """
        f = RelayFixture()
        self.assertTrue(verifyObject(IPushProducer, f.ta.producer))
        self.assertTrue(f.ta.streaming)
        self.assertTrue(f.tb.streaming)


class FlowControlTests(SynchronousTestCase):
    """
    Producers are registered crosswise and pause the reading side.
    """

    def test_paused_until_start(self) -> None:
        """
        A L{TCPEnd} pauses its transport on connect; L{Relay.start} registers the
        producers and resumes reading on both ends.
        """
        f = RelayFixture(start=False)
        self.assertEqual(f.ta.producerState, "paused")
        self.assertEqual(f.tb.producerState, "paused")
        self.assertIsNone(f.ta.producer)
        f.relay.start()
        self.assertEqual(f.ta.producerState, "producing")
        self.assertEqual(f.tb.producerState, "producing")
        self.assertIsNotNone(f.ta.producer)
        self.assertIsNotNone(f.tb.producer)

    def test_consumer_a_full_pauses_b(self) -> None:
        """
        When C{a}'s transport is full it pauses its producer, which pauses
        reading from C{b}; resuming resumes C{b}, and C{a} keeps reading.
        """
        f = RelayFixture()
        f.ta.producer.pauseProducing()
        self.assertEqual(f.tb.producerState, "paused")
        self.assertEqual(f.ta.producerState, "producing")
        f.ta.producer.resumeProducing()
        self.assertEqual(f.tb.producerState, "producing")

    def test_consumer_b_full_pauses_a(self) -> None:
        """
        When C{b}'s transport is full, reading from C{a} pauses, and resumes.
        """
        f = RelayFixture()
        f.tb.producer.pauseProducing()
        self.assertEqual(f.ta.producerState, "paused")
        self.assertEqual(f.tb.producerState, "producing")
        f.tb.producer.resumeProducing()
        self.assertEqual(f.ta.producerState, "producing")

    def test_websocket_shaped_end(self) -> None:
        """
        An end that is not a protocol (the tunnel's WebSocket end) gets the
        same crosswise registration through its raw transport.
        """
        ws = FakeWebSocketEnd()
        f = RelayFixture(a=ws)
        self.assertEqual(ws.transport.producerState, "producing")
        ws.transport.producer.pauseProducing()
        self.assertEqual(f.tb.producerState, "paused")
        f.tb.producer.pauseProducing()
        self.assertEqual(ws.transport.producerState, "paused")

    def test_data_written_through(self) -> None:
        """
        Bytes received on either end are written to the other at once and
        counted.
        """
        f = RelayFixture()
        f.a.dataReceived(b"hello")
        f.b.dataReceived(b"world!")
        self.assertEqual(f.tb.value(), b"hello")
        self.assertEqual(f.ta.value(), b"world!")
        self.assertEqual(f.relay.bytes_a_to_b, 5)
        self.assertEqual(f.relay.bytes_b_to_a, 6)

    def test_pause_set_throttle_and_consumer(self) -> None:
        """
        With both the throttle and a full consumer pausing C{a}, C{a} resumes
        only once both reasons are gone, whichever clears first.
        """
        f = RelayFixture(rate_a_to_b=1000, burst=1000)
        f.tb.producer.pauseProducing()  # b's buffer is full
        f.a.dataReceived(b"x" * 3000)  # 3 s of debt (the bucket starts empty)
        self.assertEqual(f.ta.producerState, "paused")
        f.tb.producer.resumeProducing()  # buffer drained, throttle holds
        self.assertEqual(f.ta.producerState, "paused")
        f.clock.advance(3)
        self.assertEqual(f.ta.producerState, "producing")

        f.a.dataReceived(b"x" * 2000)  # 2 s of debt again
        f.tb.producer.pauseProducing()
        f.clock.advance(2)  # throttle clears, buffer still full
        self.assertEqual(f.ta.producerState, "paused")
        f.tb.producer.resumeProducing()
        self.assertEqual(f.ta.producerState, "producing")

    def test_received_after_pause_still_written(self) -> None:
        """
        Data the transport delivers after being paused is written, never held.
        """
        f = RelayFixture()
        f.tb.producer.pauseProducing()
        f.a.dataReceived(b"late")
        self.assertEqual(f.tb.value(), b"late")


class ThrottleTests(SynchronousTestCase):
    """
    The token bucket pauses the reading side for exactly as long as needed.
    """

    def test_pause_and_resume_time(self) -> None:
        """
        At 1000 B/s, 5000 bytes pause the sender for exactly 5 seconds (the
        bucket starts empty); all bytes are written at once.
        """
        f = RelayFixture(rate_a_to_b=1000, burst=1000)
        f.a.dataReceived(b"x" * 5000)
        self.assertEqual(len(f.tb.value()), 5000)
        self.assertEqual(f.ta.producerState, "paused")
        f.clock.advance(4.999)
        self.assertEqual(f.ta.producerState, "paused")
        f.clock.advance(0.001)
        self.assertEqual(f.ta.producerState, "producing")
        self.assertAlmostEqual(f.relay.stats().throttled_a_to_b, 5.0)

    def test_other_direction_unthrottled(self) -> None:
        """
        A limit on one direction does not pause the other.
        """
        f = RelayFixture(rate_a_to_b=1000, burst=1000)
        f.b.dataReceived(b"y" * 100000)
        self.assertEqual(f.tb.producerState, "producing")
        self.assertEqual(f.ta.producerState, "producing")

    def test_default_burst(self) -> None:
        """
        The bucket starts empty and holds L{BURST_SECONDS} of the rate: a
        first read passes and pauses the source for its cost; after a long
        quiet spell only a bucket's worth passes without a pause.
        """
        f = RelayFixture(rate_b_to_a=1000)
        f.b.dataReceived(b"y" * 500)
        self.assertEqual(f.tb.producerState, "paused")
        f.clock.advance(0.49)
        self.assertEqual(f.tb.producerState, "paused")
        f.clock.advance(0.02)
        self.assertEqual(f.tb.producerState, "producing")
        f.clock.advance(60)
        f.b.dataReceived(b"y" * int(1000 * BURST_SECONDS))
        self.assertEqual(f.tb.producerState, "producing")
        f.b.dataReceived(b"y")
        self.assertEqual(f.tb.producerState, "paused")

    def test_throughput(self) -> None:
        """
        A sender that writes 500-byte chunks whenever it is not paused, for 60
        simulated seconds at 1000 B/s, gets 60 seconds' worth plus at most
        one chunk (the bucket starts empty).
        """
        f = RelayFixture(rate_a_to_b=1000, burst=1000)
        for _ in range(6000):  # 10 ms steps
            if f.ta.producerState == "producing":
                f.a.dataReceived(b"z" * 500)
            f.clock.advance(0.01)
        sent = f.relay.bytes_a_to_b
        self.assertGreaterEqual(sent, 59500)
        self.assertLessEqual(sent, 60000 + 500)
        self.assertEqual(len(f.tb.value()), sent)

    def test_more_data_while_throttled_extends_pause(self) -> None:
        """
        Data that arrives while already throttled (several messages in one
        read) extends the pause to cover the whole debt.
        """
        f = RelayFixture(rate_a_to_b=1000, burst=1000)
        f.a.dataReceived(b"x" * 2000)  # 2 s
        f.a.dataReceived(b"x" * 1000)  # 3 s
        f.clock.advance(2.5)
        self.assertEqual(f.ta.producerState, "paused")
        f.clock.advance(0.5)
        self.assertEqual(f.ta.producerState, "producing")

    def test_unlimited(self) -> None:
        """
        A rate of 0 or C{None} never pauses.
        """
        f = RelayFixture(rate_a_to_b=0, rate_b_to_a=None)
        f.a.dataReceived(b"x" * 10_000_000)
        f.b.dataReceived(b"x" * 10_000_000)
        self.assertEqual(f.ta.producerState, "producing")
        self.assertEqual(f.tb.producerState, "producing")
        self.assertEqual(f.clock.getDelayedCalls(), [])


class IdleTests(SynchronousTestCase):
    """
    The idle timer closes a quiet relay with 1000 "idle timeout".
    """

    def test_fires(self) -> None:
        """
        With no traffic for C{idle_seconds}, both ends are closed orderly with
        code 1000 and reason "idle timeout".
        """
        ws = FakeWebSocketEnd()
        f = RelayFixture(a=ws, idle_seconds=10)
        f.clock.advance(9.9)
        self.assertEqual(ws.closes, [])
        f.clock.advance(0.1)
        self.assertEqual(ws.closes, [(1000, "idle timeout")])
        self.assertTrue(f.tb.disconnecting)
        self.assertEqual(f.relay.close_code, 1000)
        self.assertEqual(f.relay.close_reason, "idle timeout")

    def test_reset_by_data(self) -> None:
        """
        Data either way restarts the idle period.
        """
        ws = FakeWebSocketEnd()
        f = RelayFixture(a=ws, idle_seconds=10)
        f.clock.advance(6)
        f.b.dataReceived(b"x")
        f.clock.advance(6)
        f.relay.received(ws, b"y")
        f.clock.advance(9)
        self.assertEqual(ws.closes, [])
        f.clock.advance(1)
        self.assertEqual(ws.closes, [(1000, "idle timeout")])

    def test_reset_by_activity(self) -> None:
        """
        L{Relay.activity} (a ping or pong) restarts the idle period.
        """
        ws = FakeWebSocketEnd()
        f = RelayFixture(a=ws, idle_seconds=10)
        for _ in range(5):
            f.clock.advance(8)
            f.relay.activity()
        self.assertEqual(ws.closes, [])
        f.clock.advance(10)
        self.assertEqual(ws.closes, [(1000, "idle timeout")])

    def test_never(self) -> None:
        """
        Without C{idle_seconds} no timer is armed.
        """
        f = RelayFixture()
        self.assertEqual(f.clock.getDelayedCalls(), [])


class CloseTests(SynchronousTestCase):
    """
    Closing is orderly, C{on_end} is called once with the right figures.
    """

    def test_peer_closed_delivers(self) -> None:
        """
        When C{b} closes cleanly after sending, everything it sent is written
        to C{a} and C{a} is closed with loseConnection (not aborted), with code
        1000 "peer closed".
        """
        ws = FakeWebSocketEnd()
        f = RelayFixture(a=ws)
        f.b.dataReceived(b"last words")
        f.b.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(ws.transport.value(), b"last words")
        self.assertEqual(ws.closes, [(1000, "peer closed")])
        self.assertFalse(ws.aborted)
        self.assertEqual(f.ended, [])
        f.relay.lost(ws, clean=True)
        self.assertEqual(len(f.ended), 1)
        stats = f.ended[0]
        self.assertEqual(stats.bytes_b_to_a, 10)
        self.assertEqual((stats.close_code, stats.close_reason), (1000, "peer closed"))

    def test_tcp_peer_closed(self) -> None:
        """
        TCP to TCP: a clean close of one side loses the other connection
        gracefully (C{disconnecting}, not C{disconnected}).
        """
        f = RelayFixture()
        f.a.dataReceived(b"abc")
        f.a.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(f.tb.value(), b"abc")
        self.assertTrue(f.tb.disconnecting)
        self.assertFalse(f.tb.disconnected)

    def test_unclean_loss(self) -> None:
        """
        An end lost uncleanly closes the other orderly with 1011.
        """
        ws = FakeWebSocketEnd()
        f = RelayFixture(a=ws)
        f.b.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(ws.closes, [(1011, "peer connection lost")])

    def test_unregisters_producers(self) -> None:
        """
        Once an end is lost the producer registered on the surviving transport
        is removed, so it can close once its buffer drains.
        """
        f = RelayFixture()
        f.b.connectionLost(Failure(ConnectionDone()))
        self.assertIsNone(f.ta.producer)

    def test_close_resumes_paused_end(self) -> None:
        """
        Closing releases every pause, so a closing handshake can be read.
        """
        ws = FakeWebSocketEnd()
        f = RelayFixture(a=ws, rate_a_to_b=1000, burst=1000)
        f.relay.received(ws, b"x" * 5000)
        self.assertEqual(ws.transport.producerState, "paused")
        f.relay.close(1001, "forward deleted")
        self.assertEqual(ws.transport.producerState, "producing")
        self.assertEqual(ws.closes, [(1001, "forward deleted")])
        self.assertTrue(f.tb.disconnecting)
        self.assertEqual(f.clock.getDelayedCalls()[0].getTime(), 60.0)

    def test_data_after_close_dropped(self) -> None:
        """
        Data arriving after the close started is not written.
        """
        ws = FakeWebSocketEnd()
        f = RelayFixture(a=ws)
        f.relay.close(1001, "going away")
        f.relay.received(ws, b"too late")
        self.assertEqual(f.tb.value(), b"")
        self.assertEqual(f.relay.bytes_a_to_b, 0)

    def test_on_end_once(self) -> None:
        """
        C{on_end} is called exactly once, when both ends are gone, with the
        byte counts, duration and close code.
        """
        f = RelayFixture()
        f.clock.advance(5)
        f.a.dataReceived(b"12345")
        f.b.dataReceived(b"123")
        f.clock.advance(2)
        f.relay.close(1001, "forward deleted")
        f.relay.close(1000, "idle timeout")
        self.assertEqual(f.ended, [])
        f.a.connectionLost(Failure(ConnectionDone()))
        f.b.connectionLost(Failure(ConnectionDone()))
        f.a.connectionLost(Failure(ConnectionDone()))
        f.relay.abort()
        self.assertEqual(
            f.ended,
            [
                RelayStats(
                    bytes_a_to_b=5,
                    bytes_b_to_a=3,
                    duration=7.0,
                    close_code=1001,
                    close_reason="forward deleted",
                )
            ],
        )
        self.assertEqual(f.clock.getDelayedCalls(), [])

    def test_close_timeout_aborts(self) -> None:
        """
        An end that has not finished closing after C{close_timeout} is aborted
        and C{on_end} is called.
        """
        ws = FakeWebSocketEnd()
        f = RelayFixture(a=ws, close_timeout=5)
        f.relay.close(1001, "going away")
        f.b.connectionLost(Failure(ConnectionDone()))
        f.clock.advance(5)
        self.assertTrue(ws.aborted)
        self.assertEqual(len(f.ended), 1)
        self.assertEqual(f.ended[0].close_code, 1001)

    def test_abort(self) -> None:
        """
        L{Relay.abort} drops both connections and ends at once.
        """
        f = RelayFixture(idle_seconds=5)
        f.relay.abort()
        self.assertTrue(f.ta.disconnected)
        self.assertTrue(f.tb.disconnected)
        self.assertEqual(len(f.ended), 1)
        self.assertEqual(f.ended[0].close_code, 1006)
        self.assertEqual(f.clock.getDelayedCalls(), [])

    def test_stop_producing_without_lost(self) -> None:
        """
        If a transport stops our producer (its connection is gone) but its
        protocol never reports L{Relay.lost}, the relay treats it as lost
        uncleanly on the next turn.
        """
        ws = FakeWebSocketEnd()
        f = RelayFixture(a=ws)
        f.tb.producer.stopProducing()
        self.assertEqual(ws.closes, [])
        f.clock.advance(0)
        self.assertEqual(ws.closes, [(1011, "peer connection lost")])

    def test_stop_producing_then_lost(self) -> None:
        """
        C{stopProducing} followed in the same turn by a clean L{Relay.lost}
        closes with 1000 "peer closed".
        """
        ws = FakeWebSocketEnd()
        f = RelayFixture(a=ws)
        f.tb.producer.stopProducing()
        f.b.connectionLost(Failure(ConnectionDone()))
        f.clock.advance(0)
        self.assertEqual(ws.closes, [(1000, "peer closed")])

    def test_on_end_error_logged(self) -> None:
        """
        An exception from C{on_end} is logged, not raised into the transport.
        """

        def boom(stats: RelayStats) -> None:
            raise ZeroDivisionError()

        a, b = connected_end(), connected_end()
        relay = Relay(Clock(), a, b, boom)
        a.attach(relay)
        b.attach(relay)
        relay.start()
        relay.abort()
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_unknown_end(self) -> None:
        """
        Reporting data for an object that is not an end is a programming
        error.
        """
        f = RelayFixture()
        self.assertRaises(ValueError, f.relay.received, connected_end(), b"x")


class HalfCloseTests(SynchronousTestCase):
    """
    A TCP end of file is passed on as a half-close when the other end can.
    """

    def test_half_close_passed_on(self) -> None:
        """
        When C{a}'s peer shuts down its writing side, C{b}'s writing side is
        shut down; data still flows from C{b} to C{a}; when C{b}'s peer shuts
        down too, C{a} half-closes and each side closes itself.
        """
        f = RelayFixture(
            a=connected_end(HalfCloseTransport()), b=connected_end(HalfCloseTransport())
        )
        f.a.dataReceived(b"request")
        f.a.readConnectionLost()
        self.assertTrue(f.tb.write_closed)
        self.assertFalse(f.relay.closing)
        f.b.dataReceived(b"response")
        self.assertEqual(f.ta.value(), b"response")
        f.b.writeConnectionLost()
        f.b.readConnectionLost()
        self.assertTrue(f.ta.write_closed)
        self.assertTrue(f.tb.disconnecting)
        f.a.writeConnectionLost()
        self.assertTrue(f.ta.disconnecting)
        f.a.connectionLost(Failure(ConnectionDone()))
        f.b.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(f.ended), 1)
        self.assertEqual(f.ended[0].close_code, 1000)
        self.assertEqual(f.ended[0].bytes_a_to_b, 7)
        self.assertEqual(f.ended[0].bytes_b_to_a, 8)

    def test_taken_over_end_does_not_half_close(self) -> None:
        """
        A L{TakenOverEnd} never half-closes, even on a transport that could:
        the protocol that owns its transport would not report it.  An end
        of file on the other side closes both orderly instead.
        """
        client = HalfCloseTransport()
        f = RelayFixture(a=TakenOverEnd(client))
        f.b.dataReceived(b"bye")
        f.b.readConnectionLost()
        self.assertEqual(client.value(), b"bye")
        self.assertFalse(client.write_closed)
        self.assertTrue(client.disconnecting)
        self.assertTrue(f.tb.disconnecting)
        self.assertEqual(f.relay.close_code, 1000)

    def test_half_close_unsupported(self) -> None:
        """
        When the other end cannot half-close (a WebSocket end), an end of file
        closes both ends orderly with 1000 "peer closed".
        """
        ws = FakeWebSocketEnd()
        f = RelayFixture(a=ws)
        f.b.dataReceived(b"bye")
        f.b.readConnectionLost()
        self.assertEqual(ws.transport.value(), b"bye")
        self.assertEqual(ws.closes, [(1000, "peer closed")])
        self.assertTrue(f.tb.disconnecting)


class AttachTests(SynchronousTestCase):
    """
    A L{TCPEnd} loses nothing that happens before it is attached.
    """

    def test_data_before_attach(self) -> None:
        """
        Bytes received before attach are written to the other end on attach.
        """
        a = connected_end()
        a.dataReceived(b"early ")
        a.dataReceived(b"bytes")
        f = RelayFixture(a=a)
        self.assertEqual(f.tb.value(), b"early bytes")
        self.assertEqual(f.relay.bytes_a_to_b, 11)

    def test_lost_before_attach(self) -> None:
        """
        A connection lost before attach closes the other end on attach.
        """
        a = connected_end()
        a.dataReceived(b"hi")
        a.connectionLost(Failure(ConnectionDone()))
        f = RelayFixture(a=a)
        self.assertEqual(f.tb.value(), b"hi")
        self.assertTrue(f.tb.disconnecting)

    def test_excess_before_attach_aborts(self) -> None:
        """
        A transport that ignores pausing and floods before attach is aborted.
        """
        a = connected_end()
        a.max_pending = 10
        a.dataReceived(b"x" * 11)
        self.assertTrue(cast(Any, a.transport).disconnected)


class SpliceTests(SynchronousTestCase):
    """
    L{splice_to_endpoint} joins an accepted connection to a new one.
    """

    def setUp(self) -> None:
        """
        An accepted end and an endpoint on a memory reactor.
        """
        self.reactor = MemoryReactorClock()
        self.endpoint = TCP4ClientEndpoint(self.reactor, "127.0.0.1", 8080)
        self.accepted = connected_end()
        self.accepted_transport: Any = self.accepted.transport
        self.ended: list[RelayStats] = []

    def test_connect(self) -> None:
        """
        Once connected, a started relay joins both sides: early bytes from the
        accepted side reach the backend, both are reading, producers crossed.
        """
        d = splice_to_endpoint(
            self.reactor,
            self.endpoint,
            self.accepted,
            on_end=self.ended.append,
            rate_a_to_b=1000,
        )
        self.accepted.dataReceived(b"early")
        self.assertNoResult(d)
        host, port, factory, _timeout, _bind = self.reactor.tcpClients[0]
        self.assertEqual((host, port), ("127.0.0.1", 8080))
        backend_transport: Any = StringTransport()
        cast(Any, factory).buildProtocol(None).makeConnection(backend_transport)
        relay = self.successResultOf(d)
        self.assertIs(relay.a, self.accepted)
        self.assertEqual(backend_transport.value(), b"early")
        self.assertEqual(backend_transport.producerState, "producing")
        self.reactor.advance(0.005)  # 5 bytes at 1000 B/s
        self.assertEqual(self.accepted_transport.producerState, "producing")
        backend_transport.producer.pauseProducing()
        self.assertEqual(self.accepted_transport.producerState, "paused")

    def test_connect_failed(self) -> None:
        """
        A refused connection closes the accepted side and fails the Deferred.
        """
        d = splice_to_endpoint(
            self.reactor, self.endpoint, self.accepted, on_end=self.ended.append
        )
        factory: Any = self.reactor.tcpClients[0][2]
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        self.failureResultOf(d, ConnectionRefusedError)
        self.assertTrue(self.accepted_transport.disconnecting)

    def test_connect_timeout(self) -> None:
        """
        A connection not made within C{connect_timeout} fails with
        C{TimeoutError} and closes the accepted side.
        """
        d = splice_to_endpoint(
            self.reactor,
            self.endpoint,
            self.accepted,
            connect_timeout=5,
            on_end=self.ended.append,
        )
        self.reactor.advance(5)
        self.failureResultOf(d, TimeoutError)
        self.assertTrue(self.accepted_transport.disconnecting)

    def test_accepted_lost_cancels(self) -> None:
        """
        If the accepted side goes away while connecting, the attempt is
        cancelled.
        """
        d = splice_to_endpoint(
            self.reactor, self.endpoint, self.accepted, on_end=self.ended.append
        )
        self.accepted.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(d, CancelledError, ConnectingCancelledError)


class WidenTransportTests(SynchronousTestCase):
    """
    L{widen_transport} and L{TCPEnd}: socket transports read and send in
    larger pieces; other transports are left alone.
    """

    def test_socket_transport(self) -> None:
        """
        A socket transport (a L{FileDescriptor}) gets L{TRANSPORT_BUFFER} as
        its read size and write-buffer bound and twice that as its send
        limit; the class defaults stay as they are.
        """
        transport = FileDescriptor(reactor=MemoryReactorClock())
        widen_transport(transport)
        self.assertEqual(transport.bufferSize, TRANSPORT_BUFFER)
        self.assertEqual(transport.SEND_LIMIT, 2 * TRANSPORT_BUFFER)
        self.assertEqual(FileDescriptor.bufferSize, 64 * 1024)
        self.assertEqual(FileDescriptor.SEND_LIMIT, 128 * 1024)

    def test_send_limit_only(self) -> None:
        """
        With C{reads=False} (a WebSocket end: Autobahn parses small reads
        faster) only the send limit is raised.
        """
        transport = FileDescriptor(reactor=MemoryReactorClock())
        widen_transport(transport, reads=False)
        self.assertEqual(transport.bufferSize, 64 * 1024)
        self.assertEqual(transport.SEND_LIMIT, 2 * TRANSPORT_BUFFER)

    def test_never_lowers(self) -> None:
        """A transport already wider keeps its sizes."""
        transport = FileDescriptor(reactor=MemoryReactorClock())
        transport.bufferSize = transport.SEND_LIMIT = 8 * TRANSPORT_BUFFER
        widen_transport(transport)
        self.assertEqual(transport.bufferSize, 8 * TRANSPORT_BUFFER)
        self.assertEqual(transport.SEND_LIMIT, 8 * TRANSPORT_BUFFER)

    def test_other_transport(self) -> None:
        """A transport without these attributes (TLS, a test double) is left alone."""
        transport = StringTransport()
        widen_transport(transport)
        self.assertFalse(hasattr(transport, "bufferSize"))
        self.assertFalse(hasattr(transport, "SEND_LIMIT"))

    def test_tcp_end_widens_its_transport(self) -> None:
        """A L{TCPEnd} widens its transport when connected."""
        transport = FileDescriptor(reactor=MemoryReactorClock())
        TCPEnd().makeConnection(transport)
        self.assertEqual(transport.bufferSize, TRANSPORT_BUFFER)
