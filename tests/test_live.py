"""
Live connections tracked by :class:`ForwardService`: by user and kind,
closed per user (a revoked token), and drained on a graceful stop.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from rexecpf.auth import Authenticator
from rexecpf.config import LimitsConfig
from rexecpf.forwards import GOING_AWAY, ForwardService
from rexecpf.model import APIError
from rexecpf.testing import FakeBackend, MemoryForwardStore


class Live:
    """A tracked connection that records why it was shut."""

    def __init__(self, kind: str | None = None) -> None:
        self.reasons: list[str] = []
        if kind is not None:
            self.kind = kind

    def shutdown(self, reason: str) -> None:
        self.reasons.append(reason)


class Drainable(Live):
    """A tracked in-flight request: ``drain()`` fires when the test finishes it."""

    def __init__(self) -> None:
        super().__init__("proxy")
        self.draining: Deferred[None] | None = None

    def drain(self) -> Deferred[None]:
        self.draining = Deferred()
        return self.draining


def make_service() -> tuple[ForwardService, Clock]:
    clock = Clock()
    service = ForwardService(clock, MemoryForwardStore(), FakeBackend(), LimitsConfig(),
                             port_probe=lambda interface, port: True)
    return service, clock


class TrackingTests(SynchronousTestCase):
    def test_counts_by_kind(self) -> None:
        """Live connections are counted per forward and per kind (argument, attribute, or "other")."""
        service, _ = make_service()
        service.track("pf_a", Live(), kind="tunnel")
        service.track("pf_a", Live("listener"))
        untrack = service.track("pf_b", Live())
        self.assertEqual(service.live_counts(), {"tunnel": 1, "listener": 1, "other": 1})
        self.assertEqual(service.live_count("pf_a"), 2)
        self.assertEqual(service.live_count(kind="tunnel"), 1)
        untrack()
        self.assertEqual(service.live_count(), 2)

    def test_shutdown_user(self) -> None:
        """shutdown_user closes that user's connections with the reason, and nobody else's."""
        service, _ = make_service()
        alice1, alice2, bob = Live(), Live(), Live()
        service.track("pf_a", alice1, user="alice")
        service.track("pf_b", alice2, user="alice")
        service.track("pf_a", bob, user="bob")
        self.assertEqual(service.shutdown_user("alice", "token revoked"), 2)
        self.assertEqual((alice1.reasons, alice2.reasons, bob.reasons),
                         (["token revoked"], ["token revoked"], []))
        self.assertEqual(service.live_count(), 1)


class CapTests(SynchronousTestCase):
    """Per-user caps: ``tunnels_per_user`` and ``connections_per_user``."""

    def setUp(self) -> None:
        backend = FakeBackend()
        backend.add("c1", "alice")
        self.service = ForwardService(
            Clock(), MemoryForwardStore(), backend,
            LimitsConfig(tunnels_per_user=2, connections_per_user=1),
            port_probe=lambda interface, port: True,
        )
        self.service.startService()
        alice = Authenticator({"alice": "alice-token"}).require("alice-token")
        self.forward = self.successResultOf(self.service.create(alice, "c1", b'{"container_port": 80}'))

    def assert_over(self, kind: str, user: str | None, key: str) -> None:
        error = self.assertRaises(APIError, self.service.admit, self.forward.id, kind, user)
        self.assertEqual((error.code, error.message), (429, "Limit exceeded"))
        self.assertIn(f"limits.{key}", error.detail)

    def test_tunnels(self) -> None:
        """A user's tunnels up to the cap are admitted, one more is 429; one ending makes room."""
        untrack = [self.service.track(self.forward.id, Live(), user="alice", kind="tunnel") for _ in range(2)]
        self.assert_over("tunnel", "alice", "tunnels_per_user")
        self.service.admit(self.forward.id, "tunnel", "bob")  # nobody else's count
        self.service.admit(self.forward.id, "proxy", "alice")  # nor the other cap
        untrack[0]()
        self.service.admit(self.forward.id, "tunnel", "alice")

    def test_listener_connections_count_for_the_owner(self) -> None:
        """A local_port connection (no user) counts against the forward's owner, with proxied requests."""
        self.service.track(self.forward.id, Live("listener"))
        self.assertEqual(self.service.user_count("alice", "listener"), 1)
        self.assert_over("listener", None, "connections_per_user")
        self.assert_over("proxy", "alice", "connections_per_user")

    def test_shut_connections_are_uncounted(self) -> None:
        """Connections shut by the service (a revoked token, a deleted forward) no longer count."""
        untrack = self.service.track(self.forward.id, Live(), user="alice", kind="proxy")
        self.service.shutdown_user("alice", "token revoked")
        untrack()  # what the connection does once closed: counted once only
        self.assertEqual(self.service.user_count("alice", "proxy"), 0)
        self.service.admit(self.forward.id, "proxy", "alice")

    def test_zero_is_no_cap(self) -> None:
        """A cap of 0 admits any number."""
        self.service.limits = LimitsConfig(connections_per_user=0)
        for _ in range(5):
            self.service.track(self.forward.id, Live(), user="alice", kind="proxy")
        self.service.admit(self.forward.id, "proxy", "alice")


class DrainTests(SynchronousTestCase):
    def test_tunnels_close_at_once_requests_finish(self) -> None:
        """drain() shuts non-drainable connections at once and waits for drainable ones to finish."""
        service, clock = make_service()
        tunnel, request = Live("tunnel"), Drainable()
        service.track("pf_a", tunnel)
        untrack = service.track("pf_a", request)
        done = service.drain(10)
        self.assertEqual(tunnel.reasons, [GOING_AWAY])
        self.assertNoResult(done)
        clock.advance(5)
        untrack()
        assert request.draining is not None
        request.draining.callback(None)
        self.assertIsNone(self.successResultOf(done))
        self.assertEqual(request.reasons, [])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_grace_period_ends(self) -> None:
        """A request still running when the grace period ends is shut with "going away"."""
        service, clock = make_service()
        request = Drainable()
        service.track("pf_a", request)
        done = service.drain(10)
        clock.advance(9.9)
        self.assertNoResult(done)
        clock.advance(0.1)
        self.successResultOf(done)
        self.assertEqual(request.reasons, [GOING_AWAY])
        self.assertEqual(service.live_count(), 0)

    def test_nothing_to_drain(self) -> None:
        """With nothing drainable, drain() fires at once."""
        service, _ = make_service()
        self.successResultOf(service.drain(10))


class AuthenticatorReplaceTests(SynchronousTestCase):
    def test_replace_in_place(self) -> None:
        """replace() swaps users and admins in place and names the users whose token was revoked."""
        auth = Authenticator({"alice": "a-1", "bob": "b-1", "carol": "c-1"}, ["alice"])
        revoked = auth.replace({"alice": "a-1", "bob": "b-2", "dave": "d-1"}, ["dave"])
        self.assertEqual(revoked, {"bob", "carol"})
        self.assertIsNone(auth.authenticate("b-1"))
        self.assertIsNone(auth.authenticate("c-1"))
        self.assertEqual(auth.authenticate("b-2").name, "bob")  # type: ignore[union-attr]
        self.assertFalse(auth.authenticate("a-1").admin)  # type: ignore[union-attr]
        self.assertTrue(auth.authenticate("d-1").admin)  # type: ignore[union-attr]
