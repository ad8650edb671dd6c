"""
Custom domains and stable names on a real rexecpf (in-process, real
sockets): the TXT proof asked of a real DNS server on loopback, requests
whose Host is the custom domain or the stable host reaching the container
at the root, and a stable host surviving a container restart.
"""

from __future__ import annotations

import json
import tempfile
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase
from twisted.web import server
from twisted.web.resource import Resource

from tests.functional import inprocess
from tests.functional.dnsserver import TXTZone, start_dns_server


class _Reflect(Resource):
    """The container's app: answers with the method, path and Host it was sent."""

    isLeaf = True

    def render(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(
            {"path": request.uri.decode(), "host": (request.getHeader(b"host") or b"").decode()}
        ).encode()


class _Collect(Protocol):
    def connectionMade(self) -> None:
        self.data = b""
        self.transport.write(self.factory.payload)

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any) -> None:
        self.factory.done.callback(self.data)


@inlineCallbacks
def get(port: int, host: str, path: str, token: str | None = None) -> Any:
    """:return: (status, body) of a GET to 127.0.0.1:port with this Host header."""
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    factory = Factory.forProtocol(_Collect)
    factory.payload = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\n\r\n".encode()
    factory.done = Deferred()
    yield TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
    raw = yield factory.done.addTimeout(15, reactor)
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


class DomainRoutingTests(TestCase):
    @inlineCallbacks
    def setUp(self) -> Any:
        self.zone = TXTZone()
        dns_port = start_dns_server(self.zone)
        self.addCleanup(dns_port.stopListening)
        app = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(server.Site(_Reflect()))
        self.addCleanup(app.stopListening)
        self.app_port = app.getHost().port
        self.daemon = inprocess.Daemon(
            tempfile.mkdtemp(prefix="rexecpf-domains-"),
            sections={
                "server": {"proxy_domain": "preview.test"},
                "auth": {"custom_domains": ["alice"]},
                "domains": {"resolver": f"127.0.0.1:{dns_port.getHost().port}"},
            },
        )
        yield self.daemon.start()
        self.addCleanup(self.daemon.stop)

    @inlineCallbacks
    def test_custom_domain_served_at_the_root_once_proven(self) -> Any:
        """
        A domain without its TXT record is not routed; once the record holds
        the token, PUT verifies it, and a request with that Host reaches the
        container at the root, Host kept; deleted, it is no longer routed.
        """
        token = inprocess.TOKENS["alice"]
        forward = yield self.daemon.create(self.app_port, domains=["app.example.com"])
        (domain,) = forward["domains"]
        self.assertFalse(domain["verified"])
        self.assertEqual(domain["verification"]["name"], "_rexecpf.app.example.com")
        status, _ = yield get(self.daemon.port, "app.example.com", "/hello?x=1", token)
        self.assertEqual(status, 404)  # not routed: the ordinary routes have no /hello
        self.zone.set_txt("_rexecpf.app.example.com", domain["verification"]["value"])
        path = f"/api/containers/c1/port-forwards/{forward['id']}/domains/app.example.com"
        response = yield inprocess._http.put(
            self.daemon.base + path, b"", headers={"Authorization": f"Bearer {token}"}
        )
        document = yield response.json()
        self.assertEqual((response.code, document["verified"]), (200, True))
        status, body = yield get(self.daemon.port, "app.example.com:443", "/hello?x=1", token)
        self.assertEqual(status, 200, body)
        self.assertEqual(json.loads(body), {"path": "/hello?x=1", "host": "app.example.com:443"})
        status, _ = yield get(self.daemon.port, "app.example.com", "/hello")
        self.assertEqual(status, 401)  # routed, and still authenticated
        self.assertTrue((yield self.daemon.forwards.domain_claimed("app.example.com")))
        response = yield inprocess._http.delete(self.daemon.base + path, headers={"Authorization": f"Bearer {token}"})
        yield response.content()
        self.assertEqual(response.code, 204)
        status, _ = yield get(self.daemon.port, "app.example.com", "/hello", token)
        self.assertEqual(status, 404)

    @inlineCallbacks
    def test_stable_hosts_not_told_without_credentials(self) -> Any:
        """
        Without credentials every stable host is 401, whether it names a
        forward or not (as ``pf-xxxx`` hosts are): whose slugs exist is not
        told to anyone; with another user's token, both are 404.
        """
        yield self.daemon.create(self.app_port, slug="web")
        for host in ("web--alice.preview.test", "nope--alice.preview.test", "web--carol.preview.test"):
            status, body = yield get(self.daemon.port, host, "/a")
            self.assertEqual(status, 401, (host, body))
            status, body = yield get(self.daemon.port, host, "/a", inprocess.TOKENS["bob"])
            self.assertEqual(status, 404, (host, body))

    @inlineCallbacks
    def test_stable_host_survives_a_container_restart(self) -> Any:
        """
        ``web--alice.preview.test`` reaches the forward named ``web``; the
        container stops (its forward goes) and starts again, a new forward
        named ``web`` is made, and the same host reaches it.
        """
        token = inprocess.TOKENS["alice"]
        first = yield self.daemon.create(self.app_port, slug="web")
        self.assertEqual(first["proxy_url"], f"http://web--alice.preview.test:{self.daemon.port}/")
        status, body = yield get(self.daemon.port, "web--alice.preview.test", "/a", token)
        self.assertEqual((status, json.loads(body)["path"]), (200, "/a"))
        self.daemon.set_state("c1", "exited")
        yield inprocess.until(lambda: self.daemon.forwards.cached(first["id"]) is None, what="the forward reaped")
        status, _ = yield get(self.daemon.port, "web--alice.preview.test", "/a", token)
        self.assertEqual(status, 404)
        self.daemon.set_state("c1", "running")
        yield self._running("c1")
        second = yield self.daemon.create(self.app_port, slug="web")
        self.assertNotEqual(second["id"], first["id"])
        self.assertEqual(second["proxy_url"], first["proxy_url"])
        status, body = yield get(self.daemon.port, "web--alice.preview.test", "/b", token)
        self.assertEqual((status, json.loads(body)["path"]), (200, "/b"))

    @inlineCallbacks
    def _running(self, container_id: str) -> Any:
        """Fires once the backend has re-read the inventory and says the container runs."""
        for _ in range(200):
            container = yield self.daemon.components.backend.inspect(container_id)
            if container is not None and container.running:
                return
            yield inprocess.sleep(0.05)
        raise AssertionError(f"{container_id} not running within 10 s")
