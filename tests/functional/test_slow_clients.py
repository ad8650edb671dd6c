"""
Slow clients against a real daemon: 500 connections trickling their request
headers a byte a second (slowloris) do not stop another client being served
promptly.  (That idle connections are closed after the site's ``timeOut`` is
tested on a Clock in tests/test_web.py: the real default is 60 s.)
"""

from __future__ import annotations

import socket
import tempfile
import threading
import time
import unittest

from tests.functional.daemon import Daemon

CONNECTIONS = 500
SECONDS = 10


class SlowlorisTests(unittest.TestCase):
    def test_trickling_clients_do_not_block_others(self) -> None:
        """500 byte-a-second clients for 10 s: others are answered within 1 s, every time."""
        daemon = Daemon(tempfile.mkdtemp(prefix="rexecpf-slow-")).start()
        self.addCleanup(daemon.stop)
        sockets = []
        for _ in range(CONNECTIONS):
            connection = socket.create_connection(("127.0.0.1", daemon.port), timeout=5)
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sockets.append(connection)
        self.addCleanup(lambda: [s.close() for s in sockets])
        request = b"GET /api/containers/c1/port-forwards HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 64
        stop = threading.Event()
        closed_early = []

        def trickle() -> None:
            for index in range(SECONDS):
                if stop.is_set():
                    return
                for connection in sockets:
                    try:
                        connection.send(request[index:index + 1])
                    except OSError:
                        closed_early.append(connection)
                time.sleep(1)

        trickler = threading.Thread(target=trickle, daemon=True)
        trickler.start()
        latencies = []
        deadline = time.monotonic() + SECONDS
        port = 1
        while time.monotonic() < deadline:
            started = time.monotonic()
            code, _ = daemon.create("c1", port)
            self.assertIn(code, (201, 429))
            self.assertEqual(daemon.request("GET", "/healthz", user=None, timeout=5)[0], 200)
            latencies.append(time.monotonic() - started)
            port += 1
            time.sleep(0.1)
        stop.set()
        trickler.join(timeout=5)
        latencies.sort()
        worst = latencies[-1]
        median = latencies[len(latencies) // 2]
        print(f"\nslowloris: {CONNECTIONS} trickling connections for {SECONDS} s; "
              f"{len(latencies)} create+healthz rounds, median {median * 1000:.0f} ms, "
              f"worst {worst * 1000:.0f} ms")
        self.assertLess(worst, 1.0)
        self.assertEqual(closed_early, [])  # still within the 60 s idle timeout
