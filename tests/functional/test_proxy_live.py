"""
Proxied requests and upgrades as live connections of their forward, on real
sockets: a revoked token closes its user's, a graceful stop lets a request
finish and closes upgraded connections at once, and every answer is counted
in the metrics.
"""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from rexecpf.model import CloseReason
from tests.functional.inprocess import close_ws, connect_ws
from tests.functional.proxyenv import (
    TOKENS,
    RawClient,
    app_site,
    free_port,
    listen,
    raw_request,
    real_reactor,
    sleep,
    split_response,
    start_rexec,
    ws_app_site,
)

#: The body the held download announces; only HEAD_START of it comes at first.
BODY_LENGTH = 1_000_000
HEAD_START = 1000


class HeldDownload(Protocol):
    """
    The container of a slow download: answers the request with its head and
    the first :data:`HEAD_START` body bytes, then waits for the test to
    :meth:`release` the rest.
    """

    def connectionMade(self) -> None:
        self.factory.held.append(self)
        self.lost: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        if b"\r\n\r\n" in data:
            assert self.transport is not None
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BODY_LENGTH)
            self.transport.write(b"x" * HEAD_START)

    def release(self) -> None:
        assert self.transport is not None
        self.transport.write(b"x" * (BODY_LENGTH - HEAD_START))

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)


def held_download_factory() -> Factory:
    factory = Factory.forProtocol(HeldDownload)
    factory.held = []
    return factory


def proxy_answers(daemon: Any) -> dict[str, float]:
    """:return: status code -> proxied requests counted so far."""
    text = daemon.components.metrics.render().decode()
    return {
        sample.labels["code"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "rexecpf_proxy_requests_total"
    }


class LiveProxyTests(TestCase):
    """A held download and a WebSocket echo through /p/, alice's."""

    @inlineCallbacks
    def setUp(self) -> Any:
        self.rex = yield start_rexec(self)
        self.downloads = held_download_factory()
        download_port = yield listen(self, self.downloads)
        ws_port = yield listen(self, ws_app_site())
        self.download_fw = yield self.rex.forward(download_port)
        self.ws_fw = yield self.rex.forward(ws_port)

    @inlineCallbacks
    def start_download(self) -> Any:
        """:return: a raw client whose download is under way (head and first bytes received)."""
        client = RawClient(
            f"GET /p/{self.download_fw.id}/file HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {TOKENS['alice']}\r\n\r\n".encode()
        )
        yield connectProtocol(TCP4ClientEndpoint(real_reactor(), "127.0.0.1", self.rex.port), client)
        yield client.received(b"\r\n\r\n" + b"x" * HEAD_START).addTimeout(10, real_reactor())
        return client

    @inlineCallbacks
    def open_websocket(self) -> Any:
        """:return: (protocol, factory) of a WebSocket to the echo app, open and echoing."""
        protocol, factory = yield connect_ws(
            f"ws://127.0.0.1:{self.rex.port}/p/{self.ws_fw.id}/ws",
            headers={"Authorization": f"Bearer {TOKENS['alice']}"},
            port=self.rex.port,
        )
        protocol.sendMessage(b"ping", isBinary=True)
        echoed = yield protocol.wait_for(4).addTimeout(10, real_reactor())
        self.assertEqual(echoed, b"ping")
        return protocol, factory

    @inlineCallbacks
    def test_revoked_token_closes_download_and_websocket(self) -> Any:
        """
        Revoking alice's token closes her proxied WebSocket and her download
        in progress (cut short: never a complete-looking response), and the
        container connections behind them; bob's are not touched.
        """
        client = yield self.start_download()
        protocol, factory = yield self.open_websocket()
        self.assertEqual(self.rex.forwards.live_counts().get("proxy"), 2)
        revoked = self.rex.components.authenticator.replace({"bob": TOKENS["bob"]}, [])
        self.assertEqual(revoked, {"alice"})
        self.assertEqual(self.rex.forwards.shutdown_user("bob", CloseReason.TOKEN_REVOKED), 0)
        self.assertEqual(self.rex.forwards.shutdown_user("alice", CloseReason.TOKEN_REVOKED), 2)
        data = yield client.ended.addTimeout(5, real_reactor())
        _, headers, body = split_response(data)
        self.assertIn((b"content-length", b"%d" % BODY_LENGTH), headers)
        self.assertLess(len(body), BODY_LENGTH)
        yield factory.closed.addTimeout(5, real_reactor())
        yield self.downloads.held[0].lost.addTimeout(5, real_reactor())
        self.assertEqual(self.rex.forwards.live_count(), 0)

    @inlineCallbacks
    def test_graceful_stop(self) -> Any:
        """
        A graceful stop closes an upgraded connection at once, waits for a
        download in progress to finish whole, then closes its connection.
        """
        client = yield self.start_download()
        _, factory = yield self.open_websocket()
        stopped = self.rex.components.service.stopService()
        yield factory.closed.addTimeout(5, real_reactor())
        self.assertFalse(stopped.called)
        self.assertFalse(client.ended.called)
        self.assertEqual(self.rex.forwards.live_counts().get("proxy"), 1)
        self.downloads.held[0].release()
        data = yield client.ended.addTimeout(10, real_reactor())
        code, headers, body = split_response(data)
        self.assertEqual((code, len(body)), (200, BODY_LENGTH))
        yield stopped.addTimeout(10, real_reactor())
        self.assertEqual(self.rex.forwards.live_count(), 0)

    @inlineCallbacks
    def test_answers_counted(self) -> Any:
        """
        Each proxied answer is counted with its status: the container's 200,
        our 502, 401, 404 and 303 (a session), the 101 of an upgrade.
        """
        app_port = yield listen(self, app_site())
        ok_fw = yield self.rex.forward(app_port)
        refused_fw = yield self.rex.forward(free_port())
        auth = f"Authorization: Bearer {TOKENS['alice']}\r\n"
        for path, headers, expected in (
            (f"{ok_fw.id}/", auth, 200),
            (f"{refused_fw.id}/", auth, 502),
            (f"{ok_fw.id}/", "", 401),
            ("pf_unknown/", auth, 404),
            (f"{ok_fw.id}/?token={TOKENS['alice']}", "", 303),
        ):
            client = yield raw_request(
                self.rex.port,
                f"GET /p/{path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}\r\n".encode(),
            )
            self.assertEqual(split_response(client.data)[0], expected)
        protocol, factory = yield self.open_websocket()
        yield close_ws(protocol, factory)
        self.assertEqual(proxy_answers(self.rex), {"200": 1, "502": 1, "401": 1, "404": 1, "303": 1, "101": 1})
        # ... and the upgraded connection, once its relay has ended, as a relay
        for _ in range(40):
            if self.rex.forwards.live_count() == 0:
                break
            yield sleep(0.05)
        text = self.rex.components.metrics.render().decode()
        self.assertIn('rexecpf_relays_total{kind="upgrade"} 1.0', text)


class UpgradeLimitsTests(TestCase):
    @inlineCallbacks
    def test_upgrades_use_the_tunnel_limits(self) -> Any:
        """Upgraded connections through /p/ are relayed with [limits] tunnel_bytes_per_second and tunnel_idle_seconds."""
        rex = yield start_rexec(self, limits={"tunnel_bytes_per_second": 123456, "tunnel_idle_seconds": 42})
        self.assertEqual((rex.proxy.upgrade_rate, rex.proxy.upgrade_idle), (123456, 42))
