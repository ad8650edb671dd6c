"""
The change feeds of the real stores, one suite run on SQLite (two stores on
one file: two processes) and on a real PostgreSQL (two stores on one
database: two nodes), on the real reactor: every committed write of either
store is delivered, in revision order, with the revision the store's
snapshot reports.  Without PostgreSQL its tests skip, except under
``CI=true`` where they fail.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
import time
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from rexecpf.feed import Change, IChangeFeed, PostgresChangeFeed, SQLiteChangeFeed
from rexecpf.model import PortForward, new_forward_id
from rexecpf.store import SQLiteForwardStore, open_sqlite_for_check
from tests.functional.pgcluster import fresh_database, require_postgres


def forward(container: str = "c1", port: int = 80, local: int = 20000) -> PortForward:
    return PortForward(
        id=new_forward_id(), container_id=container, container_port=port, local_port=local,
        name="n" * 100, created_ms=int(time.time() * 1000), owner="alice",
    )


@defer.inlineCallbacks
def until(condition: Any, timeout: float = 5.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        yield deferLater(reactor, 0.02, lambda: None)


class FeedBehaviour:
    """Mixed into a TestCase that provides ``make_store()`` and ``make_feed()``."""

    def make_store(self) -> Any:
        raise NotImplementedError

    def make_feed(self) -> IChangeFeed:
        raise NotImplementedError

    @defer.inlineCallbacks
    def listen(self) -> Any:
        self.changes: list[Change] = []
        self.states: list[bool] = []
        feed = self.make_feed()
        feed.start(self.changes.append, self.states.append)
        self.addCleanup(feed.stop)  # type: ignore[attr-defined]
        yield until(lambda: self.states == [True], what="the feed connects")
        return feed

    @defer.inlineCallbacks
    def test_every_write_of_every_node_is_delivered_in_order(self) -> Any:
        """
        Adds, a delete and a reap, from two stores (nodes) on one database,
        arrive in revision order, each once; the snapshot's revision is the
        last one; a write that changes nothing publishes nothing.
        """
        one, two = self.make_store(), self.make_store()
        yield self.listen()
        first, second, third = forward(), forward(port=81, local=20001), forward("c2", local=20002)
        yield one.add(first, 10)
        yield two.add(second, 10)
        yield one.add(third, 10)
        self.assertTrue((yield two.remove(third.id)))
        self.assertFalse((yield two.remove(third.id)))
        removed = yield one.remove_container("c1")
        yield until(lambda: len(self.changes) == 5, what="five changes")
        revs = [change.rev for change in self.changes]
        self.assertEqual(revs, list(range(revs[0], revs[0] + 5)))
        self.assertEqual(
            [(c.op, c.forward, c.ids, c.container_id) for c in self.changes],
            [
                ("add", first, (), None),
                ("add", second, (), None),
                ("add", third, (), None),
                ("delete", None, (third.id,), None),
                ("reap", None, tuple(f.id for f in removed), "c1"),
            ],
        )
        self.assertEqual(sorted(f.id for f in removed), sorted([first.id, second.id]))
        rev, stored = yield two.snapshot()
        self.assertEqual((rev, stored), (revs[-1], []))
        yield deferLater(reactor, 0.5, lambda: None)
        self.assertEqual(len(self.changes), 5)

    @defer.inlineCallbacks
    def test_refused_writes_publish_nothing(self) -> Any:
        """A create the store refuses (its invariants) publishes no change and bumps no revision."""
        store = self.make_store()
        yield self.listen()
        yield store.add(forward(), 10)
        yield self.assertFailure(store.add(forward(local=20001), 10), Exception)  # same container port
        rev, _ = yield store.snapshot()
        yield until(lambda: len(self.changes) == 1)
        self.assertEqual(self.changes[0].rev, rev)

    @defer.inlineCallbacks
    def test_stop_is_prompt(self) -> Any:
        """The feed stops within a second, and delivers nothing after."""
        store = self.make_store()
        feed = yield self.listen()
        started = time.monotonic()
        yield feed.stop()
        self.assertLess(time.monotonic() - started, 1.5)
        yield store.add(forward(), 10)
        yield deferLater(reactor, 0.5, lambda: None)
        self.assertEqual(self.changes, [])


class SQLiteFeedTests(FeedBehaviour, TestCase):
    def setUp(self) -> None:
        self.path = os.path.join(tempfile.mkdtemp(prefix="rexecpf-feed-"), "state.sqlite3")
        open_sqlite_for_check(self.path)

    def make_store(self) -> Any:
        store = SQLiteForwardStore(reactor, self.path)
        self.addCleanup(store.close)
        return store

    def make_feed(self) -> IChangeFeed:
        return SQLiteChangeFeed(reactor, reactor, self.path, interval=0.05)

    def data_version(self, connection: sqlite3.Connection) -> int:
        return int(connection.execute("PRAGMA data_version").fetchone()[0])

    @defer.inlineCallbacks
    def test_polling_writes_nothing(self) -> Any:
        """The feed's polls commit nothing to the file (its connection is query_only)."""
        yield self.listen()
        watcher = sqlite3.connect(self.path)
        self.addCleanup(watcher.close)
        before = self.data_version(watcher)
        yield deferLater(reactor, 0.5, lambda: None)
        self.assertEqual(self.data_version(watcher), before)

    @defer.inlineCallbacks
    def test_a_process_far_behind_finds_a_gap(self) -> Any:
        """Only the latest CHANGES_KEPT changes are kept: older ones are pruned (a reader then resyncs)."""
        from rexecpf.feed import CHANGES_KEPT

        store = self.make_store()
        for i in range(3):
            yield store.add(forward(port=100 + i, local=20000 + i), 10)
        connection = sqlite3.connect(self.path)
        self.addCleanup(connection.close)
        with connection:
            connection.execute("UPDATE revision SET rev = rev + ?", (CHANGES_KEPT,))
        yield store.add(forward(port=200, local=20100), 10)
        rows = connection.execute("SELECT rev FROM changes ORDER BY rev").fetchall()
        self.assertEqual(rows, [(CHANGES_KEPT + 4,)])


class PostgresFeedTests(FeedBehaviour, TestCase):
    def setUp(self) -> None:
        require_postgres()
        self.url = fresh_database(self)
        from rexecpf.postgres import open_postgres_for_check

        open_postgres_for_check(self.url)

    def make_store(self) -> Any:
        from rexecpf.postgres import PostgresForwardStore

        store = PostgresForwardStore(reactor, self.url)
        self.addCleanup(store.close)
        return store

    def make_feed(self) -> IChangeFeed:
        return PostgresChangeFeed(reactor, self.url, retry_seconds=0.1)

    @defer.inlineCallbacks
    def test_a_lost_connection_is_reported_and_replaced(self) -> Any:
        """The LISTEN connection is killed: reported down, then up again (the node resyncs), and it hears again."""
        import psycopg

        store = self.make_store()
        yield self.listen()
        with psycopg.connect(self.url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE query LIKE 'LISTEN%%' AND datname = current_database()"
            )
        yield until(lambda: self.states == [True, False, True], what="down, then up")
        yield store.add(forward(), 10)
        yield until(lambda: len(self.changes) == 1, what="a change after the reconnection")
