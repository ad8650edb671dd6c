"""
Unit tests of :mod:`rexecpf.proxy`: in memory, on a clock.
"""

from __future__ import annotations

import base64
import json
from io import BytesIO
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import server
from twisted.web.iweb import UNKNOWN_LENGTH
from twisted.web.resource import Resource

from rexecpf.api import PublicURLs
from rexecpf.auth import Authenticator
from rexecpf.config import LimitsConfig
from rexecpf.forwards import ForwardService
from rexecpf.metrics import Metrics
from rexecpf.model import CloseReason, PortForward, Principal
from rexecpf.proxy import HostRouter, ProxyResource, ProxyService, SessionCookies
from rexecpf.proxy.exchange import Exchange
from rexecpf.proxy.headers import rewrite_location
from rexecpf.proxy.pool import POOLED_IDLE_SECONDS
from rexecpf.proxy.sessions import carries_token, origin, split_token, without_session_cookie
from rexecpf.relay import CONNECT_TIMEOUT
from rexecpf.testing import FakeBackend, MemoryForwardStore
from rexecpf.web import STREAM_HIGH_WATER, NotFoundResource, RexecSite, Root


def make_proxy(
    reactor: Any,
    timeout: float = 60.0,
    metrics: Metrics | None = None,
    proxy_domain: str = "",
    create: bytes = b'{"container_port": 8080}',
) -> tuple[ProxyService, ForwardService, PortForward]:
    """
    :param create: the create request of the forward.
    :return: a proxy on the real :class:`ForwardService` (in memory: a fake
        backend with alice's ``cont_a`` at 10.0.0.7) and alice's forward to
        its port 8080.
    """
    backend = FakeBackend()
    backend.add("cont_a", "alice", "10.0.0.7")
    forwards = ForwardService(
        reactor, MemoryForwardStore(), backend, LimitsConfig(), port_probe=lambda interface, port: True
    )
    forwards.startService()
    forward = _result(forwards.create(Principal("alice"), "cont_a", create))
    service = ProxyService(
        reactor,
        Authenticator({"alice": "alice-token", "bob": "bob-token"}),
        forwards,
        PublicURLs("http://127.0.0.1:8080", proxy_domain),
        session_key=lambda: succeed(b"k" * 32),
        response_timeout=timeout,
        metrics=metrics,
    )
    return service, forwards, forward


def _result(deferred: Deferred[Any]) -> Any:
    results: list[Any] = []
    deferred.addBoth(results.append)
    assert results and not isinstance(results[0], Failure), results
    return results[0]


def connect_container(reactor: MemoryReactorClock) -> tuple[Any, StringTransport]:
    """Complete the proxy's newest connection to the container: :return: its protocol and transport."""
    factory = reactor.tcpClients[-1][2]
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


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
        request = channel.requests[-1]
        self.assertIsNone(request.content)
        channel.dataReceived(b"a" * 5000)  # read and dropped
        self.assertIsNone(request.content)

    def test_chunked_over_limit(self) -> None:
        """
        A chunked body is answered 413 as soon as it passes the limit; what
        consumed it sees it fail, the resource sees the request gone, and
        nothing of it is stored.
        """
        resource = Holding()
        channel, transport = channel_for(RexecSite(resource, proxy_body_bytes=1000))
        channel.dataReceived(b"POST /p/x/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        (request,) = resource.requests
        consumer = ListConsumer()
        sent = request.body_stream.startProducing(consumer)
        gone = request.notifyFinish()
        channel.dataReceived(b"258\r\n" + b"a" * 600 + b"\r\n")
        self.assertEqual(transport.value(), b"")
        self.assertEqual(b"".join(consumer.data), b"a" * 600)
        channel.dataReceived(b"258\r\n" + b"a" * 600 + b"\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 413 "))
        self.failureResultOf(sent)
        self.failureResultOf(gone)
        self.assertEqual(b"".join(consumer.data), b"a" * 600)
        channel.dataReceived(b"258\r\n" + b"a" * 600 + b"\r\n0\r\n\r\n")
        self.assertIsNone(request.content)
        self.assertTrue(transport.disconnecting)

    def test_under_limit(self) -> None:
        """A body within the limit is stored and the request processed."""
        channel, transport = channel_for(self.site(1000))
        channel.dataReceived(b"POST /nothing HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n0123456789")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 404 "))


class Holding(Resource):
    """Keeps every request it renders, unanswered."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Any] = []

    def render(self, request: Any) -> Any:
        self.requests.append(request)
        return server.NOT_DONE_YET


class ListConsumer:
    """An IConsumer keeping what is written."""

    def __init__(self) -> None:
        self.data: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.data.append(data)


class StreamedBodyTests(SynchronousTestCase):
    """Proxied request bodies stream: the request is processed at its head, the body flows as it arrives."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.resource = Holding()
        site = RexecSite(self.resource, proxy_body_bytes=10_000_000, reactor=self.clock)
        self.channel, self.transport = channel_for(site)
        site.timeOut = 60
        self.channel.setTimeout(60)

    def head(self, framing: bytes = b"Content-Length: 300000", path: bytes = b"/p/x/") -> Any:
        self.channel.dataReceived(b"POST " + path + b" HTTP/1.1\r\nHost: x\r\n" + framing + b"\r\n\r\n")
        return self.resource.requests[-1] if self.resource.requests else None

    def test_processed_at_head(self) -> None:
        """
        The resource gets the request once its head is complete, with an
        empty in-memory ``content`` (no temporary file, whatever the length);
        the body goes to the consumer as it arrives, and its Deferred fires
        at the end.
        """
        request = self.head()
        self.assertIsInstance(request.content, BytesIO)
        self.assertEqual(request.content.read(), b"")
        self.assertEqual(request.body_stream.length, 300000)
        consumer = ListConsumer()
        sent = request.body_stream.startProducing(consumer)
        self.channel.dataReceived(b"a" * 1000)
        self.assertEqual(consumer.data, [b"a" * 1000])
        self.assertNoResult(sent)
        self.channel.dataReceived(b"b" * 299000)
        self.assertEqual(len(b"".join(consumer.data)), 300000)
        self.assertIsNone(self.successResultOf(sent))
        self.assertIsInstance(request.content, BytesIO)

    def test_chunked_length_unknown(self) -> None:
        """A chunked body streams with an unknown length; chunk framing is decoded."""
        request = self.head(b"Transfer-Encoding: chunked")
        self.assertIs(request.body_stream.length, UNKNOWN_LENGTH)
        consumer = ListConsumer()
        sent = request.body_stream.startProducing(consumer)
        self.channel.dataReceived(b"3\r\nabc\r\n")
        self.assertEqual(consumer.data, [b"abc"])
        self.channel.dataReceived(b"0\r\n\r\n")
        self.successResultOf(sent)

    def test_kept_until_consumed(self) -> None:
        """
        Before a consumer starts, the body is kept, and the client is paused
        once STREAM_HIGH_WATER bytes wait; the consumer then gets them all.
        """
        request = self.head()
        self.channel.dataReceived(b"a" * 1000)
        self.assertEqual(self.transport.producerState, "producing")
        self.channel.dataReceived(b"b" * STREAM_HIGH_WATER)
        self.assertEqual(self.transport.producerState, "paused")
        consumer = ListConsumer()
        request.body_stream.startProducing(consumer)
        self.assertEqual(b"".join(consumer.data), b"a" * 1000 + b"b" * STREAM_HIGH_WATER)
        self.assertEqual(self.transport.producerState, "producing")

    def test_consumer_pauses_client(self) -> None:
        """
        A consumer that pauses the body pauses the client's socket, and its
        idle timeout; resumed, both run again.
        """
        request = self.head()
        stream = request.body_stream
        stream.startProducing(ListConsumer())
        stream.pauseProducing()
        self.assertEqual(self.transport.producerState, "paused")
        self.clock.advance(120)
        self.assertFalse(self.transport.disconnecting)
        stream.resumeProducing()
        self.assertEqual(self.transport.producerState, "producing")
        self.clock.advance(61)
        self.assertTrue(self.transport.disconnecting)

    def test_paused_again(self) -> None:
        """
        A client the channel resumed (its own flow control) while the
        consumer is paused is paused again at the next chunk.
        """
        request = self.head()
        request.body_stream.startProducing(ListConsumer())
        request.body_stream.pauseProducing()
        self.transport.resumeProducing()
        self.channel.dataReceived(b"a" * 10)
        self.assertEqual(self.transport.producerState, "paused")

    def test_not_resumed_when_writes_drain(self) -> None:
        """
        A client paused for a consumer that does not read stays paused when
        its connection's writes drain (as while an answer streams to it):
        else each drain would let one more read of the body in.
        """
        request = self.head()
        request.body_stream.startProducing(ListConsumer())
        request.body_stream.pauseProducing()
        request.write(b"an answer before the whole body")
        self.transport.producer.resumeProducing()  # what the transport does once its writes drain
        self.assertEqual(self.transport.producerState, "paused")
        request.body_stream.resumeProducing()
        self.assertEqual(self.transport.producerState, "producing")

    def test_idle_timeout_back_after_paused_end(self) -> None:
        """
        A body that ends while its consumer is paused leaves no idle timer
        during the response, and the idle timeout back once it is done.
        """
        request = self.head(b"Content-Length: 10")
        stream = request.body_stream
        stream.startProducing(ListConsumer())
        stream.pauseProducing()
        self.channel.dataReceived(b"0123456789")
        self.assertEqual(self.transport.producerState, "producing")
        self.clock.advance(120)
        self.assertFalse(self.transport.disconnecting)
        request.finish()
        self.clock.advance(61)
        self.assertTrue(self.transport.disconnecting)

    def test_client_gone(self) -> None:
        """A client that goes away mid-body fails the body's Deferred."""
        request = self.head()
        sent = request.body_stream.startProducing(ListConsumer())
        self.channel.dataReceived(b"a" * 10)
        self.channel.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(sent, ConnectionDone)

    def test_stopped_consumer(self) -> None:
        """A consumer that stops gets nothing more; the client is not left paused."""
        request = self.head()
        consumer = ListConsumer()
        sent = request.body_stream.startProducing(consumer)
        request.body_stream.pauseProducing()
        request.body_stream.stopProducing()
        self.assertEqual(self.transport.producerState, "producing")
        self.channel.dataReceived(b"a" * 10)
        self.assertEqual(consumer.data, [])
        self.assertNoResult(sent)

    def test_answered_early_then_pipelined(self) -> None:
        """
        A response finished before the body has arrived: the rest of the
        body is read and dropped, then the next request on the connection is
        served.
        """
        request = self.head(b"Content-Length: 20")
        request.write(b"early")
        request.finish()
        self.assertIn(b"early", self.transport.value())
        self.channel.dataReceived(b"a" * 10)
        self.assertEqual(len(self.resource.requests), 1)
        self.channel.dataReceived(b"b" * 10 + b"GET /p/x/next HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(len(self.resource.requests), 2)
        self.assertEqual(self.resource.requests[1].uri, b"/p/x/next")
        self.assertFalse(self.transport.disconnecting)

    def test_pipelined_after_streamed(self) -> None:
        """A request pipelined behind a streamed one waits for its answer, then is served."""
        request = self.head(b"Content-Length: 3")
        request.body_stream.startProducing(ListConsumer())
        self.channel.dataReceived(b"abcGET /p/x/next HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(len(self.resource.requests), 1)
        request.finish()
        self.assertEqual([r.uri for r in self.resource.requests], [b"/p/x/", b"/p/x/next"])

    def test_api_not_streamed(self) -> None:
        """/api bodies are still read whole before the resource sees them."""
        self.head(b"Content-Length: 3", path=b"/api/x")
        self.assertEqual(self.resource.requests, [])
        self.channel.dataReceived(b"abc")
        (request,) = self.resource.requests
        self.assertIsNone(request.body_stream)
        self.assertEqual(request.content.read(), b"abc")

    def test_expect_continue_before_answer(self) -> None:
        """``Expect: 100-continue`` is answered before anything the resource answers at the head."""
        site = RexecSite(NotFoundResource(), proxy_body_bytes=1000)
        channel, transport = channel_for(site)
        channel.dataReceived(
            b"POST /p/x/ HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
        )
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 404 "))
        self.assertEqual(transport.value().count(b"100 Continue"), 1)


class HelperTests(SynchronousTestCase):
    """Query, cookie and Location rules."""

    def test_split_token(self) -> None:
        """
        A token parameter holding a rexecpf token is taken out; the rest of
        the query, the app's own token parameters included, is kept byte for byte.
        """
        is_token = Authenticator({"alice": "t", "bob": "b-t"}).is_token
        self.assertEqual(split_token(b"a=1&token=t&b=%20", is_token), (["t"], b"a=1&b=%20"))
        self.assertEqual(split_token(b"a=1", is_token), (None, b"a=1"))
        self.assertEqual(split_token(b"to%6Ben=t", is_token), (["t"], b""))
        self.assertEqual(split_token(b"token=b%2Dt&token=x", is_token), (["b-t"], b"token=x"))
        self.assertEqual(split_token(b"token=x&a=%ff", is_token), ([], b"token=x&a=%ff"))

    def test_carries_token(self) -> None:
        """An Authorization value holds a rexecpf token whatever its scheme, case or spacing, Basic included."""
        is_token = Authenticator({"alice": "alice-token"}).is_token
        basic = base64.b64encode(b"me:alice-token")
        for value in (
            b"Bearer alice-token",
            b"bEaReR    alice-token  ",
            b"Bearer\talice-token",
            b"Token token=alice-token",
            b"Bearer app, Bearer alice-token",
            b'Bearer "alice-token"',
            b"Basic " + basic,
            b"basic   " + basic + b" ",
        ):
            with self.subTest(value=value):
                self.assertTrue(carries_token(value, is_token))
        for value in (b"Bearer app-own", b"Basic " + base64.b64encode(b"me:secret"), b"Bearer alice-token2", b"\xff"):
            with self.subTest(value=value):
                self.assertFalse(carries_token(value, is_token))

    def test_origin(self) -> None:
        """Origins compare by scheme, host and port, the default port filled in; anything else is no origin."""
        self.assertEqual(origin("https://Rexec.Example"), ("https", "rexec.example", 443))
        self.assertEqual(origin("http://h:80/path/"), ("http", "h", 80))
        self.assertEqual(origin("http://[::1]:8080"), ("http", "::1", 8080))
        for value in ("null", "", "file://x", "http://", "http://h:99999", "ws://h"):
            with self.subTest(value=value):
                self.assertIsNone(origin(value))

    def test_session_cookie_removed(self) -> None:
        """rexecpf's cookie is removed from Cookie headers, other cookies kept."""
        self.assertEqual(
            without_session_cookie([b"a=1; rexecpf_session=x; b=2", b"rexecpf_session=y"]), [b"a=1; b=2"]
        )

    def test_rewrite_location(self) -> None:
        """Only path-absolute Locations are put under the prefix."""
        self.assertEqual(rewrite_location(b"/login", b"/p/pf_a"), b"/p/pf_a/login")
        self.assertEqual(rewrite_location(b"login", b"/p/pf_a"), b"login")
        self.assertEqual(rewrite_location(b"//h/x", b"/p/pf_a"), b"//h/x")
        self.assertEqual(rewrite_location(b"https://h/x", b"/p/pf_a"), b"https://h/x")


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
    """The proxy against a memory reactor and the real ForwardService."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.metrics = Metrics()

    def request(
        self, timeout: float = 60.0, path: bytes = b"/x?y=1", token: bytes = b"alice-token"
    ) -> tuple[StringTransport, ForwardService]:
        """Send one proxied GET; :return: the client's transport and the forwards."""
        service, forwards, forward = make_proxy(self.reactor, timeout, self.metrics)
        root = Resource()
        root.putChild(b"p", ProxyResource(service))
        channel, transport = channel_for(server.Site(root))
        channel.dataReceived(
            b"GET /p/" + forward.id.encode() + path + b" HTTP/1.1\r\nHost: h\r\n"
            b"Authorization: Bearer " + token + b"\r\n\r\n"
        )
        self.channel = channel
        return transport, forwards

    def container(self) -> tuple[Any, StringTransport]:
        return connect_container(self.reactor)

    def counted(self) -> dict[str, float]:
        """:return: status code -> proxied requests counted."""
        text = self.metrics.render().decode()
        return {
            sample.labels["code"]: sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "rexecpf_proxy_requests_total"
        }

    def test_connects_to_container(self) -> None:
        """
        The container's address and port are connected to (IPv4 endpoint),
        given CONNECT_TIMEOUT like a tunnel's, not the 60 s for a response.
        """
        self.request()
        host, port, _factory, timeout, _bind = self.reactor.tcpClients[0]
        self.assertEqual((host, port, timeout), ("10.0.0.7", 8080, CONNECT_TIMEOUT))

    def test_gateway_timeout(self) -> None:
        """No response headers within the timeout: 504, and the request is no longer tracked."""
        transport, forwards = self.request(timeout=5)
        self.assertEqual(forwards.live_count(), 1)
        self.reactor.advance(4.9)
        self.assertEqual(transport.value(), b"")
        self.reactor.advance(0.2)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 504 "))
        self.assertEqual(forwards.live_count(), 0)
        self.assertEqual(self.counted(), {"504": 1})

    def test_unauthenticated(self) -> None:
        """Without credentials: 401 with WWW-Authenticate, nothing connected, the 401 counted."""
        service, _, forward = make_proxy(self.reactor, metrics=self.metrics)
        root = Resource()
        root.putChild(b"p", ProxyResource(service))
        channel, transport = channel_for(server.Site(root))
        channel.dataReceived(b"GET /p/" + forward.id.encode() + b"/ HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 401 "))
        self.assertIn(b"WWW-Authenticate: Bearer", transport.value())
        self.assertEqual(self.reactor.tcpClients, [])
        self.assertEqual(self.counted(), {"401": 1})

    def test_tracked_as_proxy_of_its_user(self) -> None:
        """A proxied request is tracked under its forward, as kind "proxy", for the user it serves."""
        _, forwards = self.request()
        self.assertEqual(forwards.live_counts(), {"proxy": 1})
        self.assertEqual(forwards.shutdown_user("bob", CloseReason.TOKEN_REVOKED), 0)
        self.assertEqual(forwards.shutdown_user("alice", CloseReason.TOKEN_REVOKED), 1)

    def test_connections_per_user(self) -> None:
        """
        Over ``connections_per_user`` (here 1: a request in flight): 429
        Limit exceeded with a JSON error, nothing connected; once the first
        is answered there is room again.
        """
        service, forwards, forward = make_proxy(self.reactor, metrics=self.metrics)
        forwards.limits = LimitsConfig(connections_per_user=1)
        root = Resource()
        root.putChild(b"p", ProxyResource(service))
        site = server.Site(root)

        def get() -> StringTransport:
            channel, transport = channel_for(site)
            channel.dataReceived(b"GET /p/" + forward.id.encode() + b"/ HTTP/1.1\r\nHost: h\r\n"
                                 b"Authorization: Bearer alice-token\r\n\r\n")
            return transport

        get()
        second = get()
        head, _, body = second.value().partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 429 Too Many Requests\r\n"), head)
        self.assertIn(b'"detail": "a user may have at most 1 open connections (limits.connections_per_user)"', body)
        self.assertEqual(len(self.reactor.tcpClients), 1)
        protocol, _ = self.container()
        protocol.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertEqual(forwards.live_count(), 0)
        get()
        self.assertEqual(forwards.live_count(), 1)
        self.assertEqual(self.counted(), {"204": 1, "429": 1})

    def test_revoked_while_waiting(self) -> None:
        """Revoking the user's token while the container has not answered: 401, the container connection closed."""
        transport, forwards = self.request()
        _, container = self.container()
        forwards.shutdown_user("alice", CloseReason.TOKEN_REVOKED)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 401 "))
        self.assertIn(b"revoked", transport.value())
        self.assertTrue(container.disconnecting)
        self.assertEqual(forwards.live_count(), 0)
        self.assertEqual(self.counted(), {"401": 1})

    def test_revoked_mid_body(self) -> None:
        """
        Revoking the user's token mid-body aborts the client connection (the
        response cannot look complete) and stops the container's response.
        """
        transport, forwards = self.request()
        protocol, container = self.container()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"a" * 100)
        self.assertIn(b"Content-Length: 1000", transport.value())
        forwards.shutdown_user("alice", CloseReason.TOKEN_REVOKED)
        self.assertTrue(transport.disconnected)  # aborted, not closed after a complete response
        self.assertTrue(container.disconnected)  # the container connection aborted too
        self.assertEqual(forwards.live_count(), 0)
        self.channel.connectionLost(Failure(ConnectionAborted()))  # what the abort leads to
        self.assertEqual(self.counted(), {"200": 1})

    def test_response_counted(self) -> None:
        """A container's answer is counted once, with its status, when it is done; so is a refused connection (502)."""
        transport, forwards = self.request()
        protocol, _ = self.container()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "))
        self.assertTrue(transport.value().endswith(b"\r\n\r\nhi"))
        self.assertEqual(self.counted(), {"200": 1})
        refused, _ = self.request()
        self.reactor.tcpClients[-1][2].clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        self.assertTrue(refused.value().startswith(b"HTTP/1.1 502 "))
        self.assertEqual(self.counted(), {"200": 1, "502": 1})

    def test_drain_lets_the_response_finish(self) -> None:
        """
        On a graceful stop a request in flight is waited for; it finishes
        whole, then its connection closes instead of waiting for another request.
        """
        transport, forwards = self.request()
        protocol, _ = self.container()
        drained = forwards.drain(30)
        self.assertNoResult(drained)
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
        self.successResultOf(drained)
        self.assertIn(b"Connection: close", transport.value())
        self.assertTrue(transport.value().endswith(b"hi"))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(forwards.live_count(), 0)

    def test_drain_grace_period_ends(self) -> None:
        """A request whose container has not answered when the grace period ends gets a 503."""
        transport, forwards = self.request()
        self.container()
        drained = forwards.drain(30)
        self.reactor.advance(29)
        self.assertNoResult(drained)
        self.reactor.advance(1)
        self.successResultOf(drained)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 503 "))
        self.assertEqual(forwards.live_count(), 0)

    def test_delete_closes(self) -> None:
        """Deleting the forward answers a waiting request 404 and stops tracking it."""
        transport, forwards = self.request()
        forward = forwards.forwards()[0]
        self.successResultOf(forwards.delete(Principal("alice"), "cont_a", forward.id))
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 404 "))
        self.assertEqual(forwards.live_count(), 0)


class ContainerClientTests(SynchronousTestCase):
    """The proxy's own HTTP/1.1 client: framing, interim answers, the keep-alive pool, retries."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.service, self.forwards, self.forward = make_proxy(self.reactor)
        self.root = Resource()
        self.root.putChild(b"p", ProxyResource(self.service))

    def send(
        self, head: bytes = b"GET /x HTTP/1.1\r\nHost: h\r\n", body: bytes = b"", streams: bool = True
    ) -> StringTransport:
        """
        Send one request (``head`` without its final empty line) through the
        site rexecpf serves, which streams request bodies (``streams=False``:
        a plain Site, which stores them first); :return: the client's
        transport (its channel is ``self.channel``).
        """
        method, _, rest = head.partition(b" /")
        site = RexecSite(self.root, proxy_body_bytes=1_000_000) if streams else server.Site(self.root)
        channel, transport = channel_for(site)
        self.channel = channel
        channel.dataReceived(
            method + b" /p/" + self.forward.id.encode() + b"/" + rest.rstrip(b"\r\n")
            + b"\r\nAuthorization: Bearer alice-token\r\n\r\n" + body
        )
        return transport

    def container(self) -> tuple[Any, StringTransport]:
        return connect_container(self.reactor)

    def test_kept_alive_and_reused(self) -> None:
        """A response read whole leaves its connection for the next request; one idle too long is not used."""
        client = self.send()
        protocol, container = self.container()
        self.assertTrue(container.value().startswith(b"GET /x HTTP/1.1\r\n"))
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
        self.assertTrue(client.value().endswith(b"hi"))
        self.assertEqual(self.service.pool.idle_count(), 1)
        container.clear()
        client = self.send(b"GET /y HTTP/1.1\r\nHost: h\r\n")
        self.assertEqual(len(self.reactor.tcpClients), 1)  # no new connection
        self.assertTrue(container.value().startswith(b"GET /y HTTP/1.1\r\n"))
        protocol.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertTrue(client.value().startswith(b"HTTP/1.1 204 "))
        self.reactor.advance(POOLED_IDLE_SECONDS + 1)
        self.send()
        self.assertEqual(len(self.reactor.tcpClients), 2)
        self.assertTrue(container.disconnecting)

    def test_not_kept(self) -> None:
        """A response with Connection: close, or whose body ends with the connection, leaves it closed."""
        self.send()
        protocol, container = self.container()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nhi")
        self.assertTrue(container.disconnecting)
        self.send()
        protocol, container = self.container()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\n\r\nuntil close")
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.service.pool.idle_count(), 0)

    def test_stale_connection_retried_for_get(self) -> None:
        """A kept-alive connection found closed before any answer: a GET goes again on a new connection."""
        self.send()
        protocol, _ = self.container()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        client = self.send()
        protocol.connectionLost(Failure(ConnectionDone()))  # the server had closed it
        self.assertEqual(len(self.reactor.tcpClients), 2)
        retried, container = self.container()
        self.assertTrue(container.value().startswith(b"GET /x HTTP/1.1\r\n"))
        retried.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertTrue(client.value().startswith(b"HTTP/1.1 200 "))

    def test_stale_connection_not_retried_for_post(self) -> None:
        """A POST is never sent twice: a kept-alive connection closed before any answer is a 502."""
        self.send()
        protocol, _ = self.container()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        client = self.send(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n", b"hi")
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.assertTrue(client.value().startswith(b"HTTP/1.1 502 "))

    def test_interim_answer_skipped(self) -> None:
        """A 100 Continue from the container is not passed on; the final answer is."""
        client = self.send()
        protocol, _ = self.container()
        protocol.dataReceived(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
        self.assertTrue(client.value().startswith(b"HTTP/1.1 201 "))
        self.assertNotIn(b"100 Continue", client.value())

    def test_conflicting_content_lengths(self) -> None:
        """Two different Content-Lengths: the framing is unknowable, 502."""
        client = self.send()
        protocol, container = self.container()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nhi")
        self.assertTrue(client.value().startswith(b"HTTP/1.1 502 "))
        self.assertTrue(container.disconnecting)

    def test_unasked_switch(self) -> None:
        """A 101 to a request that asked for no upgrade is a 502."""
        client = self.send()
        protocol, _ = self.container()
        protocol.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n")
        self.assertTrue(client.value().startswith(b"HTTP/1.1 502 "))

    def test_host_filled_in(self) -> None:
        """An HTTP/1.0 request without Host reaches the container with the container's authority as Host."""
        self.send(b"GET /x HTTP/1.0\r\n")
        _, container = self.container()
        self.assertIn(b"\r\nhost: 10.0.0.7:8080\r\n", container.value().lower())

    def test_upload_paced_by_container(self) -> None:
        """
        The request body goes to the container as it arrives, as the
        container connection's producer: a container that does not read
        pauses the client's socket, until it reads again.
        """
        client = self.send(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n", b"hello")
        _, container = self.container()
        self.assertTrue(container.value().endswith(b"\r\nContent-Length: 10\r\n\r\nhello"))
        container.producer.pauseProducing()
        self.assertEqual(client.producerState, "paused")
        container.producer.resumeProducing()
        self.assertEqual(client.producerState, "producing")
        self.channel.dataReceived(b"world")
        self.assertTrue(container.value().endswith(b"\r\n\r\nhelloworld"))
        self.assertIsNone(container.producer)

    def test_chunked_upload_stays_chunked(self) -> None:
        """A chunked request body goes to the container chunked, piece by piece as it arrives."""
        self.send(b"POST /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n", b"5\r\nhello\r\n")
        _, container = self.container()
        head, _, body = container.value().partition(b"\r\n\r\n")
        self.assertEqual(head.lower().count(b"\r\ntransfer-encoding: chunked"), 1)
        self.assertNotIn(b"content-length", head.lower())
        self.assertEqual(body, b"5\r\nhello\r\n")
        self.channel.dataReceived(b"3\r\nabc\r\n0\r\n\r\n")
        self.assertEqual(container.value().partition(b"\r\n\r\n")[2], b"5\r\nhello\r\n3\r\nabc\r\n0\r\n\r\n")
        self.assertIsNone(container.producer)

    def test_answered_before_body_read(self) -> None:
        """
        A container that answers before it has the whole body: the answer
        reaches the client at once; the container connection is aborted
        (the request was not sent whole, and what waits to be written to it
        may never be read); the rest of the body is read and dropped, and
        the client's next request is served.
        """
        client = self.send(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n", b"hello")
        protocol, container = self.container()
        protocol.dataReceived(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 4\r\n\r\nno")
        self.assertTrue(client.value().startswith(b"HTTP/1.1 413 "))
        self.assertTrue(client.value().endswith(b"\r\n\r\nno"))
        protocol.dataReceived(b"pe")
        self.assertTrue(client.value().endswith(b"\r\n\r\nnope"))
        self.assertTrue(container.disconnected)
        self.assertIsNone(container.producer)  # the rest of the body does not hold the connection open
        self.assertEqual(self.service.pool.idle_count(), 0)
        self.channel.dataReceived(
            b"world" + b"GET /p/" + self.forward.id.encode() + b"/next HTTP/1.1\r\nHost: h\r\n"
            b"Authorization: Bearer alice-token\r\n\r\n"
        )
        self.assertNotIn(b"world", container.value())
        _, second = self.container()
        self.assertTrue(second.value().startswith(b"GET /next HTTP/1.1\r\n"))

    def test_streamed_body_not_retried(self) -> None:
        """
        A kept-alive connection found closed before any answer: a PUT whose
        body streamed is not sent again (what went of it is gone), 502.
        """
        self.send()
        protocol, _ = self.container()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        client = self.send(b"PUT /x HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n", b"hi")
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.assertTrue(client.value().startswith(b"HTTP/1.1 502 "))

    def test_stored_body(self) -> None:
        """
        A body the site stored first (a target it does not stream) is sent
        with its length, Content-Length though it came chunked, and sent
        again when a kept-alive connection turns out closed.
        """
        self.send(streams=False)
        protocol, _ = self.container()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        client = self.send(
            b"PUT /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n", b"2\r\nhi\r\n0\r\n\r\n", streams=False
        )
        protocol.connectionLost(Failure(ConnectionDone()))
        retried, container = self.container()
        self.assertTrue(container.value().endswith(b"\r\nContent-Length: 2\r\n\r\nhi"))
        self.assertNotIn(b"transfer-encoding", container.value().lower())
        retried.dataReceived(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
        self.assertTrue(client.value().startswith(b"HTTP/1.1 201 "))

    def test_no_timeout_while_body_flows(self) -> None:
        """
        No 504 while the body flows, however long the upload takes; the
        response timer runs while the container does not read it, and once
        the body is sent.
        """
        client = self.send(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n", b"hello")
        _, container = self.container()
        self.reactor.advance(100)
        self.assertEqual(client.value(), b"")
        container.producer.pauseProducing()
        self.reactor.advance(59)
        self.assertEqual(client.value(), b"")
        container.producer.resumeProducing()
        self.reactor.advance(100)
        self.assertEqual(client.value(), b"")
        self.channel.dataReceived(b"world")
        self.reactor.advance(59)
        self.assertEqual(client.value(), b"")
        self.reactor.advance(1)
        self.assertTrue(client.value().startswith(b"HTTP/1.1 504 "))

    def test_timeout_while_container_does_not_read(self) -> None:
        """A container that stops reading the body and does not answer: 504 after the response timeout."""
        client = self.send(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n", b"hello")
        _, container = self.container()
        self.reactor.advance(100)
        container.producer.pauseProducing()
        self.reactor.advance(59)
        self.assertEqual(client.value(), b"")
        self.reactor.advance(1)
        self.assertTrue(client.value().startswith(b"HTTP/1.1 504 "))
        self.assertTrue(container.disconnecting)
        self.assertIsNone(container.producer)

    def test_switch_before_body_read(self) -> None:
        """
        An Upgrade request whose container switches protocols before it has
        the whole body: 502 (the rest would reach it as the new protocol's bytes).
        """
        client = self.send(
            b"POST /x HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\nUpgrade: example\r\nContent-Length: 10\r\n",
            b"hello",
        )
        protocol, container = self.container()
        self.assertTrue(container.value().endswith(b"\r\n\r\nhello"))
        protocol.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: example\r\nConnection: upgrade\r\n\r\n")
        self.assertTrue(client.value().startswith(b"HTTP/1.1 502 "))
        self.assertTrue(container.disconnecting)

    def test_bad_answer_not_retried(self) -> None:
        """A kept-alive connection that answers garbage is a 502 at once (no retry), and is closed."""
        self.send()
        protocol, container = self.container()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        client = self.send()
        protocol.dataReceived(b"garbage\r\n\r\n")
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.assertTrue(client.value().startswith(b"HTTP/1.1 502 "))
        self.assertTrue(container.disconnecting)

    def test_chunked_wins_over_content_length(self) -> None:
        """
        A chunked answer that also names a Content-Length reaches the client
        re-framed, without that length; its connection is not used again.
        """
        client = self.send()
        protocol, _ = self.container()
        protocol.dataReceived(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        )
        head, _, body = client.value().partition(b"\r\n\r\n")
        self.assertNotIn(b"content-length", head.lower())
        self.assertEqual(body, b"5\r\nhello\r\n0\r\n\r\n")
        self.assertEqual(self.service.pool.idle_count(), 0)

    def test_idle_connections_pruned(self) -> None:
        """Once traffic stops, a running proxy closes its idle kept-alive connections itself."""
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.send()
        protocol, container = self.container()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(self.service.pool.idle_count(), 1)
        self.reactor.advance(POOLED_IDLE_SECONDS)
        self.assertFalse(container.disconnecting)
        self.reactor.advance(POOLED_IDLE_SECONDS)
        self.assertTrue(container.disconnecting)
        self.assertEqual(self.service.pool.idle_count(), 0)

    def test_bad_field_name(self) -> None:
        """A response field whose name is not a token (here with a bare LF in it) is a 502, never passed on."""
        client = self.send()
        protocol, container = self.container()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nX-A\nSet-Cookie: evil=1\r\nContent-Length: 0\r\n\r\n")
        self.assertTrue(client.value().startswith(b"HTTP/1.1 502 "))
        self.assertNotIn(b"evil", client.value())
        self.assertTrue(container.disconnecting)

    def test_bug_answers_500(self) -> None:
        """A bug while handling the container's answer is logged and answered 500, not left hanging."""

        def broken(*args: object) -> None:
            raise RuntimeError("a bug")

        self.patch(Exchange, "_respond", broken)
        client = self.send()
        protocol, container = self.container()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertTrue(client.value().startswith(b"HTTP/1.1 500 "))
        self.assertTrue(container.disconnecting)
        self.assertEqual(self.forwards.live_count(), 0)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_bug_while_body_sent(self) -> None:
        """A bug while the request body is still being sent: 500, and the body stops being the container connection's producer."""

        def broken(*args: object) -> None:
            raise RuntimeError("a bug")

        self.patch(Exchange, "_respond", broken)
        client = self.send(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n", b"hello")
        protocol, container = self.container()
        self.assertIsNotNone(container.producer)
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertTrue(client.value().startswith(b"HTTP/1.1 500 "))
        self.assertIsNone(container.producer)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class AccessRulesTests(SynchronousTestCase):
    """
    Who may use a forward through the proxy, and that none of rexecpf's
    credentials reach the container: on ``/p/``, under host routing, and
    for upgrades.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.serve()

    def serve(self, create: bytes = b'{"container_port": 8080}') -> None:
        self.service, self.forwards, self.forward = make_proxy(
            self.reactor, proxy_domain="preview.test", create=create
        )
        self.successResultOf(self.service.sessions.ready())
        self.cookie = b"Cookie: rexecpf_session=" + self.service.sessions.make("alice", self.forward.id).encode()
        root = Root(
            NotFoundResource(),
            NotFoundResource(),
            proxy=ProxyResource(self.service),
            host_router=HostRouter(self.service, "preview.test"),
        )
        self.site = RexecSite(root, proxy_body_bytes=1_000_000)

    @property
    def own_origin(self) -> bytes:
        """:return: the forward's origin under host routing."""
        return b"http://" + self.forward.id.replace("_", "-").encode() + b".preview.test:8080"

    def send(
        self, *lines: bytes, method: bytes = b"GET", path: bytes = b"/", routed: bool = False
    ) -> StringTransport:
        """
        Send one request with the header ``lines``, under ``/p/{id}`` or
        (``routed``) to the forward's own host; :return: the client's transport.
        """
        if routed:
            target, host = path, self.own_origin[len(b"http://"):]
        else:
            target, host = b"/p/" + self.forward.id.encode() + path, b"127.0.0.1:8080"
        channel, transport = channel_for(self.site)
        self.connections = len(self.reactor.tcpClients)
        channel.dataReceived(
            method + b" " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\n"
            + b"".join(line + b"\r\n" for line in lines) + b"\r\n"
        )
        return transport

    def received(self) -> bytes:
        """:return: the request head the container got for the last request sent."""
        self.assertEqual(len(self.reactor.tcpClients), self.connections + 1, "nothing was sent to the container")
        _, container = connect_container(self.reactor)
        return container.value()

    def assertRefused(self, transport: StringTransport, code: int) -> dict[str, Any]:
        """The last request was answered ``code`` by rexecpf, nothing sent to the container: :return: the error."""
        self.assertEqual(len(self.reactor.tcpClients), self.connections)
        response = transport.value()
        self.assertTrue(response.startswith(b"HTTP/1.1 %d " % code), response)
        body = response.partition(b"\r\n\r\n")[2]  # (maybe chunked: one chunk)
        error: dict[str, Any] = json.loads(body[body.index(b"{") : body.rindex(b"}") + 1])["error"]
        self.assertEqual(error["code"], code)
        return error

    # credentials

    def test_authorization_with_a_token_never_passes(self) -> None:
        """
        Every Authorization value holding a rexecpf token is removed, whatever
        else is sent and whichever credential authenticates (several values,
        any case, any spacing); the app's own values pass, and so do its
        cookies.  Proxy-Authorization never passes.
        """
        cases = [
            (self.cookie, b"Authorization: Bearer alice-token", b"Authorization: Basic dTpw"),
            (self.cookie + b"; app=1", b"Authorization: Basic dTpw", b"Authorization: bEaReR    alice-token  "),
            (b"Authorization: Basic dTpw", b"Authorization:   bearer alice-token", b"Authorization: Bearer bob-token"),
            (self.cookie, b"Authorization: Basic dTpw", b"Proxy-Authorization: Bearer alice-token"),
            (self.cookie, b"Authorization: Basic " + base64.b64encode(b"alice:alice-token"), b"Authorization: Basic dTpw"),
        ]
        for upgrade in (False, True):
            for routed in (False, True):
                for lines in cases:
                    with self.subTest(upgrade=upgrade, routed=routed, lines=lines):
                        extra = (b"Connection: Upgrade", b"Upgrade: websocket") if upgrade else ()
                        self.send(*lines, *extra, routed=routed)
                        head = self.received()
                        self.assertNotIn(b"alice-token", head)
                        self.assertNotIn(b"bob-token", head)
                        self.assertNotIn(b"rexecpf_session", head)
                        self.assertIn(b"\r\nAuthorization: Basic dTpw\r\n", head)
                        self.assertEqual(head.lower().count(b"\r\nauthorization:"), 1)

    def test_someone_elses_token_with_a_cookie(self) -> None:
        """Bob's token beside alice's cookie: the bearer header decides (404 for bob), and it is not sent."""
        transport = self.send(self.cookie, b"Authorization: Bearer bob-token", b"Authorization: Basic dTpw")
        self.assertRefused(transport, 404)

    # ?token=

    def test_apps_own_token_parameter_passes(self) -> None:
        """A token parameter that is no rexecpf token reaches the app as sent when a cookie (or bearer) authenticates."""
        for routed in (False, True):
            with self.subTest(routed=routed):
                self.send(self.cookie, path=b"/lab?token=jupyter-own&x=1", routed=routed)
                self.assertTrue(self.received().startswith(b"GET /lab?token=jupyter-own&x=1 HTTP/1.1\r\n"))
        self.send(b"Authorization: Bearer alice-token", path=b"/lab?token=jupyter-own")
        self.assertTrue(self.received().startswith(b"GET /lab?token=jupyter-own HTTP/1.1\r\n"))

    def test_token_parameter_without_credentials(self) -> None:
        """A token parameter that is no rexecpf token, and no other credential: 401, as before."""
        error = self.assertRefused(self.send(path=b"/?token=nope"), 401)
        self.assertEqual(error["detail"], "the token is not valid")

    def test_someone_elses_token_parameter(self) -> None:
        """Bob's token in the URL of alice's forward is consumed: 404, never sent, even beside alice's cookie."""
        self.assertRefused(self.send(path=b"/?token=bob-token"), 404)
        self.assertRefused(self.send(self.cookie, path=b"/?token=bob-token&x=1"), 404)

    def test_rexecpf_token_consumed_apps_kept(self) -> None:
        """rexecpf's token is consumed (cookie and redirect); the app's own token parameter stays in the redirect."""
        transport = self.send(path=b"/lab?token=alice-token&token=jupyter-own")
        self.assertEqual(len(self.reactor.tcpClients), self.connections)
        response = transport.value()
        self.assertTrue(response.startswith(b"HTTP/1.1 303 "))
        self.assertIn(b"\r\nLocation: ./lab?token=jupyter-own\r\n", response)
        self.assertIn(b"Set-Cookie: rexecpf_session=", response)

    # Origin

    def test_cookie_refused_from_another_origin(self) -> None:
        """
        With the session cookie, an unsafe method or an upgrade from another
        origin (or ``null``, or a second Origin) is 403, nothing sent; HTML
        for a browser.
        """
        for method, lines in (
            (b"POST", (b"Origin: http://evil.example",)),
            (b"PUT", (b"Origin: null",)),
            (b"DELETE", (b"Origin: http://127.0.0.1:8080", b"Origin: http://evil.example")),
            (b"PATCH", (b"Origin: http://127.0.0.1:8081",)),
            (b"PROPFIND", (b"Origin: https://127.0.0.1:8080",)),
            (b"GET", (b"Origin: http://evil.example", b"Connection: Upgrade", b"Upgrade: websocket")),
        ):
            with self.subTest(method=method, lines=lines):
                error = self.assertRefused(self.send(self.cookie, *lines, method=method), 403)
                self.assertIn("origin", error["detail"])
        transport = self.send(self.cookie, b"Origin: http://evil.example", b"Accept: text/html", method=b"POST")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 403 "))
        self.assertIn(b"<h1>403 Forbidden</h1>", transport.value())

    def test_cookie_accepted_from_own_origin(self) -> None:
        """
        The forward's own origin (public_url's under /p/, default port
        spelled or not), no Origin at all, a safe method from anywhere, and a
        bearer token from anywhere are let through.
        """
        for method, lines in (
            (b"POST", (self.cookie, b"Origin: http://127.0.0.1:8080")),
            (b"POST", (self.cookie, b"Origin: HTTP://127.0.0.1:8080")),
            (b"DELETE", (self.cookie,)),
            (b"GET", (self.cookie, b"Origin: http://evil.example")),
            (b"GET", (self.cookie, b"Origin: http://127.0.0.1:8080", b"Connection: Upgrade", b"Upgrade: websocket")),
            (b"POST", (b"Authorization: Bearer alice-token", b"Origin: http://evil.example")),
        ):
            with self.subTest(method=method, lines=lines):
                self.send(*lines, method=method)
                self.assertTrue(self.received().startswith(method + b" / HTTP/1.1\r\n"))

    def test_host_routed_origin(self) -> None:
        """Under host routing only the forward's own origin may use its cookie: not public_url's (every forward's /p/)."""
        error = self.assertRefused(
            self.send(self.cookie, b"Origin: http://127.0.0.1:8080", method=b"POST", routed=True), 403
        )
        self.assertIn("origin", error["detail"])
        other = self.own_origin.replace(b"pf-", b"pf-0", 1)
        self.assertRefused(self.send(self.cookie, b"Origin: " + other, method=b"POST", routed=True), 403)
        self.send(self.cookie, b"Origin: " + self.own_origin, method=b"POST", routed=True)
        self.assertTrue(self.received().startswith(b"POST / HTTP/1.1\r\n"))

    # CORS preflights

    def test_preflight_answered(self) -> None:
        """
        A preflight (OPTIONS, Access-Control-Request-Method, no credentials)
        is answered 204 with no CORS permission, also for a forward that does
        not exist; an OPTIONS that is not a preflight still needs credentials.
        """
        preflight = (b"Origin: http://evil.example", b"Access-Control-Request-Method: POST")
        for routed in (False, True):
            with self.subTest(routed=routed):
                transport = self.send(*preflight, method=b"OPTIONS", routed=routed)
                self.assertEqual(len(self.reactor.tcpClients), self.connections)
                self.assertTrue(transport.value().startswith(b"HTTP/1.1 204 "))
                self.assertNotIn(b"access-control", transport.value().lower())
        channel, transport = channel_for(self.site)
        channel.dataReceived(b"OPTIONS /p/pf_nosuchforward/ HTTP/1.1\r\nHost: h\r\n" + b"".join(
            line + b"\r\n" for line in preflight) + b"\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 204 "))
        self.assertRefused(self.send(b"Origin: http://evil.example", method=b"OPTIONS"), 401)

    def test_preflight_passed(self) -> None:
        """A forward made with pass_preflight sends preflights to the container, without rexecpf's credentials."""
        self.serve(create=b'{"container_port": 8080, "pass_preflight": true}')
        self.send(
            b"Origin: http://evil.example",
            b"Access-Control-Request-Method: PUT",
            b"Cookie: rexecpf_session=stale; app=1",
            method=b"OPTIONS",
            path=b"/x?token=own",
        )
        head = self.received()
        self.assertTrue(head.startswith(b"OPTIONS /x?token=own HTTP/1.1\r\n"))
        self.assertIn(b"\r\nAccess-Control-Request-Method: PUT\r\n", head)
        self.assertIn(b"\r\nCookie: app=1\r\n", head)
        self.assertNotIn(b"rexecpf_session", head)
        self.assertEqual(self.forwards.live_counts(), {"proxy": 1})
