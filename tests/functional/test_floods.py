"""
Floods against a real ``twistd rexecpf``: a client that sends as fast as it
can and reads nothing, or opens connection after connection, must not grow
the daemon's memory; the per-user caps (``tunnels_per_user``,
``connections_per_user``) hold on every path.  The daemon's RSS (``VmRSS``)
is sampled while a flood runs; every flood is bounded (a byte or connection
count and a deadline) and stops early once the daemon has grown past the
bound, so a regression fails fast instead of eating the machine.
"""

from __future__ import annotations

import json
import select
import socket
import struct
import tempfile
import threading
import time
import unittest
from collections.abc import Callable

from tests.functional.daemon import Daemon
from tests.functional.rawws import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    RawWebSocket,
    RecordingServer,
    frame,
    wait_until,
)

MIB = 1024 * 1024

#: What one flood may send at most, and for how long.
FLOOD_BYTES = 200 * MIB
FLOOD_SECONDS = 60.0
#: The daemon has stopped reading once a send has waited this long.
STALLED_SECONDS = 2.0


class Flood:
    """
    Send ``chunk`` over ``sock`` again and again from a thread, without
    reading, until ``limit`` bytes are sent, the daemon stops reading
    (nothing could be sent for :data:`STALLED_SECONDS`), :meth:`stop`, or
    :data:`FLOOD_SECONDS` pass.
    """

    def __init__(self, sock: socket.socket, chunk: bytes, limit: int = FLOOD_BYTES) -> None:
        self.sock = sock
        self.chunk = chunk
        self.limit = limit
        self.sent = 0
        self.stalled = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Flood:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        view = memoryview(self.chunk)
        offset = 0
        waited_since: float | None = None
        deadline = time.monotonic() + FLOOD_SECONDS
        while self.sent < self.limit and not self._stop.is_set() and time.monotonic() < deadline:
            _, writable, _ = select.select([], [self.sock], [], 0.1)
            if not writable:
                waited_since = waited_since or time.monotonic()
                if time.monotonic() - waited_since > STALLED_SECONDS:
                    self.stalled = True
                    return
                continue
            waited_since = None
            try:
                count = self.sock.send(view[offset:])
            except BlockingIOError:
                continue
            except OSError:
                return  # the daemon closed the connection
            self.sent += count
            offset = (offset + count) % len(view)


def sample_rss(daemon: Daemon, flood: Flood, bound: int) -> tuple[int, int]:
    """
    Sample the daemon's RSS every 50 ms while ``flood`` runs; stop the flood
    once RSS has grown by more than twice ``bound`` (it failed: no point in
    going on).

    :return: (RSS before, the highest RSS seen).
    """
    before = peak = daemon.rss()
    flood.start()
    while flood.running:
        peak = max(peak, daemon.rss())
        if peak - before > 2 * bound:
            flood.stop()
        time.sleep(0.05)
    return before, max(peak, daemon.rss())


class TunnelFloodTests(unittest.TestCase):
    """
    A tunnel to an echo "container"; ``tunnel_bytes_per_second`` is set
    far above what loopback carries, so that only flow control bounds the
    flood (the rate limit's share is tested on a clock in
    tests/test_tunnel.py).
    """

    limits = "tunnel_bytes_per_second = 4294967296"

    def setUp(self) -> None:
        self.echo = RecordingServer(echo=True)
        self.addCleanup(self.echo.stop)
        self.daemon = Daemon(tempfile.mkdtemp(prefix="rexecpf-floods-"), limits=self.limits).start()
        self.addCleanup(self.daemon.stop)
        code, forward = self.daemon.create("c1", self.echo.port)
        self.assertEqual(code, 201, forward)
        self.path = f"/ws/port-forward/{forward['id']}"

    def tunnel(self) -> RawWebSocket:
        ws = RawWebSocket(self.daemon.port, timeout=30)
        self.addCleanup(ws.close)
        self.assertEqual(ws.handshake(self.path), 101, ws.body)
        ws.send_frame(OP_BINARY, b"hello")
        self.assertEqual(ws.read_data(5), b"hello")
        return ws

    def flood_without_reading(self, ws: RawWebSocket, one: bytes, bound: int) -> tuple[Flood, int]:
        """
        Flood ``ws`` with copies of the frame ``one`` and read nothing.

        :return: the finished flood and how much RSS grew at its peak.
        """
        ws.sock.setblocking(False)
        flood = Flood(ws.sock, one * (MIB // len(one)))
        before, peak = sample_rss(self.daemon, flood, bound)
        ws.sock.setblocking(True)
        ws.sock.settimeout(30)
        return flood, peak - before

    def still_carries_data(self, ws: RawWebSocket, skip: Callable[[int], bool]) -> int:
        """
        Read everything the daemon queued for the client (frames ``skip``
        says to skip), then show the tunnel still echoes.

        :return: how many frames were skipped.
        """
        skipped = [0]
        echoed: list[bytes] = []

        def read() -> None:
            while True:
                opcode, _, payload = ws.read_frame()
                if opcode == OP_BINARY:
                    echoed.append(payload)
                    return
                self.assertTrue(skip(opcode), opcode)
                skipped[0] += 1

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        ws.send_frame(OP_BINARY, b"after the flood")
        reader.join(timeout=60)
        self.assertEqual(echoed, [b"after the flood"])
        return skipped[0]

    def test_ping_flood_without_reading(self) -> None:
        """
        A client sends pings as fast as it can and never reads: the daemon
        stops reading it once the pongs no longer drain (they are not
        queued without bound), its RSS stays flat, and once the client
        reads again the tunnel still carries data.
        """
        ws = self.tunnel()
        ping = frame(OP_PING, b"p" * 125)
        bound = 8 * MIB
        flood, growth = self.flood_without_reading(ws, ping, bound)
        print(f"\nping flood: {flood.sent / MIB:.1f} MiB of pings sent before the daemon stopped reading "
              f"(stalled: {flood.stalled}); daemon RSS +{growth / MIB:.1f} MiB")
        self.assertLess(growth, bound)
        self.assertTrue(flood.stalled, f"the daemon read all {flood.sent / MIB:.0f} MiB of pings")
        pongs = self.still_carries_data(ws, lambda opcode: opcode == OP_PONG)
        # Pongs are coalesced: fewer than there were pings.
        self.assertLess(pongs, flood.sent // len(ping))


class CapTests(unittest.TestCase):
    """``tunnels_per_user`` and ``connections_per_user`` on a real daemon, set low."""

    CAP = 2

    def setUp(self) -> None:
        self.echo = RecordingServer(echo=True)
        self.addCleanup(self.echo.stop)
        self.daemon = Daemon(tempfile.mkdtemp(prefix="rexecpf-caps-"),
                             limits=f"tunnels_per_user = {self.CAP}\nconnections_per_user = {self.CAP}").start()
        self.addCleanup(self.daemon.stop)
        code, self.forward = self.daemon.create("c1", self.echo.port)
        self.assertEqual(code, 201, self.forward)

    def tunnel(self) -> RawWebSocket:
        ws = RawWebSocket(self.daemon.port)
        self.addCleanup(ws.close)
        ws.handshake(f"/ws/port-forward/{self.forward['id']}")
        return ws

    def local(self) -> socket.socket:
        """:return: a connection to the forward's local_port."""
        connection = socket.create_connection(("127.0.0.1", self.forward["local_port"]), timeout=10)
        self.addCleanup(connection.close)
        return connection

    def assert_echoes(self, connection: socket.socket) -> None:
        connection.sendall(b"ping")
        self.assertEqual(connection.recv(4), b"ping")

    def test_tunnels_per_user(self) -> None:
        """One tunnel over the cap: 429 Limit exceeded in JSON, no upgrade; one closed makes room."""
        open_ones = [self.tunnel() for _ in range(self.CAP)]
        self.assertEqual([ws.status for ws in open_ones], [101] * self.CAP)
        over = self.tunnel()
        self.assertEqual(over.status, 429)
        self.assertEqual(json.loads(over.body)["error"]["message"], "Limit exceeded")
        self.assertNotIn("sec-websocket-accept", over.headers)
        open_ones[0].send_frame(OP_CLOSE, struct.pack("!H", 1000))
        open_ones[0].read_close()
        wait_until(lambda: self.tunnel().status == 101, 10, "no room after a tunnel closed")

    def test_proxied_requests_per_user(self) -> None:
        """
        Requests in flight to a container that does not answer count: one
        more is 429 Limit exceeded in JSON, and so is a local_port
        connection's share of the same cap.
        """
        silent = socket.socket()
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        self.addCleanup(silent.close)
        accepted: list[socket.socket] = []  # never answered

        def accept() -> None:
            while True:
                try:
                    accepted.append(silent.accept()[0])
                except OSError:
                    return

        threading.Thread(target=accept, daemon=True).start()
        self.addCleanup(lambda: [connection.close() for connection in accepted])
        code, forward = self.daemon.create("c1", silent.getsockname()[1])
        self.assertEqual(code, 201, forward)
        request = (f"GET /p/{forward['id']}/ HTTP/1.1\r\nHost: x\r\n"
                   "Authorization: Bearer alice-token\r\n\r\n").encode()
        held = []
        for _ in range(self.CAP - 1):
            client = socket.create_connection(("127.0.0.1", self.daemon.port), timeout=10)
            self.addCleanup(client.close)
            client.sendall(request)
            held.append(client)
        wait_until(lambda: len(accepted) == self.CAP - 1, 10, "the proxied requests never reached the container")
        self.assert_echoes(self.local())  # the owner's local_port connection is the other one
        code, document, _ = self.daemon.request("GET", f"/p/{forward['id']}/", timeout=10)
        self.assertEqual(code, 429, document)
        self.assertEqual(document["error"]["message"], "Limit exceeded")
        self.assertIn("limits.connections_per_user", document["error"]["detail"])

    def test_local_port_connections_per_user(self) -> None:
        """
        A local_port connection over its owner's cap is accepted and closed
        at once (logged); one closed makes room.
        """
        first, second = self.local(), self.local()
        self.assert_echoes(first)
        self.assert_echoes(second)
        over = self.local()
        self.assertEqual(over.recv(1), b"")  # closed at once
        self.assertIn("connection closed at once", self.daemon.log_path.read_text())
        first.close()
        wait_until(self.echoed, 10, "no room after a connection closed")

    def echoed(self) -> bool:
        """:return: whether a new local_port connection echoes (not closed at once)."""
        connection = self.local()
        connection.sendall(b"ping")
        return connection.recv(4) == b"ping"

    def test_connection_flood(self) -> None:
        """
        2,000 connections to a local_port listener over the cap and 1,000
        tunnel handshakes over it, one after the other: each is refused,
        the daemon's RSS stays flat, and the refusals are not logged one by
        one.
        """
        held = [self.local() for _ in range(self.CAP)]
        for connection in held:
            self.assert_echoes(connection)
        tunnels = [self.tunnel() for _ in range(self.CAP)]
        self.assertEqual([ws.status for ws in tunnels], [101] * self.CAP)
        before = peak = self.daemon.rss()
        started = time.monotonic()
        for index in range(2000):
            with socket.create_connection(("127.0.0.1", self.forward["local_port"]), timeout=10) as connection:
                self.assertEqual(connection.recv(1), b"", index)
            if index % 100 == 0:
                peak = max(peak, self.daemon.rss())
        for index in range(1000):
            with RawWebSocket(self.daemon.port) as ws:
                self.assertEqual(ws.handshake(f"/ws/port-forward/{self.forward['id']}"), 429, index)
            if index % 100 == 0:
                peak = max(peak, self.daemon.rss())
        peak = max(peak, self.daemon.rss())
        print(f"\nconnection flood: 2,000 local_port connections and 1,000 tunnel handshakes over the cap "
              f"in {time.monotonic() - started:.1f} s; daemon RSS +{(peak - before) / MIB:.1f} MiB at the peak")
        self.assertLess(peak - before, 4 * MIB)
        # one line, then at most one every REFUSALS_LOG_SECONDS (10 s)
        elapsed = time.monotonic() - started
        self.assertLessEqual(self.daemon.log_path.read_text().count("connection closed at once"), 1 + elapsed // 10)
        self.assertEqual(self.echo.open_connections(), self.CAP + self.CAP)
        for connection in held:
            self.assert_echoes(connection)


if __name__ == "__main__":
    unittest.main()
