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
(``pg_advisory_xact_lock``) shared by every writer that can break them (add
and reap), so they hold exactly across processes and nodes; UNIQUE
constraints hold them too, as a second line.

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

import secrets
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
from psycopg import errors as pgerrors
from psycopg.conninfo import conninfo_to_dict
from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from rexecpf.config import mask_url_password
from rexecpf.feed import ADD, CHANNEL, DELETE, NOTIFY_MAX_BYTES, REAP, UPDATE, encode_change
from rexecpf.model import (
    CONTAINER_NOT_RUNNING,
    DOMAIN_CLAIMED,
    LIMIT_EXCEEDED,
    LOCAL_PORT_UNAVAILABLE,
    PORT_ALREADY_FORWARDED,
    SLUG_TAKEN,
    STORE_UNAVAILABLE,
    TOO_MANY_DOMAINS,
    PortForward,
)
from rexecpf.store import STOPS_KEPT, IForwardStore, with_domains

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
_LOCK_WRITES = 1  # add and reap: the invariants
_LOCK_MIGRATION = 2

#: Every statement (a lock wait included) gives up after this: a server that
#: hangs answers 503 instead of holding the pool's threads for ever.
STATEMENT_TIMEOUT_MS = 10_000

_COLUMNS = "id, container_id, container_port, local_port, name, created_ms, owner, pass_preflight, slug"

#: UNIQUE constraint -> the error it stands for (the second line: the
#: advisory lock makes the checks before the insert answer first)
_CONSTRAINT_ERRORS = {
    "forwards_local_port_unique": LOCAL_PORT_UNAVAILABLE,
    "forwards_container_port_unique": PORT_ALREADY_FORWARDED,
    "forwards_slug_unique": SLUG_TAKEN,
    "forward_domains_claimed": DOMAIN_CLAIMED,
}


def _row(row: tuple[Any, ...]) -> PortForward:
    return PortForward(
        id=row[0],
        container_id=row[1],
        container_port=row[2],
        local_port=row[3],
        name=row[4],
        created_ms=row[5],
        owner=row[6],
        pass_preflight=bool(row[7]),
        slug=row[8],
    )


def _select(
    connection: psycopg.Connection[Any], where: str = "", params: tuple[Any, ...] = ()
) -> list[PortForward]:
    """:return: the forwards ``where`` selects (oldest first), with their domains."""
    forwards = [
        _row(row)
        for row in connection.execute(
            f"SELECT {_COLUMNS} FROM forwards {where} ORDER BY created_ms, seq", params  # type: ignore[arg-type]
        ).fetchall()
    ]
    if not forwards:
        return []
    rows = connection.execute(
        "SELECT forward_id, domain, verified FROM forward_domains WHERE forward_id = ANY(%s) ORDER BY seq",
        ([f.id for f in forwards],),
    ).fetchall()
    return with_domains(forwards, rows)


def _claimed_elsewhere(connection: psycopg.Connection[Any], forward_id: str, owner: str, domain: str) -> None:
    """:raises APIError: 409 when another forward claims ``domain`` (see :meth:`IForwardStore.set_domain`)."""
    row = connection.execute(
        "SELECT verified FROM forward_domains WHERE domain = %s AND forward_id != %s "
        "AND (verified OR owner = %s) LIMIT 1",
        (domain, forward_id, owner),
    ).fetchone()
    if row:
        raise DOMAIN_CLAIMED(
            f"{domain} is claimed by another forward"
            + ("" if row[0] else " of yours (not verified yet): remove it there first")
        )


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
        result = work(self._connection, *args)
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
class PostgresForwardStore:
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
        Run ``work(connection, *args)`` in one transaction on a pool thread.

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

    def add(self, forward: PortForward, limit: int, stop_mark: int | None = None) -> Deferred[PortForward]:
        def add(connection: psycopg.Connection[Any]) -> PortForward:
            connection.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_LOCK_NAMESPACE, _LOCK_WRITES))
            if stop_mark is not None:
                row = connection.execute(
                    "SELECT stop FROM container_stops WHERE container_id = %s", (forward.container_id,)
                ).fetchone()
                if row and row[0] > stop_mark:
                    raise CONTAINER_NOT_RUNNING("the container stopped while the forward was being created")
            taken, count, used = _one(
                connection,
                "SELECT count(*) FILTER (WHERE container_port = %s), count(*), "
                "(SELECT count(*) FROM forwards WHERE local_port = %s) "
                "FROM forwards WHERE container_id = %s",
                (forward.container_port, forward.local_port, forward.container_id),
            )
            if taken:
                raise PORT_ALREADY_FORWARDED(
                    f"container port {forward.container_port} of {forward.container_id} "
                    "is already forwarded"
                )
            if count >= limit:
                raise LIMIT_EXCEEDED(f"a container may have at most {limit} forwards")
            if used:
                raise LOCAL_PORT_UNAVAILABLE(f"local port {forward.local_port} is in use")
            if forward.slug is not None and connection.execute(
                "SELECT 1 FROM forwards WHERE owner = %s AND slug = %s", (forward.owner, forward.slug)
            ).fetchone():
                raise SLUG_TAKEN(f"you already have a forward named {forward.slug!r}")
            for domain in forward.domains:
                _claimed_elsewhere(connection, forward.id, forward.owner, domain)
            connection.execute(
                f"INSERT INTO forwards ({_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (
                    forward.id,
                    forward.container_id,
                    forward.container_port,
                    forward.local_port,
                    forward.name,
                    forward.created_ms,
                    forward.owner,
                    forward.pass_preflight,
                    forward.slug,
                ),
            )
            for domain in forward.domains:
                connection.execute(
                    "INSERT INTO forward_domains (forward_id, domain, owner, verified) VALUES (%s, %s, %s, %s)",
                    (forward.id, domain, forward.owner, domain in forward.verified_domains),
                )
            _publish(connection, ADD, forward=forward)
            return forward

        return self._run(add)

    def set_domain(self, forward_id: str, domain: str, verified: bool, limit: int) -> Deferred[PortForward | None]:
        def set_domain(connection: psycopg.Connection[Any]) -> PortForward | None:
            connection.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_LOCK_NAMESPACE, _LOCK_WRITES))
            row = connection.execute("SELECT owner FROM forwards WHERE id = %s", (forward_id,)).fetchone()
            if row is None:
                return None
            (owner,) = row
            _claimed_elsewhere(connection, forward_id, owner, domain)
            had = connection.execute(
                "SELECT verified FROM forward_domains WHERE forward_id = %s AND domain = %s", (forward_id, domain)
            ).fetchone()
            if had is None:
                (count,) = _one(connection, "SELECT count(*) FROM forward_domains WHERE forward_id = %s", (forward_id,))
                if count >= limit:
                    raise TOO_MANY_DOMAINS(f"a forward may have at most {limit} domains")
                connection.execute(
                    "INSERT INTO forward_domains (forward_id, domain, owner, verified) VALUES (%s, %s, %s, %s)",
                    (forward_id, domain, owner, verified),
                )
            elif verified and not had[0]:
                connection.execute(
                    "UPDATE forward_domains SET verified = true WHERE forward_id = %s AND domain = %s",
                    (forward_id, domain),
                )
            else:
                return _select(connection, "WHERE id = %s", (forward_id,))[0]
            (forward,) = _select(connection, "WHERE id = %s", (forward_id,))
            _publish(connection, UPDATE, forward=forward)
            return forward

        return self._run(set_domain)

    def remove_domain(self, forward_id: str, domain: str) -> Deferred[PortForward | None]:
        def remove_domain(connection: psycopg.Connection[Any]) -> PortForward | None:
            cursor = connection.execute(
                "DELETE FROM forward_domains WHERE forward_id = %s AND domain = %s", (forward_id, domain)
            )
            found = _select(connection, "WHERE id = %s", (forward_id,))
            if not found:
                return None
            if cursor.rowcount > 0:
                _publish(connection, UPDATE, forward=found[0])
            return found[0]

        return self._run(remove_domain)

    def find_domain(self, domain: str) -> Deferred[PortForward | None]:
        def find(connection: psycopg.Connection[Any]) -> PortForward | None:
            found = _select(
                connection,
                "WHERE id = (SELECT forward_id FROM forward_domains WHERE domain = %s AND verified)",
                (domain,),
            )
            return found[0] if found else None

        return self._run(find, read_only=True)

    def find_slug(self, owner: str, slug: str) -> Deferred[PortForward | None]:
        def find(connection: psycopg.Connection[Any]) -> PortForward | None:
            found = _select(connection, "WHERE owner = %s AND slug = %s", (owner, slug))
            return found[0] if found else None

        return self._run(find, read_only=True)

    def get(self, forward_id: str) -> Deferred[PortForward | None]:
        def get(connection: psycopg.Connection[Any]) -> PortForward | None:
            found = _select(connection, "WHERE id = %s", (forward_id,))
            return found[0] if found else None

        return self._run(get, read_only=True)

    def list_forwards(self, container_id: str | None = None) -> Deferred[list[PortForward]]:
        def select(connection: psycopg.Connection[Any]) -> list[PortForward]:
            if container_id is None:
                return _select(connection)
            return _select(connection, "WHERE container_id = %s", (container_id,))

        return self._run(select, read_only=True)

    def remove(self, forward_id: str) -> Deferred[bool]:
        def remove(connection: psycopg.Connection[Any]) -> bool:
            cursor = connection.execute("DELETE FROM forwards WHERE id = %s", (forward_id,))
            if cursor.rowcount > 0:
                _publish(connection, DELETE, ids=[forward_id])
                return True
            return False

        return self._run(remove)

    def remove_container(self, container_id: str) -> Deferred[list[PortForward]]:
        def remove(connection: psycopg.Connection[Any]) -> list[PortForward]:
            # The same lock as add: a create either sees this stop or has
            # written its forward before, and then this removes it.
            connection.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_LOCK_NAMESPACE, _LOCK_WRITES))
            removed = _select(connection, "WHERE container_id = %s", (container_id,))
            connection.execute("DELETE FROM forwards WHERE container_id = %s", (container_id,))
            (stop,) = _one(connection, "SELECT COALESCE(max(stop), 0) + 1 FROM container_stops")
            connection.execute(
                "INSERT INTO container_stops (container_id, stop) VALUES (%s, %s) "
                "ON CONFLICT (container_id) DO UPDATE SET stop = EXCLUDED.stop",
                (container_id, stop),
            )
            connection.execute("DELETE FROM container_stops WHERE stop <= %s", (stop - STOPS_KEPT,))
            _publish(connection, REAP, ids=[f.id for f in removed], container_id=container_id)
            return removed

        return self._run(remove)

    def snapshot(self) -> Deferred[tuple[int, list[PortForward]]]:
        def snapshot(connection: psycopg.Connection[Any]) -> tuple[int, list[PortForward]]:
            # Both reads at one snapshot of the database.
            connection.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            (rev,) = _one(connection, "SELECT rev FROM revision")
            return int(rev), _select(connection)

        return self._run(snapshot, read_only=True)

    def stop_mark(self) -> Deferred[int]:
        def stop_mark(connection: psycopg.Connection[Any]) -> int:
            (last,) = _one(connection, "SELECT COALESCE(max(stop), 0) FROM container_stops")
            return int(last)

        return self._run(stop_mark, read_only=True)

    def secret(self, name: str) -> Deferred[bytes]:
        def secret(connection: psycopg.Connection[Any]) -> bytes:
            # Whichever node makes it first, every node reads that one.
            connection.execute(
                "INSERT INTO secrets (name, value) VALUES (%s, %s) ON CONFLICT (name) DO NOTHING",
                (name, secrets.token_bytes(32)),
            )
            (value,) = _one(connection, "SELECT value FROM secrets WHERE name = %s", (name,))
            return bytes(value)

        return self._run(secret)

    def check(self) -> Deferred[None]:
        def check(connection: psycopg.Connection[Any]) -> None:
            # A cheap read that also tells a server that takes no writes (a
            # standby, default_transaction_read_only): it could not take a
            # create or a delete.
            version, read_only = _one(
                connection,
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


def _publish(connection: psycopg.Connection[Any], op: str, **fields: Any) -> None:
    """
    Bump the revision and notify every node, inside the write's transaction:
    ``NOTIFY`` is delivered on commit, in commit order, and the revision's
    row lock (held to the commit) makes that the revision order.
    """
    (rev,) = _one(connection, "UPDATE revision SET rev = rev + 1 RETURNING rev")
    payload = encode_change(int(rev), op, max_bytes=NOTIFY_MAX_BYTES, **fields)
    connection.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))


def _one(connection: psycopg.Connection[Any], query: str, params: tuple[Any, ...] = ()) -> tuple[Any, ...]:
    row = connection.execute(query, params).fetchone()  # type: ignore[arg-type]  # constant SQL
    assert row is not None
    return tuple(row)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
