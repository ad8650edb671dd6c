"""
Tenant isolation on real sockets: a forward never leads to one of the
daemon's own sockets (another user's ``local_port``, the API, the metrics
endpoint, itself), whether the socket existed when the forward was created
or appeared later; and a reload that takes a user's access away closes what
they had open.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from tests.functional import inprocess
from tests.functional.inprocess import TOKENS, Daemon, free_port
from tests.functional.peers import free_port_in

BOB = TOKENS["bob"]


@inlineCallbacks
def post(daemon: Daemon, cid: str, token: str, body: dict[str, Any]) -> Any:
    """:return: (status, JSON document) of a create."""
    response = yield inprocess._http.post(
        f"{daemon.base}/api/containers/{cid}/port-forwards",
        json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}"},
    )
    document = yield response.json()
    return response.code, document


class OwnSocketsAtCreateTests(TestCase):
    """Both containers at 127.0.0.1, as in the demo: alice's c1, bob's c2."""

    @inlineCallbacks
    def setUp(self) -> Any:
        self.metrics_port = free_port()
        self.daemon = Daemon(
            self.mktemp(),
            sections={"server": {"metrics_listen": f"tcp:{self.metrics_port}:interface=127.0.0.1"}},
            local_ports="31000-31999",
        )
        yield self.daemon.start()
        self.addCleanup(self.daemon.stop)
        self.echo = yield inprocess.echo_server()
        self.addCleanup(self.echo.stop)

    @inlineCallbacks
    def assertNotAllowed(self, body: dict[str, Any]) -> Any:
        code, document = yield post(self.daemon, "c2", BOB, body)
        self.assertEqual((code, document["error"]["message"]), (403, "Port not allowed"), document)
        self.assertEqual([f for f in self.daemon.forwards.forwards() if f.container_id == "c2"], [])

    @inlineCallbacks
    def test_another_users_local_port(self) -> Any:
        """Bob cannot forward to alice's local_port (he would read her app through his /p/)."""
        alices = yield self.daemon.create(self.echo.port)
        yield self.assertNotAllowed({"container_port": alices["local_port"]})

    @inlineCallbacks
    def test_the_daemons_endpoints(self) -> Any:
        """Nor to the API's port, nor to metrics_listen."""
        yield self.assertNotAllowed({"container_port": self.daemon.port})
        yield self.assertNotAllowed({"container_port": self.metrics_port})

    @inlineCallbacks
    def test_its_own_local_port(self) -> Any:
        """A forward to its own local_port would loop until no descriptor is left."""
        port = free_port_in(range(31000, 32000))
        yield self.assertNotAllowed({"container_port": port, "local_port": port})

    @inlineCallbacks
    def test_local_port_where_another_forward_leads(self) -> Any:
        """A local_port that another forward leads to (same address) would take its connections: 409."""
        target = free_port_in(range(31000, 32000))
        yield self.daemon.create(target, cid="c1")
        code, document = yield post(self.daemon, "c2", BOB, {"container_port": 9, "local_port": target})
        self.assertEqual((code, document["error"]["message"]), (409, "Local port unavailable"), document)


class OwnSocketsAtConnectTests(TestCase):
    """
    The daemon's sockets change after a forward is made: bob's forward leads
    to a port nothing listens on; after a restart the metrics endpoint
    listens there.  Every way in refuses it: the tunnel before the upgrade,
    the proxy with the same error, the local_port by closing.
    """

    @inlineCallbacks
    def setUp(self) -> Any:
        self.directory = self.mktemp()
        self.target = free_port()
        first = Daemon(self.directory)
        yield first.start()
        code, self.forward = yield post(first, "c2", BOB, {"container_port": self.target})
        self.assertEqual(code, 201, self.forward)
        yield first.stop()
        self.daemon = Daemon(
            self.directory, sections={"server": {"metrics_listen": f"tcp:{self.target}:interface=127.0.0.1"}}
        )
        yield self.daemon.start()
        self.addCleanup(self.daemon.stop)

    @inlineCallbacks
    def test_tunnel(self) -> Any:
        status, headers, body = yield inprocess.raw_handshake(
            self.daemon.port, f"/ws/port-forward/{self.forward['id']}", {"Authorization": f"Bearer {BOB}"}
        )
        self.assertEqual((status, json.loads(body)["error"]["message"]), (403, "Port not allowed"))

    @inlineCallbacks
    def test_proxy(self) -> Any:
        response = yield inprocess._http.get(
            f"{self.daemon.base}/p/{self.forward['id']}/metrics", headers={"Authorization": f"Bearer {BOB}"}
        )
        document = yield response.json()
        self.assertEqual((response.code, document["error"]["message"]), (403, "Port not allowed"))

    @inlineCallbacks
    def test_local_port(self) -> Any:
        yield inprocess.until(lambda: self.forward["id"] in self.daemon.components.local_listeners.ports)
        received = yield inprocess.connect_tcp_roundtrip(self.forward["local_port"], b"GET /metrics HTTP/1.0\r\n\r\n")
        self.assertEqual(received, b"")
