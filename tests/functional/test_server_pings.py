"""
The server's pings, in real time on a real daemon with a short
``tunnel_idle_seconds``: a client that answers them (as a browser does, and
a browser cannot send pings of its own) keeps a tunnel without data open;
one that does not answer meets the idle timeout.
"""

from __future__ import annotations

import tempfile
import threading
import time
import unittest

from tests.functional.daemon import Daemon
from tests.functional.rawws import OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, RawWebSocket, RecordingServer

IDLE_SECONDS = 1.5


class ServerPingTests(unittest.TestCase):
    def setUp(self) -> None:
        self.echo = RecordingServer(echo=True)
        self.addCleanup(self.echo.stop)
        self.daemon = Daemon(tempfile.mkdtemp(prefix="rexecpf-pings-"),
                             limits=f"tunnel_idle_seconds = {IDLE_SECONDS}").start()
        self.addCleanup(self.daemon.stop)
        code, forward = self.daemon.create("c1", self.echo.port)
        self.assertEqual(code, 201, forward)
        self.path = f"/ws/port-forward/{forward['id']}"

    def tunnel(self) -> RawWebSocket:
        ws = RawWebSocket(self.daemon.port)
        self.addCleanup(ws.close)
        self.assertEqual(ws.handshake(self.path), 101, ws.body)
        return ws

    def test_answered_pings_keep_the_tunnel_open(self) -> None:
        """A client that only answers pings is still connected after 4 s (idle timeout 1.5 s)."""
        ws = self.tunnel()
        started = time.monotonic()
        pings = 0
        while time.monotonic() - started < 4.0:
            opcode, _, payload = ws.read_frame()
            self.assertEqual(opcode, OP_PING, payload)
            ws.send_frame(OP_PONG, payload)
            pings += 1
        self.assertGreaterEqual(pings, 6)  # every 0.5 s
        ws.send_frame(OP_BINARY, b"still open")
        self.assertEqual(ws.read_data(10), b"still open")

    def test_unanswered_pings_meet_the_idle_timeout(self) -> None:
        """A client that reads but never answers is closed 1000 "idle timeout" after 1.5 s."""
        ws = self.tunnel()
        started = time.monotonic()
        frames: list[tuple[int, bytes]] = []

        def read() -> None:
            while True:
                opcode, _, payload = ws.read_frame()
                frames.append((opcode, payload))
                if opcode == OP_CLOSE:
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout=10)
        elapsed = time.monotonic() - started
        opcodes = [opcode for opcode, _ in frames]
        # pings at 0.5 s and 1 s (one at 1.5 s may come before the close)
        self.assertEqual(opcodes[-1], OP_CLOSE)
        self.assertIn(opcodes[:-1], ([OP_PING] * 2, [OP_PING] * 3))
        self.assertEqual(frames[-1][1], b"\x03\xe8idle timeout")
        self.assertGreater(elapsed, IDLE_SECONDS - 0.1)


if __name__ == "__main__":
    unittest.main()
