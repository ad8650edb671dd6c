# -*- test-case-name: tests.test_relay -*-
"""
The ends a L{rexecpf.relay.Relay} joins: one family of L{IRelayEnd}s.

    - L{TransportEnd}: what every end shares; its C{producer} and
      C{consumer} are its raw transport (pausing it stops reading the peer;
      the relay registers its producers on it), C{write} writes to it,
      C{close} loses the connection once written, C{abort} drops it;
    - L{TCPEnd}: a plain TCP connection as its own protocol (a
      C{local_port} listener's, a container port's, the C{rexecpf tunnel}
      client's local side): it keeps what arrives before it is attached and
      passes a half-close on;
    - L{TakenOverEnd}: a connection taken over from another protocol that
      still owns the transport (the proxy's upgraded client connection,
      taken from its C{HTTPChannel}): no half-close;
    - L{rexecpf.wsend.WebSocketEndMixin}: an Autobahn WebSocket (the tunnel
      server, the C{rexecpf tunnel} client): a L{TransportEnd} that writes
      binary messages and closes with a close frame.  It lives in
      L{rexecpf.wsend}, with the rest of the WebSocket code, so that this
      module does not import Autobahn.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from typing import Protocol as _TypingProtocol

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

if TYPE_CHECKING:
    from rexecpf.relay import Relay

__all__ = [
    "TRANSPORT_BUFFER",
    "IRelayEnd",
    "RelayEnd",
    "TCPEnd",
    "TakenOverEnd",
    "TransportEnd",
    "widen_transport",
]

#: The read size and write-buffer bound of a L{TCPEnd}'s transport (Twisted's
#: default is 64 KiB); any end's transport may pass twice this to one
#: C{send()} (Twisted's default is 128 KiB), so that one read and the
#: WebSocket frame headers written with it go out at once.  Fewer, larger
#: reads and sends mean fewer turns of the reactor per byte: with the
#: tunnel's own frame writing this doubles its download rate.  Memory stays
#: bounded: one read plus this much buffered per direction.
TRANSPORT_BUFFER = 256 * 1024



class IRelayEnd(Interface):
    """
    One side of a relay.

    An end may also provide C{close_write() -> bool}: shut down only the
    writing half (TCP half-close), returning C{False} when the transport
    cannot do that.  The relay calls it, when present, after the other end's
    peer has finished sending.
    """

    producer = Attribute(
        "IPushProducer: pausing it stops reading from this peer (the raw transport)"
    )
    consumer = Attribute(
        "IConsumer: the raw transport written to; the relay registers producers on it"
    )

    def write(data: bytes) -> None:
        """
        Send bytes to this peer.

        :param data: the bytes, delivered in order.
        """

    def close(code: int, reason: str) -> None:
        """
        Orderly close: everything written so far is delivered first.

        (TCP: C{loseConnection}; WebSocket: a close frame with C{code}.)

        :param code: WebSocket close code.
        :param reason: WebSocket close reason.
        """

    def abort() -> None:  # type: ignore[misc]
        """
        Drop the connection now.
        """


class RelayEnd(_TypingProtocol):
    """
    The static (mypy) view of L{IRelayEnd}: anything with these members can be
    an end.
    """

    @property
    def producer(self) -> Any:
        """
        :return: the C{IPushProducer} that reads from this peer.
        """

    @property
    def consumer(self) -> Any:
        """
        :return: the C{IConsumer} written to.
        """

    def write(self, data: bytes) -> None:
        """
        :param data: bytes to send to this peer.
        """

    def close(self, code: int, reason: str) -> None:
        """
        :param code: WebSocket close code.
        :param reason: WebSocket close reason.
        """

    def abort(self) -> None:
        """
        Drop the connection now.
        """


def widen_transport(transport: Any, reads: bool = True) -> None:
    """
    Raise a Twisted socket transport's C{SEND_LIMIT} (the most one
    C{doWrite} hands to C{send()}) to twice L{TRANSPORT_BUFFER} and, with
    C{reads}, its C{bufferSize} (how much one C{doRead} asks for, and how
    much may wait in the write buffer before the registered producer is
    paused) to L{TRANSPORT_BUFFER}; never lower them.

    Both are public attributes of L{twisted.internet.abstract.FileDescriptor};
    other transports (TLS, test doubles) are left as they are.

    :param transport: an end's raw transport.
    :param reads: whether to raise C{bufferSize} too.
    """
    if not isinstance(getattr(transport, "SEND_LIMIT", None), int):
        return
    transport.SEND_LIMIT = max(transport.SEND_LIMIT, 2 * TRANSPORT_BUFFER)
    if reads:
        transport.bufferSize = max(transport.bufferSize, TRANSPORT_BUFFER)




@implementer(IRelayEnd)
class TransportEnd:
    """
    What every L{IRelayEnd} shares: its raw transport is its C{producer} and
    its C{consumer}.  A subclass (or the protocol mixed in after it) reports
    what its transport receives to L{relay}.
    """

    #: the transport (set by C{makeConnection} on a protocol)
    transport: Any = None
    #: the relay this end reports to, once attached
    relay: Relay | None = None

    @property
    def producer(self) -> Any:
        """
        :return: the transport (an C{IPushProducer}): pausing it stops
            reading from the peer.
        """
        return self.transport

    @property
    def consumer(self) -> Any:
        """
        :return: the transport (an C{IConsumer}), written to; the relay
            registers its producers on it.
        """
        return self.transport

    def write(self, data: bytes) -> None:
        """
        Send bytes to the peer.

        :param data: the bytes.
        """
        self.transport.write(data)

    def close(self, code: int, reason: str) -> None:
        """
        Close after the write buffer drains (C{loseConnection}); a transport
        has no close code.

        :param code: ignored.
        :param reason: ignored.
        """
        if self.transport is not None:
            self.transport.loseConnection()

    def abort(self) -> None:
        """
        Drop the connection now.
        """
        if self.transport is not None:
            abort = getattr(self.transport, "abortConnection", None)
            (abort or self.transport.loseConnection)()


@implementer(IRelayEnd, IHalfCloseableProtocol)
class TCPEnd(TransportEnd, Protocol):
    """
    The L{IRelayEnd} of a plain TCP connection, as its protocol.

    Until L{attach}, the transport is paused and anything received is kept, so
    no byte is lost while the other end connects.  When the peer shuts down
    its writing side, the relay is told (L{Relay.read_closed}), and the end
    can shut down its own (L{close_write}).
    """

    _log = Logger()

    #: Bytes kept before attach; the transport is paused, so this is at most a
    #: read or two.  More means the transport ignores pausing: abort.
    max_pending = 4 * 1024 * 1024

    #: whether L{close_write} may shut down the writing side alone
    half_close = True

    def __init__(self) -> None:
        """
        A new, unattached end.
        """
        self.relay = None
        self._pending: list[bytes] = []
        self._pending_len = 0
        self._pending_read_closed = False
        self._pending_lost: bool | None = None
        self._read_closed = False
        self._write_closed = False
        self._on_lost_before_attach: Callable[[], object] | None = None

    @property
    def _t(self) -> Any:
        return self.transport

    def connectionMade(self) -> None:
        """
        Pause reading until a relay is attached; read and send in
        L{TRANSPORT_BUFFER} pieces.
        """
        widen_transport(self.transport)
        if self.relay is None:
            self._t.pauseProducing()

    def attach(self, relay: Relay) -> None:
        """
        Hand this end to C{relay}: deliver what arrived before, and report an
        end of file or a lost connection that happened before.  Reading resumes
        when the relay starts.

        :param relay: the relay this end belongs to.
        """
        self.relay = relay
        pending, self._pending, self._pending_len = self._pending, [], 0
        for data in pending:
            relay.received(self, data)
        if self._pending_read_closed:
            relay.read_closed(self)
        if self._pending_lost is not None:
            relay.lost(self, self._pending_lost)

    def dataReceived(self, data: bytes) -> None:
        """
        Pass bytes to the relay (or keep them until attached).

        :param data: bytes from the peer.
        """
        if self.relay is not None:
            self.relay.received(self, data)
            return
        self._pending.append(data)
        self._pending_len += len(data)
        if self._pending_len > self.max_pending:
            self._log.warn(
                "{n} bytes arrived before attach: aborting", n=self._pending_len
            )
            self.abort()

    def readConnectionLost(self) -> None:
        """
        The peer shut down its writing side: tell the relay.
        """
        self._read_closed = True
        if self.relay is not None:
            self.relay.read_closed(self)
        else:
            self._pending_read_closed = True
        self._maybe_lose()

    def writeConnectionLost(self) -> None:
        """
        Our writing side is shut down (after L{close_write}).
        """
        self._write_closed = True
        self._maybe_lose()

    def _maybe_lose(self) -> None:
        if self._read_closed and self._write_closed and self.transport is not None:
            self._t.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        Tell the relay the connection is gone.

        :param reason: why; C{ConnectionDone} counts as clean.
        """
        clean = reason.check(ConnectionDone) is not None
        if self.relay is not None:
            self.relay.lost(self, clean)
            return
        self._pending_lost = clean
        if self._on_lost_before_attach is not None:
            callback, self._on_lost_before_attach = self._on_lost_before_attach, None
            callback()

    def close_write(self) -> bool:
        """
        Shut down the writing side after the buffer drains (TCP half-close).

        :return: C{False} if this end or its transport cannot half-close
            (e.g. TLS).
        """
        lose_write = getattr(self.transport, "loseWriteConnection", None)
        if not self.half_close or lose_write is None:
            return False
        lose_write()
        return True


class TakenOverEnd(TCPEnd):
    """
    A connection taken over from the protocol that still owns its transport
    and passes on what it receives and the connection's loss (the proxy's
    upgraded client connection, from its C{HTTPChannel}: see
    L{rexecpf.http._twisted.HTTPChannel.hand_over}).

    That protocol is not an C{IHalfCloseableProtocol}: the peer's half-close
    arrives as the loss of the whole connection, and our own would never be
    reported back.  So this end does not half-close: when the other end's
    peer is done sending, the relay closes both.

    :param transport: the transport taken over, already connected.
    """

    half_close = False

    def __init__(self, transport: Any) -> None:
        super().__init__()
        self.transport = transport
