"""``GET /tls/ask?domain=NAME`` (rexecpf.http.ask), in memory."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from rexecpf.http.ask import (
    ASK_TIMEOUT_SECONDS,
    MAX_IN_FLIGHT,
    AskResource,
    host_name,
)


def ask(resource: AskResource, query: list[tuple[bytes, bytes]] | None = None, method: bytes = b"GET",
        path: bytes = b"/tls/ask") -> DummyRequest:
    """:return: the request, rendered (maybe not finished yet)."""
    request = DummyRequest([b"tls", b"ask"])
    request.path = path
    request.method = method
    for name, value in query or []:
        request.args.setdefault(name, []).append(value)
    body = resource.render(request)
    if body is not NOT_DONE_YET:
        request.write(body)
        request.finish()
    return request


def answer(request: DummyRequest) -> tuple[int, Any]:
    return request.responseCode or 200, json.loads(b"".join(request.written))


class AskTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.asked: list[str] = []
        self.claims = {"app.example.com"}

    def claimed(self, domain: str) -> Deferred[bool]:
        self.asked.append(domain)
        return succeed(domain in self.claims)

    def test_claimed_and_not(self) -> None:
        """200 for a claimed name (normalised: lower case, no trailing dot); 404 for another."""
        resource = AskResource(self.claimed, self.clock)
        code, document = answer(ask(resource, [(b"domain", b"App.Example.COM.")]))
        self.assertEqual((code, document), (200, {"domain": "app.example.com", "claimed": True}))
        code, document = answer(ask(resource, [(b"domain", b"other.example.org")]))
        self.assertEqual(code, 404)
        self.assertEqual(document["error"]["message"], "Domain not claimed")
        self.assertEqual(self.asked, ["app.example.com", "other.example.org"])
        self.assertEqual(resource.in_flight, 0)

    def test_bad_questions(self) -> None:
        """No domain, two, or one that is no host name: 400 without asking; another path 404; POST 405."""
        resource = AskResource(self.claimed, self.clock)
        for query in (
            [],
            [(b"domain", b"a.example.com"), (b"domain", b"b.example.com")],
            [(b"domain", b"")],
            [(b"domain", b"a..example.com")],
            [(b"domain", b"app.example.com:443")],
            [(b"domain", b"-app.example.com")],
            [(b"domain", "bücher.example".encode())],
            [(b"domain", b"a" * 64 + b".example.com")],
            [(b"domain", (b"a" * 60 + b".") * 5 + b"com")],
        ):
            code, document = answer(ask(resource, query))
            self.assertEqual(code, 400, query)
            self.assertEqual(document["error"]["message"], "Invalid request")
        self.assertEqual(answer(ask(resource, [(b"domain", b"app.example.com")], path=b"/tls"))[0], 404)
        request = ask(resource, [(b"domain", b"app.example.com")], method=b"POST")
        self.assertEqual(answer(request)[0], 405)
        self.assertEqual(request.responseHeaders.getRawHeaders(b"allow"), [b"GET, HEAD"])
        self.assertEqual(self.asked, [])

    def test_slow_answer_times_out(self) -> None:
        """An answer that does not come in ASK_TIMEOUT_SECONDS is 503 (Caddy then refuses the name)."""
        pending: Deferred[bool] = Deferred()
        resource = AskResource(lambda domain: pending, self.clock)
        request = ask(resource, [(b"domain", b"app.example.com")])
        self.assertEqual(request.finished, 0)
        self.assertEqual(resource.in_flight, 1)
        self.clock.advance(ASK_TIMEOUT_SECONDS)
        self.assertEqual(answer(request)[0], 503)
        self.assertEqual(resource.in_flight, 0)

    def test_bounded(self) -> None:
        """At most MAX_IN_FLIGHT questions wait at once: the next is 503 without asking."""
        pending: list[Deferred[bool]] = []

        def claimed(domain: str) -> Deferred[bool]:
            pending.append(Deferred())
            return pending[-1]

        resource = AskResource(claimed, self.clock)
        waiting = [ask(resource, [(b"domain", b"app.example.com")]) for _ in range(MAX_IN_FLIGHT)]
        refused = ask(resource, [(b"domain", b"app.example.com")])
        self.assertEqual(answer(refused)[0], 503)
        self.assertEqual(len(pending), MAX_IN_FLIGHT)
        for deferred in pending:
            deferred.callback(True)
        self.assertEqual({answer(request)[0] for request in waiting}, {200})
        self.assertEqual(resource.in_flight, 0)
        again = ask(resource, [(b"domain", b"app.example.com")])
        pending[-1].callback(False)
        self.assertEqual(answer(again)[0], 404)

    def test_failure_is_503(self) -> None:
        """A failing ``claimed`` (the store down) is 503, logged, never a 500."""
        resource = AskResource(lambda domain: fail(RuntimeError("store down")), self.clock)
        self.assertEqual(answer(ask(resource, [(b"domain", b"app.example.com")]))[0], 503)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_client_gone(self) -> None:
        """A client gone before the answer: nothing is written, nothing fails."""
        pending: Deferred[bool] = Deferred()
        resource = AskResource(lambda domain: pending, self.clock)
        request = ask(resource, [(b"domain", b"app.example.com")])
        request.processingFailed(Failure(ConnectionDone("gone")))  # as a lost connection does
        pending.callback(True)
        self.assertEqual(request.written, [])
        self.assertEqual(resource.in_flight, 0)


class HostNameTests(TestCase):
    def test_host_name(self) -> None:
        self.assertEqual(host_name(b"A.Example.COM."), "a.example.com")
        self.assertIsNone(host_name(b"a_b.example.com"))
        self.assertIsNone(host_name(b"."))
