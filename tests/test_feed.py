"""
The change feed (:mod:`rexecpf.feed`): payloads; the apply/resync logic of
:class:`ForwardService` driven by :class:`ChangeFollower` on a fake feed and
an injected clock; bounded cache misses.  (The feeds of the real stores:
tests/test_feed_stores.py.)
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from rexecpf.config import LimitsConfig
from rexecpf.feed import (
    CUT_OFF,
    NOTIFY_MAX_BYTES,
    Change,
    ChangeFollower,
    FeedHealth,
    IChangeFeed,
    MissLookups,
    decode_change,
    encode_change,
)
from rexecpf.forwards import CONTAINER_STOPPED, DELETED, ForwardService
from rexecpf.model import STORE_UNAVAILABLE, APIError, PortForward, Principal, new_forward_id
from rexecpf.testing import FakeBackend, MemoryForwardStore

ALICE = Principal("alice")


def forward(fid: str | None = None, container: str = "c1", port: int = 80, local: int = 20050) -> PortForward:
    return PortForward(
        id=fid or new_forward_id(), container_id=container, container_port=port, local_port=local,
        name="web", created_ms=1, owner="alice",
    )


@implementer(IChangeFeed)
class FakeFeed:
    def __init__(self) -> None:
        self.receive: Any = None
        self.connected: Any = None
        self.stopped = False

    def start(self, receive: Any, connected: Any) -> None:
        self.receive, self.connected = receive, connected

    def stop(self) -> Deferred[None]:
        self.stopped = True
        return succeed(None)


class Recorder:
    """A ForwardObserver (as the local_port listeners are)."""

    def __init__(self) -> None:
        self.added: list[str] = []
        self.removed: list[tuple[str, str]] = []

    def forward_added(self, forward: PortForward) -> None:
        self.added.append(forward.id)

    def forward_removed(self, forward: PortForward, reason: str) -> None:
        self.removed.append((forward.id, reason))


class Connection:
    def __init__(self) -> None:
        self.closed: list[str] = []

    def shutdown(self, reason: str) -> None:
        self.closed.append(reason)


class SlowSnapshotStore(MemoryForwardStore):
    """A store whose snapshots answer when the test says."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[tuple[Deferred[Any], tuple[int, list[PortForward]]]] = []
        self.hold = False

    def snapshot(self) -> Deferred[tuple[int, list[PortForward]]]:
        if not self.hold:
            return super().snapshot()
        d: Deferred[Any] = Deferred()
        self.pending.append((d, (self.rev, self._ordered())))
        return d

    def release(self) -> None:
        pending, self.pending = self.pending, []
        for d, result in pending:
            d.callback(result)


class FollowerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_795_000_000)
        self.store = SlowSnapshotStore()
        self.backend = FakeBackend()
        self.backend.add("c1", "alice")
        self.backend.add("c2", "alice")
        self.forwards = ForwardService(
            self.clock, self.store, self.backend, LimitsConfig(local_ports=(20000, 20099)),
            port_probe=lambda interface, port: True,
        )
        self.seen = Recorder()
        self.forwards.observe(self.seen)
        self.forwards.startService()
        self.addCleanup(self.forwards.stopService)
        self.feed = FakeFeed()
        self.follower = ChangeFollower(self.clock, self.feed, self.forwards, resync_seconds=30, grace_seconds=10)
        self.follower.startService()
        self.addCleanup(self.follower.stopService)
        self.feed.connected(True)
        self.assertEqual(self.follower.rev, 0)

    def elsewhere(self, op: str, **fields: Any) -> Change:
        """A change another node committed (written to the store, and its change made)."""
        self.store.rev += 1
        if op == "add":
            self.store.forwards[fields["forward"].id] = fields["forward"]
        else:
            for fid in fields.get("ids", ()):
                self.store.forwards.pop(fid, None)
        return Change(rev=self.store.rev, op=op, **fields)

    def reach(self, fid: str) -> Any:
        return self.successResultOf(self.forwards.reach(ALICE, fid))

    def refused(self, fid: str) -> int:
        return self.failureResultOf(self.forwards.reach(ALICE, fid), APIError).value.code

    def test_payload_round_trip(self) -> None:
        """Every kind of change survives its JSON payload; anything else is refused."""
        one = forward()
        for change in [
            Change(rev=1, op="add", forward=one),
            Change(rev=2, op="delete", ids=(one.id,)),
            Change(rev=3, op="reap", ids=(one.id, "pf_x"), container_id="c1"),
            Change(rev=4, op="reap", container_id="c1"),
        ]:
            payload = encode_change(change.rev, change.op, change.forward, change.ids, change.container_id)
            self.assertEqual(decode_change(payload), change)
        for bad in ['{"v":2,"rev":1,"op":"add"}', '{"v":1,"op":"add"}', '{"v":1,"rev":1,"op":"drop"}', "[]", "x"]:
            self.assertRaises(ValueError, decode_change, bad)

    def test_add_elsewhere_is_kept_and_listened_on_once(self) -> None:
        """A forward added on another node is usable here at once, announced once even if heard twice."""
        other = forward()
        change = self.elsewhere("add", forward=other)
        self.feed.receive(change)
        self.feed.receive(change)
        self.assertEqual(self.seen.added, [other.id])
        self.assertEqual(self.reach(other.id)[0], other)
        self.assertEqual(self.follower.rev, 1)

    def test_delete_elsewhere_closes_connections(self) -> None:
        """A delete on another node closes this node's connections of the forward and its listener."""
        other = forward()
        self.feed.receive(self.elsewhere("add", forward=other))
        tunnel, unrelated = Connection(), Connection()
        self.forwards.track(other.id, tunnel, "alice", "tunnel")
        self.forwards.track("pf_unrelated", unrelated)
        self.feed.receive(self.elsewhere("delete", ids=(other.id,)))
        self.assertEqual(tunnel.closed, [DELETED])
        self.assertEqual(unrelated.closed, [])
        self.assertEqual(self.seen.removed, [(other.id, DELETED)])
        self.assertEqual(self.refused(other.id), 404)

    def test_reap_elsewhere_closes_every_forward_of_the_container(self) -> None:
        """A reap names its ids, and also drops forwards of that container this node alone knew of."""
        first, second, kept = forward(), forward(port=81, local=20051), forward(container="c2", local=20052)
        for one in (first, second, kept):
            self.feed.receive(self.elsewhere("add", forward=one))
        connection = Connection()
        self.forwards.track(second.id, connection)
        self.feed.receive(self.elsewhere("reap", ids=(first.id,), container_id="c1"))
        self.assertEqual(connection.closed, [CONTAINER_STOPPED])
        self.assertEqual(sorted(f.id for f in self.forwards.forwards()), [kept.id])

    def test_own_create_then_its_echo(self) -> None:
        """This node's create comes back through the feed: announced once, kept."""
        self.store.hold = False
        created = self.successResultOf(self.forwards.create(ALICE, "c1", b'{"container_port": 80}'))
        self.feed.receive(Change(rev=self.store.rev, op="add", forward=created))
        self.assertEqual(self.seen.added, [created.id])
        self.assertEqual(self.forwards.cached(created.id), created)

    def test_echo_before_own_create_finishes(self) -> None:
        """The feed may bring this node's forward before its create ends: announced once all the same."""
        original = self.store.add

        def add(new: PortForward, limit: int, stop_mark: int | None = None) -> Deferred[PortForward]:
            result = original(new, limit, stop_mark)
            self.feed.receive(Change(rev=self.store.rev, op="add", forward=new))
            return result

        self.store.add = add  # type: ignore[method-assign]
        created = self.successResultOf(self.forwards.create(ALICE, "c1", b'{"container_port": 80}'))
        self.assertEqual(self.seen.added, [created.id])

    def test_reaped_elsewhere_while_creating(self) -> None:
        """Another node reaps the container between this node's write and its answer: 409, not kept."""
        original = self.store.add

        def add(new: PortForward, limit: int, stop_mark: int | None = None) -> Deferred[PortForward]:
            result = original(new, limit, stop_mark)
            self.feed.receive(Change(rev=self.store.rev, op="add", forward=new))
            self.feed.receive(self.elsewhere("reap", ids=(new.id,), container_id="c1"))
            return result

        self.store.add = add  # type: ignore[method-assign]
        failure = self.failureResultOf(self.forwards.create(ALICE, "c1", b'{"container_port": 80}'), APIError)
        self.assertEqual(failure.value.code, 409)
        self.assertEqual(self.forwards.forwards(), [])

    def test_old_changes_ignored_and_a_gap_resyncs(self) -> None:
        """
        Changes at or below the revision read are ignored; one that skips a
        revision (a notification lost) makes the node read the store again.
        """
        lost, heard = forward(), forward(local=20051)
        self.elsewhere("add", forward=lost)  # never heard of
        change = self.elsewhere("add", forward=heard)
        resyncs = self.follower.resyncs
        self.feed.receive(change)
        self.assertEqual(self.follower.resyncs, resyncs + 1)
        self.assertEqual(sorted(self.seen.added), sorted([lost.id, heard.id]))
        self.assertEqual(self.follower.rev, 2)
        self.feed.receive(Change(rev=1, op="delete", ids=(lost.id,)))
        self.assertIsNotNone(self.forwards.cached(lost.id))

    def test_change_too_big_to_carry_its_forward(self) -> None:
        """
        An add or update too big for NOTIFY names only its forward's id: the
        node reads the store again and knows the forward as it is stored.
        """
        big = attrs.evolve(forward(), domains=tuple(f"{i}-{'d' * 240}.example" for i in range(40)))
        change = self.elsewhere("add", forward=big)
        payload = encode_change(change.rev, change.op, big, max_bytes=NOTIFY_MAX_BYTES)
        self.assertLessEqual(len(payload.encode()), NOTIFY_MAX_BYTES)
        small = forward()
        self.assertEqual(decode_change(encode_change(1, "add", small, max_bytes=NOTIFY_MAX_BYTES)).forward, small)
        self.feed.receive(decode_change(payload))
        self.assertEqual(self.forwards.cached(big.id), big)
        self.assertEqual(self.seen.added, [big.id])
        self.assertEqual(self.follower.rev, change.rev)
        bigger = attrs.evolve(big, verified_domains=big.domains)
        self.store.rev += 1
        self.store.forwards[big.id] = bigger
        self.feed.receive(decode_change(encode_change(self.store.rev, "update", bigger, max_bytes=NOTIFY_MAX_BYTES)))
        self.assertEqual(self.forwards.cached(big.id), bigger)
        self.assertEqual(self.follower.rev, self.store.rev)

    def test_tombstones_are_bounded(self) -> None:
        """
        Removed forwards are remembered for a while, but never more than
        MAX_TOMBSTONES of them (a create and delete loop), the oldest
        forgotten first.
        """
        from rexecpf import forwards as module

        self.patch(module, "MAX_TOMBSTONES", 5)
        removed = [new_forward_id() for _ in range(12)]
        for fid in removed:
            self.feed.receive(self.elsewhere("delete", ids=(fid,)))
        self.assertEqual(list(self.forwards._tombstones), removed[-5:])

    def test_resync_applies_the_differences(self) -> None:
        """On every (re)connection: stored forwards not known are kept, known ones no longer stored dropped."""
        gone, new = forward(), forward(local=20051)
        self.feed.receive(self.elsewhere("add", forward=gone))
        connection = Connection()
        self.forwards.track(gone.id, connection)
        # Missed while disconnected:
        self.feed.connected(False)
        self.elsewhere("delete", ids=(gone.id,))
        self.elsewhere("add", forward=new)
        self.feed.connected(True)
        self.assertEqual(connection.closed, [DELETED])
        self.assertEqual([f.id for f in self.forwards.forwards()], [new.id])
        self.assertEqual(self.follower.rev, self.store.rev)

    def test_resync_every_period(self) -> None:
        """Every resync_seconds the store is read again, even with a healthy feed."""
        missed = forward()
        self.elsewhere("add", forward=missed)
        self.clock.advance(29)
        self.assertIsNone(self.forwards.cached(missed.id))
        self.clock.advance(1)
        self.assertEqual(self.forwards.cached(missed.id), missed)

    def test_changes_during_a_resync_wait_for_it(self) -> None:
        """
        Changes heard while the store is being read are applied after it (those
        the read saw, ignored); a forward created here meanwhile (after the
        read began) is not dropped by the older read.
        """
        self.store.hold = True
        self.follower.resync()
        added_during = self.elsewhere("add", forward=forward())
        self.feed.receive(added_during)
        self.store.hold = False
        mine = self.successResultOf(self.forwards.create(ALICE, "c1", b'{"container_port": 81}'))
        deleted_during = self.elsewhere("delete", ids=(added_during.forward.id,))  # type: ignore[union-attr]
        self.feed.receive(deleted_during)
        self.assertEqual(self.forwards.cached(added_during.forward.id), None)  # type: ignore[union-attr]
        self.store.pending[0] = (self.store.pending[0][0], (0, []))  # read before all of them
        self.store.release()
        self.assertEqual([f.id for f in self.forwards.forwards()], [mine.id])
        self.assertEqual(self.follower.rev, self.store.rev)

    def test_cut_off(self) -> None:
        """
        The feed goes down: /healthz fails at once; after the grace period
        every connection is closed and new ones are refused (503); back and
        resynced, they are taken again.
        """
        one = forward()
        self.feed.receive(self.elsewhere("add", forward=one))
        connection = Connection()
        self.forwards.track(one.id, connection)
        health = FeedHealth(self.follower, self.store)
        self.successResultOf(health.check())
        self.feed.connected(False)
        self.assertEqual(self.failureResultOf(health.check(), APIError).value.code, 503)
        self.clock.advance(9.9)
        self.assertEqual(connection.closed, [])
        self.reach(one.id)
        self.clock.advance(0.1)
        self.assertEqual(connection.closed, [CUT_OFF])
        self.assertEqual(self.refused(one.id), 503)
        self.feed.connected(True)
        self.successResultOf(health.check())
        self.assertEqual(self.reach(one.id)[0], one)

    def test_a_failed_resync_is_retried_soon_when_cut_off(self) -> None:
        """Back after a cut-off, the first resync fails: tried again within a second, then connections are taken."""
        self.feed.connected(False)
        self.clock.advance(10)
        failing = [True]
        original = self.store.snapshot

        def snapshot() -> Deferred[Any]:
            if failing.pop(0) if failing else False:
                return fail(APIError(STORE_UNAVAILABLE, "still starting"))
            return original()

        self.store.snapshot = snapshot  # type: ignore[method-assign]
        self.feed.connected(True)
        self.failureResultOf(self.follower.check(), APIError)
        self.clock.advance(1)
        self.successResultOf(self.follower.check())
        self.assertEqual(self.refused("pf_" + "b" * 24), 404)

    def test_back_within_grace_closes_nothing(self) -> None:
        """A short outage (a database restart) closes nothing."""
        one = forward()
        self.feed.receive(self.elsewhere("add", forward=one))
        connection = Connection()
        self.forwards.track(one.id, connection)
        self.feed.connected(False)
        self.clock.advance(5)
        self.feed.connected(True)
        self.clock.advance(60)
        self.assertEqual(connection.closed, [])
        self.assertEqual(self.reach(one.id)[0], one)

    def test_never_connected_is_cut_off(self) -> None:
        """A node whose feed never connects is cut off after the grace period too."""
        feed = FakeFeed()
        follower = ChangeFollower(self.clock, feed, self.forwards, resync_seconds=30, grace_seconds=10)
        follower.startService()
        self.addCleanup(follower.stopService)
        self.clock.advance(10)
        self.failureResultOf(follower.check(), APIError)
        self.assertEqual(self.refused("pf_" + "a" * 24), 503)

    def test_health_waits_for_the_first_resync(self) -> None:
        """A node just started: /healthz waits for the feed's first connection instead of answering 503."""
        feed = FakeFeed()
        follower = ChangeFollower(self.clock, feed, self.forwards, resync_seconds=30, grace_seconds=10)
        follower.startService()
        self.addCleanup(follower.stopService)
        waiting, late = follower.check(), follower.check()
        self.assertNoResult(waiting)
        feed.connected(True)
        self.successResultOf(waiting)
        self.successResultOf(late)
        never = ChangeFollower(self.clock, FakeFeed(), self.forwards, resync_seconds=30, grace_seconds=10)
        never.startService()
        self.addCleanup(never.stopService)
        waiting = never.check()
        self.clock.advance(10)
        self.assertEqual(self.failureResultOf(waiting, APIError).value.code, 503)

    def test_stop_stops_the_feed(self) -> None:
        self.successResultOf(self.follower.stopService())
        self.assertTrue(self.feed.stopped)

    def test_cache_miss_reads_the_store(self) -> None:
        """
        A forward created elsewhere and not heard of yet: the first connection
        reads the store and finds it (and keeps it); a deleted one stays gone.
        """
        unheard = forward()
        self.elsewhere("add", forward=unheard)
        self.assertEqual(self.reach(unheard.id)[0], unheard)
        self.assertEqual(self.seen.added, [unheard.id])
        target = self.successResultOf(self.forwards.target(unheard.id))
        self.assertEqual(target[0], unheard)
        deleted = forward(local=20051)
        self.feed.receive(self.elsewhere("add", forward=deleted))
        self.feed.receive(self.elsewhere("delete", ids=(deleted.id,)))
        self.store.forwards[deleted.id] = deleted  # a late read would still see it
        self.assertEqual(self.refused(deleted.id), 404)

    def test_create_picks_another_local_port_taken_elsewhere(self) -> None:
        """Another node took the port this one picked (not heard of yet): the create picks the next one."""
        self.store.forwards["pf_other"] = forward("pf_other", container="c2", local=20000)
        created = self.successResultOf(self.forwards.create(ALICE, "c1", b'{"container_port": 80}'))
        self.assertEqual(created.local_port, 20001)

    def test_asked_for_local_port_taken_elsewhere_is_409(self) -> None:
        self.store.forwards["pf_other"] = forward("pf_other", container="c2", local=20007)
        failure = self.failureResultOf(
            self.forwards.create(ALICE, "c1", b'{"container_port": 80, "local_port": 20007}'), APIError
        )
        self.assertEqual(failure.value.code, 409)


class MissLookupsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.reads: list[str] = []
        self.answers: dict[str, Deferred[PortForward | None]] = {}

        def read(fid: str) -> Deferred[PortForward | None]:
            self.reads.append(fid)
            d: Deferred[PortForward | None] = Deferred()
            self.answers[fid] = d
            return d

        self.misses = MissLookups(self.clock, read, per_second=5, negative_seconds=1.0, max_negative=3)

    def test_one_read_at_a_time_per_id(self) -> None:
        first, second = self.misses.lookup("a"), self.misses.lookup("a")
        self.assertEqual(self.reads, ["a"])
        one = forward()
        self.answers["a"].callback(one)
        self.assertEqual((self.successResultOf(first), self.successResultOf(second)), (one, one))

    def test_missing_is_remembered_for_a_while(self) -> None:
        self.misses.lookup("a")
        self.answers["a"].callback(None)
        self.assertIsNone(self.successResultOf(self.misses.lookup("a")))
        self.assertEqual(self.reads, ["a"])
        self.clock.advance(1)
        self.misses.lookup("a")
        self.assertEqual(self.reads, ["a", "a"])

    def test_reads_per_second_are_bounded(self) -> None:
        """Random ids: at most per_second reads a second; beyond, not found without a read."""
        answers = [self.misses.lookup(f"id{i}") for i in range(50)]
        self.assertEqual(len(self.reads), 5)
        self.assertEqual([self.successResultOf(d) for d in answers[5:]], [None] * 45)
        self.clock.advance(1)
        self.misses.lookup("later")
        self.assertEqual(len(self.reads), 6)

    def test_negative_cache_is_bounded(self) -> None:
        for i in range(10):
            self.misses.lookup(f"id{i}")
            self.answers[f"id{i}"].callback(None)
            self.clock.advance(0.01 if i % 4 else 1)
        self.assertLessEqual(len(self.misses._negative), 3)
