"""
The site in memory (an HTTPChannel on a StringTransport, a Clock): bodies too
large for the API are refused with 413 before they are read, idle
connections are closed.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from rexecpf.api import MAX_BODY_BYTES
from rexecpf.web import IDLE_TIMEOUT_SECONDS, LimitedRequest, RexecSite, release_from_http_channel


class Echo(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[bytes] = []

    def render(self, request: object) -> bytes:
        self.bodies.append(request.content.read())  # type: ignore[attr-defined]
        return b"ok"


class SiteCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.resource = Echo()
        self.site = RexecSite(self.resource, reactor=self.clock)

    def connect(self) -> tuple[object, StringTransport]:
        channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1234))
        transport = StringTransport()
        channel.makeConnection(transport)  # type: ignore[union-attr]
        return channel, transport


class SiteTests(SiteCase):
    def test_defaults(self) -> None:
        """Idle timeout 60 s, the limiting request factory, no form parsing."""
        self.assertEqual(self.site.timeOut, IDLE_TIMEOUT_SECONDS)
        self.assertIs(self.site.requestFactory, LimitedRequest)
        self.assertEqual(self.site.max_body_for(b"/api/containers/c1/port-forwards"), MAX_BODY_BYTES)
        self.assertEqual(self.site.max_body_for(b"http://other/api/x"), MAX_BODY_BYTES)
        self.assertIsNone(self.site.max_body_for(b"/p/pf_x/upload"))

    def test_announced_too_large(self) -> None:
        """A Content-Length over the API limit is 413 (JSON) before any body byte."""
        channel, transport = self.connect()
        channel.dataReceived(  # type: ignore[attr-defined]
            b"POST /api/containers/c1/port-forwards HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: 10485760\r\n\r\n"
        )
        head, _, body = transport.value().partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 413 "), head)
        self.assertIn(b"Connection: close", head)
        self.assertEqual(json.loads(body)["error"]["message"], "Request too large")
        # the body is read and dropped, never handed to a resource
        channel.dataReceived(b"x" * 10485760)  # type: ignore[attr-defined]
        self.assertEqual(self.resource.bodies, [])
        self.assertTrue(transport.disconnecting)

    def test_chunked_too_large(self) -> None:
        """A chunked body that grows past the limit is refused as it grows."""
        channel, transport = self.connect()
        channel.dataReceived(  # type: ignore[attr-defined]
            b"POST /api/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"a" * 60000
        for _ in range(2):
            channel.dataReceived(b"%x\r\n%s\r\n" % (len(chunk), chunk))  # type: ignore[attr-defined]
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 413 "))
        channel.dataReceived(b"0\r\n\r\n")  # type: ignore[attr-defined]
        self.assertEqual(self.resource.bodies, [])
        self.assertTrue(transport.disconnecting)

    def test_small_body_passes(self) -> None:
        """A body within the limit reaches the resource whole."""
        channel, transport = self.connect()
        channel.dataReceived(  # type: ignore[attr-defined]
            b"POST /api/x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
        )
        self.assertEqual(self.resource.bodies, [b"hello"])
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "))

    def test_unlimited_elsewhere(self) -> None:
        """Outside /api the site sets no limit (a resource, the proxy, sets its own)."""
        channel, transport = self.connect()
        size = MAX_BODY_BYTES * 2
        channel.dataReceived(  # type: ignore[attr-defined]
            b"POST /elsewhere HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size
            + b"y" * size
        )
        self.assertEqual(len(self.resource.bodies[0]), size)

    def test_discard_gives_up(self) -> None:
        """A refused body that never ends is dropped for at most 10 s, then aborted."""
        channel, transport = self.connect()
        channel.dataReceived(  # type: ignore[attr-defined]
            b"POST /api/x HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999999\r\n\r\n"
        )
        self.clock.advance(10)
        self.assertTrue(transport.disconnecting or getattr(transport, "disconnected", False))

    def test_idle_connection_closed(self) -> None:
        """A client that stops sending half-way through its headers is closed after the timeout."""
        channel, transport = self.connect()
        channel.dataReceived(b"GET /api/x HTTP/1.1\r\nHost: x\r\n")  # type: ignore[attr-defined]
        self.clock.advance(IDLE_TIMEOUT_SECONDS - 1)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(transport.disconnecting or getattr(transport, "disconnected", False))


class LineLengthTests(SiteCase):
    def test_request_line_too_long(self) -> None:
        """A request line over 16 KiB is 414, not a silent close."""
        channel, transport = self.connect()
        channel.dataReceived(b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n")  # type: ignore[attr-defined]
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 414 "), transport.value()[:80])
        self.assertTrue(transport.disconnecting)

    def test_header_line_too_long(self) -> None:
        """A header line over 16 KiB is 431."""
        channel, transport = self.connect()
        channel.dataReceived(  # type: ignore[attr-defined]
            b"GET /api/x HTTP/1.1\r\nX-Big: " + b"b" * 20000 + b"\r\n"
        )
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 431 "), transport.value()[:80])

    def test_unparseable_request_is_json_400(self) -> None:
        """
        What Twisted refuses while parsing (a bare CR in a header value,
        Content-Length with Transfer-Encoding) is a JSON 400, then a close;
        the resource never sees it.
        """
        for raw in (
            b"GET /api/x HTTP/1.1\r\nHost: x\r\nX-Bad: a\rb\r\n\r\n",
            b"POST /p/x/ HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        ):
            with self.subTest(raw=raw):
                channel, transport = self.connect()
                channel.dataReceived(raw)  # type: ignore[attr-defined]
                head, _, body = transport.value().partition(b"\r\n\r\n")
                self.assertTrue(head.startswith(b"HTTP/1.1 400 "), head)
                self.assertIn(b"Content-Type: application/json", head)
                self.assertEqual(json.loads(body)["error"]["message"], "Invalid request")
                self.assertTrue(transport.disconnecting)
        self.assertEqual(self.resource.bodies, [])

    def test_absolute_form_target(self) -> None:
        """``GET http://a.example/p?q`` is served as ``/p?q`` with ``Host: a.example``, whatever Host said."""
        seen = []

        class Recorder(Resource):
            isLeaf = True

            def render(self, request: Any) -> bytes:
                seen.append((request.uri, request.getHeader(b"host")))
                return b"ok"

        self.site.resource = Recorder()
        for target, expected in (
            (b"http://a.example/p?q=1", (b"/p?q=1", b"a.example")),
            (b"HTTPS://a.example:8443", (b"/", b"a.example:8443")),
            (b"http://a.example?x", (b"/?x", b"a.example")),
            (b"/plain", (b"/plain", b"b.example")),
        ):
            channel, transport = self.connect()
            channel.dataReceived(b"GET " + target + b" HTTP/1.1\r\nHost: b.example\r\n\r\n")  # type: ignore[attr-defined]
            self.assertEqual(seen.pop(), expected)

    def test_no_100_continue_after_413(self) -> None:
        """Expect: 100-continue with a too-large length: the 413 only, no 100 after it."""
        channel, transport = self.connect()
        channel.dataReceived(  # type: ignore[attr-defined]
            b"POST /api/x HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        self.assertNotIn(b"100 Continue", transport.value())
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 413 "))


class TakeoverTests(SynchronousTestCase):
    def test_channel_released_as_producer(self) -> None:
        """
        A connection taken over from twisted.web no longer has the HTTPChannel
        as its producer, so the new owner can register its own.
        """
        site = RexecSite(Resource())
        site.timeOut = None
        protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.assertIsNotNone(transport.producer)
        release_from_http_channel(transport)
        self.assertIsNone(transport.producer)
        release_from_http_channel(transport)  # nothing registered: nothing to do
        transport.registerProducer(object(), True)


class HostHeaderTests(SiteCase):
    """RFC 9112 3.2: more than one Host line, a bad Host, or none in HTTP/1.1, is 400 before any routing."""

    def test_duplicate_or_bad_host_refused(self) -> None:
        """
        400 with the JSON error (an HTML page for a browser), the resource
        never sees it, and the connection closes after the answer: a
        pipelined request behind it is not served.
        """
        for target, hosts in (
            (b"/p/pf_x/", [b"a.example", b"b.example"]),
            (b"/api/containers/c1/port-forwards", [b"a.example", b"a.example"]),
            (b"/ws/port-forward/pf_x", [b"pf-x.preview.test", b"pf-y.preview.test"]),
            (b"http://a.example/p/pf_x/", [b"a.example", b"b.example"]),
            (b"/", [b"a.example, b.example"]),
            (b"/", [b"a.example b"]),
            (b"/", [b"a.example/x"]),
            (b"/", [b"a.example:80x"]),
            (b"/api/containers/c1/port-forwards", []),  # HTTP/1.1 without Host
        ):
            with self.subTest(target=target, hosts=hosts):
                channel, transport = self.connect()
                channel.dataReceived(  # type: ignore[attr-defined]
                    b"GET " + target + b" HTTP/1.1\r\n"
                    + b"".join(b"Host: " + host + b"\r\n" for host in hosts)
                    + b"\r\nGET / HTTP/1.1\r\nHost: a.example\r\n\r\n"
                )
                head, _, body = transport.value().partition(b"\r\n\r\n")
                self.assertTrue(head.startswith(b"HTTP/1.1 400 "), head)
                self.assertIn(b"Connection: close", head)
                self.assertEqual(json.loads(body)["error"]["message"], "Invalid request")
                self.assertIn("Host", json.loads(body)["error"]["detail"])
                self.assertEqual(transport.value().count(b"HTTP/1.1 "), 1)
                self.assertTrue(transport.disconnecting)
        channel, transport = self.connect()
        channel.dataReceived(  # type: ignore[attr-defined]
            b"GET /p/pf_x/ HTTP/1.1\r\nHost: a\r\nAccept: text/html\r\nHost: b\r\n\r\n"
        )
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 400 "))
        self.assertIn(b"<h1>400 Invalid request</h1>", transport.value())
        self.assertEqual(self.resource.bodies, [])

    def test_good_hosts_served(self) -> None:
        """One Host of a name, an address or an IP literal, with or without a port, or empty: served."""
        for host in (b"a.example", b"A.Example:8080", b"127.0.0.1:1", b"[::1]:8080", b"[::1]", b"", b"pf-x.preview.test:"):
            with self.subTest(host=host):
                channel, transport = self.connect()
                channel.dataReceived(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")  # type: ignore[attr-defined]
                self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "), transport.value())
        channel, transport = self.connect()
        channel.dataReceived(b"GET / HTTP/1.0\r\n\r\n")  # type: ignore[attr-defined]
        self.assertIn(b" 200 ", transport.value().partition(b"\r\n")[0], "HTTP/1.0 needs no Host")
