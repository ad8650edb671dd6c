"""
:mod:`rexecpf.endpoints`: which targets land on a listener of the daemon,
and a container name checked address by address.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import inlineCallbacks
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import TestCase

from rexecpf.endpoints import OwnSockets, container_endpoint, listener_reaches
from rexecpf.model import PORT_NOT_ALLOWED, APIError


def _local(address: str) -> bool:
    return address in ("127.0.0.1", "::1", "192.0.2.10")


class ListenerReachesTests(TestCase):
    def test_same_address(self) -> None:
        self.assertTrue(listener_reaches("127.0.0.1", "127.0.0.1", _local))
        self.assertTrue(listener_reaches("::1", "::1", _local))
        self.assertTrue(listener_reaches("127.0.0.1", "::ffff:127.0.0.1", _local))  # IPv4-mapped
        self.assertFalse(listener_reaches("127.0.0.1", "127.0.0.2", _local))

    def test_wildcard(self) -> None:
        """A wildcard listener takes loopback and this host's addresses, of either family."""
        for wildcard in ("0.0.0.0", "::"):
            for target in ("127.0.0.1", "::1", "192.0.2.10", "::ffff:192.0.2.10", "0.0.0.0"):
                self.assertTrue(listener_reaches(wildcard, target, _local), (wildcard, target))
            self.assertFalse(listener_reaches(wildcard, "198.51.100.7", _local))

    def test_unspecified_target(self) -> None:
        """Connecting to 0.0.0.0 reaches this host."""
        self.assertTrue(listener_reaches("127.0.0.1", "0.0.0.0", _local))
        self.assertFalse(listener_reaches("198.51.100.7", "0.0.0.0", _local))

    def test_names_are_not_matched(self) -> None:
        """A name is matched by its addresses, once resolved (container_endpoint)."""
        self.assertFalse(listener_reaches("127.0.0.1", "localhost", _local))


class _Port:
    def __init__(self, host: str, port: int) -> None:
        self._address = IPv4Address("TCP", host, port)

    def getHost(self) -> IPv4Address:
        return self._address


class OwnSocketsTests(TestCase):
    def test_registered_by_bound_port(self) -> None:
        own = OwnSockets(_local)
        port = _Port("0.0.0.0", 8080)
        own.add("api", port)  # type: ignore[arg-type]
        self.assertTrue(own.reaches("127.0.0.1", 8080))
        self.assertFalse(own.reaches("127.0.0.1", 8081))
        self.assertTrue(own.reaches("127.0.0.1", 8081, [("127.0.0.1", 8081)]))
        own.remove("api")
        self.assertFalse(own.reaches("127.0.0.1", 8080))


class _Resolver:
    def __init__(self, addresses: list[str]) -> None:
        self.addresses = addresses

    def resolveHostName(self, receiver: Any, name: str, portNumber: int = 0, **_: Any) -> None:
        receiver.resolutionBegan(None)
        for address in self.addresses:
            receiver.addressResolved(IPv4Address("TCP", address, portNumber))
        receiver.resolutionComplete()


class ContainerNameTests(TestCase):
    def refuse(self, address: str, port: int) -> None:
        if (address, port) == ("127.0.0.1", 8080):
            raise PORT_NOT_ALLOWED("ours")

    @inlineCallbacks
    def test_a_name_that_resolves_to_our_socket(self) -> Any:
        """Any of its addresses being ours refuses the connection, before any is made."""
        reactor = MemoryReactor()
        reactor.nameResolver = _Resolver(["192.0.2.1", "127.0.0.1"])  # type: ignore[attr-defined]
        endpoint = container_endpoint(reactor, "app.internal", 8080, self.refuse, 5)
        error = yield self.assertFailure(endpoint.connect(Factory.forProtocol(Protocol)), APIError)
        self.assertEqual(error.code, 403)
        self.assertEqual(reactor.tcpClients, [])

    def test_a_name_elsewhere(self) -> None:
        reactor = MemoryReactor()
        reactor.nameResolver = _Resolver(["192.0.2.1"])  # type: ignore[attr-defined]
        container_endpoint(reactor, "app.internal", 8080, self.refuse, 5).connect(Factory.forProtocol(Protocol))
        self.assertEqual([(host, port) for host, port, *_ in reactor.tcpClients], [("192.0.2.1", 8080)])
