"""
The store: one behavioural suite run against SQLite (a real file, on the
real reactor's thread pool) and against the in-memory fake.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
from typing import Any

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from rexecpf.model import APIError, PortForward
from rexecpf.store import SCHEMA_VERSION, IForwardStore, SQLiteForwardStore
from rexecpf.testing import MemoryForwardStore


def forward(
    fid: str, container: str = "c1", port: int = 80, local: int = 20000, ms: int = 1, pass_preflight: bool = False
) -> PortForward:
    return PortForward(
        id=fid, container_id=container, container_port=port, local_port=local,
        name=None, created_ms=ms, owner="alice", pass_preflight=pass_preflight,
    )


class StoreBehaviour:
    """Mixed into a TestCase that provides ``make_store()``."""

    store: IForwardStore

    def make_store(self) -> IForwardStore:
        raise NotImplementedError

    def setUp(self) -> None:
        self.store = self.make_store()

    @defer.inlineCallbacks
    def test_add_get_list_remove(self) -> Any:
        """A forward added can be read, listed oldest first, and removed once."""
        yield self.store.add(forward("pf_b", port=81, local=20001, ms=2), 10)
        yield self.store.add(forward("pf_a", port=80, local=20000, ms=1), 10)
        self.assertEqual((yield self.store.get("pf_a")), forward("pf_a"))
        self.assertEqual([f.id for f in (yield self.store.list_forwards("c1"))], ["pf_a", "pf_b"])
        self.assertEqual((yield self.store.list_forwards("other")), [])
        self.assertTrue((yield self.store.remove("pf_a")))
        self.assertFalse((yield self.store.remove("pf_a")))
        self.assertIsNone((yield self.store.get("pf_a")))

    @defer.inlineCallbacks
    def test_pass_preflight_kept(self) -> Any:
        """A forward's pass_preflight is kept, true or false."""
        yield self.store.add(forward("pf_a", pass_preflight=True), 10)
        yield self.store.add(forward("pf_b", port=81, local=20001), 10)
        self.assertEqual((yield self.store.get("pf_a")), forward("pf_a", pass_preflight=True))
        self.assertEqual([f.pass_preflight for f in (yield self.store.list_forwards("c1"))], [True, False])

    @defer.inlineCallbacks
    def test_invariants(self) -> Any:
        """Port taken -> 403, then limit -> 429, then local port taken -> 409."""
        yield self.store.add(forward("pf_1", port=80, local=20000), 2)
        for candidate, code in (
            (forward("pf_2", port=80, local=20001), 403),
            (forward("pf_3", container="c2", port=80, local=20000), 409),
        ):
            error = yield self.assertFailure(self.store.add(candidate, 2), APIError)
            self.assertEqual(error.code, code)
        yield self.store.add(forward("pf_4", port=81, local=20002), 2)
        error = yield self.assertFailure(self.store.add(forward("pf_5", port=82, local=20003), 2), APIError)
        self.assertEqual(error.code, 429)
        error = yield self.assertFailure(self.store.add(forward("pf_6", port=80, local=20003), 2), APIError)
        self.assertEqual(error.code, 403)

    @defer.inlineCallbacks
    def test_remove_container(self) -> Any:
        """Removing a container's forwards returns them and leaves the others."""
        yield self.store.add(forward("pf_1", port=80, local=20000), 10)
        yield self.store.add(forward("pf_2", port=81, local=20001), 10)
        yield self.store.add(forward("pf_3", container="c2", port=80, local=20002), 10)
        removed = yield self.store.remove_container("c1")
        self.assertEqual({f.id for f in removed}, {"pf_1", "pf_2"})
        self.assertEqual([f.id for f in (yield self.store.list_forwards())], ["pf_3"])

    @defer.inlineCallbacks
    def test_secret_is_stable(self) -> Any:
        """A named secret is 32 random bytes, the same every time it is asked for."""
        first = yield self.store.secret("session")
        self.assertEqual(len(first), 32)
        self.assertEqual((yield self.store.secret("session")), first)
        self.assertNotEqual((yield self.store.secret("other")), first)

    @defer.inlineCallbacks
    def test_concurrent_adds(self) -> Any:
        """Many adds at once never break the limit or the port rule."""
        attempts = [
            self.store.add(forward(f"pf_{i}", port=1000 + i % 15, local=20000 + i), 10)
            for i in range(40)
        ]
        results = yield defer.DeferredList(attempts, consumeErrors=True)
        codes = sorted(201 if ok else value.value.code for ok, value in results)
        self.assertEqual(codes.count(201), 10)
        stored = yield self.store.list_forwards("c1")
        self.assertEqual(len(stored), 10)
        self.assertEqual(len({f.container_port for f in stored}), 10)


class MemoryStoreTests(StoreBehaviour, TestCase):
    def make_store(self) -> IForwardStore:
        return MemoryForwardStore()


class SQLiteStoreTests(StoreBehaviour, TestCase):
    def make_store(self) -> IForwardStore:
        self.path = os.path.join(tempfile.mkdtemp(prefix="rexecpf-store-"), "state.sqlite3")
        store = SQLiteForwardStore(reactor, self.path)
        self.addCleanup(store.close)
        return store

    @defer.inlineCallbacks
    def test_durable_and_versioned(self) -> Any:
        """The file is WAL, carries the schema version, and a new store reads what was written."""
        yield self.store.add(forward("pf_1"), 10)
        yield self.store.secret("session")
        connection = sqlite3.connect(self.path)
        self.addCleanup(connection.close)
        self.assertEqual(connection.execute("PRAGMA journal_mode").fetchone()[0], "wal")
        self.assertEqual(connection.execute("PRAGMA user_version").fetchone()[0], SCHEMA_VERSION)
        again = SQLiteForwardStore(reactor, self.path)
        self.addCleanup(again.close)
        self.assertEqual((yield again.get("pf_1")), forward("pf_1"))

    @defer.inlineCallbacks
    def test_migrated_from_version_1(self) -> Any:
        """
        A state file of schema version 1 (before pass_preflight) is migrated
        when opened: its forwards are kept, with pass_preflight false.
        """
        path = os.path.join(os.path.dirname(self.path), "version1.sqlite3")
        old = sqlite3.connect(path)
        old.execute(
            "CREATE TABLE forwards (id TEXT PRIMARY KEY, container_id TEXT NOT NULL, "
            "container_port INTEGER NOT NULL, local_port INTEGER NOT NULL UNIQUE, name TEXT, "
            "created_ms INTEGER NOT NULL, owner TEXT NOT NULL DEFAULT '', UNIQUE (container_id, container_port))"
        )
        old.execute("CREATE TABLE secrets (name TEXT PRIMARY KEY, value BLOB NOT NULL)")
        old.execute("INSERT INTO forwards VALUES ('pf_1', 'c1', 80, 20000, NULL, 1, 'alice')")
        old.execute("PRAGMA user_version = 1")
        old.commit()
        old.close()
        again = SQLiteForwardStore(reactor, path)
        self.addCleanup(again.close)
        self.assertEqual((yield again.get("pf_1")), forward("pf_1"))
        yield again.add(forward("pf_2", port=81, local=20001, pass_preflight=True), 10)
        self.assertTrue((yield again.get("pf_2")).pass_preflight)
        connection = sqlite3.connect(path)
        self.addCleanup(connection.close)
        self.assertEqual(connection.execute("PRAGMA user_version").fetchone()[0], SCHEMA_VERSION)

    @defer.inlineCallbacks
    def test_refusing_writes(self) -> Any:
        """
        With writes refused (a read-only file): reads answer, every write and
        the health check fail with 503 and change nothing; then writes work again.
        """
        yield self.store.add(forward("pf_1"), 10)
        yield self.store.refuse_writes(True)
        self.assertEqual((yield self.store.get("pf_1")), forward("pf_1"))
        self.assertEqual((yield self.store.list_forwards("c1")), [forward("pf_1")])
        for write in (
            lambda: self.store.add(forward("pf_2", port=81, local=20001), 10),
            lambda: self.store.remove("pf_1"),
            lambda: self.store.remove_container("c1"),
            self.store.check,
        ):
            error = yield self.assertFailure(write(), APIError)
            self.assertEqual((error.code, error.message), (503, "Store unavailable"))
        self.flushLoggedErrors(sqlite3.OperationalError)
        self.assertEqual((yield self.store.list_forwards()), [forward("pf_1")])
        yield self.store.refuse_writes(False)
        yield self.store.check()
        self.assertTrue((yield self.store.remove("pf_1")))
