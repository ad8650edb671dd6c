"""
TLS with a certificate per host (SNI, ``[tls] certificates``) and the
on-demand TLS ``ask`` endpoint, with real clients against a test CA: curl
(``--resolve``, ``--cacert``), Python's ssl module (no SNI), headless
Chromium, and a real ``twistd`` reloading certificates on SIGHUP.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from tests.functional.daemon import Daemon as TwistdDaemon
from tests.functional.daemon import http_request, subprocess_env, twistd_argv
from tests.functional.inprocess import Daemon, _http, free_port
from tests.functional.test_proxy_browser import CHROMIUM, dump_dom
from tests.functional.testca import TestCA, common_name, spki_hash

CURL = shutil.which("curl")
DEFAULT_NAME = "rexecpf.test"


def curl(port: int, name: str, ca: Path, path: str = "/healthz", insecure: bool = False) -> tuple[int, str, str]:
    """
    ``curl -v`` of ``https://{name}:{port}{path}``, ``name`` resolved to 127.0.0.1.

    :return: (exit status, the certificate's subject as curl shows it, the body)
    """
    if CURL is None:
        raise SkipTest("curl is not installed")
    command = [CURL, "-sv", "--max-time", "20", "--resolve", f"{name}:{port}:127.0.0.1", "--cacert", str(ca)]
    if insecure:
        command.append("-k")
    result = subprocess.run([*command, f"https://{name}:{port}{path}"], capture_output=True, timeout=30, check=False)
    stderr = result.stderr.decode("utf-8", "replace")
    subjects = [line.partition("subject:")[2].strip() for line in stderr.splitlines() if "subject:" in line]
    return result.returncode, subjects[0] if subjects else "", result.stdout.decode("utf-8", "replace")


def served_without_sni(port: int, ca: Path) -> str:
    """:return: the common name of the certificate served to a client that sends no server name."""
    context = ssl.create_default_context(cafile=str(ca))
    context.check_hostname = False
    with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
        with context.wrap_socket(raw, server_hostname=None) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return common_name(der)


def state_files(directory: str) -> dict[str, tuple[int, int]]:
    """:return: size and modification time of the SQLite state file and its journals."""
    found = {}
    for name in os.listdir(directory):
        if name.startswith("state.sqlite3"):
            status = os.stat(os.path.join(directory, name))
            found[name] = (status.st_size, status.st_mtime_ns)
    return found


class Certificates:
    """A test CA and a certificate directory with app.example.com, other.example.org and *.preview.example.com."""

    def __init__(self, case: TestCase) -> None:
        root = Path(case.mktemp()).absolute()
        self.ca = TestCA(root)
        self.directory = root / "certs"
        self.directory.mkdir()
        self.own = root / "own.pem"
        self.ca.write(self.own, DEFAULT_NAME)
        self.app = self.ca.write(self.directory / "app.example.com.pem", "app.example.com")
        self.ca.write(self.directory / "other.example.org.pem", "other.example.org", separate_key=True)
        self.ca.write(self.directory / "_wildcard.preview.example.com.pem", "*.preview.example.com")


class InProcessTests(TestCase):
    timeout = 120

    @inlineCallbacks
    def setUp(self) -> Any:
        self.certs = Certificates(self)
        self.tls_port = free_port()
        self.ask_port = free_port()
        directory = self.mktemp()
        self.daemon = Daemon(
            directory,
            sections={
                "server": {"proxy_domain": "preview.example.com"},
                "tls": {
                    "certificates": str(self.certs.directory),
                    "ask_listen": f"tcp:{self.ask_port}:interface=127.0.0.1",
                },
            },
            listen=(f"ssl:{self.tls_port}:interface=127.0.0.1:privateKey={self.certs.own}",),
        )
        yield self.daemon.start()
        self.addCleanup(self.daemon.stop)

    @inlineCallbacks
    def test_curl_gets_each_hosts_certificate(self) -> Any:
        """
        curl with --resolve and the test CA: each host gets its own
        certificate (a separate key file too, a wildcard too) and the
        request is served; an unknown name and a client without SNI get the
        endpoint's own certificate.
        """
        ca = self.certs.ca.path
        for name, subject in (
            ("app.example.com", "CN=app.example.com"),
            ("other.example.org", "CN=other.example.org"),
        ):
            status, seen, body = yield deferToThread(curl, self.tls_port, name, ca)
            self.assertEqual((status, seen), (0, subject), name)
            self.assertEqual(json.loads(body), {"status": "ok"})
        # a forward's own host: its origin is served (the proxy wants a token)
        status, seen, body = yield deferToThread(curl, self.tls_port, "pf-abc.preview.example.com", ca)
        self.assertEqual((status, seen), (0, "CN=*.preview.example.com"))
        self.assertEqual(json.loads(body)["error"]["code"], 401)
        status, seen, _ = yield deferToThread(curl, self.tls_port, "unknown.example.com", ca)
        self.assertEqual((status, seen), (60, f"CN={DEFAULT_NAME}"))  # 60: the name does not match
        status, seen, body = yield deferToThread(curl, self.tls_port, DEFAULT_NAME, ca)
        self.assertEqual((status, seen, json.loads(body)), (0, f"CN={DEFAULT_NAME}", {"status": "ok"}))
        self.assertEqual((yield deferToThread(served_without_sni, self.tls_port, ca)), DEFAULT_NAME)

    @inlineCallbacks
    def test_ask(self) -> Any:
        """
        The ask listener: 200 for the host of a live forward under
        proxy_domain, 404 for another (an unknown forward, a custom domain
        nobody claims), 400 for a bad question; a flood of questions writes
        nothing to the store.
        """
        forward = yield self.daemon.create(9)
        host = forward["id"].replace("_", "-") + ".preview.example.com"
        base = f"http://127.0.0.1:{self.ask_port}/tls/ask?domain="

        @inlineCallbacks
        def ask(domain: str) -> Any:
            response = yield _http.get(base + domain)
            body = yield response.json()
            return response.code, body

        before = state_files(self.daemon.directory)
        self.assertEqual((yield ask(host)), (200, {"domain": host, "claimed": True}))
        self.assertEqual((yield ask(host.upper() + ".")), (200, {"domain": host, "claimed": True}))
        for domain in ("pf-nosuchforward.preview.example.com", "app.example.com", "preview.example.com"):
            code, body = yield ask(domain)
            self.assertEqual((code, body["error"]["message"]), (404, "Domain not claimed"), domain)
        for domain in ("", "a..b", "x" * 300):
            code, _ = yield ask(domain)
            self.assertEqual(code, 400, domain)
        for _ in range(50):
            yield ask(host)
        self.assertEqual(state_files(self.daemon.directory), before)
        response = yield _http.get(f"http://127.0.0.1:{self.ask_port}/api/containers")
        self.assertEqual(response.code, 404)  # nothing else is served there

        yield self.daemon.delete(forward["id"])
        code, _ = yield ask(host)
        self.assertEqual(code, 404)

    @inlineCallbacks
    def test_chromium(self) -> Any:
        """
        Headless Chromium loads a page over https with SNI: trusting only
        app.example.com's key, it loads https://app.example.com (its own
        certificate was served) but not an unknown name; trusting only the
        endpoint's own key, the other way round.
        """
        if not os.path.exists(CHROMIUM):
            raise SkipTest("chromium is not installed")
        def load(name: str, trusted: bytes) -> Any:
            return dump_dom(
                f"https://{name}:{self.tls_port}/healthz",
                self.mktemp(),
                "--host-resolver-rules=MAP *.example.com 127.0.0.1",
                f"--ignore-certificate-errors-spki-list={spki_hash(trusted)}",
            )

        own = self.certs.own.read_bytes()
        self.assertIn('{"status": "ok"}', (yield load("app.example.com", self.certs.app)))
        self.assertIn('{"status": "ok"}', (yield load("unknown.example.com", own)))
        # the other way round, the certificate served is not the one trusted
        self.assertNotIn('"status"', (yield load("app.example.com", own)))
        self.assertNotIn('"status"', (yield load("unknown.example.com", self.certs.app)))


class ReloadTests(TestCase):
    """A real twistd: certificates change on SIGHUP, without a restart; a bad file keeps it up."""

    timeout = 120

    def test_sighup(self) -> None:
        certs = Certificates(self)
        os.unlink(certs.directory / "other.example.org.pem")
        os.unlink(certs.directory / "other.example.org.key")
        tls_port = free_port()
        directory = Path(self.mktemp()).absolute()
        directory.mkdir()
        daemon = TwistdDaemon(
            directory,
            listen=(f"ssl:{tls_port}:interface=127.0.0.1:privateKey={certs.own}",),
            extra=f'\n[tls]\ncertificates = "{certs.directory}"\n',
        )
        daemon.start()
        self.addCleanup(daemon.stop)
        ca = certs.ca.path

        def reload() -> None:
            """SIGHUP, and wait until the certificates were read again."""
            assert daemon.process is not None
            loads = daemon.log().count("certificates from")
            daemon.process.send_signal(signal.SIGHUP)
            _wait(lambda: daemon.log().count("certificates from") > loads, daemon)

        self.assertEqual(curl(tls_port, "other.example.org", ca, insecure=True)[1], f"CN={DEFAULT_NAME}")

        certs.ca.write(certs.directory / "other.example.org.pem", "other.example.org")
        reload()
        status, subject, body = curl(tls_port, "other.example.org", ca)
        self.assertEqual((status, subject, json.loads(body)), (0, "CN=other.example.org", {"status": "ok"}))

        (certs.directory / "app.example.com.pem").write_text("not a certificate")
        reload()
        lines = [line for line in daemon.log().splitlines() if "app.example.com.pem" in line]
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("the certificate loaded before stays", lines[0])
        self.assertEqual(curl(tls_port, "app.example.com", ca)[:2], (0, "CN=app.example.com"))
        assert daemon.process is not None
        self.assertIsNone(daemon.process.poll())
        self.assertEqual(http_request(daemon.port, "GET", "/healthz")[0], 200)

        os.unlink(certs.directory / "other.example.org.pem")
        reload()
        self.assertEqual(curl(tls_port, "other.example.org", ca, insecure=True)[1], f"CN={DEFAULT_NAME}")


class WorkersTests(TestCase):
    """``--workers 2``: every worker serves each host's certificate and the ask endpoint."""

    timeout = 120

    def test_certificates_and_ask_in_every_worker(self) -> None:
        certs = Certificates(self)
        tls_port = free_port()
        ask_port = free_port()
        directory = Path(self.mktemp()).absolute()
        directory.mkdir()
        daemon = TwistdDaemon(
            directory,
            listen=(f"ssl:{tls_port}:interface=127.0.0.1:privateKey={certs.own}",),
            server='proxy_domain = "preview.example.com"',
            extra=f'\n[tls]\ncertificates = "{certs.directory}"\nask_listen = "tcp:{ask_port}:interface=127.0.0.1"\n',
        )
        daemon.start(args=("--workers", "2"))
        self.addCleanup(daemon.stop)
        _wait(lambda: "ready: 2 workers" in daemon.log_path.read_text(errors="replace"), daemon, 30)
        code, forward, _ = daemon.request("POST", "/api/containers/c1/port-forwards", {"container_port": 9})
        self.assertEqual(code, 201, forward)
        host = forward["id"].replace("_", "-") + ".preview.example.com"
        # SO_REUSEPORT spreads connections over both workers: with 12 of
        # each, the chance that one worker saw none is 2 * 2**-12.
        for _ in range(12):
            status, subject, body = curl(tls_port, "app.example.com", certs.ca.path)
            self.assertEqual((status, subject, json.loads(body)), (0, "CN=app.example.com", {"status": "ok"}))
            code, body, _ = http_request(ask_port, "GET", f"/tls/ask?domain={host}")
            self.assertEqual((code, body), (200, {"domain": host, "claimed": True}))


def _wait(condition: Any, daemon: TwistdDaemon, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {daemon.log()}")
        time.sleep(0.05)


class StartupErrorTests(TestCase):
    """What is wrong with the TLS settings stops start-up with one line naming the key."""

    timeout = 120

    def start(self, toml: str) -> str:
        """:return: the output of a twistd that must fail to start with ``toml``."""
        directory = Path(self.mktemp()).absolute()
        directory.mkdir()
        (directory / "containers.toml").write_text("")
        (directory / "rexecpf.toml").write_text(toml)
        result = subprocess.run(
            twistd_argv("--config", str(directory / "rexecpf.toml")), cwd=directory, capture_output=True,
            timeout=60, stdin=subprocess.DEVNULL, env=subprocess_env(),
        )
        output = (result.stdout + result.stderr).decode()
        self.assertNotEqual(result.returncode, 0, output)
        self.assertNotIn("Traceback", output)
        lines = [line for line in output.splitlines() if line.strip()]
        self.assertEqual(len(lines), 1, output)
        return lines[0]

    def test_errors(self) -> None:
        certs = Certificates(self)
        port = free_port()
        ssl = f"ssl:{port}:interface=127.0.0.1:privateKey={certs.own}"
        tls = f'[tls]\ncertificates = "{certs.directory}"\n'
        cases = [
            (f'[server]\nlisten = ["{ssl}"]\n[tls]\ncertificates = "/nonexistent"\n',
             ["tls.certificates", "/nonexistent", "not a directory"]),
            (f'[server]\nlisten = ["ssl:{port}:privateKey=/nonexistent.pem"]\n{tls}',
             ["server.listen", "nonexistent.pem", "cannot read"]),
            (f'[server]\nlisten = ["ssl:{port}:privateKey={certs.ca.path}"]\n{tls}',
             ["server.listen", "no usable PEM private key"]),
            (f'[server]\nlisten = ["{ssl}:sslmethod=TLSv1_2_METHOD"]\n{tls}',
             ["server.listen", "sslmethod"]),
            (f'[server]\nlisten = ["tcp:{port}"]\n{tls}', ["tls.certificates", "no ssl: endpoint"]),
            ('[tls]\nask_listen = "nonsense:1"\n', ["tls.ask_listen", "nonsense:1"]),
        ]
        for toml, words in cases:
            line = self.start(toml)
            for word in words:
                self.assertIn(word, line, toml)
