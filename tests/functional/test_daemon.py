"""
A real ``twistd rexecpf`` process over real sockets: the README's commands,
concurrency limits, persistence across ``kill -9``, lifecycle from the
inventory file, and start-up errors.
"""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
import tempfile
import threading
import time
import unittest
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jsonschema

from rexecpf.openapi import openapi_document
from tests.functional.daemon import Daemon, http_request, subprocess_env, twistd_argv
from tests.functional.peers import free_port


def wait_until(predicate: Callable[[], bool], timeout: float, step: float = 0.05) -> float:
    """Poll ``predicate`` until true; :return: seconds taken.  Fails after ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(step)
    raise AssertionError(f"not true within {timeout}s")


class DaemonTestCase(unittest.TestCase):
    def make_daemon(self, **kwargs: Any) -> Daemon:
        directory = tempfile.mkdtemp(prefix="rexecpf-daemon-")
        daemon = Daemon(directory, **kwargs)
        self.addCleanup(daemon.stop)
        return daemon


class DemoTests(unittest.TestCase):
    def test_demo_prints_a_working_curl_line(self) -> None:
        """``twistd -n rexecpf --demo`` serves the API and the curl line it prints works."""
        directory = tempfile.mkdtemp(prefix="rexecpf-demo-")
        port = free_port()
        log = open(Path(directory) / "out.log", "wb")
        process = subprocess.Popen(
            twistd_argv(
                "--demo",
                # no --public-url: it follows --listen
                "--listen", f"tcp:{port}:interface=127.0.0.1",
            ),
            cwd=directory, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=subprocess_env(),
        )
        self.addCleanup(lambda: (process.poll() is None and process.kill(), process.wait(10)))
        wait_until(lambda: _answers(port), 30)
        output = (Path(directory) / "out.log").read_text()
        self.assertIn("demo-token", output)
        (line,) = [text.strip() for text in output.splitlines() if text.strip().startswith("curl ")]
        result = subprocess.run(
            shlex.split(line) + ["-s", "-w", "\\n%{http_code}"],
            capture_output=True, timeout=30, check=True,
        )
        body, _, status = result.stdout.decode().rpartition("\n")
        self.assertEqual(status, "201", body)
        self.assertIn('"container_id": "demo"', body)
        self.assertIn(f'"proxy_url": "http://127.0.0.1:{port}/p/', body)
        self.assertTrue((Path(directory) / "rexecpf.sqlite3").exists())
        process.send_signal(signal.SIGTERM)
        self.assertIn(process.wait(30), (0, -signal.SIGTERM))

    def test_help_lists_options(self) -> None:
        """``twistd rexecpf --help`` lists the options of the contract."""
        result = subprocess.run(
            twistd_argv("--help")[:-1] + ["rexecpf", "--help"],
            capture_output=True, timeout=60, env=subprocess_env(),
        )
        text = result.stdout.decode()
        for option in ("--config", "--demo", "--listen", "--public-url", "--state"):
            self.assertIn(option, text)


def _answers(port: int) -> bool:
    try:
        return http_request(port, "GET", "/healthz", timeout=2)[0] == 200
    except OSError:
        return False


class ConcurrencyTests(DaemonTestCase):
    def setUp(self) -> None:
        self.daemon = self.make_daemon().start()

    def _simultaneously(self, count: int, make: Callable[[int], tuple[int, Any]]) -> list[int]:
        barrier = threading.Barrier(count)

        def one(index: int) -> int:
            barrier.wait(timeout=30)
            return make(index)[0]

        with ThreadPoolExecutor(max_workers=count) as pool:
            return list(pool.map(one, range(count)))

    def test_limit_holds_under_concurrency(self) -> None:
        """40 simultaneous POSTs for distinct ports: exactly 10 x 201 and 30 x 429."""
        codes = self._simultaneously(40, lambda i: self.daemon.create("c1", 1000 + i))
        self.assertEqual(Counter(codes), {201: 10, 429: 30})
        forwards = self.daemon.list("c1")
        self.assertEqual(len(forwards), 10)
        self.assertEqual(len({f["local_port"] for f in forwards}), 10)

    def test_one_forward_per_port_under_concurrency(self) -> None:
        """20 simultaneous POSTs for the same port: exactly one 201 and 19 x 403."""
        codes = self._simultaneously(20, lambda i: self.daemon.create("c1", 5432))
        self.assertEqual(Counter(codes), {201: 1, 403: 19})
        self.assertEqual(len(self.daemon.list("c1")), 1)


class PersistenceTests(DaemonTestCase):
    def test_kill_9_loses_nothing(self) -> None:
        """
        After ``kill -9`` and a restart every acknowledged forward is there with
        the same id, local_port and created_at; the forwards of a container
        marked stopped while rexecpf was down are gone.
        """
        daemon = self.make_daemon(
            containers=[{"id": "c1", "owner": "alice"}, {"id": "c2", "owner": "alice"}]
        ).start()
        kept = [daemon.create("c1", port)[1] for port in (80, 443, 5432)]
        doomed = daemon.create("c2", 80)
        self.assertEqual(doomed[0], 201)
        daemon.kill(signal.SIGKILL)
        daemon.write_inventory(
            [{"id": "c1", "owner": "alice"}, {"id": "c2", "owner": "alice", "state": "exited"}]
        )
        daemon.start()
        self.assertEqual(daemon.list("c1"), kept)
        self.assertEqual(daemon.list("c2"), [])

    def test_live_responses_match_openapi(self) -> None:
        """Live 201, 200 and error bodies validate against /api/openapi.json."""
        daemon = self.make_daemon().start()
        code, document, _ = daemon.request("GET", "/api/openapi.json", user=None)
        self.assertEqual(code, 200)
        components = document["components"]
        created = daemon.create("c1", 8080, name="web")
        jsonschema.validate(created[1], {"$ref": "#/components/schemas/PortForward", "components": components})
        error = daemon.create("c1", 8080)
        self.assertEqual(error[0], 403)
        jsonschema.validate(error[1], {"$ref": "#/components/schemas/Error", "components": components})
        self.assertEqual(document, openapi_document())


class LifecycleTests(DaemonTestCase):
    def test_stopped_container_reaped_within_two_seconds(self) -> None:
        """Marking a container stopped in the inventory deletes its forwards within 2 s."""
        daemon = self.make_daemon(
            containers=[{"id": "c1", "owner": "alice"}, {"id": "c2", "owner": "alice"}]
        ).start()
        for port in (1, 2, 3):
            self.assertEqual(daemon.create("c1", port)[0], 201)
        self.assertEqual(daemon.create("c2", 1)[0], 201)
        daemon.write_inventory(
            [{"id": "c1", "owner": "alice", "state": "exited"}, {"id": "c2", "owner": "alice"}]
        )
        took = wait_until(lambda: daemon.list("c1") == [], timeout=2.0)
        self.assertLess(took, 2.0)
        self.assertEqual(len(daemon.list("c2")), 1)
        self.assertEqual(daemon.create("c1", 9)[0], 409)

    def test_removed_container_reaped(self) -> None:
        """A container whose entry disappears has stopped: its forwards go, it is 404."""
        daemon = self.make_daemon(
            containers=[{"id": "c1", "owner": "alice"}, {"id": "c2", "owner": "alice"}]
        ).start()
        self.assertEqual(daemon.create("c2", 1)[0], 201)
        daemon.write_inventory([{"id": "c1", "owner": "alice"}])
        wait_until(lambda: daemon.request("GET", "/api/containers/c2/port-forwards")[0] == 404, 2.0)


class StartupErrorTests(unittest.TestCase):
    def run_with(self, config: str | None, *args: str) -> subprocess.CompletedProcess[bytes]:
        directory = Path(tempfile.mkdtemp(prefix="rexecpf-bad-"))
        (directory / "containers.toml").write_text("")
        argv = list(args)
        if config is not None:
            (directory / "rexecpf.toml").write_text(config)
            argv = ["--config", str(directory / "rexecpf.toml"), *args]
        return subprocess.run(
            twistd_argv(*argv), cwd=directory, capture_output=True, timeout=60,
            stdin=subprocess.DEVNULL, env=subprocess_env(),
        )

    def assertOneLine(self, result: subprocess.CompletedProcess[bytes], *words: str) -> None:
        output = (result.stdout + result.stderr).decode()
        self.assertNotEqual(result.returncode, 0, output)
        self.assertNotIn("Traceback", output)
        lines = [line for line in output.splitlines() if line.strip()]
        self.assertEqual(len(lines), 1, output)
        for word in words:
            self.assertIn(word, lines[0])

    def test_bad_toml(self) -> None:
        """A file that is not TOML: one line, non-zero exit."""
        self.assertOneLine(self.run_with("[server\nlisten = 1"), "not valid TOML")

    def test_unknown_key(self) -> None:
        """An unknown key is named."""
        self.assertOneLine(self.run_with("[limits]\nforwards_per_contaner = 3\n"),
                           "limits.forwards_per_contaner", "unknown key")

    def test_wrong_type(self) -> None:
        """A value of the wrong type is named."""
        self.assertOneLine(self.run_with('[limits]\nforwards_per_container = "10"\n'),
                           "limits.forwards_per_container")

    def test_bad_token_characters(self) -> None:
        """A token that is not subprotocol-safe is refused, without echoing it."""
        result = self.run_with('[auth]\nusers = { alice = "bad token/secret" }\n')
        self.assertOneLine(result, "auth.users.alice")
        self.assertNotIn(b"bad token/secret", result.stdout + result.stderr)

    def test_missing_file(self) -> None:
        """A configuration file that does not exist: one line naming it."""
        result = self.run_with(None, "--config", "/nonexistent/rexecpf.toml")
        self.assertOneLine(result, "/nonexistent/rexecpf.toml")

    def test_port_in_use(self) -> None:
        """An endpoint that cannot listen: one line naming it."""
        import socket

        holder = socket.socket()
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        self.addCleanup(holder.close)
        port = holder.getsockname()[1]
        result = self.run_with(
            f'[server]\nlisten = ["tcp:{port}:interface=127.0.0.1"]\n'
            '[backend]\ninventory = "containers.toml"\n'
        )
        output = (result.stdout + result.stderr).decode()
        self.assertNotEqual(result.returncode, 0, output)
        self.assertNotIn("Traceback", output)
        self.assertTrue(re.search(rf"cannot listen on tcp:{port}", output), output)

    def test_bad_listen_override(self) -> None:
        """A bad --listen endpoint is named too."""
        result = self.run_with('[backend]\ninventory = "containers.toml"\n', "--listen", "nonsense:1")
        output = (result.stdout + result.stderr).decode()
        self.assertNotEqual(result.returncode, 0, output)
        self.assertNotIn("Traceback", output)
        self.assertIn("server.listen", output)
