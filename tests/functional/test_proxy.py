"""
The HTTP proxy against real servers on 127.0.0.1: an in-process Twisted
application, a deliberately broken server, and ``python -m http.server`` in a
subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, ClassVar

import treq
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from rexecpf.proxy import SESSION_COOKIE
from tests.functional.inprocess import until
from tests.functional.proxyenv import (
    TOKENS,
    RawClient,
    app_site,
    free_port,
    listen,
    payload_of,
    raw_request,
    real_reactor,
    sleep,
    split_response,
    start_rexec,
    temp_dir,
    truncating_factory,
)

ALICE = {"Authorization": f"Bearer {TOKENS['alice']}"}


def _treq() -> Any:
    """:return: a treq-like client without connection reuse between tests."""
    return treq.client.HTTPClient(Agent(real_reactor(), pool=HTTPConnectionPool(real_reactor(), persistent=False)))


class ProxyTestsMixin:
    """Starts rexecpf and the test application; makes one forward to it."""

    overrides: ClassVar[dict[str, Any]] = {}

    @inlineCallbacks
    def setUp(self) -> Any:
        self.rex = yield start_rexec(self, **self.overrides)
        self.app_port = yield listen(self, app_site())
        self.fw = yield self.rex.forward(self.app_port)
        self.url = f"{self.rex.base}/p/{self.fw.id}"
        self.http = _treq()

    @inlineCallbacks
    def echo(self, path: str, **kwargs: Any) -> Any:
        kwargs.setdefault("headers", ALICE)
        response = yield self.http.request(kwargs.pop("method", "GET"), self.url + path, **kwargs)
        self.assertEqual(response.code, 200, (yield response.text()))
        document = yield response.json()
        return document

    def headers_of(self, document: dict[str, Any], name: str) -> list[str]:
        return [value for key, value in document["headers"] if key.lower() == name.lower()]


class RequestRulesTests(ProxyTestsMixin, TestCase):
    """What reaches the container."""

    @inlineCallbacks
    def test_path_query_method_body(self) -> Any:
        """Method, path (encoding kept), query string and body reach the container as sent, over HTTP/1.1."""
        body = os.urandom(300_000)  # several reads: it reaches the container in pieces
        document = yield self.echo("/a/b%2Fc//d?x=1&y=%20z&x=2", method="PUT", data=body)
        self.assertEqual(document["method"], "PUT")
        self.assertEqual(document["uri"], "/a/b%2Fc//d?x=1&y=%20z&x=2")
        self.assertEqual(document["body_length"], len(body))
        import hashlib

        self.assertEqual(document["body_sha256"], hashlib.sha256(body).hexdigest())
        self.assertEqual(document["client_proto"], "HTTP/1.1")

    @inlineCallbacks
    def test_repeated_headers_host_and_forwarded(self) -> Any:
        """
        Every value of a repeated header is kept, Host is the client's, and
        X-Forwarded-For is appended to; -Proto, -Host and -Prefix are set (the
        client's own -Prefix is not trusted).
        """
        headers = dict(ALICE)
        headers.update(
            {
                "X-Multi": ["one", "two", "three"],
                "Host": "app.example:1234",
                "X-Forwarded-For": "203.0.113.9",
                "X-Forwarded-Prefix": "/evil",
            }
        )
        document = yield self.echo("/", headers=headers)
        self.assertEqual(self.headers_of(document, "X-Multi"), ["one", "two", "three"])
        self.assertEqual(self.headers_of(document, "Host"), ["app.example:1234"])
        self.assertEqual(self.headers_of(document, "X-Forwarded-For"), ["203.0.113.9, 127.0.0.1"])
        self.assertEqual(self.headers_of(document, "X-Forwarded-Proto"), ["http"])
        self.assertEqual(self.headers_of(document, "X-Forwarded-Host"), ["app.example:1234"])
        self.assertEqual(self.headers_of(document, "X-Forwarded-Prefix"), [f"/p/{self.fw.id}"])

    @inlineCallbacks
    def test_hop_by_hop_request_headers(self) -> Any:
        """Hop-by-hop request headers, and those named in Connection, are not passed on."""
        payload = (
            f"GET /p/{self.fw.id}/ HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer alice-token\r\n"
            "Connection: close\r\nConnection: X-Private\r\nX-Private: secret\r\nKeep-Alive: 5\r\nTE: trailers\r\n"
            "Proxy-Authorization: Basic eA==\r\nTrailer: X-Foo\r\nX-Kept: yes\r\n\r\n"
        ).encode()
        client = yield raw_request(self.rex.port, payload)
        code, headers, body = split_response(client.data)
        self.assertEqual(code, 200)
        names = {name.lower() for name, _ in json.loads(payload_of(headers, body))["headers"]}
        for dropped in ("connection", "x-private", "keep-alive", "te", "proxy-authorization", "trailer"):
            self.assertNotIn(dropped, names)
        self.assertIn("x-kept", names)

    @inlineCallbacks
    def test_credentials_stripped(self) -> Any:
        """rexecpf's bearer header and session cookie never reach the container; other cookies do."""
        headers = dict(ALICE)
        headers["Cookie"] = f"a=1; {SESSION_COOKIE.decode()}=whatever; b=2"
        document = yield self.echo("/", headers=headers)
        self.assertEqual(self.headers_of(document, "Authorization"), [])
        self.assertEqual(self.headers_of(document, "Cookie"), ["a=1; b=2"])

    @inlineCallbacks
    def test_chunked_request_body(self) -> Any:
        """A chunked request body reaches the container whole."""
        payload = (
            f"POST /p/{self.fw.id}/up HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer alice-token\r\n"
            "Connection: close\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        ).encode()
        client = yield raw_request(self.rex.port, payload)
        code, headers, body = split_response(client.data)
        self.assertEqual(code, 200)
        import hashlib

        self.assertEqual(json.loads(payload_of(headers, body))["body_sha256"], hashlib.sha256(b"hello world").hexdigest())


class ResponseRulesTests(ProxyTestsMixin, TestCase):
    """What comes back to the client."""

    @inlineCallbacks
    def test_location_rewriting(self) -> Any:
        """A path-absolute Location comes back under the prefix; others are left alone."""
        cases = {
            "/login": f"/p/{self.fw.id}/login",
            "login": "login",
            "http://elsewhere.example/x": "http://elsewhere.example/x",
            "//elsewhere.example/x": "//elsewhere.example/x",
            f"/p/{self.fw.id}/already": f"/p/{self.fw.id}/already",
        }
        for sent, expected in cases.items():
            response = yield self.http.get(
                self.url + "/redirect/", params={"to": sent}, headers=ALICE, allow_redirects=False
            )
            yield response.content()
            self.assertEqual(response.code, 302)
            self.assertEqual(response.headers.getRawHeaders("location"), [expected])

    @inlineCallbacks
    def test_set_cookies_and_repeated_headers(self) -> Any:
        """The container's Set-Cookie headers, and every value of a repeated header, come back unchanged."""
        response = yield self.http.get(self.url + "/cookies", headers=ALICE)
        yield response.content()
        self.assertEqual(
            response.headers.getRawHeaders("set-cookie"), ["a=1; Path=/", "b=2; HttpOnly", "c=3; Max-Age=60"]
        )
        self.assertEqual(response.headers.getRawHeaders("x-multi"), ["one", "two"])

    @inlineCallbacks
    def test_hop_by_hop_response_headers(self) -> Any:
        """Hop-by-hop response headers, and those the container names in Connection, are removed."""
        payload = f"GET /p/{self.fw.id}/hop HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer alice-token\r\nConnection: close\r\n\r\n"
        client = yield raw_request(self.rex.port, payload.encode())
        code, headers, _ = split_response(client.data)
        self.assertEqual(code, 200)
        names = [name for name, _ in headers]
        self.assertNotIn(b"x-private", names)
        self.assertNotIn(b"keep-alive", names)
        self.assertNotIn(b"proxy-authenticate", names)

    @inlineCallbacks
    def test_chunked_response(self) -> Any:
        """A streamed response without a length arrives chunked and whole."""
        payload = f"GET /p/{self.fw.id}/chunked HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer alice-token\r\nConnection: close\r\n\r\n"
        client = yield raw_request(self.rex.port, payload.encode())
        code, headers, body = split_response(client.data)
        self.assertEqual(code, 200)
        self.assertIn((b"transfer-encoding", b"chunked"), headers)
        self.assertTrue(body.endswith(b"0\r\n\r\n"))
        self.assertIn(b"chunk 9\n", body)

    @inlineCallbacks
    def test_head(self) -> Any:
        """HEAD gets the container's headers (its Content-Length) and no body."""
        payload = f"HEAD /p/{self.fw.id}/big/5000 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer alice-token\r\nConnection: close\r\n\r\n"
        client = yield raw_request(self.rex.port, payload.encode())
        code, headers, body = split_response(client.data)
        self.assertEqual(code, 200)
        self.assertIn((b"content-length", b"5000"), headers)
        self.assertEqual(body, b"")

    @inlineCallbacks
    def test_keepalive_reused(self) -> Any:
        """Requests through the proxy reuse persistent connections to the container."""
        pool = self.rex.proxy.pool
        for _ in range(5):
            yield self.echo("/")
        self.assertEqual(pool.idle_count(), 1)


class ErrorTests(ProxyTestsMixin, TestCase):
    """Errors the proxy makes: right code, JSON for API clients, HTML for browsers."""

    @inlineCallbacks
    def test_redirect_308(self) -> Any:
        """/p/{id} redirects (308) to /p/{id}/ keeping the query string."""
        response = yield self.http.get(self.url + "?a=1&b=2", allow_redirects=False)
        yield response.content()
        self.assertEqual(response.code, 308)
        location = response.headers.getRawHeaders("location")[0]
        self.assertEqual(location, f"{self.fw.id}/?a=1&b=2")

    @inlineCallbacks
    def test_unauthenticated(self) -> Any:
        """Without credentials: 401, JSON by default, a short HTML page for browsers."""
        response = yield self.http.get(self.url + "/")
        self.assertEqual(response.code, 401)
        self.assertEqual((yield response.json())["error"]["code"], 401)
        response = yield self.http.get(self.url + "/", headers={"Accept": "text/html,*/*"})
        self.assertEqual(response.code, 401)
        self.assertIn(b"text/html", response.headers.getRawHeaders("content-type")[0].encode())
        self.assertIn(b"401", (yield response.content()))
        response = yield self.http.get(self.url + "/", headers={"Authorization": "Bearer wrong"})
        self.assertEqual(response.code, 401)
        yield response.content()

    @inlineCallbacks
    def test_unknown_and_foreign_forward(self) -> Any:
        """An unknown forward, and someone else's, are 404."""
        response = yield self.http.get(f"{self.rex.base}/p/pf_nosuchforward000000000/", headers=ALICE)
        self.assertEqual(response.code, 404)
        yield response.content()
        response = yield self.http.get(self.url + "/", headers={"Authorization": "Bearer bob-token"})
        self.assertEqual(response.code, 404)
        yield response.content()

    @inlineCallbacks
    def test_refused_502(self) -> Any:
        """A container port that refuses connections: 502."""
        fw = yield self.rex.forward(free_port())
        response = yield self.http.get(f"{self.rex.base}/p/{fw.id}/", headers=ALICE)
        self.assertEqual(response.code, 502)
        self.assertEqual((yield response.json())["error"]["code"], 502)

    @inlineCallbacks
    def test_no_headers_504(self) -> Any:
        """No response headers within the timeout: 504."""
        self.rex.proxy.response_timeout = 0.5
        response = yield self.http.get(self.url + "/hang", headers=ALICE)
        self.assertEqual(response.code, 504)
        yield response.content()

    @inlineCallbacks
    def answer_while_sending(self, payload: bytes) -> Any:
        """
        :return: the 413 (code, JSON body) answered while the body of
            ``payload`` is still open; the server would then wait a while
            for the rest of it, so as not to reset the connection.
        """
        client = RawClient(payload)
        yield connectProtocol(TCP4ClientEndpoint(real_reactor(), "127.0.0.1", self.rex.port), client)
        data = yield client.received(b"}\n").addTimeout(10, real_reactor())
        client.transport.loseConnection()
        code, _, body = split_response(data)
        return code, json.loads(body)

    @inlineCallbacks
    def test_request_too_large_content_length(self) -> Any:
        """A Content-Length over proxy_body_bytes is answered 413 before the body is sent."""
        head = (
            f"POST /p/{self.fw.id}/ HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer alice-token\r\n"
            "Content-Length: 999999999999\r\n\r\n"
        ).encode()
        code, body = yield self.answer_while_sending(head)  # the body is never sent
        self.assertEqual(code, 413)
        self.assertEqual(body["error"]["code"], 413)

    @inlineCallbacks
    def test_request_too_large_chunked(self) -> Any:
        """A chunked body is refused with 413 as soon as it passes the limit."""
        self.rex.components.site.proxy_body_bytes = 100_000
        chunk = b"%x\r\n" % 50_000 + b"a" * 50_000 + b"\r\n"
        payload = (
            f"POST /p/{self.fw.id}/ HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer alice-token\r\n"
            "Transfer-Encoding: chunked\r\n\r\n"
        ).encode() + chunk * 3  # never terminated: only the limit can answer
        code, body = yield self.answer_while_sending(payload)
        self.assertEqual(code, 413)
        self.assertEqual(body["error"]["code"], 413)

    @inlineCallbacks
    def test_response_too_large(self) -> Any:
        """A response announcing a body over the limit: 502."""
        self.rex.proxy.body_limit = 1000
        response = yield self.http.get(self.url + "/big/5000", headers=ALICE)
        self.assertEqual(response.code, 502)
        yield response.content()

    @inlineCallbacks
    def test_response_growing_too_large(self) -> Any:
        """A response without a length that grows past the limit: the client connection is dropped."""
        bad = yield listen(self, truncating_factory())
        fw = yield self.rex.forward(bad)
        self.rex.proxy.body_limit = 50_000
        payload = f"GET /p/{fw.id}/endless HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer alice-token\r\n\r\n"
        client = yield raw_request(self.rex.port, payload.encode())
        code, _, body = split_response(client.data)
        self.assertEqual(code, 200)
        self.assertFalse(body.endswith(b"0\r\n\r\n"))

    @inlineCallbacks
    def test_truncated_content_length(self) -> Any:
        """A backend that dies mid-body (Content-Length): the client gets a short body and a closed connection."""
        bad = yield listen(self, truncating_factory())
        fw = yield self.rex.forward(bad)
        payload = f"GET /p/{fw.id}/cl HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer alice-token\r\n\r\n"
        client = yield raw_request(self.rex.port, payload.encode())
        code, headers, body = split_response(client.data)
        self.assertEqual(code, 200)
        self.assertIn((b"content-length", b"1000"), headers)
        self.assertLess(len(body), 1000)

    @inlineCallbacks
    def test_reset_mid_body(self) -> Any:
        """
        A backend that resets its connection mid-body: the client gets a
        short body and a closed connection (or a 502 if the reset came before
        the head), never a complete-looking answer; nothing stays open.
        """
        bad = yield listen(self, truncating_factory())
        fw = yield self.rex.forward(bad)
        payload = f"GET /p/{fw.id}/reset HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer alice-token\r\n\r\n"
        client = yield raw_request(self.rex.port, payload.encode())
        code, headers, body = split_response(client.data)
        if code == 200:
            self.assertIn((b"content-length", b"1000"), headers)
            self.assertLess(len(body), 1000)
        else:
            self.assertEqual(code, 502)
        yield until(lambda: self.rex.forwards.live_count(fw.id) == 0, what="the request is over")

    @inlineCallbacks
    def test_truncated_chunked(self) -> Any:
        """A backend that dies mid-body (chunked): the client never sees the terminating chunk."""
        bad = yield listen(self, truncating_factory())
        fw = yield self.rex.forward(bad)
        payload = f"GET /p/{fw.id}/chunked HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer alice-token\r\n\r\n"
        client = yield raw_request(self.rex.port, payload.encode())
        code, headers, body = split_response(client.data)
        self.assertEqual(code, 200)
        self.assertIn((b"transfer-encoding", b"chunked"), headers)
        self.assertFalse(body.endswith(b"0\r\n\r\n"))

    @inlineCallbacks
    def test_delete_closes_in_flight(self) -> Any:
        """Deleting the forward ends its in-flight proxied requests at once."""
        from rexecpf.model import Principal

        pending = self.http.get(self.url + "/hang", headers=ALICE)
        yield until(lambda: self.rex.forwards.live_count(self.fw.id) == 1, what="the request is in flight")
        yield self.rex.forwards.delete(Principal("alice"), "cont_a", self.fw.id)
        response = yield pending.addTimeout(2, real_reactor())
        self.assertEqual(response.code, 404)
        yield response.content()
        self.assertEqual(self.rex.forwards.live_count(self.fw.id), 0)


class SessionTests(ProxyTestsMixin, TestCase):
    """The browser session: ?token= -> cookie -> redirect."""

    @inlineCallbacks
    def test_token_sets_cookie_and_redirects(self) -> Any:
        """
        Opening the proxy URL with ?token= sets an HttpOnly, SameSite=Lax
        cookie scoped to /p/{id}/ that names the user (not the token), and
        redirects to the same URL without the token; the cookie then works,
        is not passed on, and a cookie for another forward does not.
        """
        response = yield self.http.get(self.url + "/page?x=1&token=alice-token&y=2", allow_redirects=False)
        yield response.content()
        self.assertIn(response.code, (302, 303))
        self.assertEqual(response.headers.getRawHeaders("location"), ["./page?x=1&y=2"])
        cookie = response.headers.getRawHeaders("set-cookie")[0]
        self.assertIn(f"Path=/p/{self.fw.id}/", cookie)
        self.assertIn("HttpOnly", cookie)
        self.assertIn("samesite=lax", cookie.lower())
        self.assertNotIn("alice-token", cookie)
        value = cookie.split(";")[0]
        document = yield self.echo("/page?x=1&y=2", headers={"Cookie": f"{value}; app=1"})
        self.assertEqual(self.headers_of(document, "Cookie"), ["app=1"])
        self.assertEqual(document["uri"], "/page?x=1&y=2")
        # The app's own bearer header passes when rexecpf's cookie authenticates.
        document = yield self.echo("/", headers={"Cookie": value, "Authorization": "Bearer app-own"})
        self.assertEqual(self.headers_of(document, "Authorization"), ["Bearer app-own"])
        other = yield self.rex.forward(free_port())
        response = yield self.http.get(f"{self.rex.base}/p/{other.id}/", headers={"Cookie": value})
        self.assertEqual(response.code, 401)
        yield response.content()

    @inlineCallbacks
    def test_bad_token_and_tampered_cookie(self) -> Any:
        """A wrong ?token= is 401; a tampered or expired cookie is 401."""
        response = yield self.http.get(self.url + "/?token=nope", allow_redirects=False)
        self.assertEqual(response.code, 401)
        self.assertEqual(response.headers.getRawHeaders("www-authenticate"), ['Bearer realm="rexecpf"'])
        yield response.content()
        cookie = self.rex.proxy.sessions.make("alice", self.fw.id)
        tampered = cookie[:-2] + ("AA" if not cookie.endswith("AA") else "BB")
        response = yield self.http.get(self.url + "/", headers={"Cookie": f"rexecpf_session={tampered}"})
        self.assertEqual(response.code, 401)
        yield response.content()
        self.rex.proxy.sessions.lifetime = -1
        expired = self.rex.proxy.sessions.make("alice", self.fw.id)
        response = yield self.http.get(self.url + "/", headers={"Cookie": f"rexecpf_session={expired}"})
        self.assertEqual(response.code, 401)
        yield response.content()

    @inlineCallbacks
    def test_new_token_ends_old_sessions(self) -> Any:
        """A cookie from before the user's token changed (a reload) is 401; one made after works."""
        response = yield self.http.get(self.url + "/?token=alice-token", allow_redirects=False)
        yield response.content()
        old = response.headers.getRawHeaders("set-cookie")[0].split(";")[0]
        response = yield self.http.get(self.url + "/", headers={"Cookie": old})
        self.assertEqual(response.code, 200)
        yield response.content()
        self.rex.components.authenticator.replace({"alice": "alice-new-token", "bob": "bob-token"})
        response = yield self.http.get(self.url + "/", headers={"Cookie": old})
        self.assertEqual(response.code, 401)
        yield response.content()
        response = yield self.http.get(self.url + "/?token=alice-new-token", allow_redirects=False)
        yield response.content()
        new = response.headers.getRawHeaders("set-cookie")[0].split(";")[0]
        response = yield self.http.get(self.url + "/", headers={"Cookie": new})
        self.assertEqual(response.code, 200)
        yield response.content()

    @inlineCallbacks
    def test_cookie_survives_restart(self) -> Any:
        """
        The signing key is kept in the store: cookies checked with the key a
        restarted rexecpf reads from the same store are valid.
        """
        from rexecpf.proxy import SessionCookies

        yield self.rex.proxy.sessions.ready()
        cookie = self.rex.proxy.sessions.make("alice", self.fw.id)
        restarted = SessionCookies(
            lambda: self.rex.components.store.secret("session"),
            real_reactor(),
            60,
            self.rex.components.authenticator.credential,
        )
        yield restarted.ready()
        self.assertEqual(restarted.check(cookie.encode(), self.fw.id), "alice")


class BehindTLSFrontEndTests(ProxyTestsMixin, TestCase):
    """public_url is https (a TLS front end): the container is told so."""

    overrides: ClassVar[dict[str, Any]] = {"server": {"public_url": "https://rexec.example"}}

    @inlineCallbacks
    def test_forwarded_proto_https(self) -> Any:
        """X-Forwarded-Proto is https, and the session cookie is Secure."""
        document = yield self.echo("/")
        self.assertEqual(self.headers_of(document, "X-Forwarded-Proto"), ["https"])
        response = yield self.http.get(f"{self.url}/?token=alice-token", allow_redirects=False)
        yield response.content()
        self.assertIn("Secure", response.headers.getRawHeaders("set-cookie")[0])


class HostRoutingTests(ProxyTestsMixin, TestCase):
    """proxy_domain: each forward at the root of its own origin."""

    overrides: ClassVar[dict[str, Any]] = {"server": {"proxy_domain": "preview.test"}}

    def host(self, forward_id: str) -> str:
        return f"{forward_id.replace('_', '-')}.preview.test:{self.rex.port}"

    @inlineCallbacks
    def test_served_at_root(self) -> Any:
        """The forward's host serves it at /, /api there goes to the container, and no prefix is sent."""
        headers = dict(ALICE)
        headers["Host"] = self.host(self.fw.id)
        response = yield self.http.get(f"{self.rex.base}/api/containers?q=1", headers=headers)
        document = yield response.json()
        self.assertEqual(document["uri"], "/api/containers?q=1")
        self.assertEqual(self.headers_of(document, "X-Forwarded-Prefix"), [])
        response = yield self.http.get(f"{self.rex.base}/redirect/?to=/login", headers=headers, allow_redirects=False)
        self.assertEqual(response.headers.getRawHeaders("location"), ["/login"])
        yield response.content()

    @inlineCallbacks
    def test_unknown_host_label(self) -> Any:
        """Another name under proxy_domain is 404, never the API."""
        response = yield self.http.get(f"{self.rex.base}/api/openapi.json", headers={"Host": "www.preview.test"})
        self.assertEqual(response.code, 404)
        yield response.content()

    @inlineCallbacks
    def test_bare_domain_is_the_api(self) -> Any:
        """proxy_domain itself is not a forward's origin: it may be the API's own host."""
        response = yield self.http.get(f"{self.rex.base}/api/openapi.json", headers={"Host": "preview.test"})
        self.assertEqual(response.code, 200)
        yield response.content()

    @inlineCallbacks
    def test_cookie_scoped_to_host_root(self) -> Any:
        """Under host routing the session cookie is scoped to / on that host."""
        response = yield self.http.get(
            f"{self.rex.base}/?token=alice-token", headers={"Host": self.host(self.fw.id)}, allow_redirects=False
        )
        yield response.content()
        self.assertIn("Path=/;", response.headers.getRawHeaders("set-cookie")[0] + ";")

    def test_proxy_url(self) -> None:
        """proxy_url names the forward's own origin."""
        url = self.rex.components.api._urls.proxy_url(self.fw.id)
        self.assertEqual(url, f"http://{self.host(self.fw.id)}/")


class HTTPServerTests(TestCase):
    """Against ``python -m http.server`` in a subprocess."""

    @inlineCallbacks
    def setUp(self) -> Any:
        self.rex = yield start_rexec(self)
        self.dir = temp_dir(self)
        os.makedirs(os.path.join(self.dir, "sub"))
        with open(os.path.join(self.dir, "sub", "file.bin"), "wb") as file:
            file.write(b"q" * 123_457)
        port = free_port()
        self.server = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", self.dir],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.addCleanup(self.server.wait)
        self.addCleanup(self.server.terminate)
        self.fw = yield self.rex.forward(port)
        for _ in range(50):
            try:
                import socket

                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                yield sleep(0.1)
        self.http = _treq()

    @inlineCallbacks
    def test_file_and_directory_redirect(self) -> Any:
        """A file arrives whole; the directory redirect (absolute path) comes back under the prefix."""
        url = f"{self.rex.base}/p/{self.fw.id}"
        response = yield self.http.get(url + "/sub/file.bin", headers=ALICE)
        self.assertEqual(response.code, 200)
        self.assertEqual((yield response.content()), b"q" * 123_457)
        response = yield self.http.get(url + "/sub?x=1", headers=ALICE, allow_redirects=False)
        yield response.content()
        self.assertEqual(response.code, 301)
        self.assertEqual(response.headers.getRawHeaders("location"), [f"/p/{self.fw.id}/sub/?x=1"])
        response = yield self.http.get(url + "/nothing", headers=ALICE)
        self.assertEqual(response.code, 404)  # the container's own 404 passes through
        yield response.content()


class AccessRulesTests(ProxyTestsMixin, TestCase):
    """
    Over real sockets, on ``/p/`` and under host routing, for plain and
    upgrade requests: none of rexecpf's credentials reach the container (it
    echoes what it got), the session cookie only serves unsafe methods and
    upgrades from the forward's own origin, CORS preflights are answered or
    passed per forward, and one Host header only.
    """

    overrides: ClassVar[dict[str, Any]] = {"server": {"proxy_domain": "preview.test"}}

    @inlineCallbacks
    def setUp(self) -> Any:
        yield super().setUp()
        yield self.rex.proxy.sessions.ready()
        self.cookie = f"Cookie: rexecpf_session={self.rex.proxy.sessions.make('alice', self.fw.id)}; app=1"
        self.own_host = f"{self.fw.id.replace('_', '-')}.preview.test:{self.rex.port}"

    @inlineCallbacks
    def send(self, method: str, path: str, *lines: str, routed: bool = False, forward_id: str = "") -> Any:
        """
        Send one request with the header ``lines`` (and ``Connection: close``)
        under ``/p/{id}`` or (``routed``) to the forward's own host.

        :return: a Deferred firing with the status, the headers and the body.
        """
        forward_id = forward_id or self.fw.id
        host = f"{forward_id.replace('_', '-')}.preview.test:{self.rex.port}" if routed else f"127.0.0.1:{self.rex.port}"
        target = path if routed else f"/p/{forward_id}{path}"
        if not any(line.lower().startswith("connection:") for line in lines):
            lines = (*lines, "Connection: close")
        payload = f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n" + "".join(f"{line}\r\n" for line in lines) + "\r\n"
        client = yield raw_request(self.rex.port, payload.encode())
        code, headers, body = split_response(client.data)
        return code, headers, payload_of(headers, body)

    @inlineCallbacks
    def test_credentials_never_reach_container(self) -> Any:
        """A valid cookie plus Authorization headers holding alice's token: only the app's own Authorization passes."""
        for routed in (False, True):
            for upgrade in ((), ("Connection: Upgrade, close", "Upgrade: websocket")):
                code, _, body = yield self.send(
                    "GET",
                    "/",
                    self.cookie,
                    "Authorization: Bearer alice-token",
                    "Authorization: Basic dTpw",
                    "Authorization:   bEaReR   alice-token ",
                    "Proxy-Authorization: Bearer alice-token",
                    *upgrade,
                    routed=routed,
                )
                self.assertEqual(code, 200, body)
                document = json.loads(body)
                self.assertEqual(self.headers_of(document, "Authorization"), ["Basic dTpw"])
                self.assertEqual(self.headers_of(document, "Cookie"), ["app=1"])
                self.assertNotIn(b"alice-token", body)

    @inlineCallbacks
    def test_apps_own_token_parameter(self) -> Any:
        """With the cookie, the app's own ?token= reaches it as sent; alone it is 401; bob's token is consumed (404)."""
        for routed in (False, True):
            code, _, body = yield self.send("GET", "/lab?token=jupyter-own", self.cookie, routed=routed)
            self.assertEqual(code, 200, body)
            self.assertEqual(json.loads(body)["uri"], "/lab?token=jupyter-own")
        code, _, body = yield self.send("GET", "/lab?token=jupyter-own")
        self.assertEqual(code, 401, body)
        code, _, body = yield self.send("GET", "/lab?token=bob-token", self.cookie)
        self.assertEqual(code, 404, body)

    @inlineCallbacks
    def test_cookie_only_from_own_origin(self) -> Any:
        """
        A cookie-authenticated POST or upgrade from another origin is 403 (on
        /p/ public_url's origin is the forward's; under host routing only
        pf-xxxx's); from its own origin, or without Origin, it is served.
        """
        evil = "Origin: http://evil.example"
        public = f"Origin: {self.rex.base}"
        websocket = ("Connection: Upgrade, close", "Upgrade: websocket")
        for method, lines, routed, expected in (
            ("POST", (evil,), False, 403),
            ("POST", ("Origin: null",), False, 403),
            ("GET", (evil, *websocket), False, 403),
            ("POST", (public,), True, 403),
            ("GET", (public, *websocket), True, 403),
            ("POST", (public,), False, 200),
            ("DELETE", (), False, 200),
            ("GET", (evil,), False, 200),
            ("POST", (f"Origin: http://{self.own_host}",), True, 200),
            ("GET", (f"Origin: http://{self.own_host}", *websocket), True, 200),
        ):
            code, headers, body = yield self.send(method, "/", self.cookie, *lines, routed=routed)
            self.assertEqual(code, expected, (method, lines, routed, body))
            if expected == 403:
                self.assertEqual(json.loads(body)["error"]["message"], "Forbidden")
        code, _, body = yield self.send("POST", "/", "Authorization: Bearer alice-token", evil)
        self.assertEqual(code, 200, body)

    @inlineCallbacks
    def test_preflight(self) -> Any:
        """
        A CORS preflight without credentials is 204 with no CORS permission
        from rexecpf, unless the forward passes preflights: then the
        container answers it.
        """
        preflight = ("Origin: http://evil.example", "Access-Control-Request-Method: PUT")
        for routed in (False, True):
            code, headers, body = yield self.send("OPTIONS", "/", *preflight, routed=routed)
            self.assertEqual((code, body), (204, b""))
            self.assertEqual([name for name, _ in headers if name.startswith(b"access-control")], [])
        passing = yield self.rex.create(self.app_port, cid="cont_b", token=TOKENS["bob"], pass_preflight=True)
        self.assertTrue(passing["pass_preflight"])
        for routed in (False, True):
            code, _, body = yield self.send("OPTIONS", "/x", *preflight, routed=routed, forward_id=passing["id"])
            self.assertEqual(code, 200, body)
            document = json.loads(body)
            self.assertEqual((document["method"], document["uri"]), ("OPTIONS", "/x"))
            self.assertEqual(self.headers_of(document, "Access-Control-Request-Method"), ["PUT"])

    @inlineCallbacks
    def test_duplicate_host(self) -> Any:
        """Two Host lines are 400 (JSON) on /p/, under host routing, on /api and on /ws/."""
        for target, host in (
            (f"/p/{self.fw.id}/", f"127.0.0.1:{self.rex.port}"),
            ("/", self.own_host),
            ("/api/containers/cont_a/port-forwards", f"127.0.0.1:{self.rex.port}"),
            (f"/ws/port-forward/{self.fw.id}", f"127.0.0.1:{self.rex.port}"),
        ):
            payload = (
                f"GET {target} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer alice-token\r\n"
                f"Host: {host}\r\n\r\n"
            )
            client = yield raw_request(self.rex.port, payload.encode())
            code, headers, body = split_response(client.data)
            self.assertEqual(code, 400, client.data)
            self.assertEqual(json.loads(payload_of(headers, body))["error"]["message"], "Invalid request")
