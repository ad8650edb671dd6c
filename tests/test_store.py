"""
The store: one behavioural suite run against SQLite (a real file, on the
real reactor's thread pool), a real PostgreSQL (a private cluster started
once for the process, a fresh database for each test) and the in-memory fake.
PostgreSQL also gets concurrency tests across two store instances (two
connection pools: two nodes).  Without PostgreSQL its tests skip, except
under ``CI=true`` where they fail.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import tempfile
from typing import Any

import attrs
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from rexecpf.model import APIError, PortForward
from rexecpf.store import (
    HEALTH_CHECK_SECONDS,
    SCHEMA_VERSION,
    CachedCheck,
    IForwardStore,
    SQLiteForwardStore,
    open_sqlite_for_check,
)
from rexecpf.testing import MemoryForwardStore
from tests.functional import inprocess
from tests.functional.pgcluster import fresh_database, require_postgres, shared_cluster


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
    def test_stop_refuses_a_create_in_flight(self) -> Any:
        """
        A forward whose create read the stop mark before its container's stop
        was recorded is refused (409); another container's is not; a mark
        read after the stop lets it through.
        """
        mark = yield self.store.stop_mark()
        yield self.store.remove_container("c1")
        error = yield self.assertFailure(self.store.add(forward("pf_1"), 10, mark), APIError)
        self.assertEqual((error.code, error.message), (409, "Container not running"))
        yield self.store.add(forward("pf_2", container="c2", local=20001), 10, mark)
        later = yield self.store.stop_mark()
        self.assertGreater(later, mark)
        yield self.store.add(forward("pf_1"), 10, later)
        yield self.store.remove_container("c2")
        self.assertGreater((yield self.store.stop_mark()), later)
        self.assertEqual([f.id for f in (yield self.store.list_forwards())], ["pf_1"])

    @defer.inlineCallbacks
    def test_slug_unique_per_owner(self) -> Any:
        """A slug is kept; the same owner cannot use it twice (409) until that forward is gone; another owner can."""
        named = attrs.evolve(forward("pf_1"), slug="web")
        yield self.store.add(named, 10)
        self.assertEqual((yield self.store.get("pf_1")), named)
        error = yield self.assertFailure(
            self.store.add(attrs.evolve(forward("pf_2", container="c2", local=20001), slug="web"), 10), APIError
        )
        self.assertEqual((error.code, error.message), (409, "Slug already in use"))
        yield self.store.add(attrs.evolve(forward("pf_3", container="c3", local=20002), slug="web", owner="bob"), 10)
        self.assertEqual((yield self.store.find_slug("alice", "web")), named)
        self.assertIsNone((yield self.store.find_slug("carol", "web")))
        yield self.store.remove_container("c1")
        self.assertIsNone((yield self.store.find_slug("alice", "web")))
        yield self.store.add(attrs.evolve(forward("pf_2", container="c2", local=20001), slug="web"), 10)
        self.assertEqual((yield self.store.find_slug("alice", "web")).id, "pf_2")

    @defer.inlineCallbacks
    def test_domains_kept_in_order(self) -> Any:
        """A forward's domains and which are verified are kept, in the order added, and listed."""
        with_domains = attrs.evolve(forward("pf_1"), domains=("b.example", "a.example"), verified_domains=("a.example",))
        yield self.store.add(with_domains, 10)
        self.assertEqual((yield self.store.get("pf_1")), with_domains)
        yield self.store.add(forward("pf_2", port=81, local=20001), 10)
        self.assertEqual(
            [f.domains for f in (yield self.store.list_forwards())], [("b.example", "a.example"), ()]
        )
        self.assertEqual((yield self.store.snapshot())[1][0], with_domains)
        self.assertEqual((yield self.store.find_domain("a.example")), with_domains)
        self.assertIsNone((yield self.store.find_domain("b.example")))  # not verified: not routed

    @defer.inlineCallbacks
    def test_set_and_remove_domain(self) -> Any:
        """set_domain adds, then verifies (never un-verifies); remove_domain takes it away; a gone forward is None."""
        yield self.store.add(forward("pf_1"), 10)
        changed = yield self.store.set_domain("pf_1", "app.example", False, 2)
        self.assertEqual((changed.domains, changed.verified_domains), (("app.example",), ()))
        changed = yield self.store.set_domain("pf_1", "app.example", True, 2)
        self.assertEqual(changed.verified_domains, ("app.example",))
        changed = yield self.store.set_domain("pf_1", "app.example", False, 2)
        self.assertEqual(changed.verified_domains, ("app.example",))
        yield self.store.set_domain("pf_1", "two.example", True, 2)
        error = yield self.assertFailure(self.store.set_domain("pf_1", "three.example", True, 2), APIError)
        self.assertEqual((error.code, error.message), (429, "Too many domains"))
        changed = yield self.store.remove_domain("pf_1", "app.example")
        self.assertEqual((changed.domains, changed.verified_domains), (("two.example",), ("two.example",)))
        self.assertEqual((yield self.store.remove_domain("pf_1", "app.example")), changed)
        self.assertIsNone((yield self.store.set_domain("pf_nope", "x.example", True, 2)))
        self.assertIsNone((yield self.store.remove_domain("pf_nope", "x.example")))

    @defer.inlineCallbacks
    def test_domain_claims(self) -> Any:
        """
        A verified domain belongs to one forward (409 for any other, on add
        and set_domain); a pending one blocks only its owner's other
        forwards; deleting the forward frees its domains.
        """
        yield self.store.add(attrs.evolve(forward("pf_1"), domains=("app.example",), verified_domains=("app.example",)), 10)
        yield self.store.add(forward("pf_2", container="c2", local=20001), 10)
        yield self.store.add(attrs.evolve(forward("pf_3", container="c3", local=20002), owner="bob"), 10)
        for attempt in (
            self.store.set_domain("pf_3", "app.example", True, 10),
            self.store.set_domain("pf_3", "app.example", False, 10),
            self.store.add(
                attrs.evolve(forward("pf_4", container="c4", local=20003), domains=("app.example",)), 10
            ),
        ):
            error = yield self.assertFailure(attempt, APIError)
            self.assertEqual((error.code, error.message), (409, "Domain already claimed"))
        # pending: alice's other forward may not, bob may (whoever proves it first wins)
        yield self.store.set_domain("pf_2", "pending.example", False, 10)
        error = yield self.assertFailure(self.store.set_domain("pf_1", "pending.example", False, 10), APIError)
        self.assertEqual(error.code, 409)
        yield self.store.set_domain("pf_3", "pending.example", True, 10)
        error = yield self.assertFailure(self.store.set_domain("pf_2", "pending.example", True, 10), APIError)
        self.assertEqual(error.code, 409)
        self.assertEqual((yield self.store.find_domain("pending.example")).id, "pf_3")
        self.assertTrue((yield self.store.remove("pf_1")))
        yield self.store.set_domain("pf_3", "app.example", True, 10)
        self.assertEqual((yield self.store.find_domain("app.example")).id, "pf_3")

    @defer.inlineCallbacks
    def test_as_many_long_domains_as_allowed(self) -> Any:
        """
        A forward with as many domains as ``[domains] per_forward`` allows
        (100), each of the longest length, is stored and changed like any
        other (its change is published, whatever its size).
        """
        label = "a" * 63
        domains = tuple(f"{i:03d}{label[3:]}.{label}.{label}.{label[:53]}.example" for i in range(99))
        self.assertEqual({len(d) for d in domains}, {253})
        many = attrs.evolve(forward("pf_1"), domains=domains, verified_domains=domains)
        yield self.store.add(many, 100)
        last = "999" + domains[0][3:]
        changed = yield self.store.set_domain("pf_1", last, True, 100)
        self.assertEqual(changed.verified_domains, (*domains, last))
        self.assertEqual((yield self.store.get("pf_1")), changed)
        changed = yield self.store.remove_domain("pf_1", last)
        self.assertEqual(changed, many)

    @defer.inlineCallbacks
    def test_concurrent_domain_claims(self) -> Any:
        """Many forwards claiming one domain at once: exactly one gets it."""
        for i in range(8):
            yield self.store.add(forward(f"pf_{i}", container=f"c{i}", local=20000 + i), 10)
        results = yield defer.DeferredList(
            [self.store.set_domain(f"pf_{i}", "race.example", True, 10) for i in range(8)], consumeErrors=True
        )
        self.assertEqual(sum(1 for ok, _ in results if ok), 1)
        self.assertEqual({value.value.code for ok, value in results if not ok}, {409})

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


class PostgresStoreTests(StoreBehaviour, TestCase):
    def make_store(self) -> IForwardStore:
        require_postgres()
        self.url = fresh_database(self)
        return self.node()

    def node(self) -> Any:
        """:return: another store on the same database (as another node has)."""
        from rexecpf.postgres import PostgresForwardStore, open_postgres_for_check

        open_postgres_for_check(self.url)
        store = PostgresForwardStore(reactor, self.url)
        self.addCleanup(store.close)
        return store

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as connection:
            cursor = connection.execute(sql)  # type: ignore[arg-type]
            return cursor.fetchall() if cursor.description else []

    @defer.inlineCallbacks
    def test_versioned_and_shared(self) -> Any:
        """
        The schema carries its version; a second node reads what the first
        wrote, and gets the same secret.
        """
        from rexecpf.postgres import SCHEMA_VERSION as PG_SCHEMA_VERSION

        yield self.store.add(forward("pf_1"), 10)
        session = yield self.store.secret("session")
        self.assertEqual(self.query("SELECT version FROM schema_version"), [(PG_SCHEMA_VERSION,)])
        other = self.node()
        self.assertEqual((yield other.get("pf_1")), forward("pf_1"))
        self.assertEqual((yield other.secret("session")), session)
        self.assertEqual(self.query("SELECT version FROM schema_version"), [(PG_SCHEMA_VERSION,)])

    @defer.inlineCallbacks
    def test_limit_across_nodes(self) -> Any:
        """40 creates at once from two nodes on one container: exactly 10 succeed, the rest 429."""
        nodes = [self.store, self.node()]
        attempts = [
            nodes[i % 2].add(forward(f"pf_{i}", port=1000 + i, local=20000 + i), 10) for i in range(40)
        ]
        results = yield defer.DeferredList(attempts, consumeErrors=True)
        codes = [201 if ok else value.value.code for ok, value in results]
        self.assertEqual((codes.count(201), codes.count(429)), (10, 30), codes)
        self.assertEqual(len((yield nodes[1].list_forwards("c1"))), 10)

    @defer.inlineCallbacks
    def test_one_forward_per_port_across_nodes(self) -> Any:
        """Creates for one container port at once from two nodes: one succeeds, the rest 403."""
        nodes = [self.store, self.node()]
        attempts = [nodes[i % 2].add(forward(f"pf_{i}", port=80, local=20000 + i), 10) for i in range(20)]
        results = yield defer.DeferredList(attempts, consumeErrors=True)
        codes = [201 if ok else value.value.code for ok, value in results]
        self.assertEqual((codes.count(201), codes.count(403)), (1, 19), codes)

    @defer.inlineCallbacks
    def test_local_port_unique_across_nodes(self) -> Any:
        """One local_port asked for by twenty containers at once on two nodes: one gets it, the rest 409."""
        nodes = [self.store, self.node()]
        attempts = [
            nodes[i % 2].add(forward(f"pf_{i}", container=f"c{i}", local=20000), 10) for i in range(20)
        ]
        results = yield defer.DeferredList(attempts, consumeErrors=True)
        codes = [201 if ok else value.value.code for ok, value in results]
        self.assertEqual((codes.count(201), codes.count(409)), (1, 19), codes)
        self.assertEqual(len((yield nodes[0].list_forwards())), 1)

    @defer.inlineCallbacks
    def test_server_restart_costs_no_request(self) -> Any:
        """
        Every connection of the pool is left broken by a restart of the
        server: each is replaced on its next use, and no request fails.
        """
        yield defer.gatherResults([self.store.check() for _ in range(8)])  # open every connection
        shared_cluster().pg_ctl("restart", "-m", "fast")
        for index in range(8):
            yield self.store.add(forward(f"pf_{index}", port=80 + index, local=20000 + index), 10)
        self.assertEqual(len((yield self.store.list_forwards())), 8)

    @defer.inlineCallbacks
    def test_check_refuses_a_read_only_database(self) -> Any:
        """A database that takes no writes (as a standby) fails the health check: 503."""
        yield self.store.check()
        name = self.url.rpartition("/")[2]
        self.query(f"ALTER DATABASE {name} SET default_transaction_read_only = on")
        reader = self.node()
        error = yield self.assertFailure(reader.check(), APIError)
        self.assertEqual((error.code, error.detail), (503, "the database takes no writes (read-only)"))

    @defer.inlineCallbacks
    def test_unique_constraints_second_line(self) -> Any:
        """
        A writer that skips the lock (another program) and has not committed
        when the checks run: the UNIQUE constraint refuses the insert with
        the same error the check gives (409 for a local port taken).
        """
        import psycopg

        yield self.store.check()  # the schema exists
        with psycopg.connect(self.url) as intruder:
            intruder.execute(
                "INSERT INTO forwards (id, container_id, container_port, local_port, created_ms) "
                "VALUES ('pf_x', 'cx', 1, 20000, 1)"
            )
            adding = self.store.add(forward("pf_1", local=20000), 10)
            yield inprocess.until(
                lambda: self.query(
                    "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND query LIKE 'INSERT INTO forwards%'"
                ),
                what="the add waits on the uncommitted row",
            )
            intruder.commit()
        error = yield self.assertFailure(adding, APIError)
        self.assertEqual((error.code, error.message), (409, "Local port unavailable"))
class CachedCheckTests(TestCase):
    """The /healthz check of a real SQLite store, on an injected clock."""

    def setUp(self) -> None:
        path = os.path.join(tempfile.mkdtemp(prefix="rexecpf-health-"), "state.sqlite3")
        self.store = SQLiteForwardStore(reactor, path)
        self.addCleanup(self.store.close)
        self.clock = Clock()
        self.cached = CachedCheck(self.clock, self.store)

    @defer.inlineCallbacks
    def test_a_flood_writes_once_per_period(self) -> Any:
        """A hundred checks within the period write once; after it, the next one writes again."""
        before = yield self.store.changes()
        yield defer.gatherResults([self.cached.check() for _ in range(100)])
        self.assertEqual((yield self.store.changes()) - before, 1)
        self.clock.advance(HEALTH_CHECK_SECONDS - 0.1)
        yield self.cached.check()
        self.assertEqual((yield self.store.changes()) - before, 1)
        self.clock.advance(0.1)
        yield self.cached.check()
        self.assertEqual((yield self.store.changes()) - before, 2)

    @defer.inlineCallbacks
    def test_a_broken_store_is_reported_within_the_period(self) -> Any:
        """Writes refused: the cached success holds until the period ends, then 503 until repaired."""
        yield self.cached.check()
        yield self.store.refuse_writes(True)
        yield self.cached.check()
        self.clock.advance(HEALTH_CHECK_SECONDS)
        waiting = [self.cached.check(), self.cached.check()]
        for answer in waiting:
            error = yield self.assertFailure(answer, APIError)
            self.assertEqual(error.code, 503)
        self.flushLoggedErrors(sqlite3.OperationalError)
        error = yield self.assertFailure(self.cached.check(), APIError)
        self.assertEqual(error.code, 503)
        yield self.store.refuse_writes(False)
        self.clock.advance(HEALTH_CHECK_SECONDS)
        yield self.cached.check()


class StateFileModeTests(TestCase):
    """The state files hold the cookie-signing secret: 0600 whatever the umask."""

    def setUp(self) -> None:
        self.path = os.path.join(tempfile.mkdtemp(prefix="rexecpf-modes-"), "state.sqlite3")
        previous = os.umask(0o022)
        self.addCleanup(os.umask, previous)

    def modes(self) -> dict[str, int]:
        return {
            suffix: stat.S_IMODE(os.stat(self.path + suffix).st_mode) for suffix in ("", "-wal", "-shm")
        }

    @defer.inlineCallbacks
    def test_new_files_are_private(self) -> Any:
        """Created under umask 022, as at start-up: the database, -wal and -shm are 0600."""
        open_sqlite_for_check(self.path)
        store = SQLiteForwardStore(reactor, self.path)
        self.addCleanup(store.close)
        yield store.secret("session")
        self.assertEqual(self.modes(), {"": 0o600, "-wal": 0o600, "-shm": 0o600})

    @defer.inlineCallbacks
    def test_existing_files_are_made_private(self) -> Any:
        """Files left world-readable by an older version are changed to 0600 at start, with a log line."""
        connection = sqlite3.connect(self.path)
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute("CREATE TABLE t (x)")
        for suffix in ("", "-wal", "-shm"):
            os.chmod(self.path + suffix, 0o644)
        logged: list[Any] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        open_sqlite_for_check(self.path)
        connection.close()
        store = SQLiteForwardStore(reactor, self.path)
        self.addCleanup(store.close)
        yield store.secret("session")
        self.assertEqual(self.modes(), {"": 0o600, "-wal": 0o600, "-shm": 0o600})
        fixed = sorted(event["name"] for event in logged if "readable by others" in event.get("log_format", ""))
        self.assertEqual(fixed, sorted(self.path + suffix for suffix in ("", "-wal", "-shm")))
