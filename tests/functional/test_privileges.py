"""
``twistd --uid/--gid rexecpf``: twistd starts as root, builds the service
and opens its sockets, then becomes that user.  The state file is that
user's (opened, or created, as that user before the switch), so the daemon
can still write it; one that user cannot use stops start-up with one line.
``--workers`` refuses ``--uid/--gid`` (tests/test_workers.py).

Root only.  The daemon imports lazily after the switch (the standard
library's codecs, for one), so the interpreter and this checkout must be
readable by ``nobody``: .ci/run makes them so; elsewhere the tests say why
they cannot run.
"""

from __future__ import annotations

import os
import pwd
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path
from unittest import SkipTest

from twisted.trial.unittest import TestCase

from tests.functional.daemon import Daemon, subprocess_env, twistd_argv

NOBODY = pwd.getpwnam("nobody")
AS_NOBODY = ("--uid", str(NOBODY.pw_uid), "--gid", str(NOBODY.pw_gid))


def _nobody_can_run_rexecpf() -> None:
    """:raises SkipTest: unless this is root, and ``nobody`` can import what the daemon imports."""
    if os.geteuid() != 0:
        raise SkipTest("switching to another user needs root")
    try:
        check = subprocess.run(
            [sys.executable, "-c", "import encodings.idna, rexecpf.tap, rexecpf.api"],
            env=subprocess_env(), user=NOBODY.pw_uid, group=NOBODY.pw_gid, extra_groups=[],
            cwd="/", capture_output=True, text=True,
        )
        why = check.stderr.strip()[-300:] if check.returncode else ""
    except OSError as error:
        why = str(error)
    if why:
        raise SkipTest(f"user nobody cannot run {sys.executable} with this checkout: {why}")


class RunAsUserTests(TestCase):
    def setUp(self) -> None:
        _nobody_can_run_rexecpf()
        self.directory = Path(tempfile.mkdtemp(prefix="rexecpf-uid-"))
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.daemon = Daemon(self.directory)
        self.addCleanup(self.daemon.stop)
        os.chown(self.directory, NOBODY.pw_uid, NOBODY.pw_gid)
        for child in self.directory.iterdir():
            os.chown(child, NOBODY.pw_uid, NOBODY.pw_gid)

    def test_serves_as_the_user_with_a_state_file_of_theirs(self) -> None:
        """The daemon runs as nobody, its new state file is nobody's, and forwards are made, kept and listed."""
        self.daemon.start(twistd=AS_NOBODY)
        assert self.daemon.process is not None
        status = Path(f"/proc/{self.daemon.process.pid}/status").read_text()
        uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
        self.assertEqual(set(uids), {str(NOBODY.pw_uid)})
        state = self.directory / "state.sqlite3"
        self.assertEqual((state.stat().st_uid, state.stat().st_gid), (NOBODY.pw_uid, NOBODY.pw_gid))
        code, created, _ = self.daemon.request("POST", "/api/containers/c1/port-forwards", {"container_port": 8000})
        self.assertEqual(code, 201, created)
        code, listed, _ = self.daemon.request("GET", "/api/containers/c1/port-forwards")
        self.assertEqual((code, [forward["id"] for forward in listed]), (200, [created["id"]]))
        self.assertEqual(self.daemon.request("GET", "/healthz", user=None)[0], 200)

    def test_a_state_file_the_user_cannot_use_stops_start_up(self) -> None:
        """A state file left by a run as root (0600, root's): one line naming it and the user, status 1."""
        state = self.directory / "state.sqlite3"
        sqlite3.connect(state).close()
        os.chmod(state, 0o600)
        process = subprocess.run(
            twistd_argv("--config", str(self.daemon.config), twistd=AS_NOBODY),
            cwd=self.directory, env=subprocess_env(), stdin=subprocess.DEVNULL, capture_output=True,
            text=True, timeout=60,
        )
        self.assertEqual(process.returncode, 1, process.stdout + process.stderr)
        self.assertNotIn("Traceback", process.stdout + process.stderr)
        self.assertIn(
            f"rexecpf: error: server.state: cannot use {state} as uid {NOBODY.pw_uid}, gid {NOBODY.pw_gid}",
            process.stderr,
        )
