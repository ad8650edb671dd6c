"""
A real ``twistd -n rexecpf`` on a real PostgreSQL (``[store] url``): forwards
survive a restart of the daemon, /healthz follows the database going away
and coming back, start-up against a database that does not answer is one
line, and the URL's password is never printed.  Without PostgreSQL these
skip, except under ``CI=true`` where they fail.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
import unittest
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg

from tests.functional.daemon import Daemon, subprocess_env, twistd_argv
from tests.functional.peers import PostgresServer, free_port
from tests.functional.pgcluster import fresh_database, require_postgres

PASSWORD = "pw-not-for-logs"


def _with_password(url: str) -> str:
    # Trust authentication: the server never asks for it, so it may be anything.
    return url.replace("postgresql://postgres@", f"postgresql://postgres:{PASSWORD}@")


def _poll(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s: {what}")
        time.sleep(0.05)


class PostgresDaemonTests(unittest.TestCase):
    def setUp(self) -> None:
        require_postgres()

    def daemon(self, url: str, **kwargs: Any) -> Daemon:
        directory = Path(tempfile.mkdtemp(prefix="rexecpf-pgdaemon-"))
        self.addCleanup(shutil.rmtree, directory, True)
        daemon = Daemon(directory, extra=f'\n[store]\nurl = "{url}"\n', **kwargs)
        self.addCleanup(daemon.stop)
        return daemon

    def health(self, daemon: Daemon) -> int:
        try:
            return daemon.request("GET", "/healthz", user=None, timeout=15)[0]
        except OSError:
            return 0

    def test_forwards_survive_a_restart(self) -> None:
        """
        Created through one daemon, seen by the next one on the same
        database; the log names the database with the password masked.
        """
        url = _with_password(fresh_database(self))
        daemon = self.daemon(url).start()
        code, created = daemon.create("c1", 8080, name="web")
        self.assertEqual(code, 201, created)
        with psycopg.connect(url) as connection:
            stored = connection.execute("SELECT id, local_port FROM forwards").fetchall()
        self.assertEqual(stored, [(created["id"], created["local_port"])])
        self.assertFalse((daemon.directory / "state.sqlite3").exists())
        daemon.stop()
        daemon.start()
        self.assertEqual(daemon.list("c1"), [created])
        log = daemon.log_path.read_text()
        self.assertIn("store: PostgreSQL at postgresql://postgres:***@", log)
        self.assertNotIn(PASSWORD, log)

    def test_limit_holds_under_concurrency(self) -> None:
        """40 simultaneous POSTs for distinct ports through the daemon: exactly 10 x 201, 30 x 429."""
        daemon = self.daemon(fresh_database(self)).start()
        with ThreadPoolExecutor(max_workers=40) as pool:
            codes = list(pool.map(lambda i: daemon.create("c1", 1000 + i)[0], range(40)))
        self.assertEqual(Counter(codes), {201: 10, 429: 30})

    def test_healthz_follows_the_database(self) -> None:
        """
        The database stops (as in a crash): /healthz is 503 and a create 503
        Store unavailable; it starts again: /healthz is 200, creates work and
        nothing acknowledged was lost, without restarting rexecpf.
        """
        # Durable, as a real server is (the shared test cluster is not): an
        # acknowledged create survives the immediate (crash) stop.
        durable = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}
        directory = tempfile.mkdtemp(prefix="rexecpf-pgown-")
        self.addCleanup(shutil.rmtree, directory, True)
        cluster = PostgresServer(directory, settings=durable)
        self.addCleanup(cluster.stop)
        daemon = self.daemon(cluster.url).start()
        self.assertEqual(daemon.create("c1", 80)[0], 201)
        cluster.pg_ctl("stop", "-m", "immediate")
        _poll(lambda: self.health(daemon) == 503, 30, "/healthz 503 with the database down")
        code, document = daemon.create("c1", 81)
        self.assertEqual((code, document["error"]["message"]), (503, "Store unavailable"), document)
        cluster.pg_ctl("start")
        _poll(lambda: self.health(daemon) == 200, 30, "/healthz 200 with the database back")
        self.assertEqual(daemon.create("c1", 82)[0], 201)
        self.assertEqual([f["container_port"] for f in daemon.list("c1")], [80, 82])

    def test_unreachable_database_stops_start_up(self) -> None:
        """No database at the URL: one line naming store.url, the password masked, exit 1."""
        daemon = self.daemon(f"postgresql://postgres:{PASSWORD}@127.0.0.1:{free_port()}/x")
        result = subprocess.run(
            twistd_argv("--config", str(daemon.config)), cwd=daemon.directory, capture_output=True,
            timeout=60, stdin=subprocess.DEVNULL, env=subprocess_env(),
        )
        output = (result.stdout + result.stderr).decode()
        self.assertEqual(result.returncode, 1, output)
        lines = [line for line in output.splitlines() if line.strip()]
        self.assertEqual(len(lines), 1, output)
        self.assertIn("rexecpf: error: store.url: cannot use postgresql://postgres:***@127.0.0.1:", lines[0])
        self.assertNotIn(PASSWORD, output)
