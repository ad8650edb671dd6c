# -*- test-case-name: tests.test_store -*-
"""
Where forwards are kept: :class:`IForwardStore`, and its SQLite implementation.

SQLite runs on :mod:`twisted.enterprise.adbapi`'s thread pool, never on the
reactor thread.  The file is in WAL mode with ``synchronous=FULL`` so an
acknowledged create or delete survives ``kill -9`` and power loss.  The
invariants (one forward per container port, at most N forwards per container,
one forward per local port) are checked and written inside one
``BEGIN IMMEDIATE`` transaction, and also held by UNIQUE constraints, so they
hold under any concurrency, even across processes sharing the file.

The schema carries its version in ``PRAGMA user_version``; :data:`_MIGRATIONS`
lists the steps from each version to the next.  The transactions themselves
are shared with the PostgreSQL store (:mod:`rexecpf._storesql`).
"""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from rexecpf._storesql import SQLForwardStore, Transaction
from rexecpf.feed import CHANGES_KEPT, encode_change
from rexecpf.model import STORE_UNAVAILABLE, APIError, PortForward

__all__ = ["CachedCheck", "Checkable", "HEALTH_CHECK_SECONDS", "IForwardStore", "SQLiteForwardStore"]

T = TypeVar("T")

_log = Logger()


class IForwardStore(Interface):
    """Durable forwards.  Every method returns a Deferred."""

    def add(forward: PortForward, limit: int, stop_mark: int | None = None) -> Deferred[PortForward]:
        """
        Store a new forward, atomically checking the invariants.

        :param limit: the most forwards one container may have.
        :param stop_mark: what :meth:`stop_mark` answered before the create
            looked at the container: a stop of the container recorded since
            (:meth:`remove_container`) refuses the forward.  ``None``: no check.
        :return: fires with ``forward``; fails with :class:`APIError` 409
            (container not running: it stopped since ``stop_mark``), 403
            (port already forwarded), 429 (limit), 409 (local port taken),
            409 (slug in use by the owner), 409 (a domain claimed: see
            :meth:`set_domain`), checked in that order; 503 when the store
            cannot answer.
        """

    def set_domain(forward_id: str, domain: str, verified: bool, limit: int) -> Deferred[PortForward | None]:
        """
        Give a forward the custom domain ``domain`` (lowercase), or mark it
        verified; a verified domain stays verified (``verified=False`` on it
        changes nothing).  Checked in one transaction under the write lock,
        and held by a UNIQUE index on the verified domains: 409 Domain
        already claimed when another forward has it verified, or another
        forward of the same owner has it at all; 429 Too many domains when
        the forward already has ``limit``.  A change is published
        (:data:`rexecpf.feed.UPDATE`).

        :return: fires with the forward as it is now, or ``None`` if it is gone.
        """

    def remove_domain(forward_id: str, domain: str) -> Deferred[PortForward | None]:
        """
        Take ``domain`` from a forward (nothing changes if it did not have it).

        :return: fires with the forward as it is now, or ``None`` if it is gone.
        """

    def find_domain(domain: str) -> Deferred[PortForward | None]:
        """:return: fires with the forward that has ``domain`` verified, or ``None``."""

    def find_slug(owner: str, slug: str) -> Deferred[PortForward | None]:
        """:return: fires with ``owner``'s forward named ``slug``, or ``None``."""

    def stop_mark() -> Deferred[int]:
        """
        :return: fires with the number of the latest container stop recorded
            by :meth:`remove_container` (0: none), for :meth:`add`.
        """

    def get(forward_id: str) -> Deferred[PortForward | None]:
        """:return: fires with the forward, or ``None``."""

    def list_forwards(container_id: str | None = None) -> Deferred[list[PortForward]]:
        """:return: fires with the forwards (of one container), oldest first."""

    def remove(forward_id: str) -> Deferred[bool]:
        """:return: fires with whether it existed."""

    def remove_container(container_id: str) -> Deferred[list[PortForward]]:
        """
        The container stopped: remove its forwards and record the stop under
        a number above every earlier one (see :meth:`add`), in one transaction.

        :return: fires with the forwards removed.
        """

    def snapshot() -> Deferred[tuple[int, list[PortForward]]]:
        """
        :return: fires with the store's revision (bumped by every add,
            remove and reap, each of which publishes its change:
            :mod:`rexecpf.feed`) and every forward, oldest first, read at
            that one revision.
        """

    def secret(name: str) -> Deferred[bytes]:
        """
        :return: fires with a random 32-byte secret kept under ``name``,
            made on first use (e.g. the key that signs session cookies).
        """

    def check() -> Deferred[None]:
        """:return: fires when the store answers; fails with 503 otherwise."""

    def close() -> None:
        """Release the store."""


_MIGRATIONS: list[list[str]] = [
    # 0 -> 1
    [
        """CREATE TABLE forwards (
            id TEXT PRIMARY KEY,
            container_id TEXT NOT NULL,
            container_port INTEGER NOT NULL CHECK (container_port BETWEEN 1 AND 65535),
            local_port INTEGER NOT NULL UNIQUE CHECK (local_port BETWEEN 1 AND 65535),
            name TEXT,
            created_ms INTEGER NOT NULL,
            owner TEXT NOT NULL DEFAULT '',
            UNIQUE (container_id, container_port)
        )""",
        "CREATE INDEX forwards_by_container ON forwards (container_id, created_ms)",
        "CREATE TABLE secrets (name TEXT PRIMARY KEY, value BLOB NOT NULL)",
    ],
    # 1 -> 2: container stops, numbered, so that a create in flight can tell
    # whether its container stopped meanwhile (:meth:`IForwardStore.add`)
    [
        """CREATE TABLE container_stops (
            container_id TEXT PRIMARY KEY,
            stop INTEGER NOT NULL
        )""",
        "CREATE INDEX container_stops_by_stop ON container_stops (stop)",
    ],
    # 2 -> 3: a forward may pass CORS preflights to its container
    [
        "ALTER TABLE forwards ADD COLUMN pass_preflight INTEGER NOT NULL DEFAULT 0"
        " CHECK (pass_preflight IN (0, 1))",
    ],
    # 3 -> 4: the change feed (rexecpf.feed): every write bumps the revision
    # and leaves its change, so that other processes sharing the file hear of it
    [
        "CREATE TABLE revision (rev INTEGER NOT NULL)",
        "INSERT INTO revision (rev) VALUES (0)",
        "CREATE TABLE changes (rev INTEGER PRIMARY KEY, payload TEXT NOT NULL)",
    ],
    # 4 -> 5: stable names (a slug, unique per owner) and custom domains (a
    # verified domain belongs to one forward; deleting a forward frees its domains)
    [
        "ALTER TABLE forwards ADD COLUMN slug TEXT",
        "CREATE UNIQUE INDEX forwards_slug_unique ON forwards (owner, slug) WHERE slug IS NOT NULL",
        """CREATE TABLE forward_domains (
            forward_id TEXT NOT NULL REFERENCES forwards (id) ON DELETE CASCADE,
            domain TEXT NOT NULL,
            owner TEXT NOT NULL,
            verified INTEGER NOT NULL DEFAULT 0 CHECK (verified IN (0, 1)),
            PRIMARY KEY (forward_id, domain)
        )""",
        "CREATE UNIQUE INDEX forward_domains_claimed ON forward_domains (domain) WHERE verified = 1",
        "CREATE INDEX forward_domains_by_domain ON forward_domains (domain)",
    ],
]
SCHEMA_VERSION = len(_MIGRATIONS)

#: The row /healthz rewrites to prove the store takes writes.
_PROBE = "rexecpf.health-probe"


def _open(connection: sqlite3.Connection) -> None:
    connection.isolation_level = None  # we issue BEGIN ourselves
    connection.execute("PRAGMA busy_timeout = 5000")
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute("PRAGMA synchronous = FULL")
    connection.execute("PRAGMA foreign_keys = ON")
    _migrate(connection)


def _migrate(connection: sqlite3.Connection) -> None:
    (version,) = connection.execute("PRAGMA user_version").fetchone()
    if version == SCHEMA_VERSION:
        return
    connection.execute("BEGIN IMMEDIATE")
    try:
        (version,) = connection.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"the state file has schema version {version}, newer than this "
                f"rexecpf knows ({SCHEMA_VERSION})"
            )
        for step in _MIGRATIONS[version:]:
            for statement in step:
                connection.execute(statement)
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise


#: The files of a SQLite database in WAL mode: the database, its log, its index.
_STATE_SUFFIXES = ("", "-wal", "-shm")


def private_state_files(path: str) -> list[str]:
    """
    Make the state file and its ``-wal``/``-shm`` companions readable by
    this user only (they hold the cookie-signing secret), whatever the umask
    of whoever starts the daemon: a missing database is created ``0600``
    before SQLite opens it (SQLite gives ``-wal`` and ``-shm`` the mode of
    the database), and an existing file with group or other bits is changed
    to ``0600``.

    :return: the existing files whose mode was changed (for a log line).
    :raises OSError: when the file cannot be created or changed.
    """
    if path in ("", ":memory:"):
        return []
    os.close(os.open(path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600))
    changed = []
    for name in (path + suffix for suffix in _STATE_SUFFIXES):
        try:
            mode = stat.S_IMODE(os.stat(name).st_mode)
        except FileNotFoundError:
            continue
        if mode & 0o077:
            os.chmod(name, 0o600)
            changed.append(name)
    return changed


def open_sqlite_for_check(path: str) -> None:
    """
    Open the state file once, synchronously, to fail start-up early and
    clearly when it cannot be used; its files are made private first
    (:func:`private_state_files`, logged when a mode changed).  Called before
    the reactor runs.

    :raises sqlite3.Error: or ``OSError``, or ``RuntimeError`` on a too-new schema.
    """
    for name in private_state_files(path):
        _log.warn("state file {name} was readable by others: mode set to 0600", name=name)
    connection = sqlite3.connect(path)
    try:
        _open(connection)
    finally:
        connection.close()


class _SQLiteTransaction(Transaction):
    insertion_order = "rowid"

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self._connection.execute(sql, params).rowcount

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._connection.execute(sql, params).fetchall()

    def lock_writes(self) -> None:
        pass  # every writing transaction began with BEGIN IMMEDIATE: the write lock

    def read_one_snapshot(self) -> None:
        pass  # a deferred BEGIN reads one snapshot (WAL) from its first read

    def leave_change(self, rev: int, op: str, fields: dict[str, Any]) -> None:
        """Leave the change in the file for the other processes (:class:`rexecpf.feed.SQLiteChangeFeed`)."""
        self.execute("INSERT INTO changes (rev, payload) VALUES (?, ?)", (rev, encode_change(rev, op, **fields)))
        self.execute("DELETE FROM changes WHERE rev <= ?", (rev - CHANGES_KEPT,))


@implementer(IForwardStore)
class SQLiteForwardStore(SQLForwardStore):
    """
    :class:`IForwardStore` in a SQLite file.

    :param reactor: used by the thread pool to report back.
    :param path: the database file, created if missing.
    """

    _log = Logger()

    def __init__(self, reactor: Any, path: str) -> None:
        # (Before any connection: the files must never exist world-readable.)
        for name in private_state_files(path):
            self._log.warn("state file {name} was readable by others: mode set to 0600", name=name)
        self._pool = adbapi.ConnectionPool(
            "sqlite3",
            path,
            check_same_thread=False,
            cp_min=1,
            cp_max=1,  # one writer: SQLite serialises writers anyway
            cp_openfun=_open,
            cp_noisy=False,
            cp_reactor=reactor,
        )
        # The pool starts its threads once the reactor runs: a start-up
        # failure before then must not leave threads keeping the process alive.

    def _run(self, work: Callable[..., T], *args: Any, read_only: bool = False) -> Deferred[T]:
        """
        Run ``work(transaction, *args)`` in one transaction on the pool's thread.

        :param read_only: ``work`` only reads: a deferred ``BEGIN`` (a
            snapshot, no write lock), so that reads go on when the file
            cannot be written.  Otherwise ``BEGIN IMMEDIATE`` takes the write
            lock first, so the checks and the write see the same state.
        """

        def interaction(cursor: Any) -> T:
            connection = cursor.connection
            connection.execute("BEGIN" if read_only else "BEGIN IMMEDIATE")
            try:
                result = work(_SQLiteTransaction(connection), *args)
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")
            return result

        def unavailable(failure: Failure) -> Failure:
            if failure.check(sqlite3.Error) and not failure.check(APIError):
                self._log.failure("store failed", failure)
                raise STORE_UNAVAILABLE(str(failure.value))
            return failure

        d: Deferred[T] = self._pool.runWithConnection(_with_cursor(interaction))
        return d.addErrback(unavailable)

    def check(self) -> Deferred[None]:
        def check(tx: Transaction) -> None:
            tx.one("SELECT COUNT(*) FROM forwards")
            # A store that reads but cannot write (read-only file or file
            # system, disk full) cannot take a create or a delete: probe a
            # write (committed, so it reaches the WAL and the disk).
            tx.execute(
                "INSERT OR REPLACE INTO secrets (name, value) VALUES (?, randomblob(16))",
                (_PROBE,),
            )

        return self._run(check)

    def refuse_writes(self, refuse: bool) -> Deferred[None]:
        """
        Make the store's one connection refuse every write, as a read-only
        file does (``SQLITE_READONLY``, so creates and deletes answer 503),
        or take writes again.  A fault seam (``PRAGMA query_only``): a file
        system cannot be remounted read-only under an open file, so this is
        how the tests make the store read-only while the daemon runs.

        :return: fires once the connection refuses (or takes) writes.
        """

        def pragma(connection: Any) -> None:
            connection.execute(f"PRAGMA query_only = {'ON' if refuse else 'OFF'}")

        return self._pool.runWithConnection(pragma)

    def changes(self) -> Deferred[int]:
        """
        :return: fires with how many rows this store's connection has
            written since it opened (``total_changes``): a seam for the tests
            that prove something does not write.
        """
        return self._pool.runWithConnection(lambda connection: connection.total_changes)

    def close(self) -> None:
        # Idempotent: graceful shutdown closes the store, and so may its owner.
        if self._pool.running:
            self._pool.close()


#: How long /healthz answers from the last store check before it checks again.
HEALTH_CHECK_SECONDS = 2.0


class Checkable(Protocol):
    def check(self) -> Deferred[None]: ...


class CachedCheck:
    """
    A store's :meth:`IForwardStore.check` (which writes, to prove the store
    takes writes) for ``/healthz``, which anyone may call as often as they
    like: the outcome of the last check is reused for ``seconds``, so a flood
    of ``/healthz`` makes at most one write per period, not one each.  Once
    the outcome is older, the next call checks again, and every call made
    meanwhile waits for that one check.  So a broken store is reported
    within ``seconds`` (and a repaired one too).

    :param clock: when the last check was made.
    :param store: what is checked.
    :param seconds: how long an outcome is reused.
    """

    def __init__(self, clock: IReactorTime, store: Checkable, seconds: float = HEALTH_CHECK_SECONDS) -> None:
        self._clock = clock
        self._store = store
        self._seconds = seconds
        self._checked_at: float | None = None
        self._outcome: Failure | None = None
        self._waiting: list[Deferred[None]] | None = None

    def check(self) -> Deferred[None]:
        """:return: fires when the store answered (lately); fails as its check failed."""
        if self._checked_at is not None and self._clock.seconds() - self._checked_at < self._seconds:
            return succeed(None) if self._outcome is None else fail(self._outcome)
        answer: Deferred[None] = Deferred()
        if self._waiting is not None:
            self._waiting.append(answer)
            return answer
        self._waiting = [answer]
        self._store.check().addBoth(self._checked)
        return answer

    def _checked(self, outcome: None | Failure) -> None:
        self._checked_at = self._clock.seconds()
        self._outcome = outcome if isinstance(outcome, Failure) else None
        waiting, self._waiting = self._waiting or [], None
        for answer in waiting:
            if self._outcome is None:
                answer.callback(None)
            else:
                answer.errback(self._outcome)


def _with_cursor(interaction: Callable[[Any], T]) -> Callable[[Any], T]:
    """Adapt a cursor interaction to ``runWithConnection`` (no implicit commit)."""

    def run(connection: Any) -> T:
        cursor = connection.cursor()
        try:
            return interaction(cursor)
        finally:
            cursor.close()

    return run
