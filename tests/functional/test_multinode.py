"""
Several nodes: two real ``twistd -n rexecpf`` processes, one listening on
127.0.0.2 and one on 127.0.0.3 (each with its ``local_interface``), sharing
one store (a real PostgreSQL database, or one SQLite file) and one static
inventory file.  A forward created on one node is usable through the
other's ``/p/``, ``/ws/`` and ``local_port`` at once; a delete, or a
container stop, closes the connections of both; a node survives the other's
``kill -9``, a database restart, and a cut-off from the database.  Without
PostgreSQL those tests skip, except under ``CI=true`` where they fail.
"""

from __future__ import annotations

import http.server
import shutil
import signal
import socket
import tempfile
import threading
import time
import unittest
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tests.functional.daemon import Daemon
from tests.functional.peers import PostgresServer, local_port_range
from tests.functional.pgcluster import fresh_database, require_postgres
from tests.functional.rawws import OP_BINARY, RawWebSocket, RecordingServer

NODE_A, NODE_B = "127.0.0.2", "127.0.0.3"
GRACE = 2.0


def poll(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s: {what}")
        time.sleep(0.02)


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        body = b"hello from the container"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def connect(host: str, port: int) -> socket.socket | None:
    try:
        return socket.create_connection((host, port), timeout=5)
    except OSError:
        return None


def echoes(sock: socket.socket, data: bytes = b"ping") -> bool:
    sock.sendall(data)
    received = b""
    while len(received) < len(data):
        chunk = sock.recv(65536)
        if not chunk:
            return False
        received += chunk
    return received == data


def closed(sock: socket.socket, timeout: float) -> bool:
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except OSError:
        pass
    return True


class NodeChecks(unittest.TestCase):
    """What a test of nodes does to one node (no tests: also for other modules' node tests)."""

    def health(self, daemon: Daemon) -> int:
        try:
            return daemon.request("GET", "/healthz", user=None, timeout=5)[0]
        except OSError:
            return 0

    def tunnel(self, daemon: Daemon, forward_id: str) -> RawWebSocket:
        ws = RawWebSocket(daemon.port, host=daemon.host)
        self.addCleanup(ws.close)
        self.assertEqual(ws.handshake(f"/ws/port-forward/{forward_id}"), 101, ws.body)
        ws.send_frame(OP_BINARY, b"through the tunnel", mask=True)
        self.assertEqual(ws.read_data(18), b"through the tunnel")
        return ws

    def local(self, daemon: Daemon, port: int, timeout: float = 1.0) -> socket.socket:
        """:return: a connection to ``daemon``'s ``local_port`` (listening within ``timeout``), relaying."""
        sock = poll(lambda: connect(daemon.host, port), timeout, f"{daemon.host}:{port} listens")
        self.addCleanup(sock.close)
        self.assertTrue(echoes(sock))
        return sock

    def assert_closed_1001(self, ws: RawWebSocket, within: float) -> None:
        started = time.monotonic()
        code, _ = ws.read_close()
        self.assertEqual(code, 1001)
        self.assertLess(time.monotonic() - started, within)


class Nodes(NodeChecks):
    """Two nodes on one store; subclasses give the store's TOML."""

    def store_toml(self) -> tuple[str, str]:
        """:return: (extra TOML, ``[server] state``) of both nodes."""
        raise NotImplementedError

    def setUp(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="rexecpf-nodes-"))
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.echo = RecordingServer(echo=True)
        self.addCleanup(self.echo.stop)
        self.web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
        threading.Thread(target=self.web.serve_forever, daemon=True).start()
        self.addCleanup(self.web.server_close)
        self.addCleanup(self.web.shutdown)
        self.inventory = self.directory / "containers.toml"
        low, high = local_port_range()
        self.local_ports = f'local_ports = "{low}-{high}"'
        self.a = self.node(NODE_A, [{"id": "c1", "owner": "alice"}, {"id": "c2", "owner": "alice"}])
        self.b = self.node(NODE_B)

    def node(self, host: str, containers: list[dict[str, str]] | None = None) -> Daemon:
        directory = self.directory / host
        directory.mkdir()
        extra, state = self.store_toml()
        daemon = Daemon(
            directory, containers=containers, inventory=self.inventory, host=host, state=state, extra=extra,
            limits=f'{self.local_ports}\nlocal_interface = "{host}"',
        )
        self.addCleanup(daemon.stop)
        return daemon

    def start(self) -> None:
        self.a.start()
        self.b.start()

    # --- the tests every store runs

    def test_create_on_one_node_use_on_the_other_and_delete_closes_both(self) -> None:
        """
        Created on A: at once through B's /p/ and /ws/, and on B's local_port
        within a second; deleted on A: B's tunnel gets 1001 within a second,
        its local_port connection closes and it stops listening.
        """
        self.start()
        code, web = self.a.create("c1", self.web.server_address[1])
        self.assertEqual(code, 201, web)
        code, page, _ = self.b.request("GET", f"/p/{web['id']}/")
        self.assertEqual((code, page), (200, b"hello from the container"))
        code, echo = self.a.create("c1", self.echo.port)
        self.assertEqual(code, 201, echo)
        ws = self.tunnel(self.b, echo["id"])
        sock = self.local(self.b, echo["local_port"])
        self.local(self.a, echo["local_port"])
        same = [(f["id"], f["local_port"]) for f in self.a.list("c1")]
        self.assertEqual([(f["id"], f["local_port"]) for f in self.b.list("c1")], same)
        code, _, _ = self.a.request("DELETE", f"/api/containers/c1/port-forwards/{echo['id']}")
        self.assertEqual(code, 204)
        self.assert_closed_1001(ws, 1.0)
        self.assertTrue(closed(sock, 1.0))
        poll(lambda: connect(self.b.host, echo["local_port"]) is None, 1.0, "B stops listening")
        self.assertEqual(self.b.request("GET", f"/p/{echo['id']}/")[0], 404)


class PostgresNodesTests(Nodes):
    def setUp(self) -> None:
        require_postgres()
        self.url = fresh_database(self)
        super().setUp()

    def store_toml(self) -> tuple[str, str]:
        return (
            f'\n[store]\nurl = "{self.url}"\nresync_seconds = 30\ncut_off_grace_seconds = {GRACE}\n',
            "state.sqlite3",
        )

    def test_40_concurrent_creates_across_nodes(self) -> None:
        """40 POSTs at once, alternating between the nodes, for one container: exactly 10 x 201, 30 x 429."""
        self.start()
        nodes = [self.a, self.b]
        with ThreadPoolExecutor(max_workers=40) as pool:
            results = list(pool.map(lambda i: nodes[i % 2].create("c1", 1000 + i), range(40)))
        self.assertEqual(Counter(code for code, _ in results), {201: 10, 429: 30}, results)
        created = [document for code, document in results if code == 201]
        self.assertEqual(len({f["local_port"] for f in created}), 10)

    def test_container_stop_closes_connections_on_both(self) -> None:
        """The container stops (the shared inventory says so): tunnels on both nodes get 1001."""
        self.start()
        code, echo = self.a.create("c1", self.echo.port)
        self.assertEqual(code, 201, echo)
        on_a, on_b = self.tunnel(self.a, echo["id"]), self.tunnel(self.b, echo["id"])
        other = self.a.create("c2", self.echo.port)[1]
        kept = self.tunnel(self.b, other["id"])
        self.a.write_inventory([{"id": "c1", "owner": "alice", "state": "exited"}, {"id": "c2", "owner": "alice"}])
        self.assert_closed_1001(on_a, 5.0)
        self.assert_closed_1001(on_b, 5.0)
        self.assertEqual([f["id"] for f in self.b.list("c2")], [other["id"]])
        kept.send_frame(OP_BINARY, b"still", mask=True)
        self.assertEqual(kept.read_data(5), b"still")

    def test_a_node_killed_the_other_serves(self) -> None:
        """kill -9 of A: B's tunnel goes on, B creates, and what A created is B's too; then the same the other way."""
        self.start()
        code, echo = self.a.create("c1", self.echo.port)
        self.assertEqual(code, 201, echo)
        ws = self.tunnel(self.b, echo["id"])
        self.a.kill()
        ws.send_frame(OP_BINARY, b"after", mask=True)
        self.assertEqual(ws.read_data(5), b"after")
        self.assertEqual(self.health(self.b), 200)
        code, second = self.b.create("c1", 81)
        self.assertEqual(code, 201, second)
        self.a.start()
        self.local(self.a, echo["local_port"])
        self.b.kill()
        self.assertEqual(self.a.request("GET", f"/api/containers/c1/port-forwards/{second['id']}")[0], 200)
        self.tunnel(self.a, echo["id"])


class PostgresRestartTests(Nodes):
    """On a private, durable cluster: ``pg_ctl restart -m immediate``, and a stop."""

    def setUp(self) -> None:
        require_postgres()
        durable = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}
        directory = tempfile.mkdtemp(prefix="rexecpf-pgown-")
        self.addCleanup(shutil.rmtree, directory, True)
        self.cluster = PostgresServer(directory, settings=durable)
        self.addCleanup(self.cluster.stop)
        super().setUp()

    def store_toml(self) -> tuple[str, str]:
        grace = GRACE if "cut_off" in self._testMethodName else 30.0
        return f'\n[store]\nurl = "{self.cluster.url}"\ncut_off_grace_seconds = {grace}\n', "state.sqlite3"

    def test_cut_off_closes_after_the_grace_and_resyncs(self) -> None:
        """
        The database stops: both nodes answer 503 on /healthz at once; after
        the grace period B's tunnel is closed (1001).  It starts again: both
        resync, and a forward created on A is B's at once.
        """
        self.start()
        code, echo = self.a.create("c1", self.echo.port)
        self.assertEqual(code, 201, echo)
        ws = self.tunnel(self.b, echo["id"])
        cluster = self.cluster
        cluster.pg_ctl("stop", "-m", "fast")
        poll(lambda: self.health(self.a) == 503 and self.health(self.b) == 503, 5, "both 503")
        started = time.monotonic()
        self.assertEqual(ws.read_close()[0], 1001)
        self.assertGreater(time.monotonic() - started, GRACE - 1.5)
        cluster.pg_ctl("start")
        poll(lambda: self.health(self.a) == 200 and self.health(self.b) == 200, 30, "both 200 again")
        self.tunnel(self.b, echo["id"])
        code, web = self.a.create("c1", self.web.server_address[1])
        self.assertEqual(code, 201, web)
        self.assertEqual(self.b.request("GET", f"/p/{web['id']}/")[0:2], (200, b"hello from the container"))
        # SIGTERM ends a node promptly, even while its feed is reconnecting.
        cluster.pg_ctl("stop", "-m", "immediate")
        poll(lambda: self.health(self.b) == 503, 5, "B 503")
        started = time.monotonic()
        self.assertEqual(self.b.kill(signal.SIGTERM), 0)
        self.assertLess(time.monotonic() - started, 5)

    def test_immediate_restart(self) -> None:
        """
        ``pg_ctl restart -m immediate`` (a crash): /healthz is 503, then 200,
        with nothing lost: the forwards, the tunnels (within the grace
        period), and the change feed (a create on A is B's at once).
        """
        self.start()
        code, echo = self.a.create("c1", self.echo.port)
        self.assertEqual(code, 201, echo)
        ws = self.tunnel(self.b, echo["id"])
        seen: list[int] = []
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                seen.append(self.health(self.b))
                time.sleep(0.02)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        self.cluster.pg_ctl("restart", "-m", "immediate")
        poll(lambda: 503 in seen and seen[-1] == 200 and self.health(self.a) == 200, 30, "503, then 200")
        stop.set()
        watcher.join()
        self.assertEqual([f["id"] for f in self.b.list("c1")], [echo["id"]])
        ws.send_frame(OP_BINARY, b"kept", mask=True)
        self.assertEqual(ws.read_data(4), b"kept")
        code, web = self.a.create("c1", self.web.server_address[1])
        self.assertEqual(code, 201, web)
        self.assertEqual(self.b.request("GET", f"/p/{web['id']}/")[0:2], (200, b"hello from the container"))


class SQLiteNodesTests(Nodes):
    """Two processes on one host sharing one SQLite state file."""

    def store_toml(self) -> tuple[str, str]:
        return "", str(self.directory / "shared.sqlite3")


del Nodes
