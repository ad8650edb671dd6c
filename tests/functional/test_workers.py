"""
``twistd -n rexecpf --workers 2`` with real processes: both workers answer
on the one port (which worker holds a connection is read from ``/proc``),
a forward created through one is served by the other (proxy, tunnel,
``local_port``), a delete through one closes the other's tunnel, a worker
killed with SIGKILL is started again, SIGTERM ends them all with status 0,
SIGHUP reaches every worker, the metrics of both are served labelled, a
worker that cannot start ends the parent with status 1, and socket
activation hands the systemd socket to both.  On SQLite, and on PostgreSQL
when it is installed.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client.parser import text_string_to_metric_families

from tests.functional.daemon import REPO, Daemon, http_request, subprocess_env, twistd_argv
from tests.functional.peers import free_port, local_port_range
from tests.functional.pgcluster import fresh_database, require_postgres
from tests.functional.rawws import OP_BINARY, RawWebSocket, RecordingServer
from tests.functional.test_multinode import _Hello, closed, echoes, poll
from tests.functional.test_ops import NotifySocket

T = TypeVar("T")


def workers_of(parent: int) -> set[int]:
    """:return: the pids of ``parent``'s live children (``/proc/*/stat``)."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rpartition(")")[2].split()
        except OSError:
            continue
        if fields and int(fields[1]) == parent and fields[0] != "Z":
            found.add(int(entry))
    return found


def _hex_address(text: str) -> tuple[str, int]:
    host, _, port = text.partition(":")
    return socket.inet_ntoa(bytes.fromhex(host)[::-1]), int(port, 16)


def _server_inode(client: socket.socket) -> int:
    """:return: the inode of the server's end of ``client`` (0 while not accepted)."""
    mine, peer = client.getsockname()[:2], client.getpeername()[:2]
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if _hex_address(fields[1]) == peer and _hex_address(fields[2]) == mine:
                return int(fields[9])
    return 0


def server_pid(client: socket.socket, pids: set[int], timeout: float = 5.0) -> int:
    """:return: which of ``pids`` holds the server's end of the connection ``client``."""

    def holder() -> int | None:
        inode = _server_inode(client)
        if not inode:
            return None
        for pid in pids:
            try:
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                        return pid
            except OSError:
                continue
        return None

    return poll(holder, timeout, "a worker holds the connection")  # type: ignore[no-any-return]


class Workers(unittest.TestCase):
    """One rexecpf with two workers; subclasses give the store's TOML."""

    def store_toml(self) -> str:
        return ""

    def setUp(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="rexecpf-workers-test-"))
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.echo = RecordingServer(echo=True)
        self.addCleanup(self.echo.stop)
        self.web = http_server()
        self.addCleanup(self.web.server_close)
        self.addCleanup(self.web.shutdown)
        low, high = local_port_range()
        self.metrics_port = free_port()
        self.daemon = Daemon(
            self.directory, containers=[{"id": "c1", "owner": "alice"}], extra=self.store_toml(),
            limits=f'local_ports = "{low}-{high}"',
        )
        self.daemon.config.write_text(self.daemon.config.read_text().replace(
            "state = ", f'metrics_listen = "tcp:{self.metrics_port}:interface=127.0.0.1"\n'
                        "shutdown_grace_seconds = 3\nstate = ", 1))
        self.addCleanup(self.stop_all)

    def start(self) -> set[int]:
        """Start with two workers; :return: their pids, once both are ready."""
        self.daemon.start(args=("--workers", "2"))
        poll(lambda: "ready: 2 workers" in self.log(), 30, "both workers ready")
        return self.workers()

    def log(self) -> str:
        """:return: the whole log (``Daemon.log`` is its end)."""
        return self.daemon.log_path.read_text(errors="replace")

    def workers(self) -> set[int]:
        assert self.daemon.process is not None
        pids = workers_of(self.daemon.process.pid)
        self.assertEqual(len(pids), 2, self.daemon.log())
        return pids

    def stop_all(self) -> None:
        process = self.daemon.process
        pids = workers_of(process.pid) if process is not None and process.poll() is None else set()
        self.daemon.stop()
        for pid in pids:  # never leave a worker behind, whatever the test did
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def on(self, want: Callable[[int], bool], pids: set[int], opening: Callable[[], T],
           sock_of: Callable[[T], socket.socket], close: Callable[[T], None]) -> tuple[T, int]:
        """:return: a new connection (and its worker) held by a worker for which ``want`` is true."""
        for _ in range(100):
            connection = opening()
            pid = server_pid(sock_of(connection), pids)
            if want(pid):
                return connection, pid
            close(connection)
        raise AssertionError("no connection reached the wanted worker in 100 tries")

    def http(self, want: Callable[[int], bool], pids: set[int]) -> tuple[http.client.HTTPConnection, int]:
        def opening() -> http.client.HTTPConnection:
            connection = http.client.HTTPConnection("127.0.0.1", self.daemon.port, timeout=10)
            connection.connect()
            self.addCleanup(connection.close)
            return connection

        return self.on(want, pids, opening, lambda c: c.sock, lambda c: c.close())  # type: ignore[arg-type]

    def tunnel(self, want: Callable[[int], bool], pids: set[int], forward_id: str,
               token: str = "alice-token") -> tuple[RawWebSocket, int]:
        def opening() -> RawWebSocket:
            ws = RawWebSocket(self.daemon.port)
            self.addCleanup(ws.close)
            return ws

        ws, pid = self.on(want, pids, opening, lambda w: w.sock, lambda w: w.close())
        self.assertEqual(ws.handshake(f"/ws/port-forward/{forward_id}", token=token), 101, ws.body)
        ws.send_frame(OP_BINARY, b"through the tunnel", mask=True)
        self.assertEqual(ws.read_data(18), b"through the tunnel")
        return ws, pid

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        code, body, _ = http_request(self.metrics_port, "GET", "/metrics")
        self.assertEqual(code, 200, body)
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(body.decode())
            for sample in family.samples
        }

    # --- the tests

    def test_both_workers_answer_and_metrics_name_them(self) -> None:
        """
        Forty connections in a row to the one port reach both workers (the
        kernel spreads them); metrics_listen answers for both, each sample
        labelled with its worker.
        """
        pids = self.start()
        seen = set()
        for _ in range(40):
            connection = http.client.HTTPConnection("127.0.0.1", self.daemon.port, timeout=10)
            connection.request("GET", "/healthz")
            response = connection.getresponse()
            self.assertEqual((response.status, response.read()), (200, b'{"status": "ok"}\n'))
            seen.add(server_pid(connection.sock, pids))  # type: ignore[arg-type]
            connection.close()
        self.assertEqual(seen, pids)
        samples = self.scrape()
        for worker in ("0", "1"):
            self.assertEqual(samples[("rexecpf_worker_up", (("worker", worker),))], 1.0)
            self.assertEqual(samples[("rexecpf_forwards", (("worker", worker),))], 0.0)
            self.assertEqual(samples[("rexecpf_worker_restarts_total", (("worker", worker),))], 0.0)

    def test_a_flood_of_scrapes(self) -> None:
        """
        300 scrapes at once (all sent before any answer is read) are all
        answered, with both workers, and the parent's memory stays flat:
        the scrapes that come while one is under way share its answer.
        """
        self.start()
        self.scrape()  # the first scrape's imports and buffers
        before = self.daemon.rss()
        peak = before
        clients = []
        for _ in range(300):
            client = socket.create_connection(("127.0.0.1", self.metrics_port), timeout=30)
            client.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            clients.append(client)
            peak = max(peak, self.daemon.rss())
        for client in clients:
            with client:
                answer = b"".join(iter(lambda client=client: client.recv(65536), b""))
            peak = max(peak, self.daemon.rss())
            head, _, body = answer.partition(b"\r\n\r\n")
            self.assertTrue(head.startswith(b"HTTP/1.0 200 "), head)
            for worker in (b"0", b"1"):
                self.assertIn(b'rexecpf_worker_up{worker="%s"} 1.0' % worker, body)
        self.assertLess(peak - before, 4 * 1024 * 1024, f"parent RSS {before} -> peak {peak}")

    def test_no_forward_to_an_ipv6_metrics_listen(self) -> None:
        """
        metrics_listen on the IPv6 wildcard (which takes IPv4 too) is one of
        the daemon's own sockets in every worker, as in one process: a
        forward to its port is refused (403).
        """
        if not socket.has_ipv6:
            self.skipTest("no IPv6")
        self.daemon.config.write_text(self.daemon.config.read_text().replace(
            f'metrics_listen = "tcp:{self.metrics_port}:interface=127.0.0.1"',
            f'metrics_listen = "tcp6:{self.metrics_port}"'))
        pids = self.start()
        for pid in pids:
            creating, _ = self.http(lambda held, pid=pid: held == pid, pids)  # type: ignore[misc]
            creating.request("POST", "/api/containers/c1/port-forwards",
                             body=f'{{"container_port": {self.metrics_port}}}',
                             headers={"Authorization": "Bearer alice-token"})
            response = creating.getresponse()
            self.assertEqual(response.status, 403, response.read())
            response.read()

    def test_created_through_one_served_by_the_other_and_deleted(self) -> None:
        """
        A forward created through one worker is served by the other at
        once (proxy, tunnel) and on its local_port within a second; deleted
        through the first, the other's tunnel gets 1001 within a second and
        the local_port stops answering.
        """
        pids = self.start()
        creating, creator = self.http(lambda pid: True, pids)
        forwards = {}
        for name, port in (("web", self.web.server_address[1]), ("echo", self.echo.port)):
            creating.request("POST", "/api/containers/c1/port-forwards", body=f'{{"container_port": {port}}}',
                             headers={"Authorization": "Bearer alice-token"})
            response = creating.getresponse()
            document = response.read()
            self.assertEqual(response.status, 201, document)
            forwards[name] = json.loads(document)
        other = lambda pid: pid != creator  # noqa: E731

        proxying, pid = self.http(other, pids)
        proxying.request("GET", f"/p/{forwards['web']['id']}/", headers={"Authorization": "Bearer alice-token"})
        response = proxying.getresponse()
        self.assertEqual((response.status, response.read()), (200, b"hello from the container"))

        ws, _ = self.tunnel(other, pids, forwards["echo"]["id"])

        def local() -> socket.socket:
            sock = poll(lambda: _connect(forwards["echo"]["local_port"]), 1.0, "local_port listens")
            self.addCleanup(sock.close)
            return sock

        held, _ = self.on(other, pids, local, lambda s: s, lambda s: s.close())
        self.assertTrue(echoes(held))

        creating.request("DELETE", f"/api/containers/c1/port-forwards/{forwards['echo']['id']}",
                         headers={"Authorization": "Bearer alice-token"})
        response = creating.getresponse()
        self.assertEqual((response.status, response.read()), (204, b""))
        started = time.monotonic()
        self.assertEqual(ws.read_close()[0], 1001)
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertTrue(closed(held, 1.0))
        poll(lambda: _connect(forwards["echo"]["local_port"]) is None, 1.0, "nobody listens on local_port")

    def test_a_killed_worker_is_started_again(self) -> None:
        """
        SIGKILL to a worker: the parent logs it and starts another, which
        serves; the other worker served meanwhile; metrics count the restart.
        """
        pids = self.start()
        victim = min(pids)
        os.kill(victim, signal.SIGKILL)
        poll(lambda: "was killed by signal 9: restarting it" in self.log(), 10, "the restart line")
        for _ in range(10):
            self.assertEqual(self.daemon.request("GET", "/healthz", user=None)[0], 200)
        poll(lambda: self.log().count("is ready") == 3, 30, "the new worker ready")
        now = self.workers()
        self.assertNotIn(victim, now)
        self.assertIn(max(pids), now)
        newcomer = (now - pids).pop()
        connection, _ = self.http(lambda pid: pid == newcomer, now)
        connection.request("GET", "/api/containers/c1/port-forwards", headers={"Authorization": "Bearer alice-token"})
        response = connection.getresponse()
        self.assertEqual((response.status, response.read()), (200, b"[]\n"))
        restarts = self.scrape()
        self.assertEqual(sum(value for (name, _), value in restarts.items()
                             if name == "rexecpf_worker_restarts_total"), 1.0)

    def test_sigterm_stops_all_with_status_0(self) -> None:
        """SIGTERM to the parent: both workers drain and exit, then the parent, with status 0."""
        pids = self.start()
        started = time.monotonic()
        self.assertEqual(self.daemon.kill(signal.SIGTERM), 0, self.daemon.log())
        self.assertLess(time.monotonic() - started, 10)
        for pid in pids:
            self.assertFalse(os.path.exists(f"/proc/{pid}"), f"worker {pid} outlived the parent")
        self.assertEqual(self.log().count("exited with status 0"), 2, self.daemon.log())

    def test_sighup_reaches_every_worker(self) -> None:
        """SIGHUP to the parent: both workers reload; alice's revoked token closes her tunnels on both."""
        pids = self.start()
        code, forward = self.daemon.create("c1", self.echo.port)
        self.assertEqual(code, 201, forward)
        first, pid = self.tunnel(lambda pid: True, pids, forward["id"])
        second, _ = self.tunnel(lambda other: other != pid, pids, forward["id"])
        config = self.daemon.config.read_text()
        self.daemon.config.write_text(config.replace('alice = "alice-token"', 'alice = "alice-new-token"'))
        assert self.daemon.process is not None
        self.daemon.process.send_signal(signal.SIGHUP)
        for ws in (first, second):
            self.assertEqual(ws.read_close(), (1001, "token revoked"))
        poll(lambda: self.log().count("reloaded ") == 2, 5, "both workers reloaded")
        self.assertEqual(self.daemon.request("GET", "/healthz", user=None)[0], 200)

class SQLiteWorkersTests(Workers):
    """Two workers sharing one SQLite file."""

    def run_to_the_end(self) -> tuple[int, bytes]:
        process = subprocess.Popen(
            twistd_argv("--config", str(self.daemon.config), "--workers", "2"), cwd=self.directory,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=subprocess_env(),
        )
        output, _ = process.communicate(timeout=60)
        return process.returncode, output

    def test_sighup_while_the_workers_start(self) -> None:
        """
        SIGHUP to the parent while its workers are still starting (a reload
        right after a start) does not end them (nor so the parent, with
        status 1): each gets it once it is ready.
        """
        self.daemon._log = open(self.daemon.log_path, "ab")
        process = self.daemon.process = subprocess.Popen(
            twistd_argv("--config", str(self.daemon.config), "--workers", "2"), cwd=self.directory,
            stdin=subprocess.DEVNULL, stdout=self.daemon._log, stderr=subprocess.STDOUT, env=subprocess_env(),
        )
        poll(lambda: len(workers_of(process.pid)) == 2 or None, 30, "two workers spawned")
        process.send_signal(signal.SIGHUP)
        poll(lambda: "ready: 2 workers" in self.log() or process.poll() is not None, 30, "ready or ended")
        self.assertIsNone(process.poll(), self.log())
        poll(lambda: self.log().count("reloaded ") == 2, 5, "both workers reloaded")
        self.assertNotIn("before it was ready", self.log())

    def test_a_worker_that_cannot_start_ends_the_parent(self) -> None:
        """A worker that fails before it is ready (an unreadable inventory) ends the parent with status 1."""
        self.daemon.inventory.write_text("[[container]\n")
        code, output = self.run_to_the_end()
        self.assertEqual(code, 1, output)
        self.assertIn(b"worker 0 started", output)
        self.assertIn(b"before it was ready: stopping", output)

    def test_an_unusable_store_ends_the_parent_before_any_worker(self) -> None:
        """The parent opens the store first (workers creating one SQLite file at once found it locked)."""
        (self.directory / "state.sqlite3").mkdir()
        code, output = self.run_to_the_end()
        self.assertEqual(code, 1, output)
        self.assertIn(b"server.state: cannot use", output)
        self.assertNotIn(b"worker 0 started", output)

    @unittest.skipUnless(shutil.which("systemd-socket-activate"), "needs systemd-socket-activate (apt: systemd)")
    def test_socket_activation(self) -> None:
        """
        Under systemd-socket-activate: the parent hands the systemd socket to
        both workers, which both serve it; systemd hears READY=1 once, from
        the parent, then STOPPING=1; exit status 0.
        """
        config = self.daemon.config.read_text().replace(
            f'listen = ["tcp:{self.daemon.port}:interface=127.0.0.1"]', 'listen = ["systemd:domain=INET:name=web"]'
        )
        self.daemon.config.write_text(config)
        notify = NotifySocket(self.directory)
        self.addCleanup(notify.close)
        env = subprocess_env()
        argv = [
            "systemd-socket-activate", "--fdname=web", "-l", f"127.0.0.1:{self.daemon.port}",
            "-E", f"PYTHONPATH={env['PYTHONPATH']}", "-E", f"NOTIFY_SOCKET={notify.path}", "-E", f"PATH={env['PATH']}",
            *twistd_argv("--config", str(self.daemon.config), "--workers", "2"),
        ]
        log = open(self.daemon.log_path, "ab")
        self.addCleanup(log.close)
        self.daemon.process = subprocess.Popen(
            argv, cwd=self.directory, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
        )
        poll(lambda: "Listening on" in self.log(), 10, "systemd-socket-activate listens")
        self.assertEqual(http_request(self.daemon.port, "GET", "/healthz", timeout=60)[0], 200)
        notify.wait_for("READY=1", 30)
        pids = self.workers()
        seen = set()
        for _ in range(200):
            connection = http.client.HTTPConnection("127.0.0.1", self.daemon.port, timeout=10)
            connection.request("GET", "/healthz")
            self.assertEqual(connection.getresponse().status, 200)
            seen.add(server_pid(connection.sock, pids))  # type: ignore[arg-type]
            connection.close()
            if seen == pids:
                break
        self.assertEqual(seen, pids)
        self.assertEqual(self.daemon.kill(signal.SIGTERM), 0, self.daemon.log())
        notify.wait_for("STOPPING=1", 5)
        self.assertEqual([m for _, m in notify.messages].count("READY=1"), 1, notify.messages)


class PostgresWorkersTests(Workers):
    """Two workers on one PostgreSQL database (LISTEN/NOTIFY)."""

    def setUp(self) -> None:
        require_postgres()
        self.url = fresh_database(self)
        super().setUp()

    def store_toml(self) -> str:
        return f'\n[store]\nurl = "{self.url}"\n'


del Workers


def _connect(port: int) -> socket.socket | None:
    try:
        return socket.create_connection(("127.0.0.1", port), timeout=5)
    except OSError:
        return None


def http_server() -> Any:
    import http.server

    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    return web


class SystemdDropInTests(unittest.TestCase):
    """``contrib/systemd/rexecpf.service.d/workers.conf`` over ``rexecpf.service``."""

    def verify(self, extra: str = "") -> str:
        units = REPO / "contrib" / "systemd"
        directory = Path(tempfile.mkdtemp(prefix="rexecpf-units-"))
        self.addCleanup(shutil.rmtree, directory, True)
        twistd = str(Path(sys.executable).with_name("twistd"))
        (directory / "rexecpf.service.d").mkdir()
        for name in ("rexecpf.service", "rexecpf.socket", "rexecpf.service.d/workers.conf"):
            text = (units / name).read_text().replace("/opt/rexecpf/bin/twistd", twistd)
            (directory / name).write_text(text + extra if name.endswith(".conf") else text)
        result = subprocess.run(
            ["systemd-analyze", "verify", "--man=no", str(directory / "rexecpf.socket"),
             str(directory / "rexecpf.service")],
            capture_output=True, text=True, timeout=60,
            env={**os.environ, "SYSTEMD_UNIT_PATH": f"{directory}:"},  # read the drop-in directory too
        )
        return f"{result.returncode} {result.stdout}{result.stderr}".strip()

    @unittest.skipUnless(shutil.which("systemd-analyze"), "systemd-analyze is not installed")
    def test_verify(self) -> None:
        """systemd-analyze verify accepts the unit with the drop-in, and does read the drop-in."""
        self.assertEqual(self.verify(), "0")
        self.assertIn("BogusKey", self.verify("BogusKey=1\n"))

    def test_content(self) -> None:
        drop_in = (REPO / "contrib" / "systemd" / "rexecpf.service.d" / "workers.conf").read_text()
        self.assertIn("\nExecStart=\nExecStart=/opt/rexecpf/bin/twistd --nodaemon --pidfile= rexecpf "
                      "--config /etc/rexecpf/rexecpf.toml --workers 2\n", drop_in)
        service = (REPO / "contrib" / "systemd" / "rexecpf.service").read_text()
        self.assertIn("\nKillMode=mixed\n", service)  # SIGTERM to the parent only
        self.assertIn("\nNotifyAccess=main\n", service)  # only the parent talks to systemd
