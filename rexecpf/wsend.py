# -*- test-case-name: tests.test_tunnel -*-
"""
The WebSocket side of a relay, shared by the server tunnel and the ``rexecpf
tunnel`` client.

:class:`WebSocketEndMixin` turns an Autobahn (Twisted) protocol into an
:class:`rexecpf.ends.IRelayEnd`, one of the family of
:class:`rexecpf.ends.TransportEnd`:

- its ``producer`` and ``consumer`` are the *raw* transport (the socket), so
  the relay pauses socket reads and hears when the socket's write buffer is
  full (STYLE.md 2.2);
- incoming message data is streamed to the relay frame chunk by frame chunk,
  as Autobahn unmasks it: a message is never assembled in memory, binary and
  text alike (a text message's UTF-8 bytes are passed as they are);
- ``write`` sends a chunk as binary messages of at most 64 KiB each; a
  server writes those frames to the socket itself (:func:`binary_frames`),
  a client has Autobahn mask them;
- its transport keeps Twisted's 64 KiB read size (Autobahn's parser costs
  time quadratic in the size of one read) but sends up to
  :data:`rexecpf.ends.TRANSPORT_BUFFER` at once;
- a ping or pong counts as activity for the relay's idle timer, and pings,
  pongs and frame headers count against the relay's rate like data;
- a ping that arrives while our socket's write buffer is full is not
  answered at once: the pong waits (only the latest, as RFC 6455 5.5.3
  allows) and the peer is not read until the buffer drains, so a peer that
  sends pings and reads nothing stops being read instead of growing a queue
  of pongs.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any

from autobahn.util import encode_truncate
from autobahn.wamp.types import TransportDetails
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.logger import Logger

from rexecpf.ends import TransportEnd, widen_transport
from rexecpf.http._twisted import frame_header_size, parse_websocket_data, writes_plain_frames
from rexecpf.model import CloseReason

__all__ = [
    "AUTO_FRAGMENT_SIZE",
    "WebSocketEndMixin",
    "binary_frames",
    "protocol_options",
    "xor_masker_name",
]

#: Frames written to a peer are at most this big.
AUTO_FRAGMENT_SIZE = 64 * 1024

_FIN_BINARY = 0x80 | 0x02
_HEADER_7 = struct.Struct("!BB")
_HEADER_16 = struct.Struct("!BBH")
_HEADER_64 = struct.Struct("!BBQ")


def protocol_options() -> dict[str, Any]:
    """
    :return: the Autobahn protocol options every rexecpf WebSocket uses
        (pass to ``factory.setProtocolOptions``).
    """
    return {
        # No cap on frames or messages: their data is streamed to the relay
        # chunk by chunk as it arrives (onMessageFrameData), never held
        # whole, and a browser sends each ws.send() as one frame, however big.
        "maxFramePayloadSize": 0,
        "maxMessagePayloadSize": 0,
        "autoFragmentSize": AUTO_FRAGMENT_SIZE,
        # Streams need no per-message compression, and it would defeat the
        # relay's flow control (a small frame can inflate to a big one).
        "perMessageCompressionAccept": lambda offers: None,
        "openHandshakeTimeout": 30,
        "closeHandshakeTimeout": 5,
        "failByDrop": False,
    }


def binary_frames(data: bytes, frame_size: int = AUTO_FRAGMENT_SIZE) -> bytes:
    """
    Encode ``data`` as unmasked binary WebSocket messages, one frame each
    (RFC 6455 5.2), ready for the socket: what a server sends.

    :param data: the payload.
    :param frame_size: the largest payload of one frame.
    :return: the frames, in one ``bytes`` (one copy of ``data``).
    """
    view = memoryview(data)
    parts: list[bytes | memoryview] = []
    for start in range(0, len(view), frame_size):
        payload = view[start : start + frame_size]
        length = len(payload)
        if length < 126:
            parts.append(_HEADER_7.pack(_FIN_BINARY, length))
        elif length < 1 << 16:
            parts.append(_HEADER_16.pack(_FIN_BINARY, 126, length))
        else:
            parts.append(_HEADER_64.pack(_FIN_BINARY, 127, length))
        parts.append(payload)
    return b"".join(parts)


def xor_masker_name() -> str:
    """
    :return: the class name of the XOR masker Autobahn uses for large
        payloads (``XorMaskerSimple`` / ``XorMaskerShifted1`` of
        ``autobahn.nvx`` when the native one is active).
    """
    from autobahn.websocket.xormasker import create_xor_masker

    masker = create_xor_masker(b"\x01\x02\x03\x04", 1 << 20)
    return f"{type(masker).__module__}.{type(masker).__name__}"


if TYPE_CHECKING:
    from rexecpf.relay import Relay

    # What the mixin is mixed into, as the type checker sees it.
    _AutobahnProtocol = WebSocketProtocol
else:
    _AutobahnProtocol = object


def _close_frame_fault(code: int | None, reason: bytes | None) -> tuple[int, str] | None:
    """
    :return: the close code and reason that answer a peer's close frame
        with a reserved code (RFC 6455 7.4) or a reason that is not UTF-8,
        or ``None`` for a good one.
    """
    if code is not None and not (
        code in WebSocketProtocol.CLOSE_STATUS_CODES_ALLOWED or 3000 <= code <= 4999
    ):
        return WebSocketProtocol.CLOSE_STATUS_CODE_PROTOCOL_ERROR, f"invalid close code {code}"
    if reason:
        try:
            reason.decode("utf-8")
        except UnicodeDecodeError:
            return WebSocketProtocol.CLOSE_STATUS_CODE_INVALID_PAYLOAD, "close reason is not UTF-8"
    return None


class WebSocketEndMixin(TransportEnd, _AutobahnProtocol):
    """
    Mixed in before an Autobahn Twisted protocol class: the protocol is then
    an ``IRelayEnd`` once :meth:`attach_relay` is called.  Its ``producer``,
    ``consumer`` and :meth:`abort` are a :class:`TransportEnd`'s (the raw
    transport); it writes binary messages and closes with a close frame.
    """

    _log = Logger()
    #: the payload of the last ping not answered yet (our socket was full)
    _pending_pong: bytes | None = None
    # Set on the protocol at run time, and not declared by Autobahn's
    # framework-independent WebSocketProtocol: the factory and, on a server,
    # the frame-masking option (the raw transport: TransportEnd.transport).
    factory: Any
    maskServerFrames: bool
    # Autobahn's Twisted adapter and its WebSocketProtocol declare these two
    # differently (``str | None`` / ``str``, ``TransportDetails`` /
    # ``TransportDetails | None``): one declaration that fits both.
    peer: Any
    _transport_details: TransportDetails

    # -- IRelayEnd ---------------------------------------------------------

    def write(self, data: bytes) -> None:
        """
        Send ``data`` as binary messages of at most 64 KiB; dropped once the
        WebSocket is closing.

        A server's frames are unmasked and uncompressed (rexecpf refuses
        per-message compression), so they are written to the socket as they
        are: Autobahn's ``sendMessage`` costs more per frame than the
        transport does.  A client's frames must be masked: Autobahn does it.
        """
        if self.state != WebSocketProtocol.STATE_OPEN:
            return
        if self._sends_plain_frames():
            self.transport.write(binary_frames(data))
        else:
            self.sendMessage(data, isBinary=True)

    def _sends_plain_frames(self) -> bool:
        # Autobahn's send queue holds delayed writes (it is empty unless a
        # "sync" or "chopsize" write was asked for): never overtake them.
        return (
            self.factory.isServer
            and not self.maskServerFrames
            and writes_plain_frames(self)
        )

    def close(self, code: int, reason: str) -> None:
        """Send a close frame with ``code`` and ``reason`` after the data."""
        if self.state == WebSocketProtocol.STATE_OPEN:
            # sendClose() refuses the 1001 and 1011 a relay needs: send the
            # close frame directly (any code valid on the wire is allowed).
            # (str(): Autobahn takes exactly a str, not a CloseReason)
            self.sendCloseFrame(
                code=code, reasonUtf8=encode_truncate(str(reason), 123), isReply=False
            )
        elif self.state == WebSocketProtocol.STATE_CONNECTING and self.transport is not None:
            self.transport.loseConnection()

    # -- glue --------------------------------------------------------------

    def attach_relay(self, relay: Relay) -> None:
        """Report to ``relay`` from now on."""
        self.relay = relay
        widen_transport(self.transport, reads=False)

    def dataReceived(self, data: bytes) -> None:
        # Autobahn's Twisted adapter only logs (formatting the log fields even
        # when debug is off) before handing the bytes to its parser.
        parse_websocket_data(self, data)

    def onMessageFrameData(self, payload: bytes) -> None:
        # Stream: hand each chunk to the relay as it is unmasked (Autobahn's
        # own would keep it for the whole message).
        if self.relay is not None and not self.failedByMe:
            self.relay.received(self, payload)

    def onMessageFrameEnd(self) -> None:
        # The frame's data went to the relay already: nothing to collect.
        pass

    def onMessageEnd(self) -> None:
        # Nothing was assembled: no onMessage.
        pass

    def onMessageFrameBegin(self, length: int) -> None:
        super().onMessageFrameBegin(length)
        # A frame header counts against the rate: a flood of empty frames
        # is not free.
        if self.relay is not None:
            self.relay.overhead(self, frame_header_size(self))

    def onPing(self, payload: bytes) -> None:
        relay = self.relay
        if relay is None:
            super().onPing(payload)
            return
        # Activity, and charged to the rate like data.
        relay.overhead(self, frame_header_size(self) + len(payload))
        if self.state != WebSocketProtocol.STATE_OPEN:
            return
        if relay.write_blocked(self):
            # The peer does not read what we send: rather than queue a pong
            # per ping, keep the last one (RFC 6455 5.5.3 allows answering
            # only the most recent ping) and read no more until the socket
            # drains (then drained() sends it).
            self._pending_pong = payload
            relay.hold_until_drained(self)
            return
        self.sendPong(payload)

    def drained(self) -> None:
        """Our socket's write buffer drained: send the pong held back."""
        payload, self._pending_pong = self._pending_pong, None
        if payload is not None:
            self.sendPong(payload)

    def onPong(self, payload: bytes) -> None:
        super().onPong(payload)
        if self.relay is not None:
            self.relay.overhead(self, frame_header_size(self) + len(payload))

    def onCloseFrame(self, code: int | None, reasonRaw: bytes | None) -> Any:
        fault = _close_frame_fault(code, reasonRaw)
        if fault is not None and self.state == WebSocketProtocol.STATE_OPEN:
            # Autobahn would queue its 1002/1007 answer, then take the bad
            # frame for the reply to it and abort the connection, discarding
            # the answer (the peer saw a reset).  Answer, and close once the
            # answer is written.
            self.sendCloseFrame(code=fault[0], reasonUtf8=fault[1].encode())
            self.wasClean = False
            self.dropConnection(abort=False)
            return True
        # Autobahn annotates int and bytes, but passes None for a close frame
        # without a code or reason.
        result = super().onCloseFrame(code, reasonRaw)  # type: ignore[arg-type]
        # The peer is done: close the other side now rather than when the
        # socket finally goes away.
        if self.relay is not None and not self.relay.closing:
            self.relay.close(1000, CloseReason.PEER_CLOSED)
        return result

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self.relay is not None:
            self.relay.lost(self, bool(wasClean))
