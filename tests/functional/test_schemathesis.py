"""
Schemathesis against the live ``/api/openapi.json`` of a real daemon: every
built-in check, examples + coverage + fuzzing + stateful (the 201's links:
create -> get -> delete), at least 1,000 generated cases, zero failures.

Runs the ``st`` command line in a subprocess (its exit status is the verdict)
and reads the numbers from its JSON report.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

from tests.functional.daemon import Daemon, subprocess_env

try:
    import schemathesis  # noqa: F401

    HAVE_SCHEMATHESIS = True
except ImportError:  # pragma: no cover
    HAVE_SCHEMATHESIS = False

#: Cases per operation per phase; the total is reported and checked.
MAX_EXAMPLES = int(os.environ.get("REXECPF_ST_MAX_EXAMPLES", "1000"))
SEED = os.environ.get("REXECPF_ST_SEED", "20261128")
MIN_CASES = 1000


def _st() -> list[str]:
    found = shutil.which("st", path=os.path.dirname(sys.executable))
    if found:
        return [found]
    return [sys.executable, "-m", "schemathesis.cli"]


@unittest.skipUnless(HAVE_SCHEMATHESIS, "schemathesis is not installed (pip install '.[test]')")
class SchemathesisTests(unittest.TestCase):
    def test_live_api_conforms(self) -> None:
        """Every check, every phase, >= 1,000 cases against a real daemon: no failure."""
        directory = Path(tempfile.mkdtemp(prefix="rexecpf-st-"))
        daemon = Daemon(
            directory,
            containers=[{"id": "c1", "owner": "alice"}],
            limits="forwards_per_container = 200",
            # Slugs and custom domains are schema-valid input: configure what
            # they need (no DNS: the tests never leave loopback).
            server='proxy_domain = "preview.test"',
            auth='custom_domains = ["alice"]',
            extra="\n[domains]\nverify = false\n",
        ).start()
        self.addCleanup(daemon.stop)
        (directory / "schemathesis.toml").write_text(
            # Aim at a container that exists, so requests reach the body checks
            # and the stateful links have something to create (404 Container
            # not found is covered by tests/test_api.py).
            '[parameters]\n"path.containerId" = "c1"\n'
        )
        report = directory / "st-report.json"
        env = subprocess_env()
        env["SCHEMATHESIS_HOOKS"] = "tests.functional.schemathesis_hooks"
        env.pop("CI", None)  # let st use its normal output
        result = subprocess.run(
            [
                *_st(),
                "--config-file", str(directory / "schemathesis.toml"),
                "run", f"http://127.0.0.1:{daemon.port}/api/openapi.json",
                "--header", f"Authorization: Bearer {daemon.users['alice']}",
                "--checks", "all",
                "--phases", "examples,coverage,fuzzing,stateful",
                "--max-examples", str(MAX_EXAMPLES),
                "--seed", SEED,
                "--workers", "1",
                "--request-timeout", "10",
                "--report", "json",
                "--report-json-path", str(report),
                "--no-color",
            ],
            cwd=directory, env=env, capture_output=True, timeout=300,
        )
        output = (result.stdout + result.stderr).decode(errors="replace")
        self.assertEqual(result.returncode, 0, output[-6000:])
        cases = _generated_cases(report, output)
        print(f"\nschemathesis: {cases} cases generated, seed {SEED}, 0 failures")
        self.assertGreaterEqual(cases, MIN_CASES, output[-3000:])
        # the daemon is still healthy and answered without a server error
        self.assertEqual(daemon.request("GET", "/healthz", user=None)[0], 200)
        self.assertNotIn("Traceback", daemon.log())


def _generated_cases(report: Path, output: str) -> int:
    import re

    match = re.search(r"(\d+) generated", output)
    if match:
        return int(match.group(1))
    data = json.loads(report.read_text())  # pragma: no cover - fallback
    return int(data.get("summary", {}).get("test_cases", {}).get("generated", 0))
