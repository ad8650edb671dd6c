"""
The REST API, in memory (StubTreq, Clock, the fakes): every row of the error
table, in order, and live responses checked against the OpenAPI document.
"""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from rexecpf.api import API, PublicURLs
from rexecpf.auth import Authenticator
from rexecpf.config import LimitsConfig
from rexecpf.forwards import ForwardService
from rexecpf.model import APIError
from rexecpf.openapi import openapi_document
from rexecpf.testing import FakeBackend, MemoryForwardStore
from rexecpf.web import Health, Root

BASE = "http://rexecpf.test"
ALICE = {"Authorization": "Bearer alice-token"}
BOB = {"Authorization": "Bearer bob-token"}
ROOT = {"Authorization": "Bearer root-token"}


def _schema(name: str, array: bool = False) -> dict[str, Any]:
    document = openapi_document()
    reference = {"$ref": f"#/components/schemas/{name}"}
    schema = {"type": "array", "items": reference} if array else reference
    return {**schema, "components": document["components"]}


class APITestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_795_000_000.5)
        self.store = MemoryForwardStore()
        self.backend = FakeBackend()
        self.backend.add("c1", "alice")
        self.backend.add("c2", "alice")
        self.backend.add("bobs", "bob")
        self.backend.add("nobodys", None)
        self.bindable: set[int] = set(range(20000, 30000))
        self.forwards = ForwardService(
            self.clock,
            self.store,
            self.backend,
            LimitsConfig(),
            port_probe=lambda interface, port: port in self.bindable,
        )
        self.forwards.startService()
        self.addCleanup(self.forwards.stopService)
        authenticator = Authenticator(
            {"alice": "alice-token", "bob": "bob-token", "root": "root-token"}, ["root"]
        )
        self.api = API(authenticator, self.forwards, PublicURLs("http://example.test:8080"))
        root = Root(self.api.resource(), Health(self.store, self.backend))
        self.stub = StubTreq(root)

    def request(
        self, method: str, path: str, headers: dict[str, str] | None = None, body: Any = None
    ) -> tuple[int, Any, Any]:
        if body is not None and not isinstance(body, bytes):
            body = json.dumps(body).encode()
        response = self.successResultOf(
            self.stub.request(method, BASE + path, headers=headers or {}, data=body)
        )
        raw = self.successResultOf(response.content())
        document = json.loads(raw) if raw else None
        if document is not None and response.code >= 400 and path != "/healthz":
            jsonschema.validate(document, _schema("Error"))
            self.assertEqual(document["error"]["code"], response.code)
        self.assertEqual(
            response.headers.getRawHeaders("content-type", [None])[0],
            "application/json" if raw else None,
        )
        return response.code, document, response.headers

    def create(self, port: int = 8080, container: str = "c1", headers: Any = ALICE, **extra: Any) -> Any:
        return self.request(
            "POST",
            f"/api/containers/{container}/port-forwards",
            headers,
            {"container_port": port, **extra},
        )

    def assertError(self, result: tuple[int, Any, Any], code: int, message: str) -> None:
        self.assertEqual((result[0], result[1]["error"]["message"]), (code, message))


class CreateTests(APITestCase):
    def test_created(self) -> None:
        """A 201 answers with the forward object (as documented) and its Location."""
        code, document, headers = self.create(8080, name="Web Server")
        self.assertEqual(code, 201)
        jsonschema.validate(document, _schema("PortForward"))
        self.assertRegex(document["id"], r"^pf_[a-z0-9]{20,}$")
        self.assertEqual(document["container_id"], "c1")
        self.assertEqual(document["container_port"], 8080)
        self.assertEqual(document["local_port"], 20000)
        self.assertEqual(document["name"], "Web Server")
        self.assertEqual(document["proxy_url"], f"http://example.test:8080/p/{document['id']}/")
        self.assertEqual(
            document["websocket_url"], f"ws://example.test:8080/ws/port-forward/{document['id']}"
        )
        self.assertEqual(document["created_at"], "2026-11-18T11:06:40.500Z")
        self.assertEqual(
            headers.getRawHeaders("location"),
            [f"/api/containers/c1/port-forwards/{document['id']}"],
        )

    def test_name_defaults_to_null(self) -> None:
        """Without a name, ``name`` is null."""
        self.assertIsNone(self.create(8080)[1]["name"])

    def test_form_content_type_accepted(self) -> None:
        """JSON posted with curl's default form Content-Type is read as JSON."""
        code, document, _ = self.request(
            "POST",
            "/api/containers/c1/port-forwards",
            {**ALICE, "Content-Type": "application/x-www-form-urlencoded"},
            b'{"container_port": 3000, "name": "Next.js App"}',
        )
        self.assertEqual((code, document["container_port"]), (201, 3000))

    def test_local_port_requested(self) -> None:
        """A requested local_port inside local_ports is used."""
        self.assertEqual(self.create(8080, local_port=25000)[1]["local_port"], 25000)

    def test_local_port_auto_skips_unbindable(self) -> None:
        """Auto-assignment skips ports used by forwards and ports that cannot be bound."""
        self.bindable.discard(20001)
        self.assertEqual(self.create(1)[1]["local_port"], 20000)
        self.assertEqual(self.create(2)[1]["local_port"], 20002)

    def test_pass_preflight(self) -> None:
        """pass_preflight is false unless the create asks for true; it is kept with the forward."""
        code, document, _ = self.create(8080)
        self.assertEqual((code, document["pass_preflight"]), (201, False))
        code, document, _ = self.create(8081, pass_preflight=True)
        self.assertEqual((code, document["pass_preflight"]), (201, True))
        jsonschema.validate(document, _schema("PortForward"))
        self.assertTrue(self.forwards.cached(document["id"]).pass_preflight)
        self.assertEqual(self.request("GET", f"/api/containers/c1/port-forwards/{document['id']}", ALICE)[1], document)

    def test_ids_unique(self) -> None:
        """Every forward gets its own id."""
        ids = {self.create(port)[1]["id"] for port in range(1, 11)}
        self.assertEqual(len(ids), 10)


class ErrorTableTests(APITestCase):
    def test_unauthorized(self) -> None:
        """No token, a bad token or another scheme: 401 with WWW-Authenticate: Bearer."""
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic YWxpY2U6"}):
            result = self.create(8080, headers=headers)
            self.assertError(result, 401, "Unauthorized")
            self.assertTrue(result[2].getRawHeaders("www-authenticate")[0].startswith("Bearer"))

    def test_unauthorized_before_everything(self) -> None:
        """401 comes first, even for unknown paths and methods."""
        self.assertError(self.request("GET", "/api/nothing"), 401, "Unauthorized")
        self.assertError(self.request("PUT", "/api/containers/c1/port-forwards"), 401, "Unauthorized")

    def test_container_not_found(self) -> None:
        """An unknown container, another user's, and an unlabelled one are all 404."""
        for container in ("nope", "bobs", "nobodys"):
            self.assertError(self.create(8080, container=container), 404, "Container not found")
            self.assertError(
                self.request("GET", f"/api/containers/{container}/port-forwards", ALICE),
                404,
                "Container not found",
            )

    def test_not_found_before_bad_body(self) -> None:
        """404 Container not found is checked before the body."""
        result = self.request("POST", "/api/containers/bobs/port-forwards", ALICE, b"{nope")
        self.assertError(result, 404, "Container not found")

    def test_invalid_request(self) -> None:
        """Bodies that are not a JSON object of known fields are 400 Invalid request."""
        for body in (
            b"",
            b"   ",
            b"{nope",
            b"[8080]",
            b'"8080"',
            b"8080",
            b"null",
            b'{"container_port": 8080, "extra": 1}',
            b"[" * 60_000,  # nested past Python's recursion limit, within 64 KiB
            b'{"container_port": ' + b"[" * 60_000,
            b"\xff\xfe{}",
            b'{"container_port": 8080, "name": "\xc3"}',
            b'{"container_port": 8080, "container_port": 8081}',
            b'{"container_port": NaN}',
            b"{}",
            b'{"container_port": 8080, "name": ""}',
            b'{"container_port": 8080, "name": 5}',
            json.dumps({"container_port": 8080, "name": "x" * 101}).encode(),
            b'{"container_port": 8080, "pass_preflight": 1}',
            b'{"container_port": 8080, "pass_preflight": "true"}',
            b'{"container_port": 8080, "pass_preflight": null}',
        ):
            with self.subTest(body=body):
                result = self.request("POST", "/api/containers/c1/port-forwards", ALICE, body)
                self.assertError(result, 400, "Invalid request")
        self.assertEqual(self.store.forwards, {})

    def test_invalid_port(self) -> None:
        """Ports that are not integers 1-65535 (booleans and floats included) are 400 Invalid port."""
        for value in (True, False, 8080.0, "8080", 0, 65536, -1, None, [8080], {"p": 1}, 1e3):
            with self.subTest(value=value):
                self.assertError(self.create(value), 400, "Invalid port")
                self.assertError(self.create(8080, local_port=value if value is not None else 0),
                                 400, "Invalid port")
        self.assertEqual(self.store.forwards, {})

    def test_invalid_request_before_invalid_port(self) -> None:
        """An unknown field is reported before a bad port."""
        result = self.create("x", extra=True)
        self.assertError(result, 400, "Invalid request")

    def test_not_running(self) -> None:
        """A stopped container is 409 Container not running, after body validation."""
        self.backend.stop("c2")
        self.assertError(self.create(8080, container="c2"), 409, "Container not running")
        self.assertError(self.create(0, container="c2"), 400, "Invalid port")

    def test_port_already_forwarded(self) -> None:
        """A second forward of the same container_port is 403."""
        self.create(8080)
        self.assertError(self.create(8080), 403, "Port already forwarded")
        self.assertEqual(self.create(8080, container="c2")[0], 201)

    def test_limit(self) -> None:
        """The eleventh forward of a container is 429; 403 is checked before 429."""
        for port in range(1, 11):
            self.assertEqual(self.create(port)[0], 201)
        self.assertError(self.create(11), 429, "Limit exceeded")
        self.assertError(self.create(5), 403, "Port already forwarded")

    def test_local_port_unavailable(self) -> None:
        """A local_port outside local_ports, used by a forward, or not bindable is 409."""
        self.create(1, local_port=21000)
        self.bindable.discard(22000)
        for port in (80, 30000, 21000, 22000):
            with self.subTest(port=port):
                self.assertError(self.create(2, local_port=port), 409, "Local port unavailable")

    def test_local_port_after_limit(self) -> None:
        """403 and 429 come before 409 Local port unavailable."""
        self.create(1)
        self.assertError(self.create(1, local_port=80), 403, "Port already forwarded")

    def test_forward_not_found(self) -> None:
        """An unknown forward, or one of another container, is 404 Port forward not found."""
        fid = self.create(8080)[1]["id"]
        for path in (
            "/api/containers/c1/port-forwards/pf_nope",
            f"/api/containers/c2/port-forwards/{fid}",
        ):
            for method in ("GET", "DELETE"):
                self.assertError(self.request(method, path, ALICE), 404, "Port forward not found")
        self.assertIn(fid, self.store.forwards)

    def test_other_users_forward(self) -> None:
        """Another user's forward is 404, exactly like a missing container."""
        fid = self.create(8080)[1]["id"]
        self.assertError(
            self.request("GET", f"/api/containers/c1/port-forwards/{fid}", BOB),
            404,
            "Container not found",
        )
        self.assertError(
            self.request("DELETE", f"/api/containers/c1/port-forwards/{fid}", BOB),
            404,
            "Container not found",
        )

    def test_method_not_allowed(self) -> None:
        """Other methods are 405 with Allow."""
        for method, path, allowed in (
            ("PUT", "/api/containers/c1/port-forwards", {"GET", "HEAD", "POST"}),
            ("PATCH", "/api/containers/c1/port-forwards/pf_x", {"GET", "HEAD", "DELETE"}),
        ):
            result = self.request(method, path, ALICE)
            self.assertError(result, 405, "Method not allowed")
            self.assertEqual(set(result[2].getRawHeaders("allow")[0].split(", ")), allowed)

    def test_unknown_paths(self) -> None:
        """Other paths under /api, and outside it, are JSON 404 Not found."""
        for path in ("/api/nothing", "/api/containers/c1/port-forwards/x/y", "/api", "/elsewhere"):
            self.assertError(self.request("GET", path, ALICE), 404, "Not found")

    def test_backend_unavailable(self) -> None:
        """When the engine cannot answer: 503, and nothing is changed."""
        self.create(8080)
        before = dict(self.store.forwards)
        self.backend.available = False
        self.assertError(self.create(8081), 503, "Backend unavailable")
        fid = next(iter(before))
        self.assertError(
            self.request("DELETE", f"/api/containers/c1/port-forwards/{fid}", ALICE),
            503,
            "Backend unavailable",
        )
        self.assertEqual(self.store.forwards, before)
        code, document, _ = self.request("GET", "/healthz")
        self.assertEqual((code, document["status"]), (503, "unavailable"))


class ReadDeleteTests(APITestCase):
    def test_list_oldest_first(self) -> None:
        """The list holds the container's forwards, oldest first, and nobody else's."""
        ids = []
        for port in (3, 1, 2):
            ids.append(self.create(port)[1]["id"])
            self.clock.advance(0.001)
        self.create(9, container="c2")
        code, document, _ = self.request("GET", "/api/containers/c1/port-forwards", ALICE)
        self.assertEqual(code, 200)
        jsonschema.validate(document, _schema("PortForward", array=True))
        self.assertEqual([f["id"] for f in document], ids)

    def test_get_and_delete(self) -> None:
        """GET returns what POST did; DELETE is 204 and the forward is gone."""
        created = self.create(8080)[1]
        path = f"/api/containers/c1/port-forwards/{created['id']}"
        self.assertEqual(self.request("GET", path, ALICE)[1], created)
        code, document, _ = self.request("DELETE", path, ALICE)
        self.assertEqual((code, document), (204, None))
        self.assertError(self.request("GET", path, ALICE), 404, "Port forward not found")
        self.assertEqual(self.request("GET", "/api/containers/c1/port-forwards", ALICE)[1], [])

    def test_delete_closes_live_connections(self) -> None:
        """Deleting a forward shuts down what is open on its behalf, with the reason."""
        fid = self.create(8080)[1]["id"]
        reasons: list[str] = []

        class Live:
            def shutdown(self, reason: str) -> None:
                reasons.append(reason)

        self.forwards.track(fid, Live())
        self.request("DELETE", f"/api/containers/c1/port-forwards/{fid}", ALICE)
        self.assertEqual(reasons, ["forward deleted"])
        self.assertEqual(self.forwards.live_count(), 0)

    def test_admin_sees_all(self) -> None:
        """An admin lists, reads and deletes forwards on anyone's container, labelled or not."""
        fid = self.create(8080)[1]["id"]
        self.assertEqual(len(self.request("GET", "/api/containers/c1/port-forwards", ROOT)[1]), 1)
        self.assertEqual(self.create(80, container="nobodys", headers=ROOT)[0], 201)
        self.assertEqual(self.create(80, container="bobs", headers=ROOT)[0], 201)
        self.assertEqual(
            self.request("DELETE", f"/api/containers/c1/port-forwards/{fid}", ROOT)[0], 204
        )

    def test_container_stop_reaps(self) -> None:
        """A container that stops has its forwards deleted; others stay."""
        self.create(8080)
        kept = self.create(8080, container="c2")[1]
        self.backend.stop("c1")
        self.assertEqual(self.request("GET", "/api/containers/c1/port-forwards", ALICE)[1], [])
        self.assertEqual(
            [f["id"] for f in self.request("GET", "/api/containers/c2/port-forwards", ALICE)[1]],
            [kept["id"]],
        )

    def test_stop_while_creating(self) -> None:
        """
        A container that stops while a create is being written (its reap
        cannot see the new forward yet) answers 409 and leaves no forward:
        the reap records the stop and the store refuses the forward.
        """
        from rexecpf.model import Principal

        writing: Deferred[Any] = Deferred()
        add = self.store.add

        def slow_add(forward: Any, limit: int, stop_mark: Any = None) -> Any:
            return writing.addCallback(lambda _: add(forward, limit, stop_mark))

        self.store.add = slow_add  # type: ignore[method-assign]
        creating = self.forwards.create(Principal("alice"), "c1", b'{"container_port": 8080}')
        self.backend.stop("c1")
        writing.callback(None)
        failure = self.failureResultOf(creating, APIError)
        self.assertEqual((failure.value.code, failure.value.message), (409, "Container not running"))
        self.assertEqual(self.successResultOf(self.store.list_forwards("c1")), [])
        self.assertEqual(self.forwards.live_count("c1"), 0)

    def test_stop_after_write_before_answer(self) -> None:
        """
        A stop whose reap removes the forward after it was written but before
        its create has answered: 409, and the forward is not served.
        """
        from rexecpf.model import Principal

        answering: Deferred[Any] = Deferred()
        add = self.store.add

        def written_then_slow(forward: Any, limit: int, stop_mark: Any = None) -> Any:
            return add(forward, limit, stop_mark).addCallback(lambda added: answering.addCallback(lambda _: added))

        self.store.add = written_then_slow  # type: ignore[method-assign]
        creating = self.forwards.create(Principal("alice"), "c1", b'{"container_port": 8080}')
        self.backend.stop("c1")
        answering.callback(None)
        failure = self.failureResultOf(creating, APIError)
        self.assertEqual((failure.value.code, failure.value.message), (409, "Container not running"))
        self.assertEqual(self.successResultOf(self.store.list_forwards("c1")), [])
        self.assertEqual(self.forwards.forwards(), [])
        # Nothing is remembered once no create is in flight.
        self.assertEqual(self.forwards._removed_while_creating, set())


class MiscTests(APITestCase):
    def test_openapi(self) -> None:
        """/api/openapi.json is an OpenAPI 3.1 document naming every route."""
        code, document, _ = self.request("GET", "/api/openapi.json")
        self.assertEqual(code, 200)
        self.assertEqual(document["openapi"], "3.1.0")
        self.assertEqual(
            set(document["paths"]),
            {
                "/api/containers/{containerId}/port-forwards",
                "/api/containers/{containerId}/port-forwards/{forwardId}",
                "/api/containers/{containerId}/port-forwards/{forwardId}/domains",
                "/api/containers/{containerId}/port-forwards/{forwardId}/domains/{domain}",
                "/api/openapi.json",
                "/healthz",
            },
        )

    def test_healthz(self) -> None:
        """/healthz is 200 {"status": "ok"} when store and backend answer."""
        self.assertEqual(self.request("GET", "/healthz")[:2], (200, {"status": "ok"}))

    def test_logs_one_event_per_call_without_token(self) -> None:
        """Each API call logs user, container, forward and status; never the token."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        fid = self.create(8080)[1]["id"]
        self.create(8080, headers={"Authorization": "Bearer secret-guess"})
        api_events = [e for e in events if e.get("log_namespace", "").startswith("rexecpf.api")]
        self.assertEqual(len(api_events), 2)
        self.assertEqual(
            (api_events[0]["user"], api_events[0]["container_id"], api_events[0]["forward_id"],
             api_events[0]["status"]),
            ("alice", "c1", fid, 201),
        )
        self.assertEqual(api_events[1]["status"], 401)
        for event in events:
            text = repr(event)
            self.assertNotIn("alice-token", text)
            self.assertNotIn("secret-guess", text)

    def test_forward_ids_fit_dns(self) -> None:
        """Forward ids, with - for _, are valid DNS labels."""
        fid = self.create(8080)[1]["id"]
        self.assertRegex(fid.replace("_", "-"), re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"))


class ConformanceTests(APITestCase):
    """Gaps between the document and the code that schemathesis found."""

    def test_healthz_other_methods(self) -> None:
        """/healthz answers other methods (TRACE included) with a JSON 405 and Allow."""
        for method in ("POST", "DELETE", "TRACE", "PATCH"):
            with self.subTest(method=method):
                result = self.request(method, "/healthz")
                self.assertError(result, 405, "Method not allowed")
                self.assertEqual(result[2].getRawHeaders("allow"), ["GET, HEAD"])

    def test_float_ports_documented(self) -> None:
        """The document says in words that 8080.0 is refused (JSON Schema cannot)."""
        properties = openapi_document()["components"]["schemas"]["CreatePortForward"]["properties"]
        for field in ("container_port", "local_port"):
            self.assertIn("8080.0", properties[field]["description"])
        self.assertError(self.create(8080.0), 400, "Invalid port")

    def test_non_utf8_url(self) -> None:
        """A URL that is not UTF-8 is the JSON 400 Invalid request, after 401."""
        path = "/api/containers/%FF%FE/port-forwards"
        self.assertError(self.request("GET", path, ALICE), 400, "Invalid request")
        self.assertError(self.request("POST", path, ALICE, {"container_port": 1}), 400,
                         "Invalid request")
        self.assertError(self.request("GET", path), 401, "Unauthorized")

    def test_encoded_slash_is_not_a_separator(self) -> None:
        """``c1%2Fport-forwards`` is one segment: 404 Not found, not c1's list."""
        result = self.request("GET", "/api/containers/c1%2Fport-forwards", ALICE)
        self.assertError(result, 404, "Not found")
        self.assertError(self.request("GET", "/api/containers/c1%2Fport-forwards"), 401, "Unauthorized")


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=120),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
_PORTISH = st.integers(-2, 70000) | st.floats() | st.booleans() | st.text(max_size=6) | st.none()
_FIELDS = st.fixed_dictionaries(
    {},
    optional={
        "container_port": _PORTISH,
        "local_port": _PORTISH | st.integers(20000, 29999),
        "name": st.none() | st.text(max_size=110) | st.integers(),
    },
)
_BODIES = (
    st.binary(max_size=200)
    | _JSON.map(lambda value: json.dumps(value).encode())
    | _FIELDS.map(lambda value: json.dumps(value).encode())
    | st.builds(lambda fields, extra: json.dumps({**fields, **extra}).encode(),
                _FIELDS, st.dictionaries(st.text(max_size=8), _JSON, max_size=2))
)
#: What the contract allows a create to answer, by status and message.
_DOCUMENTED = {
    (400, "Invalid request"),
    (400, "Invalid port"),
    (403, "Port already forwarded"),
    (403, "Port not allowed"),
    (409, "Local port unavailable"),
    (429, "Limit exceeded"),
}


class PropertyTests(APITestCase):
    @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
    @given(body=_BODIES, content_type=st.sampled_from(
        ["application/json", "application/x-www-form-urlencoded", "text/plain", None]))
    def test_any_body(self, body: bytes, content_type: str | None) -> None:
        """Any body: a 201 (for a valid one) or a documented 4xx; never a 500."""
        headers = dict(ALICE)
        if content_type:
            headers["Content-Type"] = content_type
        code, document, _ = self.request("POST", "/api/containers/c1/port-forwards", headers, body)
        if code == 201:
            data = json.loads(body)
            self.assertEqual(document["container_port"], data["container_port"])
            self.assertEqual(document["name"], data.get("name"))
            path = f"/api/containers/c1/port-forwards/{document['id']}"
            self.assertEqual(self.request("DELETE", path, ALICE)[0], 204)
        else:
            self.assertIn((code, document["error"]["message"]), _DOCUMENTED, (body, document))
        self.assertEqual(self.store.forwards, {})
