"""
A real browser through the proxy: headless Chromium opens ``proxy_url?token=``,
is redirected, keeps the session cookie, loads a page from the container whose
script opens a WebSocket back through the proxy, and shows the echo.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from tests.functional.proxyenv import listen, start_rexec, temp_dir, ws_app_site

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def dump_dom(url: str, profile: str, *extra: str) -> Any:
    """:return: a Deferred firing with the DOM Chromium has after loading ``url``."""
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=5000",
        *extra,
        "--dump-dom",
        url,
    ]

    def run() -> str:
        result = subprocess.run(command, capture_output=True, timeout=60, check=False)
        return result.stdout.decode("utf-8", "replace")

    return deferToThread(run)


class BrowserTests(TestCase):
    """Headless Chromium, path routing and host routing."""

    timeout = 120

    def setUp(self) -> None:
        if not os.path.exists(CHROMIUM):
            raise SkipTest("chromium is not installed")

    @inlineCallbacks
    def check(self, proxy_domain: str = "") -> Any:
        overrides = {"server": {"proxy_domain": proxy_domain}} if proxy_domain else {}
        rex = yield start_rexec(self, **overrides)
        port = yield listen(self, ws_app_site())
        fw = yield rex.forward(port)
        proxy_url = rex.components.api._urls.proxy_url(fw.id)
        profile = temp_dir(self)
        extra = [f"--host-resolver-rules=MAP *.{proxy_domain} 127.0.0.1"] if proxy_domain else []
        dom = yield dump_dom(proxy_url + "?token=alice-token", profile, *extra)
        self.assertIn('<div id="status">open echo.v1</div>', dom)
        self.assertIn('<div id="echo">echo.v1:hello from the browser</div>', dom)

    def test_path_routing(self) -> Any:
        """Under /p/{id}/: token -> cookie -> page -> WebSocket echo in the DOM."""
        return self.check()

    def test_host_routing(self) -> Any:
        """At the root of the forward's own origin (proxy_domain), the same."""
        return self.check("preview.test")
