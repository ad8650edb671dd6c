"""
Operations with real processes: socket activation through
``systemd-socket-activate``, readiness and watchdog datagrams on a real
``$NOTIFY_SOCKET``, a graceful SIGTERM (exit status 0) with a request in
flight and a relay open, live reload on SIGHUP, the metrics endpoint, JSON
logs, and ``systemd-analyze verify`` of the units.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.functional.daemon import REPO, Daemon, http_request, subprocess_env, twistd_argv
from tests.functional.peers import free_port
from tests.functional.test_daemon import wait_until

UNITS = REPO / "contrib" / "systemd"


class NotifySocket:
    """A datagram socket standing in for systemd's ``$NOTIFY_SOCKET``."""

    def __init__(self, directory: Path) -> None:
        self.path = str(directory / "notify.sock")
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(self.path)
        self.messages: list[tuple[float, str]] = []

    def receive(self, timeout: float) -> str | None:
        """:return: the next message, or ``None`` after ``timeout``."""
        self.socket.settimeout(timeout)
        try:
            data = self.socket.recv(4096)
        except TimeoutError:
            return None
        message = data.decode()
        self.messages.append((time.monotonic(), message))
        return message

    def wait_for(self, wanted: str, timeout: float) -> float:
        """:return: when ``wanted`` arrived; fails after ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.receive(max(0.01, deadline - time.monotonic())) == wanted:
                return self.messages[-1][0]
        raise AssertionError(f"no {wanted} within {timeout}s; got {self.messages}")

    def close(self) -> None:
        self.socket.close()


class EchoServer(socketserver.ThreadingTCPServer):
    """The "container port": echoes what it receives."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                while data := self.request.recv(65536):
                    self.request.sendall(data)

        super().__init__(("127.0.0.1", 0), Handler)
        self.port = self.server_address[1]
        threading.Thread(target=self.serve_forever, daemon=True).start()


class OpsTestCase(unittest.TestCase):
    def make_daemon(self, **kwargs: Any) -> Daemon:
        daemon = Daemon(tempfile.mkdtemp(prefix="rexecpf-ops-"), **kwargs)
        self.addCleanup(daemon.stop)
        return daemon

    def notify_socket(self, daemon: Daemon) -> NotifySocket:
        notify = NotifySocket(daemon.directory)
        self.addCleanup(notify.close)
        return notify

    def spawn(self, daemon: Daemon, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        """Start ``argv`` as ``daemon``'s process, logging to its log file."""
        daemon._log = open(daemon.log_path, "ab")  # type: ignore[assignment]
        daemon.process = subprocess.Popen(
            argv, cwd=daemon.directory, stdin=subprocess.DEVNULL, stdout=daemon._log,
            stderr=subprocess.STDOUT, env=env,
        )
        return daemon.process

    def sigterm(self, daemon: Daemon) -> int:
        return daemon.kill(signal.SIGTERM)


class SocketActivationTests(OpsTestCase):
    @unittest.skipUnless(shutil.which("systemd-socket-activate"), "needs systemd-socket-activate (apt: systemd)")
    def test_socket_activation_and_readiness(self) -> None:
        """
        Under systemd-socket-activate, rexecpf serves the API on the socket it
        was handed (``systemd:domain=INET:name=web``), says READY=1 once it
        answers, STOPPING=1 on SIGTERM, and exits 0.
        """
        daemon = self.make_daemon()
        config = daemon.config.read_text().replace(
            f'listen = ["tcp:{daemon.port}:interface=127.0.0.1"]',
            'listen = ["systemd:domain=INET:name=web"]',
        )
        daemon.config.write_text(config)
        notify = self.notify_socket(daemon)
        env = subprocess_env()
        argv = [
            "systemd-socket-activate", "--fdname=web", "-l", f"127.0.0.1:{daemon.port}",
            "-E", f"PYTHONPATH={env['PYTHONPATH']}", "-E", f"NOTIFY_SOCKET={notify.path}",
            "-E", f"PATH={env['PATH']}",
            *twistd_argv("--config", str(daemon.config)),
        ]
        self.spawn(daemon, argv, env)
        wait_until(lambda: "Listening on" in daemon.log(), 10)
        # systemd-socket-activate starts rexecpf at the first connection,
        # which waits in the handed-over socket's backlog.
        code, document, _ = http_request(daemon.port, "GET", "/healthz", timeout=60)
        self.assertEqual((code, document), (200, {"status": "ok"}), daemon.log())
        notify.wait_for("READY=1", 30)
        self.assertEqual(daemon.create("c1", 8080)[0], 201)
        self.assertEqual(self.sigterm(daemon), 0, daemon.log())
        notify.wait_for("STOPPING=1", 5)
        self.assertIn("listening on systemd:domain=INET:name=web", daemon.log())


class ReadinessTests(OpsTestCase):
    def test_ready_after_the_api_answers_then_watchdog(self) -> None:
        """
        READY=1 arrives only when the API already answers; WATCHDOG=1 then
        comes every half $WATCHDOG_USEC; SIGHUP does not kill the process;
        SIGTERM sends STOPPING=1 and exits 0.
        """
        daemon = self.make_daemon()
        notify = self.notify_socket(daemon)
        env = subprocess_env() | {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "1000000"}
        process = self.spawn(daemon, twistd_argv("--config", str(daemon.config)), env)
        # The order check: when READY=1 arrives, the API answers at once.
        while (message := notify.receive(30)) != "READY=1":
            self.assertIsNotNone(message, daemon.log())
        code, document, _ = daemon.request("GET", "/api/containers/c1/port-forwards")
        self.assertEqual((code, document), (200, []))
        start = time.monotonic()
        while time.monotonic() - start < 2.6:
            notify.receive(0.2)
        beats = [when for when, message in notify.messages if message == "WATCHDOG=1" and when >= start]
        gaps = [b - a for a, b in zip(beats, beats[1:], strict=False)]
        self.assertGreaterEqual(len(beats), 4, notify.messages)
        for gap in gaps:
            self.assertAlmostEqual(gap, 0.5, delta=0.2)
        process.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        self.assertIsNone(process.poll(), daemon.log())
        self.assertEqual(self.sigterm(daemon), 0, daemon.log())
        notify.wait_for("STOPPING=1", 5)


class SlowServer(socketserver.ThreadingTCPServer):
    """
    A "container" web app: ``GET /slow/{seconds}`` answers ``started``, then
    ``finished`` that many seconds later (one body, Content-Length known).
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                line = self.rfile.readline().decode()
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                seconds = float(line.split()[1].rsplit("/", 1)[-1])
                self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 17\r\nConnection: close\r\n\r\nstarted\n")
                self.wfile.flush()
                time.sleep(seconds)  # the app is slow, not the test
                try:
                    self.wfile.write(b"finished\n")
                except OSError:
                    pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.port = self.server_address[1]
        threading.Thread(target=self.serve_forever, daemon=True).start()


class LiveConnectionsTestCase(OpsTestCase):
    """
    A real ``twistd rexecpf`` with a forward to an echo server (used through
    its ``local_port``) and forwards to a slow web app (used through the
    proxy), for alice on c1 and bob on c2.
    """

    def start_daemon(self, server: str = "") -> Daemon:
        """:param server: more keys of the ``[server]`` table."""
        self.echo_server = EchoServer()
        self.addCleanup(self.echo_server.shutdown)
        self.slow_server = SlowServer()
        self.addCleanup(self.slow_server.shutdown)
        daemon = self.make_daemon(containers=[{"id": "c1", "owner": "alice"}, {"id": "c2", "owner": "bob"}])
        daemon.config.write_text(
            daemon.config.read_text().replace('state = "state.sqlite3"', 'state = "state.sqlite3"\n' + server)
        )
        daemon.start()
        code, self.echo_forward = daemon.create("c1", self.echo_server.port)
        self.assertEqual(code, 201)
        self.slow_forwards = {}
        for user, container in (("alice", "c1"), ("bob", "c2")):
            code, forward = daemon.create(container, self.slow_server.port, user=user)
            self.assertEqual(code, 201, forward)
            self.slow_forwards[user] = forward
        return daemon

    def slow_request(self, daemon: Daemon, seconds: float, user: str, owner: str | None = None) -> dict[str, Any]:
        """
        Start a proxied GET /slow/{seconds} in a thread, as ``user`` through
        the forward of ``owner`` (``user`` by default); :return: what it got,
        filled in later.
        """
        result: dict[str, Any] = {}
        path = f"/p/{self.slow_forwards[owner or user]['id']}/slow/{seconds}"

        def run() -> None:
            try:
                result["response"] = http_request(daemon.port, "GET", path, token=daemon.users[user])
            except Exception as error:  # the connection was cut
                result["error"] = error
            result["ended"] = time.monotonic()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        result["thread"] = thread
        return result

    def echo(self, connection: socket.socket, data: bytes) -> None:
        connection.sendall(data)
        received = b""
        while len(received) < len(data):
            received += connection.recv(65536)
        self.assertEqual(received, data)


def _live(metrics_port: int, kind: str) -> float | None:
    return _samples(_scrape(metrics_port)).get(("rexecpf_live_connections", (("kind", kind),)))


def _with_metrics(port: int, grace: float) -> str:
    return f'metrics_listen = "tcp:{port}:interface=127.0.0.1"\nshutdown_grace_seconds = {grace}\n'


def _healthy(daemon: Daemon) -> bool:
    try:
        return daemon.request("GET", "/healthz", user=None, timeout=2)[0] == 200
    except OSError:
        return False


class GracefulStopTests(LiveConnectionsTestCase):
    def test_sigterm_drains_requests_and_closes_relays(self) -> None:
        """
        On SIGTERM the port stops accepting, an open local_port connection is
        closed at once, a proxied request in flight finishes, the process
        exits 0, and the forwards are there after a restart.  The relay's
        bytes reach the metrics and its end is one log line.
        """
        metrics_port = free_port()
        daemon = self.start_daemon(_with_metrics(metrics_port, 20))
        local_port = self.echo_forward["local_port"]
        with socket.create_connection(("127.0.0.1", local_port), timeout=10) as first:
            self.echo(first, b"x" * 1000)
        wait_until(lambda: b'rexecpf_relays_total{kind="listener"}' in _scrape(metrics_port), 10)
        values = _samples(_scrape(metrics_port))
        self.assertEqual(values[("rexecpf_relayed_bytes_total", (("direction", "upstream"), ("kind", "listener")))], 1000)
        self.assertEqual(values[("rexecpf_forwards", ())], 3)

        relay = socket.create_connection(("127.0.0.1", local_port), timeout=10)
        self.addCleanup(relay.close)
        self.echo(relay, b"hello")
        slow = self.slow_request(daemon, 2.0, "alice")
        wait_until(lambda: _live(metrics_port, "proxy") == 1, 10)
        signalled = time.monotonic()
        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGTERM)
        self.assertEqual(relay.recv(100), b"")  # closed at once, not after the grace period
        self.assertLess(time.monotonic() - signalled, 1.5)
        wait_until(lambda: not _accepts(daemon.port), 5)
        status = daemon.process.wait(30)
        slow["thread"].join(10)
        self.assertEqual(status, 0, daemon.log())
        self.assertNotIn("error", slow, daemon.log())
        code, body, _ = slow["response"]
        self.assertEqual((code, body), (200, b"started\nfinished\n"))
        self.assertGreater(slow["ended"] - signalled, 1.0)
        self.assertIn(f"listener {self.echo_forward['id']} of - closed: 5 bytes in, 5 bytes out", daemon.log())
        daemon.kill()
        daemon.start()
        self.assertEqual([f["id"] for f in daemon.list("c1")], [self.echo_forward["id"], self.slow_forwards["alice"]["id"]])

    def test_grace_period_ends(self) -> None:
        """A proxied request still running after shutdown_grace_seconds is cut; the exit status is still 0."""
        metrics_port = free_port()
        daemon = self.start_daemon(_with_metrics(metrics_port, 1))
        slow = self.slow_request(daemon, 60, "alice")
        wait_until(lambda: _live(metrics_port, "proxy") == 1, 10)
        signalled = time.monotonic()
        self.assertEqual(self.sigterm(daemon), 0, daemon.log())
        self.assertLess(time.monotonic() - signalled, 10)
        slow["thread"].join(10)
        # the answer had started: it is cut short, never complete-looking
        self.assertIn("error", slow)


class ReloadTests(LiveConnectionsTestCase):
    def test_sighup(self) -> None:
        """
        SIGHUP re-reads the file: a new token works at once, a removed one is
        401 and its user's connections (a proxied request here) are closed
        while others stay; a broken file is one log line and changes nothing.
        """
        metrics_port = free_port()
        daemon = self.start_daemon(_with_metrics(metrics_port, 10))
        assert daemon.process is not None
        bobs = self.slow_request(daemon, 30, "bob")
        alices = self.slow_request(daemon, 3, "alice")
        wait_until(lambda: _live(metrics_port, "proxy") == 2, 10)
        config = daemon.config.read_text()
        daemon.config.write_text(config.replace('bob = "bob-token"', 'carol = "carol-token"'))
        daemon.process.send_signal(signal.SIGHUP)
        wait_until(lambda: "reloaded" in daemon.log(), 10)
        self.assertEqual(http_request(daemon.port, "GET", "/api/containers/c1/port-forwards",
                                      token="bob-token")[0], 401)
        self.assertEqual(http_request(daemon.port, "GET", "/api/containers/c2/port-forwards",
                                      token="carol-token")[0], 404)
        self.assertEqual(daemon.request("GET", "/api/containers/c1/port-forwards")[0], 200)
        bobs["thread"].join(5)
        self.assertIn("error", bobs)  # cut at once
        alices["thread"].join(10)
        self.assertEqual(alices["response"][1], b"started\nfinished\n")

        before = daemon.log().count("reload failed")
        daemon.config.write_text("[auth\nusers = ")
        daemon.process.send_signal(signal.SIGHUP)
        wait_until(lambda: "reload failed" in daemon.log(), 10)
        self.assertEqual(daemon.log().count("reload failed"), before + 1)
        lines = [line for line in daemon.log().splitlines() if "reload failed" in line]
        self.assertEqual(len(lines), 1)
        self.assertEqual(http_request(daemon.port, "GET", "/api/containers/c2/port-forwards",
                                      token="carol-token")[0], 404)
        self.assertIsNone(daemon.process.poll())
        self.assertEqual(self.sigterm(daemon), 0)


    def test_sighup_closes_what_is_no_longer_allowed(self) -> None:
        """
        SIGHUP that takes alice's admin right away cuts her request through
        bob's forward; one that gives bob's container to alice cuts bob's.
        Alice's own request runs on; bob's forward stays, with the container.
        """
        metrics_port = free_port()
        daemon = self.start_daemon(_with_metrics(metrics_port, 10))
        assert daemon.process is not None
        config = daemon.config.read_text()

        def reload(text: str | None, count: int) -> None:
            if text is not None:
                daemon.config.write_text(text)
            daemon.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
            wait_until(lambda: daemon.log().count("reloaded") == count, 10)

        reload(config.replace("admins = []", 'admins = ["alice"]'), 1)
        alice_as_admin = self.slow_request(daemon, 30, "alice", owner="bob")
        bobs = self.slow_request(daemon, 30, "bob")
        alices = self.slow_request(daemon, 4, "alice")
        wait_until(lambda: _live(metrics_port, "proxy") == 3, 10)

        reload(config, 2)
        alice_as_admin["thread"].join(5)
        self.assertIn("error", alice_as_admin)  # cut at once
        self.assertNotIn("ended", bobs)

        daemon.write_inventory([{"id": "c1", "owner": "alice"}, {"id": "c2", "owner": "alice"}])
        reload(None, 3)
        bobs["thread"].join(5)
        self.assertIn("error", bobs)
        alices["thread"].join(10)
        self.assertEqual(alices["response"][1], b"started\nfinished\n")
        self.assertIn("access revoked", daemon.log())
        listed = [forward["id"] for forward in daemon.list("c2", user="alice")]
        self.assertEqual(listed, [self.slow_forwards["bob"]["id"]])
        self.assertEqual(self.sigterm(daemon), 0)


class MetricsAndLogsTests(OpsTestCase):
    def test_metrics_endpoint_and_json_logs(self) -> None:
        """
        The metrics are served on metrics_listen only (404 on the public
        port); the forwards gauge follows creates; --log-format=json writes
        one JSON object per line.
        """
        metrics_port = free_port()
        daemon = self.make_daemon()
        daemon.config.write_text(daemon.config.read_text().replace(
            'state = "state.sqlite3"',
            f'state = "state.sqlite3"\nmetrics_listen = "tcp:{metrics_port}:interface=127.0.0.1"'))
        env = subprocess_env()
        self.spawn(daemon, twistd_argv("--config", str(daemon.config), "--log-format=json"), env)
        wait_until(lambda: _healthy(daemon), 30)
        self.assertEqual(_samples(_scrape(metrics_port))[("rexecpf_forwards", ())], 0)
        for port in (1, 2, 3):
            self.assertEqual(daemon.create("c1", port)[0], 201)
        self.assertEqual(_samples(_scrape(metrics_port))[("rexecpf_forwards", ())], 3)
        code, _, _ = http_request(daemon.port, "GET", "/metrics")
        self.assertEqual(code, 404)
        self.assertEqual(http_request(metrics_port, "GET", "/")[0], 404)
        self.assertEqual(self.sigterm(daemon), 0)
        lines = [line for line in daemon.log_path.read_text().splitlines() if line.strip()]
        events = [json.loads(line) for line in lines]
        self.assertTrue(any(event["text"].startswith("listening on tcp:") for event in events))
        self.assertTrue(all("log_time" in event for event in events))


class UnitFileTests(unittest.TestCase):
    def verify(self, directory: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["systemd-analyze", "verify", "--man=no",
             str(directory / "rexecpf.socket"), str(directory / "rexecpf.service")],
            capture_output=True, text=True, timeout=60,
        )

    def copy_units(self, replace: str = "") -> Path:
        """Copy the units, with ExecStart pointing at this venv's twistd (verify checks it exists)."""
        directory = Path(tempfile.mkdtemp(prefix="rexecpf-units-"))
        twistd = Path(sys.executable).with_name("twistd")
        for name in ("rexecpf.service", "rexecpf.socket"):
            text = (UNITS / name).read_text().replace("/opt/rexecpf/bin/twistd", str(twistd))
            (directory / name).write_text(text + replace if name.endswith(".service") else text)
        return directory

    @unittest.skipUnless(shutil.which("systemd-analyze"), "systemd-analyze is not installed")
    def test_verify(self) -> None:
        """systemd-analyze verify accepts both units without a word."""
        result = self.verify(self.copy_units())
        self.assertEqual((result.returncode, result.stdout + result.stderr), (0, ""))

    @unittest.skipUnless(shutil.which("systemd-analyze"), "systemd-analyze is not installed")
    def test_verify_notices_mistakes(self) -> None:
        """The verify check is not vacuous: an unknown key is reported."""
        result = self.verify(self.copy_units("BogusKey=1\n"))
        self.assertIn("BogusKey", result.stdout + result.stderr)

    def test_content(self) -> None:
        """The units hand the socket named "web" to a notify service with the promised hardening."""
        service = (UNITS / "rexecpf.service").read_text()
        socket_unit = (UNITS / "rexecpf.socket").read_text()
        self.assertIn("FileDescriptorName=web", socket_unit)
        for line in [
            "Type=notify", "ExecReload=/bin/kill -HUP $MAINPID", "StateDirectory=rexecpf",
            "DynamicUser=yes", "NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes",
            "PrivateTmp=yes", "PrivateDevices=yes", "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
            "SystemCallFilter=@system-service", "CapabilityBoundingSet=", "LockPersonality=yes",
            "MemoryDenyWriteExecute=yes", "RestrictNamespaces=yes", "ProtectKernelTunables=yes",
            "ProtectKernelModules=yes", "ProtectKernelLogs=yes",
        ]:
            self.assertIn(f"\n{line}\n", service)
        self.assertRegex(service, r"\nWatchdogSec=\d+")
        self.assertIn("twistd --nodaemon --pidfile= rexecpf --config /etc/rexecpf/rexecpf.toml", service)


class MemoryDenyWriteExecuteTests(OpsTestCase):
    @unittest.skipUnless(sys.platform == "linux", "prctl is Linux's")
    def test_runs_with_mdwe(self) -> None:
        """
        rexecpf runs under MemoryDenyWriteExecute: the kernel's own
        PR_SET_MDWE (what the unit's option asks for) is set before twistd
        starts, and the API still serves.
        """
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        probe = subprocess.run(
            [sys.executable, "-c", "import ctypes,sys; sys.exit(ctypes.CDLL(None).prctl(65, 1, 0, 0, 0) != 0)"],
            timeout=30,
        )
        if probe.returncode != 0 or libc is None:
            self.skipTest("this kernel has no PR_SET_MDWE")
        daemon = self.make_daemon()
        argv = twistd_argv("--config", str(daemon.config))
        wrapper = (
            "import ctypes, os, sys; assert ctypes.CDLL(None).prctl(65, 1, 0, 0, 0) == 0; "
            "os.execv(sys.executable, sys.argv[1:])"
        )
        self.spawn(daemon, [sys.executable, "-c", wrapper, *argv], subprocess_env())
        wait_until(lambda: _healthy(daemon), 30)
        self.assertEqual(daemon.create("c1", 8080)[0], 201)
        self.assertEqual(self.sigterm(daemon), 0, daemon.log())


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def _scrape(port: int) -> bytes:
    code, body, headers = http_request(port, "GET", "/metrics")
    assert code == 200, (code, body)
    assert headers["content-type"].startswith("text/plain")
    return body  # type: ignore[no-any-return]


def _samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text.decode())
        for sample in family.samples
    }

