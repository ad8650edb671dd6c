"""
Custom domains and stable names: the name rules, the TXT proof against a
real DNS server on loopback, and the API (in memory, every 4xx of the
error table for them, live bodies checked against the OpenAPI document).
"""

from __future__ import annotations

from typing import Any

import jsonschema
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from rexecpf.api import API, PublicURLs
from rexecpf.auth import Authenticator
from rexecpf.config import ConfigError, LimitsConfig, parse_config
from rexecpf.domains import DomainRules, TXTVerifier, check_slug, normalise_domain, verification_token
from rexecpf.feed import UPDATE, Change
from rexecpf.forwards import ForwardService
from rexecpf.model import APIError
from rexecpf.testing import FakeBackend, MemoryForwardStore
from rexecpf.web import Health, Root
from tests.functional.dnsserver import TXTZone, start_dns_server
from tests.test_api import ALICE, BOB, ROOT, APITestCase, _schema


class NameRulesTests(SynchronousTestCase):
    def test_valid_domains_normalised(self) -> None:
        """Host names are lowercased, one trailing dot dropped."""
        for given, expected in (
            ("App.Example.COM", "app.example.com"),
            ("app.example.com.", "app.example.com"),
            ("xn--bcher-kva.example", "xn--bcher-kva.example"),
            ("a-b.c1.example", "a-b.c1.example"),
            ("a" * 63 + ".example", "a" * 63 + ".example"),
        ):
            self.assertEqual(normalise_domain(given), expected)

    def test_invalid_domains(self) -> None:
        """Anything but a host name is 400 Invalid domain."""
        too_long = ".".join(["a" * 60] * 5)  # 304 characters
        for bad in (
            "", ".", "localhostonly", "app..example", "-app.example", "app-.example", "app.example..",
            "*.example.com", "app_x.example", "app.example:8080", "10.0.0.1", "b\u00fccher.example",
            "a" * 64 + ".example", too_long, 42, None, ["a.example"], "app example.com", "app.example/x",
        ):
            with self.assertRaises(APIError, msg=repr(bad)) as caught:
                normalise_domain(bad)
            self.assertEqual((caught.exception.code, caught.exception.message), (400, "Invalid domain"))

    def test_slugs(self) -> None:
        """A slug is 1-40 of [a-z0-9-], no edge hyphen, no '--'."""
        for good in ("a", "web", "my-app-2", "x" * 40):
            self.assertEqual(check_slug(good), good)
        for bad in ("", "Web", "-web", "web-", "my--app", "x" * 41, "web.app", "w_b", 7, "caf\u00e9"):
            with self.assertRaises(APIError, msg=repr(bad)) as caught:
                check_slug(bad)
            self.assertEqual((caught.exception.code, caught.exception.message), (400, "Invalid slug"))

    def test_reserved_names(self) -> None:
        """public_url's host, proxy_domain and anything under it, and loopback names are refused."""
        rules = DomainRules.from_config((), True, 10, "https://API.example.com:8443", "preview.example.com")
        for name in ("api.example.com", "preview.example.com", "pf-x.preview.example.com", "a.b.preview.example.com",
                     "x.localhost"):
            with self.assertRaises(APIError, msg=name):
                rules.refuse_reserved(name)
        rules.refuse_reserved("app.example.com")
        rules.refuse_reserved("xpreview.example.com")

    def test_tokens_differ_per_user_and_domain(self) -> None:
        """The token is stable for a (user, domain), another for any other user or domain."""
        key = b"k" * 32
        token = verification_token(key, "alice", "app.example")
        self.assertRegex(token, r"^[a-z2-7]{32}$")
        self.assertEqual(token, verification_token(key, "alice", "app.example"))
        self.assertNotEqual(token, verification_token(key, "bob", "app.example"))
        self.assertNotEqual(token, verification_token(key, "alice", "other.example"))


class ConfigTests(SynchronousTestCase):
    def test_keys(self) -> None:
        """[auth] custom_domains and [domains] are read and validated, naming the key."""
        config = parse_config(
            {
                "auth": {"users": {"alice": "t"}, "custom_domains": ["alice"]},
                "domains": {"verify": False, "resolver": "127.0.0.1:5353", "per_forward": 3},
            }
        )
        self.assertEqual(config.auth.custom_domains, ("alice",))
        self.assertEqual((config.domains.verify, config.domains.resolver, config.domains.per_forward),
                         (False, "127.0.0.1:5353", 3))
        for data, key in (
            ({"auth": {"users": {"alice": "t"}, "custom_domains": ["bob"]}}, "auth.custom_domains"),
            ({"auth": {"custom_domains": "alice"}}, "auth.custom_domains"),
            ({"domains": {"verify": "yes"}}, "domains.verify"),
            ({"domains": {"resolver": "dns.example:53"}}, "domains.resolver"),
            ({"domains": {"resolver": "127.0.0.1:0"}}, "domains.resolver"),
            ({"domains": {"per_forward": 0}}, "domains.per_forward"),
            ({"domains": {"wildcards": True}}, "domains.wildcards"),
        ):
            with self.assertRaises(ConfigError, msg=repr(data)) as caught:
                parse_config(data)
            self.assertTrue(str(caught.exception).startswith(key), str(caught.exception))


class TXTVerifierTests(TestCase):
    """The proof, asked of a real DNS server on a loopback UDP port."""

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.zone = TXTZone()
        port = start_dns_server(self.zone)
        self.addCleanup(port.stopListening)
        self.verifier = TXTVerifier.for_address(reactor, f"127.0.0.1:{port.getHost().port}")

    @inlineCallbacks
    def test_found_only_with_the_token(self) -> Any:
        """The record must hold the token (one of its values); another value, or none, is not proof."""
        self.zone.set_txt("_rexecpf.app.example", "something-else", "tok3n")
        self.assertTrue((yield self.verifier.verify("app.example", "tok3n")))
        self.assertFalse((yield self.verifier.verify("app.example", "other")))
        self.assertFalse((yield self.verifier.verify("none.example", "tok3n")))
        self.assertIn("_rexecpf.app.example", self.zone.asked)

    @inlineCallbacks
    def test_no_server_is_not_proof(self) -> Any:
        """A resolver that does not answer: not verified (after the timeout), no exception."""
        from twisted.internet import reactor

        from tests.functional.peers import free_port

        silent = TXTVerifier.for_address(reactor, f"127.0.0.1:{free_port()}")
        self.assertFalse((yield silent.verify("app.example", "tok3n")))


class FakeVerifier:
    """TXT records in a dict: (domain) -> token values."""

    def __init__(self) -> None:
        self.records: dict[str, str] = {}
        self.asked: list[str] = []

    def verify(self, domain: str, token: str) -> Deferred[bool]:
        self.asked.append(domain)
        return succeed(self.records.get(domain) == token)


class DomainAPITests(APITestCase):
    def setUp(self) -> None:
        super().setUp()
        self.verifier = FakeVerifier()
        self.forwards = ForwardService(
            self.clock,
            self.store,
            self.backend,
            LimitsConfig(),
            port_probe=lambda interface, port: port in self.bindable,
            domain_rules=DomainRules.from_config(
                ("alice", "root"), True, 3, "http://example.test:8080", "preview.test"
            ),
            verifier=self.verifier,  # type: ignore[arg-type]
        )
        self.forwards.startService()
        self.addCleanup(self.forwards.stopService)
        authenticator = Authenticator(
            {"alice": "alice-token", "bob": "bob-token", "root": "root-token", "Carol.X": "carol-token"}, ["root"]
        )
        self.api = API(authenticator, self.forwards, PublicURLs("http://example.test:8080", "preview.test"))
        self.stub = StubTreq(Root(self.api.resource(), Health(self.store, self.backend)))

    def prove(self, domain: str, user: str = "alice") -> None:
        key = self.successResultOf(self.forwards.domain_key())
        self.verifier.records[domain] = verification_token(key, user, domain)

    def put(self, fid: str, domain: str, headers: Any = ALICE, container: str = "c1") -> Any:
        return self.request("PUT", f"/api/containers/{container}/port-forwards/{fid}/domains/{domain}", headers)

    def test_create_with_domains(self) -> None:
        """Domains on create: normalised, the proven one verified, each with its TXT record to make."""
        self.prove("proven.example")
        code, document, _ = self.create(8080, domains=["Proven.Example.", "pending.example"])
        self.assertEqual(code, 201, document)
        jsonschema.validate(document, _schema("PortForward"))
        key = self.successResultOf(self.forwards.domain_key())
        self.assertEqual(
            document["domains"],
            [
                {"domain": "proven.example", "verified": True, "url": "http://proven.example:8080/",
                 "verification": {"type": "TXT", "name": "_rexecpf.proven.example",
                                  "value": verification_token(key, "alice", "proven.example")}},
                {"domain": "pending.example", "verified": False, "url": "http://pending.example:8080/",
                 "verification": {"type": "TXT", "name": "_rexecpf.pending.example",
                                  "value": verification_token(key, "alice", "pending.example")}},
            ],
        )
        self.assertEqual(self.forwards.host_forward("proven.example"), document["id"])
        self.assertIsNone(self.forwards.host_forward("pending.example"))
        self.assertTrue(self.successResultOf(self.forwards.domain_claimed("PROVEN.example")))
        self.assertFalse(self.successResultOf(self.forwards.domain_claimed("pending.example")))
        self.assertFalse(self.successResultOf(self.forwards.domain_claimed("not a name")))

    def test_create_errors(self) -> None:
        """Each bad domain or slug on create is its own 4xx."""
        for extra, code, message, headers in (
            ({"domains": "app.example"}, 400, "Invalid request", ALICE),
            ({"domains": ["app..example"]}, 400, "Invalid domain", ALICE),
            ({"domains": ["a.example", "A.example"]}, 400, "Invalid domain", ALICE),
            ({"domains": ["example.test"]}, 400, "Invalid domain", ALICE),  # public_url's host
            ({"domains": ["x.preview.test"]}, 400, "Invalid domain", ALICE),
            ({"domains": ["a.example", "b.example", "c.example", "d.example"]}, 429, "Too many domains", ALICE),
            ({"domains": ["app.example"]}, 403, "Custom domains not allowed", BOB),
            ({"slug": "Web"}, 400, "Invalid slug", ALICE),
            ({"slug": "my--web"}, 400, "Invalid slug", ALICE),
        ):
            container = "bobs" if headers is BOB else "c1"
            self.assertError(self.create(8080, container=container, headers=headers, **extra), code, message)
        self.assertEqual(self.store.forwards, {})

    def test_claims(self) -> None:
        """A verified domain is one forward's: 409 for any other, until that forward is gone."""
        self.prove("app.example")
        first = self.create(8080, domains=["app.example"])[1]
        self.assertError(self.create(8081, domains=["app.example"]), 409, "Domain already claimed")
        self.prove("app.example", "root")
        self.assertError(self.create(9000, container="bobs", headers=ROOT, domains=["app.example"]),
                         409, "Domain already claimed")
        self.assertEqual(self.request("DELETE", f"/api/containers/c1/port-forwards/{first['id']}", ALICE)[0], 204)
        self.assertIsNone(self.forwards.host_forward("app.example"))
        self.prove("app.example")
        second = self.create(8081, domains=["app.example"])[1]
        self.assertEqual(self.forwards.host_forward("app.example"), second["id"])

    def test_unverified_does_not_block_others(self) -> None:
        """Naming a domain one cannot prove squats nothing: the user who proves it gets it."""
        squatter = self.create(9000, container="bobs", headers=ROOT, domains=["app.example"])[1]
        self.assertFalse(squatter["domains"][0]["verified"])
        self.prove("app.example")
        owner = self.create(8080, domains=["app.example"])[1]
        self.assertTrue(owner["domains"][0]["verified"])
        self.prove("app.example", "bob")  # (root's forward: bob's container, claimed for its owner)
        self.assertError(self.put(squatter["id"], "app.example", ROOT, "bobs"), 409, "Domain already claimed")

    def test_put_get_delete(self) -> None:
        """PUT adds (201, Location) then re-checks (200); GET reads; DELETE removes (204) and unroutes."""
        fid = self.create(8080)[1]["id"]
        code, document, headers = self.put(fid, "App.Example")
        self.assertEqual(code, 201)
        jsonschema.validate(document, _schema("Domain"))
        self.assertFalse(document["verified"])
        self.assertEqual(headers.getRawHeaders("location"), [f"/api/containers/c1/port-forwards/{fid}/domains/app.example"])
        self.prove("app.example")
        code, document, _ = self.put(fid, "app.example")
        self.assertEqual((code, document["verified"]), (200, True))
        self.assertEqual(self.forwards.host_forward("app.example"), fid)
        path = f"/api/containers/c1/port-forwards/{fid}/domains"
        code, listed, _ = self.request("GET", path, ALICE)
        self.assertEqual((code, [d["domain"] for d in listed]), (200, ["app.example"]))
        jsonschema.validate(listed, _schema("Domain", array=True))
        self.assertEqual(self.request("GET", path + "/APP.example", ALICE)[1], document)
        self.assertEqual(self.request("DELETE", path + "/app.example", ALICE)[0], 204)
        self.assertIsNone(self.forwards.host_forward("app.example"))
        self.assertError(self.request("DELETE", path + "/app.example", ALICE), 404, "Domain not found")
        self.assertError(self.request("GET", path + "/app.example", ALICE), 404, "Domain not found")
        self.assertEqual(self.request("GET", f"/api/containers/c1/port-forwards/{fid}", ALICE)[1]["domains"], [])

    def test_put_errors(self) -> None:
        """PUT: 404s first, then 403, 400, 429; someone else's forward is 404."""
        fid = self.create(8080)[1]["id"]
        bobs = self.create(9000, container="bobs", headers=BOB)[1]["id"]
        self.assertError(self.put(fid, "app.example", BOB), 404, "Container not found")
        self.assertError(self.put("pf_nope", "app.example"), 404, "Port forward not found")
        self.assertError(self.put(bobs, "app.example", BOB, "bobs"), 403, "Custom domains not allowed")
        self.assertError(self.put(fid, "bad_name.example"), 400, "Invalid domain")
        self.assertError(self.put(fid, "pf-x.preview.test"), 400, "Invalid domain")
        for name in ("a.example", "b.example", "c.example"):
            self.assertEqual(self.put(fid, name)[0], 201)
        self.assertError(self.put(fid, "d.example"), 429, "Too many domains")
        self.assertEqual(self.put(fid, "a.example")[0], 200)
        self.assertError(self.request("POST", f"/api/containers/c1/port-forwards/{fid}/domains/a.example", ALICE),
                         405, "Method not allowed")

    def test_slug(self) -> None:
        """A slug gives proxy_url its stable host; the same user cannot reuse it while it lives (409)."""
        code, document, _ = self.create(8080, slug="web")
        self.assertEqual(code, 201)
        jsonschema.validate(document, _schema("PortForward"))
        self.assertEqual((document["slug"], document["proxy_url"]), ("web", "http://web--alice.preview.test:8080/"))
        self.assertEqual(self.forwards.host_forward("web--alice.preview.test"), document["id"])
        self.assertTrue(self.successResultOf(self.forwards.domain_claimed("web--alice.preview.test")))
        self.assertFalse(self.successResultOf(self.forwards.domain_claimed("web--bob.preview.test")))
        label = document["id"].replace("_", "-")
        self.assertTrue(self.successResultOf(self.forwards.domain_claimed(f"{label}.preview.test")))
        self.assertError(self.create(8081, container="c2", slug="web"), 409, "Slug already in use")
        self.assertEqual(self.create(9000, container="bobs", headers=BOB, slug="web")[0], 201)
        # the container restarts: its forwards go, a new one takes the name
        self.backend.stop("c1")
        self.assertIsNone(self.forwards.host_forward("web--alice.preview.test"))
        self.backend.add("c1", "alice")
        again = self.create(8080, slug="web")[1]
        self.assertEqual(self.forwards.host_forward("web--alice.preview.test"), again["id"])

    def test_slug_needs_a_label_safe_user(self) -> None:
        """A user whose name cannot be in a host name gets a clear 400 for a slug."""
        self.backend.add("carols", "Carol.X")
        headers = {"Authorization": "Bearer carol-token"}
        self.assertError(self.create(8080, container="carols", headers=headers, slug="web"), 400, "Invalid slug")
        self.assertEqual(self.create(8080, container="carols", headers=headers)[0], 201)

    def test_update_from_another_node(self) -> None:
        """A domain verified on another node (an update change) is routed here at once; removed, it is not."""
        import attrs

        fid = self.create(8080)[1]["id"]
        forward = self.forwards.cached(fid)
        assert forward is not None
        verified = attrs.evolve(forward, domains=("app.example",), verified_domains=("app.example",))
        self.forwards.apply(Change(rev=10, op=UPDATE, forward=verified))
        self.assertEqual(self.forwards.host_forward("app.example"), fid)
        self.forwards.apply(Change(rev=11, op=UPDATE, forward=forward))
        self.assertIsNone(self.forwards.host_forward("app.example"))

    def test_store_miss_is_read(self) -> None:
        """A domain claimed in the store but not heard of here is found by one (bounded) store read."""
        import attrs

        fid = self.create(8080)[1]["id"]
        stored = self.store.forwards[fid]
        self.store.forwards[fid] = attrs.evolve(stored, domains=("late.example",), verified_domains=("late.example",))
        self.assertTrue(self.successResultOf(self.forwards.domain_claimed("late.example")))
        self.assertEqual(self.forwards.host_forward("late.example"), fid)


class NoVerifyTests(SynchronousTestCase):
    def test_verify_off_claims_at_once(self) -> None:
        """With [domains] verify = false a permitted user's domain is verified (claimed, routed) at once."""
        clock = Clock()
        backend = FakeBackend()
        backend.add("c1", "alice")
        forwards = ForwardService(
            clock, MemoryForwardStore(), backend, LimitsConfig(), port_probe=lambda i, p: True,
            domain_rules=DomainRules.from_config(("*",), False, 10, "http://example.test", ""),
        )
        forwards.startService()
        from rexecpf.model import Principal

        forward = self.successResultOf(
            forwards.create(Principal("alice"), "c1", b'{"container_port": 80, "domains": ["app.example"]}')
        )
        self.assertEqual(forward.verified_domains, ("app.example",))
        self.assertEqual(forwards.host_forward("app.example"), forward.id)
        failure = self.failureResultOf(
            forwards.create(Principal("alice"), "c1", b'{"container_port": 81, "slug": "web"}'), APIError
        )
        self.assertEqual(failure.value.message, "Invalid slug")  # no proxy_domain
