"""
Unit tests of the tunnel: its handshake rules and WebSocket settings, and
:class:`rexecpf.tunnel.TunnelProtocol` driven in memory on a clock.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import attrs
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from rexecpf.auth import Authenticator
from rexecpf.config import LimitsConfig
from rexecpf.forwards import ForwardService
from rexecpf.relay import CONNECT_TIMEOUT
from rexecpf.testing import FakeBackend, MemoryForwardStore
from rexecpf.tunnel import TunnelFactory, choose_credentials
from rexecpf.wsend import AUTO_FRAGMENT_SIZE, protocol_options, xor_masker_name


class CredentialsTests(SynchronousTestCase):
    def test_bearer_pair(self):
        """``['Bearer', TOKEN]`` gives the token and selects ``Bearer``."""
        self.assertEqual(choose_credentials(["Bearer", "t0k"], None), ("t0k", "Bearer"))

    def test_bearer_without_token(self):
        """A lone ``Bearer`` presents no token."""
        self.assertEqual(choose_credentials(["Bearer"], None), (None, None))

    def test_hosted(self):
        """``rexec.token.TOKEN`` gives the token; ``rexec.v1`` is selected only when offered."""
        self.assertEqual(
            choose_credentials(["rexec.v1", "rexec.token.abc"], None), ("abc", "rexec.v1")
        )
        self.assertEqual(choose_credentials(["rexec.token.abc"], None), ("abc", None))

    def test_header(self):
        """The ``Authorization: Bearer`` header gives the token, no subprotocol."""
        self.assertEqual(choose_credentials([], "Bearer xyz"), ("xyz", None))
        self.assertEqual(choose_credentials([], "Basic xyz"), (None, None))

    def test_subprotocol_wins(self):
        """A token in the subprotocols is used before the header."""
        self.assertEqual(choose_credentials(["Bearer", "a"], "Bearer b"), ("a", "Bearer"))


class SettingsTests(SynchronousTestCase):
    def test_native_masker(self):
        """
        Autobahn's native (NVX) XOR masker is in use: unmasking client
        frames is not done in pure Python.
        """
        from autobahn.websocket import USES_NVX

        self.assertTrue(USES_NVX)
        self.assertTrue(xor_masker_name().startswith("autobahn.nvx."), xor_masker_name())

    def test_caps(self):
        """Frames and messages from peers are streamed, so not capped; frames to peers are 64 KiB."""
        options = protocol_options()
        self.assertEqual((options["maxFramePayloadSize"], options["maxMessagePayloadSize"]), (0, 0))
        self.assertEqual(options["autoFragmentSize"], AUTO_FRAGMENT_SIZE)
        self.assertEqual(AUTO_FRAGMENT_SIZE, 65536)


# --- the tunnel protocol, in memory ---------------------------------------------

CLIENT_MASK = b"\x0f\x1e\x2d\x3c"


def client_frame(payload: bytes, opcode: int = 2, fin: bool = True) -> bytes:
    """
    :return: one masked frame, as a WebSocket client sends it.
    """
    length = len(payload)
    if length < 126:
        head = struct.pack("!BB", (0x80 if fin else 0) | opcode, 0x80 | length)
    elif length < 1 << 16:
        head = struct.pack("!BBH", (0x80 if fin else 0) | opcode, 0x80 | 126, length)
    else:
        head = struct.pack("!BBQ", (0x80 if fin else 0) | opcode, 0x80 | 127, length)
    masked = bytes(b ^ CLIENT_MASK[i % 4] for i, b in enumerate(payload))
    return head + CLIENT_MASK + masked


def server_frames(data: bytes) -> list[tuple[bool, int, bytes]]:
    """
    Parse what a server wrote after its 101 answer.

    :return: ``(fin, opcode, payload)`` of each frame; a masked frame or a
        truncated one fails the test.
    """
    frames = []
    while data:
        first, second = data[0], data[1]
        assert not second & 0x80, "a server frame is masked"
        length, offset = second & 0x7F, 2
        if length == 126:
            length, offset = struct.unpack("!H", data[2:4])[0], 4
        elif length == 127:
            length, offset = struct.unpack("!Q", data[2:10])[0], 10
        assert len(data) >= offset + length, "truncated frame"
        frames.append((bool(first & 0x80), first & 0x0F, data[offset : offset + length]))
        data = data[offset + length :]
    return frames


def close_frame_of(frame: tuple[bool, int, bytes]) -> tuple[int, str]:
    """:return: the code and reason of a close frame."""
    fin, opcode, payload = frame
    assert opcode == 8, f"not a close frame: opcode {opcode}"
    return struct.unpack("!H", payload[:2])[0], payload[2:].decode("utf-8")


class _Endpoint:
    """
    A container port: ``connect`` answers with :attr:`result`, or builds the
    protocol on a :class:`StringTransport` and succeeds.
    """

    def __init__(self) -> None:
        self.result: Deferred[Any] | None = None
        self.connected: list[tuple[Any, _SocketTransport]] = []
        self.addresses: list[tuple[str, int]] = []

    def __call__(self, host: str, port: int) -> _Endpoint:
        self.addresses.append((host, port))
        return self

    def connect(self, factory: Any) -> Deferred[Any]:
        if self.result is not None:
            return self.result
        protocol = factory.buildProtocol(IPv4Address("TCP", "10.0.0.2", 8080))
        transport = _SocketTransport()
        protocol.makeConnection(transport)
        self.connected.append((protocol, transport))
        return succeed(protocol)


class _SocketTransport(StringTransport):
    """
    A :class:`StringTransport` that, like a socket transport
    (``FileDescriptor``), lets ``unregisterProducer`` be called with no
    producer registered: Autobahn's ``dropConnection`` does that.
    """

    aborted = False

    def unregisterProducer(self) -> None:
        if self.producer is not None:
            super().unregisterProducer()

    def abortConnection(self) -> None:
        """Like a socket's: what was written and not yet sent is lost."""
        self.aborted = True
        self.clear()
        self.loseConnection()


class _HTTPChannelStandIn:
    """The producer ``twisted.web`` leaves registered on a taken-over transport."""

    def pauseProducing(self) -> None:
        raise AssertionError("the HTTPChannel was paused after the takeover")

    def resumeProducing(self) -> None:
        raise AssertionError("the HTTPChannel was resumed after the takeover")

    def stopProducing(self) -> None:
        pass


class TunnelProtocolTests(SynchronousTestCase):
    """
    :class:`TunnelProtocol` on a :class:`StringTransport`, its container port
    on another, time on a :class:`Clock`.  (Back-pressure through real
    sockets: tests/functional/test_flow.py.)
    """

    idle_seconds = 30.0
    rate = 0

    def setUp(self) -> None:
        self.clock = Clock()
        backend = FakeBackend()
        backend.add("c1", "alice")
        self.limits = LimitsConfig(
            tunnel_idle_seconds=self.idle_seconds, tunnel_bytes_per_second=self.rate
        )
        self.forwards = ForwardService(
            self.clock, MemoryForwardStore(), backend, self.limits,
            port_probe=lambda interface, port: True,
        )
        self.forwards.startService()
        self.addCleanup(self.forwards.stopService)
        authenticator = Authenticator({"alice": "alice-token"})
        self.alice = authenticator.require("alice-token")
        self.forward = self.successResultOf(
            self.forwards.create(self.alice, "c1", b'{"container_port": 8080}')
        )
        self.endpoint = _Endpoint()
        self.factory = TunnelFactory(
            self.clock, authenticator, self.forwards, self.limits, endpoint=self.endpoint
        )
        # Autobahn's own handshake timers run on the global reactor: off.
        self.factory.setProtocolOptions(openHandshakeTimeout=0, closeHandshakeTimeout=0)

    def connect(self, token: str = "alice-token", forward_id: str | None = None) -> None:
        """Open a WebSocket to the forward; its answer is in ``self.ws_transport``."""
        self.ws = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
        self.ws_transport = _SocketTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 50000))
        self.ws_transport.registerProducer(_HTTPChannelStandIn(), True)
        self.ws.makeConnection(self.ws_transport)
        self.ws.dataReceived(
            (
                f"GET /ws/port-forward/{forward_id or self.forward.id} HTTP/1.1\r\n"
                "Host: rexecpf.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                f"Sec-WebSocket-Protocol: Bearer, {token}\r\n\r\n"
            ).encode()
        )

    def open(self) -> None:
        """Open the tunnel; ``self.container`` and its transport are the container side."""
        self.connect()
        head, _, rest = self.ws_transport.value().partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 101 "), head)
        self.assertEqual(rest, b"")
        self.ws_transport.clear()
        [(self.container, self.container_transport)] = self.endpoint.connected

    def sent_frames(self, pings: bool = False) -> list[tuple[bool, int, bytes]]:
        """
        :param pings: whether to keep the server's own pings.
        :return: the frames written to the client since the last call.
        """
        frames = server_frames(self.ws_transport.value())
        self.ws_transport.clear()
        return [frame for frame in frames if pings or frame[1] != 9]

    def test_open_splices_both_ways(self) -> None:
        """
        After the 101, a binary message from the client reaches the container
        port and the container's bytes come back as binary messages.
        """
        self.open()
        self.assertEqual(self.endpoint.addresses, [("127.0.0.1", 8080)])
        self.ws.dataReceived(client_frame(b"hello"))
        self.assertEqual(self.container_transport.value(), b"hello")
        self.container.dataReceived(b"world")
        self.assertEqual(self.sent_frames(), [(True, 2, b"world")])

    def test_text_message_passes_its_bytes(self) -> None:
        """A text message's UTF-8 bytes are sent to the container as they are."""
        self.open()
        self.ws.dataReceived(client_frame("h\u00e9".encode(), opcode=1))
        self.assertEqual(self.container_transport.value(), "h\u00e9".encode())

    def test_many_frames_in_one_read(self) -> None:
        """
        Several frames in one read, and a message fragmented over frames,
        reach the container whole and in order.
        """
        self.open()
        chunks = [bytes([i]) * (70_000 if i % 2 else 10) for i in range(6)]
        read = b"".join(client_frame(chunk) for chunk in chunks)
        read += client_frame(b"frag", fin=False) + client_frame(b"ment", opcode=0)
        self.ws.dataReceived(read)
        self.assertEqual(self.container_transport.value(), b"".join(chunks) + b"fragment")

    def test_big_read_goes_out_as_64k_frames(self) -> None:
        """
        A container read bigger than 64 KiB goes to the client as unmasked
        binary messages of at most 64 KiB, in order.
        """
        self.open()
        data = bytes(range(256)) * 1000  # 256000 bytes
        self.container.dataReceived(data)
        frames = self.sent_frames()
        self.assertEqual([len(payload) for _, _, payload in frames], [65536] * 3 + [59392])
        self.assertEqual({(fin, opcode) for fin, opcode, _ in frames}, {(True, 2)})
        self.assertEqual(b"".join(payload for _, _, payload in frames), data)

    def test_producers_registered_both_ways(self) -> None:
        """
        The HTTPChannel left on the taken-over transport is unregistered;
        each side's transport then has the other side's reader registered:
        a full client buffer pauses reading the container, and the other
        way round.
        """
        self.open()
        self.assertNotIsInstance(self.ws_transport.producer, _HTTPChannelStandIn)
        self.assertIsNotNone(self.container_transport.producer)
        pairs = [
            (self.ws_transport, self.container_transport),
            (self.container_transport, self.ws_transport),
        ]
        for full, reader in pairs:
            self.assertEqual(reader.producerState, "producing")
            full.producer.pauseProducing()
            self.assertEqual(reader.producerState, "paused")
            full.producer.resumeProducing()
            self.assertEqual(reader.producerState, "producing")

    def test_idle_timeout(self) -> None:
        """
        No data either way for ``tunnel_idle_seconds``: close 1000 "idle
        timeout", and the container connection is closed.
        """
        self.open()
        self.clock.advance(self.idle_seconds - 1)
        self.assertEqual(self.sent_frames(), [])
        self.clock.advance(1)
        [frame] = self.sent_frames()
        self.assertEqual(close_frame_of(frame), (1000, "idle timeout"))
        self.assertTrue(self.container_transport.disconnecting)

    def test_data_resets_idle_timer(self) -> None:
        """Data in either direction starts the idle time again."""
        self.open()
        self.clock.advance(self.idle_seconds - 1)
        self.ws.dataReceived(client_frame(b"x"))
        self.clock.advance(self.idle_seconds - 1)
        self.container.dataReceived(b"y")
        self.clock.advance(self.idle_seconds - 1)
        self.assertEqual(self.sent_frames(), [(True, 2, b"y")])
        self.clock.advance(1)
        self.assertEqual(close_frame_of(self.sent_frames()[0]), (1000, "idle timeout"))

    def test_ping_counts_as_activity(self) -> None:
        """A ping from the client keeps an otherwise idle tunnel open (and is answered)."""
        self.open()
        self.clock.advance(self.idle_seconds - 1)
        self.ws.dataReceived(client_frame(b"are you there", opcode=9))
        self.assertEqual(self.sent_frames(), [(True, 10, b"are you there")])
        self.clock.advance(self.idle_seconds - 1)
        self.assertEqual(self.sent_frames(), [])
        self.clock.advance(1)
        self.assertEqual(close_frame_of(self.sent_frames()[0]), (1000, "idle timeout"))

    def test_pings_while_client_does_not_read(self) -> None:
        """
        Pings that arrive while the client's socket is full get no pong
        queued each: reading the client stops, and once the socket drains
        one pong answers the most recent ping and reading resumes.
        """
        self.open()
        self.ws_transport.producer.pauseProducing()  # the client's socket is full
        self.ws.dataReceived(b"".join(client_frame(b"ping %d" % i, opcode=9) for i in range(3)))
        self.assertEqual(self.sent_frames(), [])
        self.assertEqual(self.ws_transport.producerState, "paused")
        self.ws_transport.producer.resumeProducing()
        self.assertEqual(self.sent_frames(), [(True, 10, b"ping 2")])
        self.clock.advance(1)  # (with a rate, the pings' bytes were charged)
        self.assertEqual(self.ws_transport.producerState, "producing")
        self.assertEqual(self.container_transport.producerState, "producing")

    def test_server_pings(self) -> None:
        """
        The server pings every third of the idle timeout; a client that
        answers (as a browser does) keeps a tunnel without data open.
        """
        self.open()
        for _ in range(10):
            self.clock.advance(self.idle_seconds / 3)
            [frame] = self.sent_frames(pings=True)
            self.assertEqual(frame[1], 9)
            self.ws.dataReceived(client_frame(frame[2], opcode=10))
        self.assertFalse(self.container_transport.disconnecting)

    def test_unanswered_pings(self) -> None:
        """The server's pings are not activity: a client that does not answer meets the idle timeout."""
        self.open()
        self.clock.pump([1] * int(self.idle_seconds - 1))
        self.assertEqual([opcode for _, opcode, _ in self.sent_frames(pings=True)], [9, 9])
        self.clock.advance(1)
        self.assertEqual(close_frame_of(self.sent_frames()[0]), (1000, "idle timeout"))
        self.clock.advance(self.idle_seconds)
        self.assertEqual(self.sent_frames(pings=True), [])

    def test_no_ping_into_a_full_socket(self) -> None:
        """No ping is written while the client's socket is full."""
        self.open()
        self.ws_transport.producer.pauseProducing()
        self.clock.advance(self.idle_seconds / 3)
        self.assertEqual(self.sent_frames(pings=True), [])
        self.ws_transport.producer.resumeProducing()
        self.clock.advance(self.idle_seconds / 3)
        self.assertEqual([opcode for _, opcode, _ in self.sent_frames(pings=True)], [9])

    def test_container_closes(self) -> None:
        """
        The container closes its connection: the data it sent is delivered,
        then close 1000.
        """
        self.open()
        self.container.dataReceived(b"last words")
        self.container.connectionLost(Failure(ConnectionDone()))
        frames = self.sent_frames()
        self.assertEqual(frames[0], (True, 2, b"last words"))
        self.assertEqual(close_frame_of(frames[1]), (1000, "peer closed"))
        self.assertEqual(len(frames), 2)

    def test_container_connection_lost(self) -> None:
        """The container connection breaks (reset): close 1011."""
        self.open()
        self.container.connectionLost(Failure(ConnectionLost()))
        [frame] = self.sent_frames()
        self.assertEqual(close_frame_of(frame), (1011, "peer connection lost"))

    def test_forward_deleted(self) -> None:
        """Deleting the forward closes its tunnel with 1001."""
        self.open()
        self.successResultOf(self.forwards.delete(self.alice, "c1", self.forward.id))
        [frame] = self.sent_frames()
        self.assertEqual(close_frame_of(frame)[0], 1001)
        self.assertTrue(self.container_transport.disconnecting)

    def test_client_closes(self) -> None:
        """A close frame from the client closes the container connection."""
        self.open()
        self.ws.dataReceived(client_frame(struct.pack("!H", 1000), opcode=8))
        self.assertTrue(self.container_transport.disconnecting)
        self.assertEqual(close_frame_of(self.sent_frames()[0])[0], 1000)

    def assert_close_answered(self, payload: bytes, code: int) -> None:
        """The client's close frame ``payload`` is answered ``code``; the connection closes after it."""
        self.open()
        self.ws.dataReceived(client_frame(payload, opcode=8))
        self.assertEqual(close_frame_of(self.sent_frames()[-1])[0], code)
        self.assertTrue(self.ws_transport.disconnecting)
        self.assertFalse(self.ws_transport.aborted)

    def test_reserved_close_code_answered(self) -> None:
        """A close frame with a reserved code is answered 1002, written before the close (not a reset)."""
        self.assert_close_answered(struct.pack("!H", 999), 1002)

    def test_close_reason_not_utf8_answered(self) -> None:
        """A close reason that is not UTF-8 is answered 1007."""
        self.assert_close_answered(struct.pack("!H", 1000) + b"\xff", 1007)

    def test_token_revoked(self) -> None:
        """Revoking the user's token closes their tunnel with 1001."""
        self.open()
        self.assertEqual(self.forwards.live_counts(), {"tunnel": 1})
        self.assertEqual(self.forwards.shutdown_user("alice", "token revoked"), 1)
        [frame] = self.sent_frames()
        self.assertEqual(close_frame_of(frame), (1001, "token revoked"))

    def test_end_reported_once(self) -> None:
        """
        When both sides are gone the tunnel's end goes to
        ``ForwardService.relay_ended`` (its log line and the metrics), once,
        as a ``tunnel``, with the bytes each way.
        """
        ended: list[tuple[str, int, int]] = []
        self.forwards.relay_observers.append(
            lambda kind, stats: ended.append((kind, stats.bytes_a_to_b, stats.bytes_b_to_a))
        )
        self.open()
        self.ws.dataReceived(client_frame(b"up"))
        self.container.dataReceived(b"down!")
        self.container.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(ended, [])
        self.ws.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(ended, [("tunnel", 2, 5)])

    def test_client_gone_ends_tracking(self) -> None:
        """The client's connection drops: the container connection is closed and the tunnel no longer counted."""
        self.open()
        self.assertEqual(self.forwards.live_count(self.forward.id), 1)
        self.ws.connectionLost(Failure(ConnectionLost()))
        self.assertTrue(self.container_transport.disconnecting)
        self.container.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.forwards.live_count(self.forward.id), 0)

    def test_refused(self) -> None:
        """The container port refuses: 502 with a JSON error, no upgrade."""
        self.endpoint.result = fail(ConnectionRefusedError())
        self.connect()
        head, _, body = self.ws_transport.value().partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 502 "), head)
        self.assertEqual(json.loads(body)["error"]["code"], 502)

    def test_connect_timeout(self) -> None:
        """The container port does not answer within CONNECT_TIMEOUT: 502."""
        self.endpoint.result = Deferred()
        self.connect()
        self.clock.advance(CONNECT_TIMEOUT - 0.1)
        self.assertEqual(self.ws_transport.value(), b"")
        self.clock.advance(0.1)
        self.assertTrue(self.ws_transport.value().startswith(b"HTTP/1.1 502 "))

    def test_client_gone_while_connecting(self) -> None:
        """The client leaves during the TCP connect: the attempt is cancelled."""
        cancelled: list[bool] = []
        self.endpoint.result = Deferred(lambda d: cancelled.append(True))
        self.connect()
        self.ws.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(cancelled, [True])

    def test_tunnels_per_user(self) -> None:
        """
        Over ``tunnels_per_user`` (a handshake in flight counts): 429 Limit
        exceeded with a JSON error, before any upgrade or connection to the
        container; once a tunnel ends there is room again.
        """
        self.forwards.limits = attrs.evolve(self.limits, tunnels_per_user=1)
        self.endpoint.result = Deferred()  # the first one is still connecting
        self.connect()
        first, self.endpoint.result = self.ws, None
        self.connect()
        head, _, body = self.ws_transport.value().partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 429 "), head)
        self.assertEqual(json.loads(body)["error"]["message"], "Limit exceeded")
        self.assertIn("limits.tunnels_per_user", json.loads(body)["error"]["detail"])
        self.assertEqual(len(self.endpoint.addresses), 1)
        first.connectionLost(Failure(ConnectionLost()))
        self.open()

    def test_unauthorized(self) -> None:
        """A bad token: 401 before any connection to the container."""
        self.connect(token="wrong")
        self.assertTrue(self.ws_transport.value().startswith(b"HTTP/1.1 401 "))
        self.assertEqual(self.endpoint.addresses, [])

    def test_unknown_forward(self) -> None:
        """An unknown forward: 404."""
        self.connect(forward_id="pf_nope")
        self.assertTrue(self.ws_transport.value().startswith(b"HTTP/1.1 404 "))


class TunnelThrottleTests(TunnelProtocolTests):
    """
    The same, with ``tunnel_bytes_per_second`` set: reading pauses when
    a direction is over its rate and resumes on the clock.
    """

    rate = 100_000

    def test_throttle_container_to_client(self) -> None:
        """
        The container sends a second's worth at once: reading from it pauses
        for that second (the bucket starts empty).
        """
        self.open()
        self.container.dataReceived(b"x" * self.rate)
        self.assertEqual(self.container_transport.producerState, "paused")
        self.clock.advance(0.99)
        self.assertEqual(self.container_transport.producerState, "paused")
        self.clock.advance(0.02)
        self.assertEqual(self.container_transport.producerState, "producing")

    def test_throttle_client_to_container(self) -> None:
        """The client sends more than the bucket holds: reading from it pauses, then resumes."""
        self.open()
        self.ws.dataReceived(client_frame(b"x" * (self.rate // 2)))
        self.assertEqual(self.ws_transport.producerState, "paused")
        self.clock.advance(0.51)
        self.assertEqual(self.ws_transport.producerState, "producing")

    def test_pings_count_against_the_rate(self) -> None:
        """
        Pings count as bytes against ``tunnel_bytes_per_second``: more
        than the bucket holds pauses reading the client, as data would.
        """
        self.open()
        ping = client_frame(b"p" * 125, opcode=9)  # 131 bytes on the wire
        count = self.rate // 2 // len(ping) + 1
        self.ws.dataReceived(ping * count)
        self.assertEqual(self.ws_transport.producerState, "paused")
        self.assertEqual(len(self.sent_frames()), count)
        self.clock.advance(0.51)
        self.assertEqual(self.ws_transport.producerState, "producing")

    def test_empty_frames_count_against_the_rate(self) -> None:
        """Headers count too: a flood of empty data frames is throttled."""
        self.open()
        empty = client_frame(b"")  # 6 bytes on the wire
        self.ws.dataReceived(empty * (self.rate // 2 // len(empty) + 1))
        self.assertEqual(self.container_transport.value(), b"")
        self.assertEqual(self.ws_transport.producerState, "paused")
        self.clock.advance(0.51)
        self.assertEqual(self.ws_transport.producerState, "producing")
