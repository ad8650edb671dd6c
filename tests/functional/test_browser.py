"""
A real browser (headless Chromium) opens a tunnel exactly as the product's
documentation shows: ``new WebSocket(url, ['Bearer', token])``.
"""

from __future__ import annotations

import json
import os
import shutil

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import ProcessProtocol
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from tests.functional.inprocess import TOKENS, Daemon, echo_server, free_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

PAGE = """<!doctype html>
<html><body><pre id="out">waiting</pre>
<script>
const out = document.getElementById("out");
function report(text) {
  out.textContent = text;
  fetch("/result?text=" + encodeURIComponent(text));
}
const ws = new WebSocket(%(url)s, ['Bearer', %(token)s]);
ws.binaryType = "arraybuffer";
ws.onopen = () => ws.send(new TextEncoder().encode("hello from the browser"));
ws.onmessage = (event) => {
  const text = new TextDecoder().decode(new Uint8Array(event.data));
  report("echo:" + ws.protocol + ":" + text);
  ws.close();
};
ws.onerror = () => report("error");
</script></body></html>
"""


class Page(Resource):
    """
    The test page at ``/``; the page reports what it saw to ``/result``,
    which fires :attr:`reported` with it.
    """

    isLeaf = True

    def __init__(self, html: str) -> None:
        super().__init__()
        self.html = html.encode()
        self.reported: Deferred[bytes] = Deferred()

    def render_GET(self, request):
        if request.path == b"/result":
            if not self.reported.called:
                self.reported.callback(request.args.get(b"text", [b""])[0])
            return b"ok"
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return self.html


class _Browser(ProcessProtocol):
    """Chromium, run until :meth:`stop`; its output is kept for failure messages."""

    def __init__(self) -> None:
        self.output = b""
        self.ended: Deferred[None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason) -> None:
        self.ended.callback(None)

    def stop(self) -> Deferred[None]:
        if not self.ended.called:
            self.transport.signalProcess("TERM")
        return self.ended


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
        page = Page(html)
        port = free_port()
        listening = reactor.listenTCP(port, Site(page), interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        profile = self.mktemp()
        os.makedirs(profile)
        args = [
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", f"http://127.0.0.1:{port}/",
        ]
        browser = _Browser()
        reactor.spawnProcess(browser, CHROMIUM, [CHROMIUM, *args], env=dict(os.environ))
        self.addCleanup(browser.stop)
        # The page reports when the echo arrived (or the socket failed); a
        # page that never reports fails the test after 60 s.
        page.reported.addTimeout(60, reactor)
        try:
            result = yield page.reported
        except Exception:
            self.fail(f"the page reported nothing: {browser.output[-2000:]!r}")
        self.assertEqual(result, b"echo:Bearer:hello from the browser")
