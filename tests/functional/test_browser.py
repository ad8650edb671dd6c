"""
A real browser (headless Chromium) opens a tunnel exactly as the product's
documentation shows: ``new WebSocket(url, ['Bearer', token])``.
"""

from __future__ import annotations

import json
import os
import shutil

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from tests.functional.inprocess import TOKENS, Daemon, echo_server, free_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

PAGE = """<!doctype html>
<html><body><pre id="out">waiting</pre>
<script>
const out = document.getElementById("out");
const ws = new WebSocket(%(url)s, ['Bearer', %(token)s]);
ws.binaryType = "arraybuffer";
ws.onopen = () => ws.send(new TextEncoder().encode("hello from the browser"));
ws.onmessage = (event) => {
  const text = new TextDecoder().decode(new Uint8Array(event.data));
  out.textContent = "echo:" + ws.protocol + ":" + text;
  ws.close();
};
ws.onerror = () => { out.textContent = "error"; };
</script></body></html>
"""


class Page(Resource):
    isLeaf = True

    def __init__(self, html: str) -> None:
        super().__init__()
        self.html = html.encode()

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return self.html


class BrowserTests(TestCase):
    timeout = 90

    @inlineCallbacks
    def test_chromium_websocket(self):
        """
        Chromium's WebSocket with subprotocols ``['Bearer', token]`` opens
        the tunnel (``protocol`` is ``Bearer``), sends binary data and
        receives the container's echo.
        """
        if not os.access(CHROMIUM, os.X_OK):
            raise SkipTest("chromium is not installed")
        daemon = Daemon(self.mktemp())
        yield daemon.start()
        self.addCleanup(daemon.stop)
        echo = yield echo_server()
        self.addCleanup(echo.stop)
        forward = yield daemon.create(echo.port)
        html = PAGE % {"url": json.dumps(daemon.ws_url(forward["id"])), "token": json.dumps(TOKENS["alice"])}
        port = free_port()
        page = reactor.listenTCP(port, Site(Page(html)), interface="127.0.0.1")
        self.addCleanup(page.stopListening)
        profile = self.mktemp()
        os.makedirs(profile)
        args = [
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--dump-dom",
            f"http://127.0.0.1:{port}/",
        ]
        d = getProcessOutputAndValue(CHROMIUM, args, env=dict(os.environ), reactor=reactor)
        d.addTimeout(80, reactor)
        out, err, status = yield d
        self.assertIn(b"echo:Bearer:hello from the browser", out, err[-2000:])
