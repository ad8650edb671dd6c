"""
Hostile clients against ``/ws/`` (the tunnel) and ``/p/`` (the proxy) of a
real ``twistd rexecpf``, over raw sockets, frames written byte by byte.

For every attack: the right HTTP status with a JSON error body (before an
upgrade) or the right WebSocket close code (after it); nothing the attacker
smuggled reaches the container; no connection to the container is left open;
a tunnel opened before the attack still carries data; and the daemon keeps
serving ``/healthz`` with no traceback in its log and no token in it either.
"""

from __future__ import annotations

import json
import re
import socket
import struct
import tempfile
import threading
import time
import unittest
from typing import Any

from tests.functional.daemon import Daemon
from tests.functional.rawws import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    RawWebSocket,
    RecordingServer,
    frame,
    wait_until,
)
from tests.functional.test_hostile_http import parse_responses

ALICE = "alice-token"
BOB = "bob-token"
MIB = 1024 * 1024

#: Close codes of RFC 6455 section 7.4.1.
PROTOCOL_ERROR, INVALID_PAYLOAD = 1002, 1007


class HostileTestCase(unittest.TestCase):
    """
    One daemon for the class, with a forward to an echo "container" and one
    to an HTTP "container"; a bystander tunnel stays open through every test.
    """

    daemon: Daemon
    echo: RecordingServer
    app: RecordingServer
    #: TOML lines added to the daemon's ``[server]`` section.
    server_extra = ""

    @classmethod
    def setUpClass(cls) -> None:
        cls.echo = RecordingServer(echo=True)
        cls.app = RecordingServer(echo=False)
        cls.daemon = Daemon(tempfile.mkdtemp(prefix="rexecpf-hostile-ws-"),
                            containers=[{"id": "c1", "owner": "alice"}, {"id": "c2", "owner": "bob"}])
        cls.daemon.config.write_text(cls.daemon.config.read_text().replace(
            'state = "state.sqlite3"', f'state = "state.sqlite3"\n{cls.server_extra}'))
        cls.daemon.start()
        code, forward = cls.daemon.create("c1", cls.echo.port)
        assert code == 201, forward
        cls.tunnel_id = forward["id"]
        cls.tunnel_path = f"/ws/port-forward/{cls.tunnel_id}"
        code, forward = cls.daemon.create("c1", cls.app.port)
        assert code == 201, forward
        cls.proxy_id = forward["id"]
        cls.bystander = RawWebSocket(cls.daemon.port)
        assert cls.bystander.handshake(cls.tunnel_path) == 101
        wait_until(lambda: cls.echo.open_connections() == 1, 10, "the bystander tunnel never connected")

    @classmethod
    def tearDownClass(cls) -> None:
        cls.bystander.close()
        cls.daemon.stop()
        cls.echo.stop()
        cls.app.stop()

    def setUp(self) -> None:
        self.received_before = len(self.echo.received), len(self.app.received)
        # A cleanup added first runs last: after the test's own sockets are closed.
        self.addCleanup(self.check_aftermath)

    def check_aftermath(self) -> None:
        # Every connection the attacks caused to the containers is closed
        # (the bystander's stays), within the 5 s close handshake timeout.
        wait_until(lambda: self.echo.open_connections() == 1, 15,
                   f"{self.echo.open_connections() - 1} tunnel connections to the container left open")
        wait_until(lambda: self.app.open_connections() == 0, 15,
                   f"{self.app.open_connections()} proxied connections to the container left open")
        # The bystander tunnel was not disturbed.
        payload = b"still here %f" % time.monotonic()
        self.bystander.send_frame(OP_BINARY, payload)
        self.assertEqual(self.bystander.read_data(len(payload)), payload)
        status, document, _ = self.daemon.request("GET", "/healthz", user=None, timeout=5)
        self.assertEqual((status, document), (200, {"status": "ok"}))
        log = self.daemon.log_path.read_text(errors="replace")
        self.assertNotIn("Traceback", log)
        self.assertNotIn("Unhandled", log)
        self.assertNotIn(ALICE, log)
        self.assertNotIn(BOB, log)

    # --- helpers

    def tunnel(self) -> RawWebSocket:
        """:return: an open tunnel to the echo container, shown to carry data."""
        ws = RawWebSocket(self.daemon.port)
        self.addCleanup(ws.close)
        self.assertEqual(ws.handshake(self.tunnel_path), 101, ws.body)
        ws.send_frame(OP_BINARY, b"hello")
        self.assertEqual(ws.read_data(5), b"hello")
        return ws

    def assertJSONError(self, status: int, body: bytes, expected: int, message: str | None = None) -> None:
        self.assertEqual(status, expected, body)
        document = json.loads(body)
        self.assertEqual(document["error"]["code"], expected)
        if message is not None:
            self.assertEqual(document["error"]["message"], message)

    def assertClosedWith(self, ws: RawWebSocket, code: int) -> None:
        """The server sends a close frame with ``code``; once answered, it closes the TCP connection."""
        received, reason = ws.read_close()
        self.assertEqual(received, code, reason)
        ws.send_frame(OP_CLOSE, struct.pack("!H", code))
        self.assertTrue(ws.wait_closed(10), "the server kept the TCP connection open")

    def exchange(self, raw: bytes, timeout: float = 5.0, until_response: bool = False) -> bytes:
        """
        Send ``raw`` on a new connection; :return: everything until the
        server closes (or, with ``until_response``, until one whole response
        with a Content-Length has come).
        """
        with socket.create_connection(("127.0.0.1", self.daemon.port), timeout=timeout) as connection:
            connection.sendall(raw)
            received = b""
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    chunk = connection.recv(65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                received += chunk
                if until_response and _whole_response(received):
                    break
            return received

    def nothing_reached_containers(self) -> None:
        self.assertEqual((len(self.echo.received), len(self.app.received)), self.received_before)


class HandshakeTests(HostileTestCase):
    """Broken opening handshakes on /ws/: refused before any upgrade, as JSON."""

    def test_broken_handshakes_are_json_400(self) -> None:
        """Missing or malformed key, version or Connection header: 400 with a JSON error, no upgrade."""
        accepted = self.echo.accepted
        for name, kwargs in {
            "no key": {"omit": ("sec-websocket-key",)},
            "short key": {"key": "c2hvcnQ="},
            "key not base64": {"key": "!" * 24},
            "no version": {"version": None},
            "version 99": {"version": "99"},
            "version garbage": {"version": "thirteen"},
            "no Connection: Upgrade": {"omit": ("connection",)},
        }.items():
            with self.subTest(name), RawWebSocket(self.daemon.port) as ws:
                status = ws.handshake(self.tunnel_path, **kwargs)
                self.assertJSONError(status, ws.body, 400, "Invalid request")
                self.assertNotIn("sec-websocket-accept", ws.headers)
        with RawWebSocket(self.daemon.port) as ws:
            ws.handshake(self.tunnel_path, version="99")
            # RFC 6455 4.4: a refused version names the versions spoken.
            self.assertIn("13", ws.headers["sec-websocket-version"])
        self.assertEqual(self.echo.accepted, accepted)
        self.nothing_reached_containers()

    def test_upgrade_with_other_methods_is_json_405(self) -> None:
        """An upgrade by POST, PUT or DELETE is 405 with ``Allow: GET`` and a JSON error."""
        for method in ("POST", "PUT", "DELETE"):
            with self.subTest(method), RawWebSocket(self.daemon.port) as ws:
                status = ws.handshake(self.tunnel_path, method=method)
                self.assertJSONError(status, ws.body, 405, "Method not allowed")
                self.assertEqual(ws.headers["allow"], "GET")
        self.nothing_reached_containers()

    def test_not_an_upgrade_is_json_426(self) -> None:
        """A plain GET of a tunnel URL is 426 naming ``Upgrade: websocket``."""
        response, = parse_responses(self.exchange(
            f"GET {self.tunnel_path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()))
        self.assertJSONError(response.status, response.body, 426, "Upgrade required")
        self.assertEqual(response.headers[b"upgrade"], b"websocket")

    def test_credentials_checked_before_the_container_is_reached(self) -> None:
        """No token, a wrong one, a token in the query string, another user's: 401/404, nothing connects."""
        accepted = self.echo.accepted
        for token, path, expected in (
            (None, self.tunnel_path, 401),
            ("wrong-token", self.tunnel_path, 401),
            (None, f"{self.tunnel_path}?token={ALICE}", 401),  # the query is no credential here
            (BOB, self.tunnel_path, 404),  # exactly as if it did not exist
        ):
            with self.subTest(token=token, path=path), RawWebSocket(self.daemon.port) as ws:
                status = ws.handshake(path, token=token)
                self.assertJSONError(status, ws.body, expected)
                self.assertNotIn("sec-websocket-accept", ws.headers)
        self.assertEqual(self.echo.accepted, accepted)

    def test_odd_paths(self) -> None:
        """Missing, extra, encoded or dotted path segments under /ws/: a JSON 404, nothing connects."""
        accepted = self.echo.accepted
        for path in (
            "/ws/",
            "/ws/port-forward",
            "/ws/port-forward/",
            f"{self.tunnel_path}/extra",
            f"{self.tunnel_path}%2Fextra",
            "/ws/port-forward/..%2F..%2Fapi%2Fcontainers",
            f"/ws/port-forward/x/../{self.tunnel_id}",
            f"/ws/port-forward/{self.tunnel_id.upper()}",
            "/ws/port-forward/%00",
        ):
            with self.subTest(path), RawWebSocket(self.daemon.port) as ws:
                status = ws.handshake(path)
                self.assertJSONError(status, ws.body, 404)
        self.assertEqual(self.echo.accepted, accepted)

    def test_slowloris_handshakes(self) -> None:
        """
        200 connections trickling a WebSocket handshake a byte every 0.2 s
        for 5 s: meanwhile new tunnels open and echo promptly, and none of
        the trickling connections reaches the container.
        """
        accepted = self.echo.accepted
        head = (f"GET {self.tunnel_path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nX-Slow: ").encode() + b"s" * 100
        slow = [socket.create_connection(("127.0.0.1", self.daemon.port), timeout=5) for _ in range(200)]
        self.addCleanup(lambda: [s.close() for s in slow])
        stop = threading.Event()
        failures: list[OSError] = []

        def trickle() -> None:
            for index in range(len(head)):
                if stop.wait(0.2):
                    return
                for connection in slow:
                    try:
                        connection.send(head[index:index + 1])
                    except OSError as error:
                        failures.append(error)

        trickler = threading.Thread(target=trickle, daemon=True)
        trickler.start()
        latencies = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            started = time.monotonic()
            with RawWebSocket(self.daemon.port) as ws:
                self.assertEqual(ws.handshake(self.tunnel_path), 101)
                ws.send_frame(OP_BINARY, b"ping")
                self.assertEqual(ws.read_data(4), b"ping")
                ws.send_frame(OP_CLOSE, struct.pack("!H", 1000))
                self.assertEqual(ws.read_close()[0], 1000)
            latencies.append(time.monotonic() - started)
        stop.set()
        trickler.join(timeout=5)
        latencies.sort()
        print(f"\nslowloris on /ws/: 200 trickling handshakes for 5 s; {len(latencies)} tunnels opened, "
              f"echoed and closed meanwhile, median {latencies[len(latencies) // 2] * 1000:.0f} ms, "
              f"worst {latencies[-1] * 1000:.0f} ms")
        self.assertEqual(failures, [])  # within the site's 60 s idle timeout
        self.assertGreater(len(latencies), 5)
        self.assertLess(max(latencies), 1.0, latencies)
        # the tunnels opened meanwhile are the only new container connections
        self.assertEqual(self.echo.accepted - accepted, len(latencies))


class FrameTests(HostileTestCase):
    """Broken frames on an open tunnel: closed with the right code, the container connection too."""

    def attack(self, data: bytes, code: int) -> None:
        ws = self.tunnel()
        ws.send(data)
        self.assertClosedWith(ws, code)

    def test_unmasked_client_frame(self) -> None:
        """An unmasked client frame: 1002."""
        self.attack(frame(OP_BINARY, b"x", mask=False), PROTOCOL_ERROR)

    def test_reserved_bits(self) -> None:
        """Any RSV bit set (no extension is negotiated): 1002."""
        for rsv in (1, 2, 4, 7):
            with self.subTest(rsv=rsv):
                self.attack(frame(OP_BINARY, b"x", rsv=rsv), PROTOCOL_ERROR)

    def test_reserved_opcodes(self) -> None:
        """Reserved data (3-7) and control (0xB-0xF) opcodes: 1002."""
        for opcode in (3, 7, 0xB, 0xF):
            with self.subTest(opcode=opcode):
                self.attack(frame(opcode, b"x"), PROTOCOL_ERROR)

    def test_fragmented_or_oversized_control_frames(self) -> None:
        """A ping without FIN, or with a 126-byte payload: 1002."""
        self.attack(frame(OP_PING, b"x", fin=False), PROTOCOL_ERROR)
        self.attack(frame(OP_PING, b"x" * 126), PROTOCOL_ERROR)

    def test_bad_fragmentation(self) -> None:
        """A continuation with no message begun, or a new message inside one: 1002."""
        self.attack(frame(OP_CONTINUATION, b"x"), PROTOCOL_ERROR)
        self.attack(frame(OP_BINARY, b"x", fin=False) + frame(OP_BINARY, b"y"), PROTOCOL_ERROR)

    def test_big_frame_streams(self) -> None:
        """
        A 2 MiB frame (what a browser's one ws.send() of 2 MiB is) reaches the
        container whole: frames are streamed, not capped; a length of 2^63
        is 1002.
        """
        ws = self.tunnel()
        payload = bytes(range(256)) * (2 * MIB // 256)
        ws.send_frame(OP_BINARY, payload)
        self.assertEqual(ws.read_data(len(payload)), payload)
        self.attack(frame(OP_BINARY, length=1 << 63), PROTOCOL_ERROR)

    def test_big_message_streams(self) -> None:
        """Five 1 MiB fragments of one message reach the container whole."""
        ws = self.tunnel()
        chunk = bytes(range(256)) * (MIB // 256)
        ws.send(frame(OP_BINARY, chunk, fin=False))
        for _ in range(3):
            ws.send(frame(OP_CONTINUATION, chunk, fin=False))
        ws.send(frame(OP_CONTINUATION, chunk))
        self.assertEqual(ws.read_data(5 * MIB), chunk * 5)

    def test_invalid_utf8_text(self) -> None:
        """A text frame that is not UTF-8: 1007."""
        self.attack(frame(OP_TEXT, b"ok \xff\xfe"), INVALID_PAYLOAD)
        self.attack(frame(OP_TEXT, b"\xed\xa0\x80"), INVALID_PAYLOAD)  # a UTF-16 surrogate

    def test_text_frames_carry_their_utf8_bytes(self) -> None:
        """Valid text on the binary tunnel: its UTF-8 bytes reach the container and come back binary."""
        ws = self.tunnel()
        text = "naïve ☃ text".encode()
        ws.send_frame(OP_TEXT, text[:4], fin=False)  # split inside a character
        ws.send_frame(OP_CONTINUATION, text[4:])
        opcode, _, payload = ws.read_frame()
        received = payload
        while len(received) < len(text):
            received += ws.read_frame()[2]
        self.assertEqual((opcode, received), (OP_BINARY, text))

    def test_garbage_after_the_handshake(self) -> None:
        """An HTTP request sent where frames belong: 1002."""
        self.attack(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", PROTOCOL_ERROR)

    def test_close_frames_with_bad_contents(self) -> None:
        """
        A close frame with a reserved code, a 1-byte payload or a reason
        that is not UTF-8 ends the tunnel and its container connection.
        (Autobahn queues its 1002/1007 answer and then aborts the socket at
        once, so the client may see a reset instead of that close frame.)
        """
        for payload in (struct.pack("!H", 999), struct.pack("!H", 1005), b"\x03",
                        struct.pack("!H", 1000) + b"\xff"):
            with self.subTest(payload=payload):
                ws = self.tunnel()
                ws.send_frame(OP_CLOSE, payload)
                try:
                    code, _ = ws.read_close()
                except AssertionError:
                    code = None  # reset before the close frame was read
                self.assertIn(code, (None, PROTOCOL_ERROR, INVALID_PAYLOAD))
                self.assertTrue(ws.wait_closed(10))

    def test_close_with_a_reserved_code_is_answered_1002(self) -> None:
        """
        A close frame with a reserved code (999) is answered with a close
        frame 1002 before the TCP connection ends (RFC 6455 7.1.7, 7.4.1),
        not a reset (Autobahn alone aborts under its own answer; see
        ``rexecpf.wsend``).
        """
        ws = self.tunnel()
        ws.send_frame(OP_CLOSE, struct.pack("!H", 999))
        self.assertEqual(ws.read_close()[0], PROTOCOL_ERROR)

    def test_close_handshake_abuse(self) -> None:
        """
        Data and a second close after the client's close are ignored; a
        client that never answers the server's close is dropped after the
        5 s close handshake timeout.
        """
        ws = self.tunnel()
        ws.send(frame(OP_CLOSE, struct.pack("!H", 1000)) + frame(OP_BINARY, b"after close")
                + frame(OP_CLOSE, struct.pack("!H", 1000)))
        self.assertEqual(ws.read_close()[0], 1000)
        self.assertTrue(ws.wait_closed(10))
        ws = self.tunnel()
        ws.send(frame(OP_BINARY, b"x", mask=False))  # the server starts closing
        self.assertEqual(ws.read_close()[0], PROTOCOL_ERROR)
        started = time.monotonic()
        self.assertTrue(ws.wait_closed(15), "a client that never answers the close is never dropped")
        self.assertLess(time.monotonic() - started, 10)

    def test_pings_and_unsolicited_pongs(self) -> None:
        """A ping is answered with a pong of the same payload; an unsolicited pong is ignored."""
        ws = self.tunnel()
        ws.send_frame(OP_PONG, b"unasked")
        ws.send_frame(OP_PING, b"are you there")
        opcode, _, payload = ws.read_frame()
        self.assertEqual((opcode, payload), (OP_PONG, b"are you there"))
        ws.send_frame(OP_BINARY, b"after")
        self.assertEqual(ws.read_data(5), b"after")

    def test_flood_of_tiny_frames(self) -> None:
        """
        200,000 one-byte frames in one burst: every byte reaches the
        container, in order, and comes back; the daemon's memory stays
        bounded (each frame is a separate write towards the container).
        """
        ws = self.tunnel()
        payload = bytes(i % 251 for i in range(200_000))
        burst = b"".join(frame(OP_BINARY, payload[i:i + 1]) for i in range(len(payload)))
        before = self.daemon.rss()
        # Sent from a thread while this one reads: back-pressure may hold the sender.
        sender = threading.Thread(target=ws.send, args=(burst,), daemon=True)
        sender.start()
        self.assertEqual(ws.read_data(len(payload)), payload)
        sender.join(timeout=10)
        growth = self.daemon.rss() - before
        print(f"\nflood: 200,000 one-byte frames ({len(burst) / 1e6:.1f} MB) relayed; daemon RSS +{growth / 2**20:.1f} MiB")
        # The container-side write buffer pauses the WebSocket's reads at 64 KiB
        # of payload, i.e. 64 Ki one-byte writes (~100 bytes each in Python): ~6 MiB.
        self.assertLess(growth, 16 * 2**20)

    def test_client_vanishes_mid_frame(self) -> None:
        """A client gone in the middle of a frame: the container connection is closed."""
        ws = self.tunnel()
        ws.send(frame(OP_BINARY, b"y" * 1000)[:500])
        ws.close()
        # check_aftermath waits for the container connection to close


class ProxyTests(HostileTestCase):
    """Hostile requests under /p/: JSON 4xx, and nothing ambiguous reaches the container."""

    def one(self, raw: bytes) -> Any:
        responses = parse_responses(self.exchange(raw))
        self.assertEqual(len(responses), 1, responses)
        return responses[0]

    def get(self, target: str, headers: str = f"Authorization: Bearer {ALICE}\r\n") -> Any:
        return self.one(f"GET {target} HTTP/1.1\r\nHost: x\r\n{headers}Connection: close\r\n\r\n".encode())

    def test_no_forward_id(self) -> None:
        """/p, /p/ and /p// are a JSON 404 naming the form of a proxy URL."""
        for target in ("/p", "/p/", "/p//", "/p//x"):
            with self.subTest(target):
                response = self.get(target)
                self.assertJSONError(response.status, response.body, 404)
        self.nothing_reached_containers()

    def test_dot_segments_stay_with_the_container(self) -> None:
        """``/p/{id}/../../api/...`` is the container's path, passed as sent: never rexecpf's API."""
        target = f"/p/{self.proxy_id}/../../api/containers/c1/port-forwards"
        response = self.get(target)
        self.assertEqual((response.status, response.body), (200, b"container"))
        self.assertTrue(self.app.received.endswith(b"\r\n\r\n"))
        self.assertIn(b"GET /../../api/containers/c1/port-forwards HTTP/1.1\r\n", self.app.received)

    def test_encoded_slashes_and_dots_in_the_id(self) -> None:
        """An id with %2F and dots in it names no forward: JSON 404, nothing proxied."""
        for target in (f"/p/{self.proxy_id}%2F..%2F..%2Fapi/", "/p/%2e%2e/api/", "/p/..%2Fapi%2Fcontainers/",
                       f"/p/{self.proxy_id}%00/"):
            with self.subTest(target):
                response = self.get(target)
                self.assertJSONError(response.status, response.body, 404)
        self.nothing_reached_containers()

    def test_percent_encoded_id_is_the_same_forward(self) -> None:
        """
        ``pf%5F...`` decodes to the forward's id (``_`` is unreserved, RFC
        3986 6.2.2.2): it is that forward, with the same checks (401 without
        credentials, 404 for another user).
        """
        target = f"/p/{self.proxy_id.replace('_', '%5F')}/"
        response = self.get(target, headers="")
        self.assertJSONError(response.status, response.body, 401)
        response = self.get(target, headers=f"Authorization: Bearer {BOB}\r\n")
        self.assertJSONError(response.status, response.body, 404)
        self.nothing_reached_containers()
        self.assertEqual(self.get(target).body, b"container")

    def test_other_users_forward(self) -> None:
        """Bob's token on Alice's forward: 404 as if it did not exist; nothing proxied."""
        response = self.get(f"/p/{self.proxy_id}/", headers=f"Authorization: Bearer {BOB}\r\n")
        self.assertJSONError(response.status, response.body, 404, "Port forward not found")
        self.nothing_reached_containers()

    def test_header_injection_is_refused(self) -> None:
        """A bare CR, a bare LF or a NUL in a header value: JSON 400, and nothing reaches the container."""
        for value in ("a\rX-Injected: 1", "a\nX-Injected: 1", "a\x00b"):
            with self.subTest(value=value):
                response = self.get(f"/p/{self.proxy_id}/",
                                    headers=f"X-A: {value}\r\nAuthorization: Bearer {ALICE}\r\n")
                self.assertJSONError(response.status, response.body, 400, "Invalid request")
        self.nothing_reached_containers()

    def test_encoded_crlf_stays_encoded(self) -> None:
        """``%0d%0a`` in the path or query reaches the container still encoded: no header is injected."""
        target = f"/p/{self.proxy_id}/x%0d%0aX-Injected:%201?q=%0d%0aX-Injected:%202"
        self.assertEqual(self.get(target).body, b"container")
        self.assertIn(b"GET /x%0d%0aX-Injected:%201?q=%0d%0aX-Injected:%202 HTTP/1.1\r\n", self.app.received)
        self.assertNotIn(b"\nX-Injected", self.app.received)

    def test_smuggling_never_reaches_the_container(self) -> None:
        """Content-Length with chunked, or two lengths: JSON 400, and no byte of it (nor the smuggled request) is proxied."""
        head = f"POST /p/{self.proxy_id}/ HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ALICE}\r\n".encode()
        smuggled = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
        for framing, body in (
            (b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n" + smuggled),
            (b"Transfer-Encoding: chunked\r\nContent-Length: 40\r\n", b"0\r\n\r\n" + smuggled),
            (b"Content-Length: 5\r\nContent-Length: 40\r\n", b"hello" + smuggled),
            (b"Transfer-Encoding: xchunked\r\n", b"0\r\n\r\n" + smuggled),
        ):
            with self.subTest(framing=framing):
                responses = parse_responses(self.exchange(head + framing + b"\r\n" + body))
                self.assertEqual([r.status for r in responses], [400], responses)
                self.assertJSONError(400, responses[0].body, 400)
        self.nothing_reached_containers()

    def test_upgrades_pass_through_without_credentials(self) -> None:
        """
        Upgrade requests (a broken WebSocket one, h2c, a POST with a body) are
        the container's to judge: passed on without rexecpf's credentials or
        the hop-by-hop headers, and its plain answer comes back.
        """
        for head, body in (
            ("GET /p/{id}/ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             "Sec-WebSocket-Key: bad\r\n", b""),
            ("GET /p/{id}/ws HTTP/1.1\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n"
             "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n", b""),
            ("POST /p/{id}/ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             "Content-Length: 5\r\n", b"hello"),
        ):
            with self.subTest(head=head.split("\r\n")[1]):
                before = len(self.app.received)
                raw = (head.format(id=self.proxy_id) + f"Host: x\r\nAuthorization: Bearer {ALICE}\r\n\r\n").encode()
                response, = parse_responses(self.exchange(raw + body, until_response=True))
                self.assertEqual((response.status, response.body), (200, b"container"))
                sent = self.app.received[before:]
                self.assertTrue(sent.endswith(b"\r\n\r\n" + body), sent)
                self.assertIn(b"upgrade: ", sent.lower())
                self.assertNotIn(b"authorization", sent.lower())
                self.assertNotIn(b"http2-settings", sent.lower())

    def test_token_in_the_query_is_never_passed_on_nor_logged(self) -> None:
        """
        ``?token=`` sets the session cookie and redirects without the token;
        with the cookie, the container sees neither token nor cookie, and the
        daemon's log never holds a token (checked after every test).
        """
        response = self.get(f"/p/{self.proxy_id}/page?token={ALICE}&keep=1", headers="")
        self.assertEqual(response.status, 303)
        self.assertNotIn(ALICE.encode(), response.headers[b"location"])
        cookie = response.headers[b"set-cookie"].split(b";")[0].decode()
        response = self.get(f"/p/{self.proxy_id}/page?keep=1", headers=f"Cookie: {cookie}; theirs=1\r\n")
        self.assertEqual(response.body, b"container")
        self.assertNotIn(ALICE.encode(), self.app.received)
        self.assertNotIn(cookie.encode(), self.app.received)
        self.assertIn(b"theirs=1", self.app.received)  # the container's own cookies pass
        # a wrong token in the query is a 401 and is not logged either
        response = self.get(f"/p/{self.proxy_id}/?token={BOB}", headers="")
        self.assertIn(response.status, (401, 404))


class HostRoutingTests(HostileTestCase):
    """
    With ``proxy_domain``, a forward is served at the root of its own host:
    Host headers and absolute-form targets that name someone else's forward,
    or disagree with each other, never reach a container they should not.
    """

    server_extra = 'proxy_domain = "preview.test"'

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        code, forward = cls.daemon.create("c2", cls.app.port, user="bob")
        assert code == 201, forward
        cls.bob_id = forward["id"]

    @staticmethod
    def host_of(forward_id: str) -> str:
        return forward_id.replace("_", "-") + ".preview.test"

    def get(self, target: str, host: str, token: str | None = ALICE) -> Any:
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        responses = parse_responses(self.exchange(
            f"GET {target} HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\n\r\n".encode()))
        self.assertEqual(len(responses), 1, responses)
        return responses[0]

    def test_someone_elses_forward_by_host(self) -> None:
        """Alice's token at Bob's forward's host, or Bob's at Alice's: 404, nothing proxied; no token: 401."""
        response = self.get("/", self.host_of(self.bob_id))
        self.assertJSONError(response.status, response.body, 404, "Port forward not found")
        response = self.get("/", self.host_of(self.proxy_id), token=BOB)
        self.assertJSONError(response.status, response.body, 404, "Port forward not found")
        response = self.get("/", self.host_of(self.proxy_id), token=None)
        self.assertJSONError(response.status, response.body, 401)
        self.nothing_reached_containers()

    def test_look_alike_hosts(self) -> None:
        """
        A prefixed label, ``_`` for ``-``, the bare domain, or the domain
        under another: never a forward (the last two are rexecpf's own site).
        """
        for host in ("x-" + self.host_of(self.proxy_id), self.proxy_id + ".preview.test",
                     "preview.test", self.host_of(self.proxy_id) + ".evil.example"):
            with self.subTest(host):
                response = self.get("/api/containers/c1/port-forwards", host)
                if host == "preview.test" or host.endswith(".evil.example"):
                    self.assertEqual(response.status, 200)
                    self.assertIsInstance(json.loads(response.body), list)
                else:
                    self.assertJSONError(response.status, response.body, 404)
        self.nothing_reached_containers()

    def test_host_spellings_name_the_same_forward(self) -> None:
        """Upper case, a trailing dot or a port: the same forward, for its owner only."""
        for host in (self.host_of(self.proxy_id).upper(), self.host_of(self.proxy_id) + ".",
                     self.host_of(self.proxy_id) + ":8443"):
            with self.subTest(host):
                self.assertEqual(self.get("/", host).body, b"container")
                response = self.get("/", host, token=BOB)
                self.assertJSONError(response.status, response.body, 404)

    def test_absolute_form_target_wins_over_host(self) -> None:
        """
        ``GET http://{bob's host}/`` with ``Host: {alice's host}`` is Bob's
        forward (RFC 9112 3.2.2: the target's host wins), so 404 for Alice;
        ``GET http://{alice's host}/x`` with any Host reaches Alice's
        container as ``GET /x`` with her host: one host, never two.
        """
        response = self.get(f"http://{self.host_of(self.bob_id)}/", self.host_of(self.proxy_id))
        self.assertJSONError(response.status, response.body, 404, "Port forward not found")
        self.nothing_reached_containers()
        response = self.get(f"http://{self.host_of(self.proxy_id)}/x?q=1", "127.0.0.1")
        self.assertEqual(response.body, b"container")
        sent = self.app.received[self.received_before[1]:]
        self.assertTrue(sent.startswith(b"GET /x?q=1 HTTP/1.1\r\n"), sent)
        self.assertIn(f"\r\nHost: {self.host_of(self.proxy_id)}\r\n".encode(), sent)

    def test_prefix_paths_stay_in_the_hosts_forward(self) -> None:
        """``/p/{bob's id}/`` and ``/api/...`` on Alice's host are paths of Alice's container."""
        for target in (f"/p/{self.bob_id}/", "/api/containers/c2/port-forwards"):
            with self.subTest(target):
                before = len(self.app.received)
                self.assertEqual(self.get(target, self.host_of(self.proxy_id)).body, b"container")
                self.assertTrue(self.app.received[before:].startswith(f"GET {target} ".encode()))


def _whole_response(data: bytes) -> bool:
    head, separator, body = data.partition(b"\r\n\r\n")
    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    return bool(separator and length and len(body) >= int(length.group(1)))


if __name__ == "__main__":
    unittest.main()
