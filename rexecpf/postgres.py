# -*- test-case-name: tests.test_store -*-
"""
:class:`IForwardStore` in PostgreSQL (``[store] url``), shared by every node.

psycopg 3 runs on :mod:`twisted.enterprise.adbapi`'s thread pool, never on
the reactor thread (psycopg's ``threadsafety`` is 2; adbapi gives each
thread its own connection).  Connections are in autocommit mode and every
method runs one explicit ``BEGIN ... COMMIT``.

The invariants (one forward per container port, at most N forwards per
container, ``local_port`` unique, no forward for a container whose stop was
recorded after the create began) are checked and written in one transaction
that first takes a transaction-level advisory lock
(``pg_advisory_xact_lock``) shared by every writer that can break them (add,
set_domain and reap), so they hold exactly across processes and nodes; UNIQUE
constraints hold them too, as a second line.  The transactions themselves
are shared with the SQLite store (:mod:`rexecpf._storesql`); this module
gives them the lock, the snapshot and ``NOTIFY`` (:class:`_PostgresTransaction`).

The schema's version is in the table ``schema_version``; :data:`_MIGRATIONS`
lists the steps from each version to the next, applied at start-up under
another advisory lock, so nodes starting together migrate once.  Give
rexecpf a database of its own (or a schema: ``?options=-csearch_path%3Drexecpf``).

A connection found broken (the server restarted or went away) is dropped
and the next use connects again; when it is found broken on the ``BEGIN``
(nothing was sent), the transaction is retried once on a new connection,
so that one restart of the server costs no request.  Anything else that
goes wrong answers 503 Store unavailable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg import errors as pgerrors
from psycopg.conninfo import conninfo_to_dict
from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from rexecpf._storesql import SQLForwardStore, Transaction
from rexecpf.config import mask_url_password
from rexecpf.feed import CHANNEL, NOTIFY_MAX_BYTES, encode_change
from rexecpf.model import (
    DOMAIN_CLAIMED,
    LOCAL_PORT_UNAVAILABLE,
    PORT_ALREADY_FORWARDED,
    SLUG_TAKEN,
    STORE_UNAVAILABLE,
)
from rexecpf.store import IForwardStore

__all__ = [
    "PostgresForwardStore",
    "SCHEMA_VERSION",
    "connection_settings",
    "open_postgres_for_check",
    "redact",
]

T = TypeVar("T")

_MIGRATIONS: list[list[str]] = [
    # 0 -> 1
    [
        """CREATE TABLE forwards (
            seq BIGINT GENERATED ALWAYS AS IDENTITY,
            id TEXT PRIMARY KEY,
            container_id TEXT NOT NULL,
            container_port INTEGER NOT NULL CHECK (container_port BETWEEN 1 AND 65535),
            local_port INTEGER NOT NULL CHECK (local_port BETWEEN 1 AND 65535),
            name TEXT,
            created_ms BIGINT NOT NULL,
            owner TEXT NOT NULL DEFAULT '',
            pass_preflight BOOLEAN NOT NULL DEFAULT false,
            CONSTRAINT forwards_local_port_unique UNIQUE (local_port),
            CONSTRAINT forwards_container_port_unique UNIQUE (container_id, container_port)
        )""",
        "CREATE INDEX forwards_by_container ON forwards (container_id, created_ms)",
        "CREATE TABLE secrets (name TEXT PRIMARY KEY, value BYTEA NOT NULL)",
        """CREATE TABLE container_stops (
            container_id TEXT PRIMARY KEY,
            stop BIGINT NOT NULL
        )""",
        "CREATE INDEX container_stops_by_stop ON container_stops (stop)",
    ],
    # 1 -> 2: the change feed (rexecpf.feed): every write bumps the revision
    # (its row lock orders the writes as they commit) and notifies
    [
        "CREATE TABLE revision (rev BIGINT NOT NULL)",
        "INSERT INTO revision (rev) VALUES (0)",
    ],
    # 2 -> 3: stable names (a slug, unique per owner) and custom domains (a
    # verified domain belongs to one forward; deleting a forward frees its domains)
    [
        "ALTER TABLE forwards ADD COLUMN slug TEXT",
        "CREATE UNIQUE INDEX forwards_slug_unique ON forwards (owner, slug) WHERE slug IS NOT NULL",
        """CREATE TABLE forward_domains (
            seq BIGINT GENERATED ALWAYS AS IDENTITY,
            forward_id TEXT NOT NULL REFERENCES forwards (id) ON DELETE CASCADE,
            domain TEXT NOT NULL,
            owner TEXT NOT NULL,
            verified BOOLEAN NOT NULL DEFAULT false,
            PRIMARY KEY (forward_id, domain)
        )""",
        "CREATE UNIQUE INDEX forward_domains_claimed ON forward_domains (domain) WHERE verified",
        "CREATE INDEX forward_domains_by_domain ON forward_domains (domain)",
    ],
]
SCHEMA_VERSION = len(_MIGRATIONS)

#: The advisory locks (two-key form: rexecpf's namespace, then which).
_LOCK_NAMESPACE = 0x72657870  # "rexp"
_LOCK_WRITES = 1  # add, set_domain and reap: the invariants
_LOCK_MIGRATION = 2

#: Every statement (a lock wait included) gives up after this: a server that
#: hangs answers 503 instead of holding the pool's threads for ever.
STATEMENT_TIMEOUT_MS = 10_000

#: UNIQUE constraint -> the error it stands for (the second line: the
#: advisory lock makes the checks before the insert answer first)
_CONSTRAINT_ERRORS = {
    "forwards_local_port_unique": LOCAL_PORT_UNAVAILABLE,
    "forwards_container_port_unique": PORT_ALREADY_FORWARDED,
    "forwards_slug_unique": SLUG_TAKEN,
    "forward_domains_claimed": DOMAIN_CLAIMED,
}


def connection_settings(url: str) -> dict[str, Any]:
    """
    :return: the keyword arguments of :func:`psycopg.connect` for ``url``:
        its own, plus defaults for what it does not say (a connect timeout,
        TCP keepalives that find a dead server, the application name).
    :raises ValueError: naming the problem, never the password, when libpq
        cannot read ``url``.
    """
    try:
        settings: dict[str, Any] = conninfo_to_dict(url)
    except psycopg.Error as error:
        raise ValueError(f"libpq cannot read it: {redact(str(error), url)}") from None
    defaults = {
        "connect_timeout": "10",
        "keepalives": "1",
        "keepalives_idle": "30",
        "keepalives_interval": "10",
        "keepalives_count": "3",
        "application_name": "rexecpf",
    }
    return {**defaults, **settings, "autocommit": True}


def redact(message: str, url: str) -> str:
    """:return: ``message`` on one line, with ``url``'s password (if any) masked."""
    password = _password(url)
    if password:
        message = message.replace(password, "***")
    return " ".join(message.split())


def _password(url: str) -> str:
    try:
        return str(conninfo_to_dict(url).get("password") or "")
    except psycopg.Error:
        from urllib.parse import unquote, urlsplit

        try:
            return unquote(urlsplit(url).password or "")
        except ValueError:
            return ""


def _open(connection: psycopg.Connection[Any]) -> None:
    connection.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS}")
    _migrate(connection)


def _migrate(connection: psycopg.Connection[Any]) -> None:
    version = _version(connection)
    if version == SCHEMA_VERSION:
        return
    with connection.transaction():
        connection.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_LOCK_NAMESPACE, _LOCK_MIGRATION))
        connection.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        version = _version(connection)
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"the database has schema version {version}, newer than this "
                f"rexecpf knows ({SCHEMA_VERSION})"
            )
        for step in _MIGRATIONS[version:]:
            for statement in step:
                connection.execute(statement)  # type: ignore[arg-type]  # constant SQL
        connection.execute("DELETE FROM schema_version")
        connection.execute("INSERT INTO schema_version (version) VALUES (%s)", (SCHEMA_VERSION,))


def _version(connection: psycopg.Connection[Any]) -> int:
    exists = connection.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return 0
    row = connection.execute("SELECT max(version) FROM schema_version").fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def open_postgres_for_check(url: str) -> None:
    """
    Connect once, synchronously, and create or migrate the schema: start-up
    fails early and clearly when the database cannot be used.  Called
    before the reactor runs.

    :raises ValueError: ``url`` cannot be read.
    :raises psycopg.Error: or ``RuntimeError`` on a too-new schema.
    """
    connection = psycopg.connect(**connection_settings(url))
    try:
        _open(connection)
    finally:
        connection.close()


class _PostgresTransaction(Transaction):
    insertion_order = "seq"

    def __init__(self, connection: psycopg.Connection[Any]) -> None:
        self._connection = connection

    def _cursor(self, sql: str, params: Sequence[Any]) -> psycopg.Cursor[Any]:
        # The shared SQL has no "?" but its placeholders, and no "%".
        return self._connection.execute(sql.replace("?", "%s"), params)  # type: ignore[arg-type]

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self._cursor(sql, params).rowcount

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._cursor(sql, params).fetchall()

    def lock_writes(self) -> None:
        self._connection.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_LOCK_NAMESPACE, _LOCK_WRITES))

    def read_one_snapshot(self) -> None:
        self._connection.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")

    def leave_change(self, rev: int, op: str, fields: dict[str, Any]) -> None:
        """
        Notify every node: ``NOTIFY`` is delivered on commit, in commit
        order, and the revision's row lock (held to the commit) makes that
        the revision order.
        """
        payload = encode_change(rev, op, max_bytes=NOTIFY_MAX_BYTES, **fields)
        self._connection.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))


class _Connection(adbapi.Connection):
    """
    adbapi's connection wrapper made to fit psycopg in autocommit mode: a
    rollback on a broken connection drops it from the pool (the next use
    connects again) instead of failing, and never logs; :meth:`transact`
    retries once a transaction whose ``BEGIN`` met a stale connection.
    """

    _connection: psycopg.Connection[Any]

    def transact(self, work: Callable[..., T], args: tuple[Any, ...], read_only: bool) -> T:
        begin = "BEGIN READ ONLY" if read_only else "BEGIN"
        try:
            self._connection.execute(begin)
        except psycopg.OperationalError:
            if not self._connection.broken:
                raise
            # It went stale while idle (the server restarted): nothing was
            # sent, so a new connection can run the whole transaction.
            self.reconnect()
            self._connection.execute(begin)
        result = work(_PostgresTransaction(self._connection), *args)
        self._connection.execute("COMMIT")
        return result

    def commit(self) -> None:
        pass  # transact committed

    def rollback(self) -> None:
        connection = self._connection
        if connection.broken or connection.closed:
            self._pool.disconnect(connection)
            self._connection = None  # type: ignore[assignment]
            return
        try:
            connection.rollback()
        except psycopg.Error:
            self._pool.disconnect(connection)
            self._connection = None  # type: ignore[assignment]


class _ConnectionPool(adbapi.ConnectionPool):
    connectionFactory = _Connection


@implementer(IForwardStore)
class PostgresForwardStore(SQLForwardStore):
    """
    :class:`IForwardStore` in a PostgreSQL database.

    :param reactor: used by the thread pool to report back.
    :param url: a ``postgresql://`` URL (libpq's syntax).
    :param connections: the most connections (and threads) it opens.
    """

    _log = Logger()

    def __init__(self, reactor: Any, url: str, connections: int = 4) -> None:
        self.url = mask_url_password(url)
        self._pool = _ConnectionPool(
            "psycopg",
            cp_min=1,
            cp_max=connections,
            cp_openfun=_open,
            cp_noisy=False,
            cp_reactor=reactor,
            **connection_settings(url),
        )

    def _run(self, work: Callable[..., T], *args: Any, read_only: bool = False) -> Deferred[T]:
        """
        Run ``work(transaction, *args)`` in one transaction on a pool thread.

        :param read_only: ``work`` only reads (``BEGIN READ ONLY``).
        """

        def interaction(connection: _Connection) -> T:
            return connection.transact(work, args, read_only)

        def unavailable(failure: Failure) -> Failure:
            error = failure.value
            if isinstance(error, pgerrors.UniqueViolation):
                kind = _CONSTRAINT_ERRORS.get(error.diag.constraint_name or "")
                if kind is not None:
                    raise kind("taken meanwhile")
            if isinstance(error, psycopg.Error):
                self._log.warn("store failed: {error}", error=_one_line(error))
                raise STORE_UNAVAILABLE(_one_line(error))
            return failure

        d: Deferred[T] = self._pool.runWithConnection(interaction)
        return d.addErrback(unavailable)

    def check(self) -> Deferred[None]:
        def check(tx: Transaction) -> None:
            # A cheap read that also tells a server that takes no writes (a
            # standby, default_transaction_read_only): it could not take a
            # create or a delete.
            version, read_only = tx.one(
                "SELECT (SELECT max(version) FROM schema_version), current_setting('transaction_read_only')",
            )
            if read_only != "off":
                raise STORE_UNAVAILABLE("the database takes no writes (read-only)")
            if version != SCHEMA_VERSION:
                raise STORE_UNAVAILABLE(f"the database has schema version {version}, not {SCHEMA_VERSION}")

        return self._run(check)

    def close(self) -> None:
        # Idempotent: graceful shutdown closes the store, and so may its owner.
        if self._pool.running:
            self._pool.close()


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
