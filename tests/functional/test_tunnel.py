"""
The WebSocket tunnel on real sockets: handshake, data, close codes.
"""

from __future__ import annotations

import json

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from tests.functional.inprocess import (
    TOKENS,
    Daemon,
    close_ws,
    connect_ws,
    echo_server,
    free_port,
    raw_handshake,
    sleep,
    source_server,
)

ALICE = TOKENS["alice"]


class TunnelTestsMixin:
    limits: dict = {}

    @inlineCallbacks
    def setUp(self):
        self.daemon = Daemon(self.mktemp(), **self.limits)
        yield self.daemon.start()
        self.addCleanup(self.daemon.stop)
        self.echo = yield echo_server()
        self.addCleanup(self.echo.stop)
        self.forward = yield self.daemon.create(self.echo.port)
        self.url = self.daemon.ws_url(self.forward["id"])

    @inlineCallbacks
    def open(self, protocols=None, headers=None, url=None):
        client, factory = yield connect_ws(url or self.url, protocols, headers, port=self.daemon.port)
        self.addCleanup(close_ws, client, factory)
        return client, factory


class HandshakeTests(TunnelTestsMixin, TestCase):
    @inlineCallbacks
    def test_bearer_subprotocols(self):
        """
        Subprotocols ``['Bearer', TOKEN]`` authenticate, and the server
        selects ``Bearer``.
        """
        client, _ = yield self.open(["Bearer", ALICE])
        self.assertEqual(client.websocket_protocol_in_use, "Bearer")
        client.sendClose()

    @inlineCallbacks
    def test_authorization_header(self):
        """
        The ``Authorization: Bearer`` header authenticates; no subprotocol is
        selected when none was offered.
        """
        client, _ = yield self.open(headers={"Authorization": f"Bearer {ALICE}"})
        self.assertIsNone(client.websocket_protocol_in_use)
        client.sendClose()

    @inlineCallbacks
    def test_hosted_subprotocol(self):
        """
        The subprotocol ``rexec.token.TOKEN`` authenticates, and ``rexec.v1``
        is selected when offered.
        """
        client, _ = yield self.open(["rexec.v1", f"rexec.token.{ALICE}"])
        self.assertEqual(client.websocket_protocol_in_use, "rexec.v1")
        client.sendClose()

    @inlineCallbacks
    def test_unauthorized(self):
        """
        A missing or unknown token is answered 401 with ``WWW-Authenticate:
        Bearer`` and a JSON error, before any upgrade.
        """
        path = f"/ws/port-forward/{self.forward['id']}"
        for headers in ({}, {"Sec-WebSocket-Protocol": "Bearer, wrong-token"}):
            status, head, body = yield raw_handshake(self.daemon.port, path, headers)
            self.assertEqual(status, 401)
            self.assertIn("Bearer", head["www-authenticate"])
            self.assertEqual(json.loads(body)["error"]["code"], 401)
            self.assertNotIn("sec-websocket-accept", head)

    @inlineCallbacks
    def test_not_found(self):
        """
        An unknown forward, or another user's, is 404 before any upgrade.
        """
        headers = {"Sec-WebSocket-Protocol": f"Bearer, {ALICE}"}
        status, _, body = yield raw_handshake(self.daemon.port, "/ws/port-forward/pf_nothing", headers)
        self.assertEqual((status, json.loads(body)["error"]["message"]), (404, "Port forward not found"))
        bob = {"Sec-WebSocket-Protocol": f"Bearer, {TOKENS['bob']}"}
        status, _, _ = yield raw_handshake(self.daemon.port, f"/ws/port-forward/{self.forward['id']}", bob)
        self.assertEqual(status, 404)

    @inlineCallbacks
    def test_refused(self):
        """
        A container port that refuses the connection makes the handshake
        fail with 502, before any upgrade.
        """
        forward = yield self.daemon.create(free_port())
        headers = {"Sec-WebSocket-Protocol": f"Bearer, {ALICE}"}
        status, head, body = yield raw_handshake(
            self.daemon.port, f"/ws/port-forward/{forward['id']}", headers
        )
        self.assertEqual(status, 502)
        self.assertEqual(json.loads(body)["error"]["message"], "Bad gateway")


class DataTests(TunnelTestsMixin, TestCase):
    @inlineCallbacks
    def test_binary_and_text(self):
        """
        Binary messages and text messages (their UTF-8 bytes) reach the
        container as they are, and its answers come back as binary messages.
        """
        client, _ = yield self.open(["Bearer", ALICE])
        client.sendMessage(b"\x00\x01binary\xff", isBinary=True)
        yield client.wait_for(9)
        client.sendMessage("text é".encode(), isBinary=False)
        echoed = yield client.wait_for(9 + len("text é".encode()))
        self.assertEqual(echoed, b"\x00\x01binary\xfftext \xc3\xa9")
        client.sendClose()

    @inlineCallbacks
    def test_container_closes(self):
        """
        When the container closes after sending, every byte is delivered and
        then the tunnel closes with 1000.
        """
        source = yield source_server(3 * 1024 * 1024 + 17)
        self.addCleanup(source.stop)
        forward = yield self.daemon.create(source.port)
        client, factory = yield self.open(["Bearer", ALICE], url=self.daemon.ws_url(forward["id"]))
        code, _ = yield factory.closed
        self.assertEqual(code, 1000)
        self.assertEqual(client.count, 3 * 1024 * 1024 + 17)
        self.assertEqual(client.digest.hexdigest(), source.factory.protocols[0].digest.hexdigest())

    @inlineCallbacks
    def test_deleted(self):
        """
        Deleting the forward through the API closes its tunnel with 1001.
        """
        client, factory = yield self.open(["Bearer", ALICE])
        code = yield self.daemon.delete(self.forward["id"])
        self.assertEqual(code, 204)
        code, reason = yield factory.closed
        self.assertEqual(code, 1001)
        self.assertIn("deleted", reason)

    @inlineCallbacks
    def test_container_stopped(self):
        """
        Marking the container stopped in the inventory file closes its
        tunnels with 1001 (the static backend polls every 0.5 s).
        """
        client, factory = yield self.open(["Bearer", ALICE])
        self.daemon.set_state("c1", "exited")
        code, reason = yield factory.closed.addTimeout(5, reactor)
        self.assertEqual(code, 1001)
        self.assertIn("stopped", reason)

    @inlineCallbacks
    def test_service_stops(self):
        """
        Stopping the service closes its tunnels with 1001 "going away".
        """
        client, factory = yield self.open(["Bearer", ALICE])
        yield self.daemon.forwards.stopService()
        code, reason = yield factory.closed
        self.assertEqual((code, reason), (1001, "going away"))


class IdleTests(TunnelTestsMixin, TestCase):
    """With a client that does not answer the server's pings (see tests/functional/test_server_pings.py)."""

    limits = {"tunnel_idle_seconds": 1.0}

    @inlineCallbacks
    def open(self, *args, **kwargs):
        client, factory = yield super().open(*args, **kwargs)
        client.onPing = lambda payload: None
        return client, factory

    @inlineCallbacks
    def test_idle_timeout(self):
        """
        No data, no ping and no pong for ``tunnel_idle_seconds``: close 1000
        "idle timeout".
        """
        client, factory = yield self.open(["Bearer", ALICE])
        code, reason = yield factory.closed
        self.assertEqual((code, reason), (1000, "idle timeout"))

    @inlineCallbacks
    def test_pings_keep_open(self):
        """
        Pings every 0.3 s keep a tunnel without data open past the idle
        timeout; once they stop, it closes.
        """
        client, factory = yield self.open(["Bearer", ALICE])
        for _ in range(8):
            client.sendPing()
            yield sleep(0.3)
        self.assertFalse(factory.closed.called)
        code, reason = yield factory.closed
        self.assertEqual((code, reason), (1000, "idle timeout"))
