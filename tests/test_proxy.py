"""
Unit tests of :mod:`rexecpf.proxy`: in memory, on a clock.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import server
from twisted.web.resource import Resource

from rexecpf.api import PublicURLs
from rexecpf.auth import Authenticator
from rexecpf.model import Container, PortForward
from rexecpf.proxy import (
    ProxyResource,
    ProxyService,
    SessionCookies,
    _rewrite_location,
    _split_token,
    _without_session_cookie,
)
from rexecpf.web import RexecSite


class FakeForwards:
    """Just enough of ForwardService: one forward of alice's to 10.0.0.7:8080."""

    def __init__(self) -> None:
        self.forward = PortForward("pf_abc", "cont_a", 8080, 20000, None, 0, "alice")
        self.container = Container("cont_a", "alice", "10.0.0.7", True)
        self.live: set[Any] = set()

    def reach(self, principal: Any, forward_id: str) -> Any:
        return succeed((self.forward, self.container))

    def track(self, forward_id: str, connection: Any) -> Any:
        self.live.add(connection)
        return lambda: self.live.discard(connection)


def make_proxy(reactor: Any, timeout: float = 60.0) -> tuple[ProxyService, FakeForwards]:
    forwards = FakeForwards()
    service = ProxyService(
        reactor,
        Authenticator({"alice": "alice-token"}),
        forwards,  # type: ignore[arg-type]
        PublicURLs("http://127.0.0.1:8080"),
        session_key=lambda: succeed(b"k" * 32),
        response_timeout=timeout,
    )
    return service, forwards


def channel_for(site: server.Site) -> tuple[Any, StringTransport]:
    site.timeOut = None  # no idle timer on the global reactor
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport


class LimitedRequestTests(SynchronousTestCase):
    """Proxied request bodies over ``proxy_body_bytes`` are refused while they arrive."""

    def site(self, limit: int) -> server.Site:
        return RexecSite(Resource(), proxy_body_bytes=limit)

    def test_content_length_over_limit(self) -> None:
        """A Content-Length over the limit is answered 413 at once; nothing of the body is stored."""
        channel, transport = channel_for(self.site(1000))
        channel.dataReceived(
            b"POST /p/x/ HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5000\r\n\r\n"
        )
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 413 "))
        self.assertNotIn(b"100 Continue", transport.value())
        request = channel._channel.requests[-1]
        self.assertIsNone(request.content)
        channel.dataReceived(b"a" * 5000)  # read and dropped
        self.assertIsNone(request.content)

    def test_chunked_over_limit(self) -> None:
        """A chunked body is answered 413 as soon as it passes the limit; at most the limit was stored."""
        channel, transport = channel_for(self.site(1000))
        channel.dataReceived(b"POST /p/x/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        request = channel._channel.requests[-1]
        channel.dataReceived(b"258\r\n" + b"a" * 600 + b"\r\n")
        self.assertEqual(transport.value(), b"")
        self.assertEqual(request.content.tell(), 600)
        channel.dataReceived(b"258\r\n" + b"a" * 600 + b"\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 413 "))
        channel.dataReceived(b"258\r\n" + b"a" * 600 + b"\r\n0\r\n\r\n")
        self.assertIsNone(request.content)

    def test_under_limit(self) -> None:
        """A body within the limit is stored and the request processed."""
        channel, transport = channel_for(self.site(1000))
        channel.dataReceived(b"POST /nothing HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n0123456789")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 404 "))


class HelperTests(SynchronousTestCase):
    """Query, cookie and Location rules."""

    def test_split_token(self) -> None:
        """The token parameter is taken out; the rest of the query is kept byte for byte."""
        self.assertEqual(_split_token(b"a=1&token=t&b=%20"), ([b"t"], b"a=1&b=%20"))
        self.assertEqual(_split_token(b"a=1"), (None, b"a=1"))
        self.assertEqual(_split_token(b"to%6Ben=t"), ([b"t"], b""))

    def test_session_cookie_removed(self) -> None:
        """rexecpf's cookie is removed from Cookie headers, other cookies kept."""
        self.assertEqual(
            _without_session_cookie([b"a=1; rexecpf_session=x; b=2", b"rexecpf_session=y"]), [b"a=1; b=2"]
        )

    def test_rewrite_location(self) -> None:
        """Only path-absolute Locations are put under the prefix."""
        self.assertEqual(_rewrite_location(b"/login", b"/p/pf_a"), b"/p/pf_a/login")
        self.assertEqual(_rewrite_location(b"login", b"/p/pf_a"), b"login")
        self.assertEqual(_rewrite_location(b"//h/x", b"/p/pf_a"), b"//h/x")
        self.assertEqual(_rewrite_location(b"https://h/x", b"/p/pf_a"), b"https://h/x")


class SessionCookieTests(SynchronousTestCase):
    """Signed, expiring, per-forward session cookies."""

    def test_round_trip_and_expiry(self) -> None:
        """A cookie names its user for its forward until it expires."""
        clock = Clock()
        cookies = SessionCookies(lambda: succeed(b"k" * 32), clock, 100)
        self.successResultOf(cookies.ready())
        value = cookies.make("alice", "pf_a").encode()
        self.assertEqual(cookies.check(value, "pf_a"), "alice")
        self.assertIsNone(cookies.check(value, "pf_b"))
        self.assertIsNone(cookies.check(value[:-1] + b"x", "pf_a"))
        clock.advance(101)
        self.assertIsNone(cookies.check(value, "pf_a"))


class ProxyServiceTests(SynchronousTestCase):
    """The proxy against a memory reactor."""

    def request(self, reactor: Any, timeout: float = 60.0) -> tuple[StringTransport, FakeForwards]:
        service, forwards = make_proxy(reactor, timeout)
        root = Resource()
        root.putChild(b"p", ProxyResource(service))
        channel, transport = channel_for(server.Site(root))
        channel.dataReceived(
            b"GET /p/pf_abc/x?y=1 HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer alice-token\r\n\r\n"
        )
        return transport, forwards

    def test_connects_to_container(self) -> None:
        """The container's address and port are connected to (IPv4 endpoint)."""
        reactor = MemoryReactorClock()
        self.request(reactor)
        host, port = reactor.tcpClients[0][:2]
        self.assertEqual((host, port), ("10.0.0.7", 8080))

    def test_gateway_timeout(self) -> None:
        """No response headers within the timeout: 504, and the request is no longer tracked."""
        reactor = MemoryReactorClock()
        transport, forwards = self.request(reactor, timeout=5)
        self.assertEqual(len(forwards.live), 1)
        reactor.advance(4.9)
        self.assertEqual(transport.value(), b"")
        reactor.advance(0.2)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 504 "))
        self.assertEqual(forwards.live, set())

    def test_unauthenticated(self) -> None:
        """Without credentials: 401 with WWW-Authenticate, nothing connected."""
        reactor = MemoryReactorClock()
        service, _ = make_proxy(reactor)
        root = Resource()
        root.putChild(b"p", ProxyResource(service))
        channel, transport = channel_for(server.Site(root))
        channel.dataReceived(b"GET /p/pf_abc/ HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 401 "))
        self.assertIn(b"WWW-Authenticate: Bearer", transport.value())
        self.assertEqual(reactor.tcpClients, [])
