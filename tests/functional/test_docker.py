"""
rexecpf with the Docker backend against a real engine: a real ``twistd
rexecpf`` process, real busybox containers, the REST API over HTTP.

Skipped where ``docker info`` fails or the offline image is missing (see
``.ci/system-setup.sh``).  The test that restarts dockerd runs only where it
owns that dockerd: ``REXECPF_TEST_RESTART_DOCKERD=1`` and the PID file
``/run/rexecpf-ci-dockerd.pid`` of ``.ci/system-setup.sh``.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from twisted.trial.unittest import TestCase

from tests import _docker
from tests.functional.peers import free_port, local_port_range

REPO = Path(__file__).resolve().parents[2]
TOKENS = {"alice": "alice-token", "bob": "bob-token", "root": "root-token"}
#: The dockerd the restart test may restart, and how to start it again
#: (those of .ci/system-setup.sh unless overridden, e.g. for a private engine
#: reached through DOCKER_HOST).
DOCKERD_PIDFILE = Path(os.environ.get("REXECPF_TEST_DOCKERD_PIDFILE", "/run/rexecpf-ci-dockerd.pid"))
DOCKERD_ARGS = os.environ.get(
    "REXECPF_TEST_DOCKERD_ARGS", "dockerd --iptables=false --ip-forward=false --ip-masq=false"
).split()
#: The engine rexecpf is pointed at (the docker CLI follows DOCKER_HOST too).
DOCKER_URL = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")


def poll(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """:return: the first true value of ``condition()`` within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(interval)


class Rexecpf:
    """A ``twistd -n rexecpf`` process on a free port, with the Docker backend."""

    def __init__(
        self, directory: Path, reconcile_seconds: float = 30, url: str | None = None, engines: Sequence[str] = ()
    ) -> None:
        directory = directory.resolve()
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.state = directory / "state.sqlite3"
        self.config = directory / "rexecpf.toml"
        self.log_path = directory / "twistd.log"
        users = ", ".join(f'{user} = "{token}"' for user, token in TOKENS.items())
        low, high = local_port_range(51)
        backend_url = (
            "".join(f'\n[[backend.engines]]\nurl = "{engine}"' for engine in engines)
            if engines
            else f'url = "{url or DOCKER_URL}"'
        )
        self.config.write_text(
            f"""
[server]
listen = ["tcp:{self.port}:interface=127.0.0.1"]
public_url = "{self.base}"
state = "{self.state}"
[auth]
users = {{ {users} }}
admins = ["root"]
[backend]
kind = "docker"
reconcile_seconds = {reconcile_seconds}
{backend_url}
[limits]
local_ports = "{low}-{high}"
"""
        )
        env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from twisted.scripts.twistd import run; run()",
                "-n",
                "--pidfile=",
                "rexecpf",
                "--config",
                str(self.config),
            ],
            cwd=directory,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        try:
            poll(self._answers, 30, "rexecpf answers on /healthz")
        except AssertionError:
            self.stop()
            raise AssertionError(f"rexecpf did not start:\n{self.log()}") from None

    def _answers(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"rexecpf exited ({self.process.returncode}):\n{self.log()}")
        try:
            self.request("GET", "/healthz", token=None)
        except OSError:
            return False
        return True

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()

    def request(
        self, method: str, path: str, body: Any = None, token: str | None = "alice-token"
    ) -> tuple[int, Any, dict[str, str]]:
        """:return: status, decoded JSON (or text) body, headers."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method)
        if token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=15) as response:
                status, raw, headers = response.status, response.read(), dict(response.headers)
        except urllib.error.HTTPError as error:
            status, raw, headers = error.code, error.read(), dict(error.headers)
        try:
            document = json.loads(raw) if raw else None
        except ValueError:
            document = raw.decode(errors="replace")
        return status, document, headers

    def create(self, reference: str, port: int, token: str = "alice-token") -> dict[str, Any]:
        status, document, _ = self.request(
            "POST", f"/api/containers/{reference}/port-forwards", {"container_port": port}, token
        )
        assert status == 201, (status, document)
        return document  # type: ignore[no-any-return]

    def stored(self, container_id: str | None = None) -> list[str]:
        """:return: the ids of the forwards in the state file (read-only)."""
        connection = sqlite3.connect(f"file:{self.state}?mode=ro", uri=True, timeout=5)
        try:
            if container_id is None:
                rows = connection.execute("SELECT id FROM forwards").fetchall()
            else:
                rows = connection.execute(
                    "SELECT id FROM forwards WHERE container_id = ?", (container_id,)
                ).fetchall()
        finally:
            connection.close()
        return sorted(row[0] for row in rows)


def _http_get(url: str, headers: dict[str, str] | None = None, timeout: float = 5) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def websocket_echo(host: str, port: int, path: str, token: str, payload: bytes) -> bytes:
    """
    Open a WebSocket (RFC 6455, by hand: no client library needed), send
    ``payload`` as one binary message and :return: the bytes that come back
    until as many have arrived.
    """
    key = base64.b64encode(os.urandom(16)).decode()
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(
            (
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: Bearer, {token}\r\n\r\n"
            ).encode()
        )
        buffer = b""
        while b"\r\n\r\n" not in buffer:
            chunk = sock.recv(4096)
            if not chunk:
                raise AssertionError(f"the handshake ended early: {buffer!r}")
            buffer += chunk
        head, buffer = buffer.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101"), head
        mask = os.urandom(4)
        assert len(payload) < 126
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        sock.sendall(bytes([0x82, 0x80 | len(payload)]) + mask + masked)
        received = b""
        while len(received) < len(payload):
            while len(buffer) < 2 or len(buffer) < _frame_length(buffer):
                chunk = sock.recv(4096)
                if not chunk:
                    raise AssertionError(f"closed after {received!r}")
                buffer += chunk
            size = _frame_length(buffer)
            frame, buffer = buffer[:size], buffer[size:]
            opcode = frame[0] & 0x0F
            header = 2 + {126: 2, 127: 8}.get(frame[1] & 0x7F, 0)
            if opcode in (0x0, 0x1, 0x2):
                received += frame[header:]
            elif opcode == 0x8:
                raise AssertionError(f"closed after {received!r}: {frame[header:]!r}")
        return received


def _frame_length(buffer: bytes) -> int:
    if len(buffer) < 2:
        return 2
    length = buffer[1] & 0x7F
    if length == 126:
        return 4 + int.from_bytes(buffer[2:4], "big") if len(buffer) >= 4 else 4
    if length == 127:
        return 10 + int.from_bytes(buffer[2:10], "big") if len(buffer) >= 10 else 10
    return 2 + length


class DockerTestCase(TestCase):
    skip = _docker.skip_reason()

    def run_container(self, command: list[str], owner: str | None = "alice", **kwargs: Any) -> tuple[str, str]:
        """:return: the full id and the name of a new container, removed at cleanup."""
        name = f"rexecpf-test-{uuid.uuid4().hex[:12]}"
        cid = _docker.run_container(command, owner=owner, name=name, **kwargs)
        self.addCleanup(_docker.remove_quietly, cid)
        return cid, name

    def start_rexecpf(self, **kwargs: Any) -> Rexecpf:
        rexecpf = Rexecpf(Path(self.mktemp()), **kwargs)
        self.addCleanup(rexecpf.stop)
        return rexecpf


class DockerForwardTests(DockerTestCase):
    """Forwards to busybox containers through a running rexecpf."""

    def setUp(self) -> None:
        self.rexecpf = self.start_rexecpf()

    def test_httpd(self) -> None:
        """
        A forward to a busybox httpd, created through its name, names the
        container by its full id; the container answers at the address the
        backend reports, and through the proxy and the local port where
        this build has them.
        """
        cid, name = self.run_container(_docker.HTTPD)
        ip = _docker.container_ip(cid)
        forward = self.rexecpf.create(name, 8000)
        self.assertEqual(forward["container_id"], cid)
        status, listed, _ = self.rexecpf.request("GET", f"/api/containers/{cid[:12]}/port-forwards")
        self.assertEqual((status, [f["id"] for f in listed]), (200, [forward["id"]]))
        body = poll(lambda: _try_get(f"http://{ip}:8000/"), 15, "httpd answers")
        self.assertEqual(body, b"hello\n")

        # The backend sees the same address.
        code = (
            "import sys\n"
            "from twisted.internet import task, defer\n"
            "from rexecpf.backends.docker import DockerRuntime, DockerBackend\n"
            "async def main(reactor):\n"
            "    runtime = DockerRuntime(reactor, sys.argv[2]); runtime.startService()\n"
            "    try:\n"
            "        container = await DockerBackend(reactor, runtime).inspect(sys.argv[1])\n"
            "        print(container.address, container.owner, container.running)\n"
            "    finally:\n"
            "        runtime.stopService()\n"
            "task.react(lambda r: defer.ensureDeferred(main(r)))\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code, name, DOCKER_URL], capture_output=True, timeout=60, cwd=REPO,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
        )
        self.assertEqual(out.stdout.decode().split(), [ip, "alice", "True"], out.stderr)

        if importlib.util.find_spec("rexecpf.proxy") is not None:
            status, body = _http_get(forward["proxy_url"], {"Authorization": "Bearer alice-token"})
            self.assertEqual((status, body), (200, b"hello\n"))
        if importlib.util.find_spec("rexecpf.listeners") is not None:
            body = poll(
                lambda: _try_get(f"http://127.0.0.1:{forward['local_port']}/"), 5, "the local port answers"
            )
            self.assertEqual(body, b"hello\n")

    def test_tunnel_echo(self) -> None:
        """Bytes sent through the tunnel to a busybox `nc -ll -p 9000 -e cat` come back."""
        if importlib.util.find_spec("rexecpf.tunnel") is None:
            self.skipTest("this build has no tunnel (rexecpf.tunnel)")
        cid, name = self.run_container(["nc", "-ll", "-p", "9000", "-e", "cat"])
        ip = _docker.container_ip(cid)
        poll(lambda: _port_open(ip, 9000), 15, "nc listens")
        forward = self.rexecpf.create(name, 9000)
        echoed = websocket_echo(
            "127.0.0.1", self.rexecpf.port, f"/ws/port-forward/{forward['id']}", "alice-token", b"ping-pong\n"
        )
        self.assertEqual(echoed, b"ping-pong\n")

    def _reaped_within_2s(self, action: list[str]) -> None:
        cid, name = self.run_container(_docker.SLEEPER)
        first = self.rexecpf.create(name, 8000)
        second = self.rexecpf.create(cid[:12], 8001)
        self.assertEqual(self.rexecpf.stored(cid), sorted([first["id"], second["id"]]))
        _docker.docker(*action, cid)

        def gone() -> bool:
            return not self.rexecpf.stored(cid) and all(
                self.rexecpf.request("GET", f"/api/containers/{cid}/port-forwards/{f['id']}")[0] == 404
                for f in (first, second)
            )

        poll(gone, 2.0, f"forwards gone after docker {' '.join(action)}")

    def test_docker_stop(self) -> None:
        """`docker stop`: the container's forwards are gone within 2 s."""
        self._reaped_within_2s(["stop", "-t", "1"])

    def test_docker_kill(self) -> None:
        """`docker kill`: the container's forwards are gone within 2 s."""
        self._reaped_within_2s(["kill"])

    def test_docker_rm_f(self) -> None:
        """`docker rm -f`: the container's forwards are gone within 2 s."""
        self._reaped_within_2s(["rm", "-f"])

    def test_ownership(self) -> None:
        """A container labelled for another user is 404 to you; an unlabelled one to all but admins."""
        _, bobs = self.run_container(_docker.SLEEPER, owner="bob")
        _, nobodys = self.run_container(_docker.SLEEPER, owner=None)
        for name, token in ((bobs, "alice-token"), (nobodys, "alice-token"), (nobodys, "bob-token")):
            for method, body in (("GET", None), ("POST", {"container_port": 80})):
                status, document, _ = self.rexecpf.request(
                    method, f"/api/containers/{name}/port-forwards", body, token
                )
                self.assertEqual((status, document["error"]["message"]), (404, "Container not found"))
        self.assertEqual(self.rexecpf.request("GET", f"/api/containers/{bobs}/port-forwards", token="bob-token")[0], 200)
        self.rexecpf.create(nobodys, 80, token="root-token")

    def test_not_running(self) -> None:
        """A created but never started container is 409 Container not running."""
        name = f"rexecpf-test-{uuid.uuid4().hex[:12]}"
        cid = _docker.docker(
            "create", "--init", "--label", "rexecpf.test=1", "--label", "rexecpf.owner=alice",
            "--name", name, _docker.IMAGE, "sleep", "600",
        )
        self.addCleanup(_docker.remove_quietly, cid)
        status, document, _ = self.rexecpf.request(
            "POST", f"/api/containers/{name}/port-forwards", {"container_port": 80}
        )
        self.assertEqual((status, document["error"]["message"]), (409, "Container not running"))
        self.assertIn("created", document["error"]["detail"])


class UnreachableEngineTests(TestCase):
    """rexecpf whose engine URL answers nothing (no Docker needed)."""

    def test_503(self) -> None:
        """/healthz and the API answer 503 Backend unavailable; rexecpf keeps running."""
        directory = Path(self.mktemp())
        server = Rexecpf(directory, url=f"unix://{directory.resolve()}/no-engine.sock")
        self.addCleanup(server.stop)
        status, document, _ = server.request("GET", "/healthz", token=None)
        self.assertEqual((status, document["status"]), (503, "unavailable"))
        for method, body in (("GET", None), ("POST", {"container_port": 80})):
            status, document, _ = server.request(method, "/api/containers/web/port-forwards", body)
            self.assertEqual((status, document["error"]["message"]), (503, "Backend unavailable"))
        self.assertIsNone(server.process.poll())


def _try_get(url: str) -> bytes | None:
    try:
        status, body = _http_get(url, timeout=2)
    except OSError:
        return None
    return body if status == 200 else None


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _dockerd_pid() -> int | None:
    try:
        pid = int(DOCKERD_PIDFILE.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


class DockerdRestartTests(DockerTestCase):
    """rexecpf while the Docker engine restarts under it."""

    if os.environ.get("REXECPF_TEST_RESTART_DOCKERD") != "1":
        skip = "restarts dockerd: set REXECPF_TEST_RESTART_DOCKERD=1 (CI, with .ci/system-setup.sh's dockerd)"
    elif DockerTestCase.skip is None and _dockerd_pid() is None:
        skip = f"no dockerd of ours to restart ({DOCKERD_PIDFILE})"

    def test_restart(self) -> None:
        """
        While dockerd is down, /healthz and the API answer 503 and the
        stored forwards are left alone (reconciles run every second and
        skip); once it is back rexecpf recovers by itself, reaps the forwards
        of the containers that died meanwhile, and follows events again.
        """
        rexecpf = self.start_rexecpf(reconcile_seconds=1)
        died, died_name = self.run_container(_docker.SLEEPER)
        forward = rexecpf.create(died_name, 8000)

        pid = _dockerd_pid()
        assert pid is not None
        os.kill(pid, signal.SIGTERM)
        self.addCleanup(_ensure_dockerd)
        poll(lambda: not _alive(pid), 60, "dockerd exits")
        poll(lambda: rexecpf.request("GET", "/healthz", token=None)[0] == 503, 5, "/healthz says 503")
        while_down = rexecpf.stored()
        for _ in range(3):  # over three reconcile periods
            time.sleep(1)
            status, document, _ = rexecpf.request("GET", f"/api/containers/{died}/port-forwards")
            self.assertEqual((status, document["error"]["message"]), (503, "Backend unavailable"))
            status, _, _ = rexecpf.request(
                "POST", f"/api/containers/{died}/port-forwards", {"container_port": 9}
            )
            self.assertEqual(status, 503)
            self.assertEqual(rexecpf.request("GET", "/healthz", token=None)[0], 503)
            self.assertEqual(rexecpf.stored(), while_down)

        _start_dockerd()
        poll(lambda: rexecpf.request("GET", "/healthz", token=None)[0] == 200, 60, "/healthz recovers")
        # The container was stopped with the engine: its forward goes.
        poll(lambda: forward["id"] not in rexecpf.stored(), 10, "the forward of the dead container is reaped")
        self.assertFalse(_docker.docker("inspect", "-f", "{{.State.Running}}", died) == "true")

        # Events are followed again: rm -f right after the engine came back.
        cid, name = self.run_container(_docker.SLEEPER)
        after = rexecpf.create(name, 8000)
        _docker.docker("rm", "-f", cid)
        poll(lambda: after["id"] not in rexecpf.stored(), 2.0, "the forward is reaped within 2 s")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    # A zombie (our child? no: setsid'd by the CI script) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _start_dockerd() -> None:
    """Start dockerd as .ci/system-setup.sh does, and record its PID."""
    if "--pidfile" not in " ".join(DOCKERD_ARGS):
        Path("/var/run/docker.pid").unlink(missing_ok=True)
    log = open(os.environ.get("DOCKERD_LOG", "/tmp/dockerd.log"), "ab")
    process = subprocess.Popen(
        DOCKERD_ARGS, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
    )
    log.close()
    DOCKERD_PIDFILE.write_text(f"{process.pid}\n")
    poll(_docker.engine_answers, 60, "docker info answers", interval=0.5)


def _ensure_dockerd() -> None:
    if not _docker.engine_answers():
        _start_dockerd()
