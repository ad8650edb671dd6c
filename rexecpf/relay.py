# -*- test-case-name: tests.test_relay -*-
"""
The one splice of rexecpf: join two byte streams both ways.

A L{Relay} joins two L{IRelayEnd} objects.  Bytes an end's protocol receives are
handed to L{Relay.received}, which writes them synchronously to the other end;
the relay never queues a byte.  Memory is bounded by flow control instead:

    - each end's raw transport (its C{consumer}) has the other end's reading
      side registered as its streaming producer, through a L{_Pauser};
    - a per-direction token bucket pauses the reading side when the rate is
      exceeded and resumes it, on the injected clock, when the bucket refills;
    - a reading side is paused while I{any} reason holds (buffer full, throttle,
      not started yet) and resumed only when none remains: the pause-set idiom
      of magic-wormhole's C{_dilation/inbound.py};
    - bytes an end receives that carry no data (WebSocket pings, pongs and
      frame headers: L{Relay.overhead}) are charged to the token bucket too,
      and a reply an end owes its own peer (a pong) while that peer's socket
      is full pauses reading that peer until it drains
      (L{Relay.hold_until_drained}) instead of being queued.

An idle timer (also on the injected clock) closes both ends with code 1000
"idle timeout" when no data flows either way and no L{Relay.activity} is
reported for C{idle_seconds}.

Close codes are WebSocket close codes; a TCP end ignores them.  The relay knows
nothing about WebSocket: the tunnel adapts its protocol to L{IRelayEnd}.  The
ends are in L{rexecpf.ends}.

L{splice_to_endpoint} joins an accepted L{TCPEnd} to a freshly connected one
(what C{local_port} listeners use).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast
from typing import Protocol as _TypingProtocol

import attrs
from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.interfaces import (
    IPushProducer,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from rexecpf.ends import RelayEnd, TCPEnd
from rexecpf.model import CloseReason

__all__ = [
    "CONNECT_TIMEOUT",
    "CLOSE_ABORTED",
    "CLOSE_GOING_AWAY",
    "CLOSE_NORMAL",
    "CLOSE_PEER_LOST",
    "BURST_SECONDS",
    "Relay",
    "RelayStats",
    "splice_to_endpoint",
]

#: Seconds to wait for a container port to accept a connection, for every
#: kind of connection (tunnel, local_port, proxy): then it counts as not
#: answering (502 for the tunnel and the proxy).
CONNECT_TIMEOUT = 10.0

#: Normal closure: peer closed, idle timeout.
CLOSE_NORMAL = 1000
#: Going away: forward deleted, container stopped, server shutting down.
CLOSE_GOING_AWAY = 1001
#: The other end's connection was lost uncleanly (reset, error).
CLOSE_PEER_LOST = 1011
#: Recorded in L{RelayStats} after L{Relay.abort}; never sent on the wire.
CLOSE_ABORTED = 1006

#: Seconds of the rate a token bucket holds by default.  The bucket starts
#: empty and a read is charged once passed, so over any interval a direction
#: carries at most the rate's worth plus this much plus one read: a small
#: burst (the contract says "at most", not "on average").
BURST_SECONDS = 0.1

#: Reasons a reading side may be paused (members of a L{_Pauser}'s pause set).
_START = "start"
_CONSUMER = "consumer"
_THROTTLE = "throttle"
#: an end owes its peer a reply (a WebSocket pong) that waits for that end's
#: own write buffer to drain: reading the peer waits with it
_REPLY = "reply"


class _DelayedCall(_TypingProtocol):
    def active(self) -> bool: ...

    def cancel(self) -> None: ...

    def reset(self, seconds_from_now: float) -> None: ...


class _Clock(_TypingProtocol):
    """
    The static view of the L{IReactorTime} we use.
    """

    def seconds(self) -> float: ...

    def callLater(
        self, delay: float, f: Callable[..., object], /, *args: Any, **kw: Any
    ) -> _DelayedCall: ...


@attrs.frozen
class RelayStats:
    """
    What one relay did, handed to C{on_end} once both ends are finished.

    :ivar bytes_a_to_b: bytes received from C{a} and written to C{b}.
    :ivar bytes_b_to_a: bytes received from C{b} and written to C{a}.
    :ivar duration: seconds from L{Relay.start} to the end.
    :ivar close_code: the code of the first close (1000 peer closed or idle
        timeout, 1001 going away, 1011 peer lost, 1006 aborted).
    :ivar close_reason: the reason that went with C{close_code}.
    :ivar throttled_a_to_b: seconds C{a} was paused by the throttle.
    :ivar throttled_b_to_a: seconds C{b} was paused by the throttle.
    """

    bytes_a_to_b: int
    bytes_b_to_a: int
    duration: float
    close_code: int | None
    close_reason: str | None
    throttled_a_to_b: float = 0.0
    throttled_b_to_a: float = 0.0


@implementer(IPushProducer)
class _Pauser:
    """
    The producer registered on one end's consumer on behalf of the other end's
    reading side: a pause set in front of that end's real producer.

    The real producer is paused while at least one reason is in the set and
    resumed only when the set becomes empty.
    """

    def __init__(self, relay: Relay, end: RelayEnd) -> None:
        """
        :param relay: the relay told about L{stopProducing}.
        :param end: the end whose C{producer} this pauses.
        """
        self._relay = relay
        self._end = end
        # The owner of the end paused it before the relay starts (TCPEnd on
        # connect, the tunnel during the handshake); start() clears this.
        self.reasons: set[str] = {_START}
        self.detached = False

    @property
    def paused(self) -> bool:
        """
        :return: whether the end's producer is currently held paused by us.
        """
        return bool(self.reasons) and not self.detached

    def add(self, reason: str) -> None:
        """
        Pause the end's producer for C{reason}.

        :param reason: one of the pause reasons.
        """
        if self.detached:
            return
        was_paused = bool(self.reasons)
        self.reasons.add(reason)
        if not was_paused:
            self._end.producer.pauseProducing()

    def discard(self, reason: str) -> None:
        """
        Remove C{reason}; resume the end's producer if no reason remains.

        :param reason: one of the pause reasons.
        """
        if self.detached or reason not in self.reasons:
            return
        self.reasons.discard(reason)
        if not self.reasons:
            self._end.producer.resumeProducing()

    def release(self) -> None:
        """
        Stop managing the producer; if we held it paused, resume it first (so a
        closing handshake can still be read).
        """
        if self.detached:
            return
        was_paused = bool(self.reasons)
        self.reasons.clear()
        self.detached = True
        if was_paused:
            self._end.producer.resumeProducing()

    def detach(self) -> None:
        """
        Stop managing the producer without touching it (its reading side is
        finished already).
        """
        self.detached = True
        self.reasons.clear()

    # IPushProducer, called by the consumer we are registered on.

    def pauseProducing(self) -> None:
        """
        The consumer's write buffer is full.
        """
        self.add(_CONSUMER)

    def resumeProducing(self) -> None:
        """
        The consumer's write buffer has drained.
        """
        self.discard(_CONSUMER)
        self._relay._consumer_drained(self._end)

    def stopProducing(self) -> None:
        """
        The consumer is gone: the relay closes once this turn of the reactor
        has told it (or not) how.
        """
        self.discard(_CONSUMER)
        self._relay._consumer_stopped(self._end)


class _Direction:
    """
    State of one direction of a relay: counters and the token bucket.
    """

    def __init__(
        self,
        clock: _Clock,
        source: RelayEnd,
        sink: RelayEnd,
        pauser: _Pauser,
        rate: float | None,
        burst: int | None,
    ) -> None:
        """
        :param clock: time source and scheduler.
        :param source: the end data is read from.
        :param sink: the end data is written to.
        :param pauser: the pause set of C{source}'s producer.
        :param rate: bytes per second; C{None} or 0 is unlimited.
        :param burst: bucket capacity; default L{BURST_SECONDS} of C{rate}.
        """
        self.clock = clock
        self.source = source
        self.sink = sink
        self.pauser = pauser
        self.rate = float(rate) if rate else None
        self.capacity = float(
            burst if burst is not None else (self.rate or 0.0) * BURST_SECONDS
        )
        self.tokens = 0.0
        self.stamp = clock.seconds()
        self.bytes = 0
        self.throttled = 0.0
        self.throttled_since: float | None = None
        self.resume_call: _DelayedCall | None = None
        self.eof = False

    def charge(self, n: int) -> float:
        """
        Take C{n} tokens from the bucket.

        :param n: bytes just passed.
        :return: seconds until the bucket is back to >= 0 (0 when it is).
        """
        if self.rate is None:
            return 0.0
        now = self.clock.seconds()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= n
        if self.tokens >= 0:
            return 0.0
        return -self.tokens / self.rate

    def throttle(self, delay: float, resume: Callable[[], None]) -> None:
        """
        Pause the source until the bucket refills.

        :param delay: seconds to stay paused.
        :param resume: what to call when they are over.
        """
        if self.resume_call is not None:
            # Already paused; the scheduled resume covers only part of the
            # debt now.
            self.resume_call.reset(delay)
            return
        self.throttled_since = self.clock.seconds()
        self.resume_call = self.clock.callLater(delay, resume)
        self.pauser.add(_THROTTLE)

    def unthrottle(self) -> None:
        """
        The bucket has refilled: count the paused time, drop the throttle
        reason.
        """
        self.resume_call = None
        self._account()
        self.pauser.discard(_THROTTLE)

    def stop(self) -> None:
        """
        Cancel the pending resume (the relay is closing) and count the paused
        time so far.
        """
        if self.resume_call is not None and self.resume_call.active():
            self.resume_call.cancel()
        self.resume_call = None
        self._account()

    def _account(self) -> None:
        if self.throttled_since is not None:
            self.throttled += self.clock.seconds() - self.throttled_since
            self.throttled_since = None


class Relay:
    """
    Join two L{IRelayEnd}s both ways with back-pressure, a throttle and an
    idle timer.

    Life: build, hand it to both ends' protocols, L{start}.  The ends' protocols
    then report L{received}, L{lost} (and optionally L{read_closed},
    L{activity}); the owner may L{close} or L{abort}.  C{on_end} is called
    exactly once, when both ends are finished.

    :ivar a: one end.
    :ivar b: the other end.
    :ivar started_at: C{clock.seconds()} at L{start}, or C{None}.
    """

    _log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        a: RelayEnd,
        b: RelayEnd,
        on_end: Callable[[RelayStats], object],
        rate_a_to_b: float | None = None,
        rate_b_to_a: float | None = None,
        idle_seconds: float | None = None,
        burst: int | None = None,
        close_timeout: float | None = 60.0,
    ) -> None:
        """
        :param clock: time source and scheduler (the reactor, or a C{Clock}).
        :param a: one end.
        :param b: the other end.
        :param on_end: called once with the L{RelayStats} when both ends are
            finished.
        :param rate_a_to_b: bytes/second from C{a} to C{b}; C{None} or 0 is
            unlimited.
        :param rate_b_to_a: bytes/second from C{b} to C{a}.
        :param idle_seconds: close with 1000 "idle timeout" after this long
            without data or activity; C{None} never.
        :param burst: token-bucket capacity in bytes (both directions); by
            default L{BURST_SECONDS} of the rate.  Buckets start empty.
        :param close_timeout: seconds an orderly close may take before the ends
            still open are aborted; C{None} waits forever.
        """
        self.clock = cast(_Clock, clock)
        self.a = a
        self.b = b
        self._on_end = on_end
        self._idle_seconds = idle_seconds or None
        self._close_timeout = close_timeout
        self._pauser_a = _Pauser(self, a)
        self._pauser_b = _Pauser(self, b)
        self._a_to_b = _Direction(self.clock, a, b, self._pauser_a, rate_a_to_b, burst)
        self._b_to_a = _Direction(self.clock, b, a, self._pauser_b, rate_b_to_a, burst)
        self._gone: set[int] = set()  # id() of ends whose connection is gone
        self._registered: set[int] = set()  # id() of consumers holding a pauser
        self._stopped_pending: set[int] = set()
        self._last_activity = self.clock.seconds()
        self._idle_call: _DelayedCall | None = None
        self._close_call: _DelayedCall | None = None
        self.started_at: float | None = None
        self._ended_at: float | None = None
        self.closing = False
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self.finished = False

    # -- counters ---------------------------------------------------------

    @property
    def bytes_a_to_b(self) -> int:
        """
        :return: bytes written from C{a} to C{b} so far.
        """
        return self._a_to_b.bytes

    @property
    def bytes_b_to_a(self) -> int:
        """
        :return: bytes written from C{b} to C{a} so far.
        """
        return self._b_to_a.bytes

    def stats(self) -> RelayStats:
        """
        :return: the statistics so far (final once C{on_end} was called).
        """
        end = self._ended_at if self._ended_at is not None else self.clock.seconds()
        duration = 0.0 if self.started_at is None else max(0.0, end - self.started_at)
        return RelayStats(
            bytes_a_to_b=self._a_to_b.bytes,
            bytes_b_to_a=self._b_to_a.bytes,
            duration=duration,
            close_code=self.close_code,
            close_reason=self.close_reason,
            throttled_a_to_b=self._a_to_b.throttled,
            throttled_b_to_a=self._b_to_a.throttled,
        )

    # -- helpers ------------------------------------------------------------

    def _direction_from(self, end: RelayEnd) -> _Direction:
        if end is self.a:
            return self._a_to_b
        if end is self.b:
            return self._b_to_a
        raise ValueError(f"{end!r} is not an end of this relay")

    def _other(self, end: RelayEnd) -> RelayEnd:
        return self.b if end is self.a else self.a

    def _pauser_of(self, end: RelayEnd) -> _Pauser:
        """:return: the pause set in front of C{end}'s producer."""
        return self._direction_from(end).pauser

    def _record_close(self, code: int, reason: str) -> None:
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason

    def _unregister(self, consumer_end: RelayEnd) -> None:
        """
        Take our pauser off C{consumer_end}'s consumer, if it is still there.
        """
        if id(consumer_end) in self._registered:
            self._registered.discard(id(consumer_end))
            if id(consumer_end) not in self._gone:
                consumer = consumer_end.consumer
                if getattr(consumer, "producer", True) is not None:
                    consumer.unregisterProducer()

    def _is_gone(self, end: RelayEnd) -> bool:
        return id(end) in self._gone

    # -- life -----------------------------------------------------------------

    def start(self) -> None:
        """
        Register the producers crosswise, arm the idle timer and resume
        reading on both ends.  Does nothing once the relay has ended.

        Until now both ends' producers should be paused (L{TCPEnd} pauses
        itself on connect; the tunnel pauses the WebSocket's raw transport
        during the handshake), and neither consumer may have a producer
        registered: the tunnel must first unregister the C{HTTPChannel} that
        C{twisted.web} left on the raw transport.

        :raises RuntimeError: if a consumer already has a producer.
        """
        if self.started_at is not None or self.finished:
            return
        self.started_at = self.clock.seconds()
        self._last_activity = self.started_at
        if self.closing:
            return
        # The producer of a is paused when b's transport buffer is full, and
        # vice versa.
        self._registered.add(id(self.b))
        self.b.consumer.registerProducer(self._pauser_a, True)
        self._registered.add(id(self.a))
        self.a.consumer.registerProducer(self._pauser_b, True)
        if self._idle_seconds is not None:
            self._idle_call = self.clock.callLater(self._idle_seconds, self._idle_check)
        self._log.debug(
            "relay started: rates {ab}/{ba} B/s, idle {idle}s",
            ab=self._a_to_b.rate,
            ba=self._b_to_a.rate,
            idle=self._idle_seconds,
        )
        # Resume last (an end may have been lost while registering).
        if not self.closing:
            self._pauser_a.discard(_START)
            self._pauser_b.discard(_START)

    def received(self, end: RelayEnd, data: bytes) -> None:
        """
        C{end}'s peer sent C{data}: write it to the other end now, count it,
        reset the idle timer and charge the throttle.

        Data arriving once the other end is gone or the relay is closing is
        dropped.

        :param end: the end whose protocol received the bytes.
        :param data: the bytes.
        """
        direction = self._direction_from(end)
        if self.closing or self.finished or self._is_gone(direction.sink):
            self._log.debug("relay closing: dropped {n} bytes", n=len(data))
            return
        if not data:
            return
        self._last_activity = self.clock.seconds()
        direction.bytes += len(data)
        direction.sink.write(data)
        delay = direction.charge(len(data))
        if delay > 0 and not self.closing:
            direction.throttle(delay, direction.unthrottle)

    def activity(self) -> None:
        """
        Something other than data shows the connection is in use (a WebSocket
        ping or pong): reset the idle timer.
        """
        self._last_activity = self.clock.seconds()

    def overhead(self, end: RelayEnd, n: int) -> None:
        """
        C{end}'s peer sent C{n} bytes that carry nothing for the other end (a
        WebSocket ping or pong, a frame header): they count as activity and
        against the rate of C{end}'s direction, though not as data relayed.
        Without this, a peer could send control frames or empty data frames
        without limit.

        :param end: the end whose protocol received the bytes.
        :param n: how many bytes.
        """
        direction = self._direction_from(end)
        if self.closing or self.finished or n <= 0:
            return
        self._last_activity = self.clock.seconds()
        delay = direction.charge(n)
        if delay > 0:
            direction.throttle(delay, direction.unthrottle)

    def write_blocked(self, end: RelayEnd) -> bool:
        """
        :param end: one end.
        :return: whether C{end}'s consumer has asked not to be written to (its
            write buffer is over its bound), so that a reply C{end} owes its
            peer must wait (see L{hold_until_drained}).
        """
        return _CONSUMER in self._pauser_of(self._other(end)).reasons

    def hold_until_drained(self, end: RelayEnd) -> None:
        """
        Stop reading C{end}'s peer until C{end}'s own write buffer has
        drained; then call C{end.drained()}, if it has one, and read again.
        For replies owed to a peer that reads nothing and keeps asking (a
        WebSocket ping flood): rather than queue them, stop taking requests.

        :param end: an end whose consumer is L{write_blocked}.
        """
        self._pauser_of(end).add(_REPLY)

    def _consumer_drained(self, producer_end: RelayEnd) -> None:
        """
        The consumer a pauser is registered on has drained its write buffer:
        the end that consumer belongs to may send what it held back.

        :param producer_end: the end the resumed pauser manages.
        """
        end = self._other(producer_end)
        pauser = self._pauser_of(end)
        if _REPLY not in pauser.reasons:
            return
        drained: Callable[[], object] | None = getattr(end, "drained", None)
        if drained is not None:
            drained()
        pauser.discard(_REPLY)

    def _idle_check(self) -> None:
        self._idle_call = None
        if self.closing or self.finished or self._idle_seconds is None:
            return
        idle_for = self.clock.seconds() - self._last_activity
        remaining = self._idle_seconds - idle_for
        if remaining > 0:
            self._idle_call = self.clock.callLater(remaining, self._idle_check)
            return
        self._log.info("relay idle for {seconds}s: closing", seconds=idle_for)
        self.close(CLOSE_NORMAL, CloseReason.IDLE)

    def read_closed(self, end: RelayEnd) -> None:
        """
        C{end}'s peer has finished sending but may still read (TCP half-close).

        The other end's C{close_write()} is called if it has one and it
        succeeds; otherwise the relay closes both ends orderly (1000 "peer
        closed").

        :param end: the end whose reading side reached end of file.
        """
        direction = self._direction_from(end)
        if self.closing or self.finished or direction.eof:
            return
        direction.eof = True
        direction.stop()
        # Its reading side is over: never pause or resume it again.
        self._unregister(direction.sink)
        direction.pauser.detach()
        close_write: Callable[[], bool] | None = getattr(
            direction.sink, "close_write", None
        )
        if self._is_gone(direction.sink) or close_write is None or not close_write():
            self.close(CLOSE_NORMAL, CloseReason.PEER_CLOSED)
            return
        self._log.debug("relay half-closed")
        other = self._direction_from(direction.sink)
        if other.eof:
            # Both directions finished: the ends close themselves; make sure.
            self._record_close(CLOSE_NORMAL, CloseReason.PEER_CLOSED)
            self._start_closing()

    def lost(self, end: RelayEnd, clean: bool) -> None:
        """
        C{end}'s connection is gone: close the other end orderly (1000 "peer
        closed" when C{clean}, else 1011 "peer connection lost").

        :param end: the end whose connection was lost.
        :param clean: whether it ended normally (TCP FIN, WebSocket close
            handshake).
        """
        self._direction_from(end)
        if self.finished or self._is_gone(end):
            return
        self._gone.add(id(end))
        self._stopped_pending.discard(id(end))
        other = self.b if end is self.a else self.a
        if self._is_gone(other):
            self._finish()
            return
        if clean:
            self.close(CLOSE_NORMAL, CloseReason.PEER_CLOSED)
        else:
            self.close(CLOSE_PEER_LOST, CloseReason.PEER_LOST)

    def _consumer_stopped(self, producer_end: RelayEnd) -> None:
        """
        The consumer a pauser is registered on called C{stopProducing}: that
        end's transport is gone.  Its protocol normally reports L{lost} in the
        same turn; if it has not by the next turn, treat it as lost uncleanly.

        :param producer_end: the end the stopped pauser manages.
        """
        consumer_end = self.b if producer_end is self.a else self.a
        self._registered.discard(id(consumer_end))
        if self.finished or self._is_gone(consumer_end):
            return
        self._stopped_pending.add(id(consumer_end))

        def check() -> None:
            if id(consumer_end) in self._stopped_pending:
                self._stopped_pending.discard(id(consumer_end))
                self.lost(consumer_end, clean=False)

        self.clock.callLater(0, check)

    def close(self, code: int, reason: str) -> None:
        """
        Close both ends orderly: everything already written is delivered, then
        each end closes (WebSocket ends with C{code} and C{reason}).

        Later data is dropped.  Ends still open after C{close_timeout} are
        aborted.

        :param code: WebSocket close code (1000 normal, 1001 going away).
        :param reason: WebSocket close reason.
        """
        if self.finished:
            return
        self._record_close(code, reason)
        if self.closing:
            return
        self._start_closing()
        for end in (self.a, self.b):
            if not self._is_gone(end):
                end.close(code, reason)
        if self._is_gone(self.a) and self._is_gone(self.b):
            self._finish()

    def _start_closing(self) -> None:
        if self.closing:
            return
        self.closing = True
        self._log.debug(
            "relay closing: {code} {reason}",
            code=self.close_code,
            reason=self.close_reason,
        )
        self._cancel_timers()
        self._unregister(self.a)
        self._unregister(self.b)
        # Let closing handshakes be read: nobody pauses the ends any more.
        for pauser, end in ((self._pauser_a, self.a), (self._pauser_b, self.b)):
            if self._is_gone(end):
                pauser.detach()
            else:
                pauser.release()
        if self._close_timeout is not None:
            self._close_call = self.clock.callLater(
                self._close_timeout, self._close_timed_out
            )

    def _close_timed_out(self) -> None:
        self._close_call = None
        self._log.info(
            "relay close timed out after {t}s: aborting", t=self._close_timeout
        )
        self._abort_ends()
        self._finish()

    def abort(self) -> None:
        """
        Drop both connections now; C{on_end} is called at once.
        """
        if self.finished:
            return
        self._record_close(CLOSE_ABORTED, "aborted")
        self._start_closing()
        self._abort_ends()
        self._finish()

    def _abort_ends(self) -> None:
        for end in (self.a, self.b):
            if not self._is_gone(end):
                self._gone.add(id(end))
                end.abort()

    def _cancel_timers(self) -> None:
        for call in (self._idle_call, self._close_call):
            if call is not None and call.active():
                call.cancel()
        self._idle_call = None
        self._close_call = None
        self._a_to_b.stop()
        self._b_to_a.stop()

    def _finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        self.closing = True
        self._ended_at = self.clock.seconds()
        self._cancel_timers()
        self._pauser_a.detach()
        self._pauser_b.detach()
        stats = self.stats()
        # Debug only: whoever made the relay logs its one line from on_end
        # (ForwardService.relay_ended), naming the forward and the user.
        self._log.debug(
            "relay ended: {a_to_b} bytes a->b, {b_to_a} bytes b->a, "
            "{duration:.3f}s, close {code} {reason}",
            a_to_b=stats.bytes_a_to_b,
            b_to_a=stats.bytes_b_to_a,
            duration=stats.duration,
            code=stats.close_code,
            reason=stats.close_reason,
        )
        try:
            self._on_end(stats)
        except Exception:  # noqa: BLE001 - a callback must not break the relay
            self._log.failure("relay on_end callback failed")


def splice_to_endpoint(
    clock: IReactorTime,
    endpoint: IStreamClientEndpoint,
    accepted: TCPEnd,
    connect_timeout: float | None = CONNECT_TIMEOUT,
    **relay_kwargs: Any,
) -> Deferred[Relay]:
    """
    Join an accepted connection to a new connection to C{endpoint}.

    The accepted side stays paused (nothing it sends is lost) until the
    connection is made; then a L{Relay} with C{a=accepted}, C{b=} the new
    connection is built, both ends attached and the relay started.  If the
    connection fails or times out, the accepted side is closed; if the
    accepted side goes away first, the attempt is cancelled.

    :param clock: time source and scheduler for the relay and the timeout.
    :param endpoint: where to connect (the container port).
    :param accepted: the accepted end, already connected.
    :param connect_timeout: seconds to wait for the connection; C{None} waits
        as long as the endpoint does.
    :param relay_kwargs: passed to L{Relay} (C{on_end} is required).
    :return: a Deferred that fires with the started L{Relay}, or fails with the
        connection error: C{twisted.internet.defer.TimeoutError} on timeout,
        C{ConnectingCancelledError} or C{CancelledError} if the accepted side
        went away or the Deferred was cancelled.
    """
    if accepted.transport is not None:
        accepted._t.pauseProducing()
    d: Deferred[Any] = cast(Any, endpoint).connect(Factory.forProtocol(TCPEnd))
    timed_out: list[bool] = []
    timeout_call: _DelayedCall | None = None
    if connect_timeout is not None:

        def on_timeout() -> None:
            timed_out.append(True)
            d.cancel()

        timeout_call = cast(_Clock, clock).callLater(connect_timeout, on_timeout)
    accepted._on_lost_before_attach = d.cancel

    def done() -> None:
        accepted._on_lost_before_attach = None
        if timeout_call is not None and timeout_call.active():
            timeout_call.cancel()

    def connected(backend: TCPEnd) -> Relay:
        done()
        relay = Relay(clock, accepted, backend, **relay_kwargs)
        accepted.attach(relay)
        backend.attach(relay)
        relay.start()
        return relay

    def failed(failure: Failure) -> Failure:
        done()
        if timed_out:
            failure = Failure(
                TimeoutError(f"connect timed out after {connect_timeout}s")
            )
        Relay._log.info(
            "relay connect failed: {error}", error=failure.getErrorMessage()
        )
        accepted.close(CLOSE_PEER_LOST, CloseReason.CONNECT_FAILED)
        return failure

    return d.addCallbacks(connected, failed)
