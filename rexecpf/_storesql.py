# -*- test-case-name: tests.test_store -*-
"""
The transactions of :class:`rexecpf.store.IForwardStore`, written once for
both SQL stores: SQLite (:class:`rexecpf.store.SQLiteForwardStore`) and
PostgreSQL (:class:`rexecpf.postgres.PostgresForwardStore`).

The SQL is what both understand (SQLite >= 3.35, for ``RETURNING``): ``?``
placeholders (the PostgreSQL side turns them into psycopg's ``%s``, so the
SQL here holds no other ``?`` and no ``%``); booleans bound as Python bools
and tested bare (``WHERE verified``: SQLite keeps them as 0 or 1);
``INSERT ... ON CONFLICT``.  What differs is behind :class:`Transaction`:
how a writer holds off the others, how the reads see one snapshot, how the
insertion order is kept, and where a change is published.  Each store keeps
its own connections, schema, error mapping and :meth:`check`.
"""

from __future__ import annotations

import secrets
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, TypeVar

import attrs
from twisted.internet.defer import Deferred

from rexecpf.feed import ADD, DELETE, REAP, UPDATE
from rexecpf.model import (
    CONTAINER_NOT_RUNNING,
    DOMAIN_CLAIMED,
    LIMIT_EXCEEDED,
    LOCAL_PORT_UNAVAILABLE,
    PORT_ALREADY_FORWARDED,
    SLUG_TAKEN,
    TOO_MANY_DOMAINS,
    PortForward,
)

T = TypeVar("T")

#: How many of the latest container stops are remembered: a create in flight
#: while more containers than that stop may miss its own container's stop.
STOPS_KEPT = 100_000

_COLUMNS = "id, container_id, container_port, local_port, name, created_ms, owner, pass_preflight, slug"


class Transaction(ABC):
    """One transaction on one connection, already begun, in the SQL of this module."""

    #: The column that orders the rows of ``forwards`` and ``forward_domains``
    #: as they were inserted.
    insertion_order: ClassVar[str]

    @abstractmethod
    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """:return: how many rows ``sql`` changed."""

    @abstractmethod
    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """:return: every row ``sql`` answers."""

    @abstractmethod
    def lock_writes(self) -> None:
        """
        Hold off every other writer that could break the invariants until
        this transaction ends (first thing in add, set_domain and reap).
        """

    @abstractmethod
    def read_one_snapshot(self) -> None:
        """Make every read of this (read-only) transaction see one snapshot (first thing in it)."""

    @abstractmethod
    def leave_change(self, rev: int, op: str, fields: dict[str, Any]) -> None:
        """Publish change ``rev`` (:func:`rexecpf.feed.encode_change`) to the other processes, on commit."""

    def first(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        """:return: the first row ``sql`` answers, or ``None``."""
        found = self.rows(sql, params)
        return found[0] if found else None

    def one(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...]:
        """:return: the one row ``sql`` answers."""
        (row,) = self.rows(sql, params)
        return row


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


def with_domains(forwards: list[PortForward], rows: list[tuple[Any, ...]]) -> list[PortForward]:
    """
    :param rows: ``(forward_id, domain, verified)`` in the order the
        domains were added.
    :return: ``forwards`` with their domains.
    """
    domains: dict[str, list[tuple[str, bool]]] = {}
    for forward_id, domain, verified in rows:
        domains.setdefault(forward_id, []).append((domain, bool(verified)))
    return [
        attrs.evolve(
            forward,
            domains=tuple(d for d, _ in domains[forward.id]),
            verified_domains=tuple(d for d, ok in domains[forward.id] if ok),
        )
        if forward.id in domains
        else forward
        for forward in forwards
    ]


def _select(tx: Transaction, where: str = "", params: tuple[Any, ...] = ()) -> list[PortForward]:
    """:return: the forwards ``where`` selects (oldest first), with their domains."""
    order = tx.insertion_order
    forwards = [
        _row(row)
        for row in tx.rows(f"SELECT {_COLUMNS} FROM forwards {where} ORDER BY created_ms, {order}", params)
    ]
    if not forwards:
        return []
    rows = tx.rows(
        f"SELECT forward_id, domain, verified FROM forward_domains WHERE forward_id IN "
        f"(SELECT id FROM forwards {where}) ORDER BY {order}",
        params,
    )
    return with_domains(forwards, rows)


def _select_one(tx: Transaction, where: str, params: tuple[Any, ...]) -> PortForward | None:
    found = _select(tx, where, params)
    return found[0] if found else None


def _claimed_elsewhere(tx: Transaction, forward_id: str, owner: str, domain: str) -> None:
    """:raises APIError: 409 when another forward claims ``domain`` (see :meth:`IForwardStore.set_domain`)."""
    row = tx.first(
        "SELECT verified FROM forward_domains WHERE domain = ? AND forward_id != ? AND (verified OR owner = ?) LIMIT 1",
        (domain, forward_id, owner),
    )
    if row:
        raise DOMAIN_CLAIMED(
            f"{domain} is claimed by another forward"
            + ("" if row[0] else " of yours (not verified yet): remove it there first")
        )


def _publish(tx: Transaction, op: str, **fields: Any) -> None:
    """Bump the revision and publish the change (inside the write's transaction)."""
    (rev,) = tx.one("UPDATE revision SET rev = rev + 1 RETURNING rev")
    tx.leave_change(int(rev), op, fields)


class SQLForwardStore(ABC):
    """:class:`rexecpf.store.IForwardStore` but :meth:`check` and :meth:`close`, on a :class:`Transaction`."""

    @abstractmethod
    def _run(self, work: Callable[..., T], *args: Any, read_only: bool = False) -> Deferred[T]:
        """
        Run ``work(transaction, *args)`` in one transaction (a
        :class:`Transaction`), off the reactor thread.

        :param read_only: ``work`` only reads.
        """

    def add(self, forward: PortForward, limit: int, stop_mark: int | None = None) -> Deferred[PortForward]:
        def add(tx: Transaction) -> PortForward:
            tx.lock_writes()
            if stop_mark is not None:
                row = tx.first(
                    "SELECT stop FROM container_stops WHERE container_id = ?", (forward.container_id,)
                )
                if row and row[0] > stop_mark:
                    raise CONTAINER_NOT_RUNNING("the container stopped while the forward was being created")
            taken, count, used = tx.one(
                "SELECT count(*) FILTER (WHERE container_port = ?), count(*), "
                "(SELECT count(*) FROM forwards WHERE local_port = ?) "
                "FROM forwards WHERE container_id = ?",
                (forward.container_port, forward.local_port, forward.container_id),
            )
            if taken:
                raise PORT_ALREADY_FORWARDED(
                    f"container port {forward.container_port} of {forward.container_id} is already forwarded"
                )
            if count >= limit:
                raise LIMIT_EXCEEDED(f"a container may have at most {limit} forwards")
            if used:
                raise LOCAL_PORT_UNAVAILABLE(f"local port {forward.local_port} is in use")
            if forward.slug is not None and tx.first(
                "SELECT 1 FROM forwards WHERE owner = ? AND slug = ?", (forward.owner, forward.slug)
            ):
                raise SLUG_TAKEN(f"you already have a forward named {forward.slug!r}")
            for domain in forward.domains:
                _claimed_elsewhere(tx, forward.id, forward.owner, domain)
            tx.execute(
                f"INSERT INTO forwards ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
                tx.execute(
                    "INSERT INTO forward_domains (forward_id, domain, owner, verified) VALUES (?, ?, ?, ?)",
                    (forward.id, domain, forward.owner, domain in forward.verified_domains),
                )
            _publish(tx, ADD, forward=forward)
            return forward

        return self._run(add)

    def set_domain(
        self, forward_id: str, domain: str, verified: bool, limit: int
    ) -> Deferred[PortForward | None]:
        def set_domain(tx: Transaction) -> PortForward | None:
            tx.lock_writes()
            row = tx.first("SELECT owner FROM forwards WHERE id = ?", (forward_id,))
            if row is None:
                return None
            (owner,) = row
            _claimed_elsewhere(tx, forward_id, owner, domain)
            had = tx.first(
                "SELECT verified FROM forward_domains WHERE forward_id = ? AND domain = ?",
                (forward_id, domain),
            )
            if had is None:
                (count,) = tx.one("SELECT count(*) FROM forward_domains WHERE forward_id = ?", (forward_id,))
                if count >= limit:
                    raise TOO_MANY_DOMAINS(f"a forward may have at most {limit} domains")
                tx.execute(
                    "INSERT INTO forward_domains (forward_id, domain, owner, verified) VALUES (?, ?, ?, ?)",
                    (forward_id, domain, owner, verified),
                )
            elif verified and not had[0]:
                tx.execute(
                    "UPDATE forward_domains SET verified = ? WHERE forward_id = ? AND domain = ?",
                    (True, forward_id, domain),
                )
            else:
                return _select(tx, "WHERE id = ?", (forward_id,))[0]
            (forward,) = _select(tx, "WHERE id = ?", (forward_id,))
            _publish(tx, UPDATE, forward=forward)
            return forward

        return self._run(set_domain)

    def remove_domain(self, forward_id: str, domain: str) -> Deferred[PortForward | None]:
        def remove_domain(tx: Transaction) -> PortForward | None:
            removed = tx.execute(
                "DELETE FROM forward_domains WHERE forward_id = ? AND domain = ?", (forward_id, domain)
            )
            found = _select_one(tx, "WHERE id = ?", (forward_id,))
            if found is not None and removed > 0:
                _publish(tx, UPDATE, forward=found)
            return found

        return self._run(remove_domain)

    def find_domain(self, domain: str) -> Deferred[PortForward | None]:
        return self._run(
            _select_one,
            "WHERE id = (SELECT forward_id FROM forward_domains WHERE domain = ? AND verified)",
            (domain,),
            read_only=True,
        )

    def find_slug(self, owner: str, slug: str) -> Deferred[PortForward | None]:
        return self._run(_select_one, "WHERE owner = ? AND slug = ?", (owner, slug), read_only=True)

    def get(self, forward_id: str) -> Deferred[PortForward | None]:
        return self._run(_select_one, "WHERE id = ?", (forward_id,), read_only=True)

    def list_forwards(self, container_id: str | None = None) -> Deferred[list[PortForward]]:
        if container_id is None:
            return self._run(_select, read_only=True)
        return self._run(_select, "WHERE container_id = ?", (container_id,), read_only=True)

    def remove(self, forward_id: str) -> Deferred[bool]:
        def remove(tx: Transaction) -> bool:
            if tx.execute("DELETE FROM forwards WHERE id = ?", (forward_id,)) > 0:
                _publish(tx, DELETE, ids=[forward_id])
                return True
            return False

        return self._run(remove)

    def remove_container(self, container_id: str) -> Deferred[list[PortForward]]:
        def remove(tx: Transaction) -> list[PortForward]:
            # The same lock as add: a create either sees this stop or has
            # written its forward before, and then this removes it.
            tx.lock_writes()
            removed = _select(tx, "WHERE container_id = ?", (container_id,))
            tx.execute("DELETE FROM forwards WHERE container_id = ?", (container_id,))
            (stop,) = tx.one("SELECT COALESCE(max(stop), 0) + 1 FROM container_stops")
            tx.execute(
                "INSERT INTO container_stops (container_id, stop) VALUES (?, ?) "
                "ON CONFLICT (container_id) DO UPDATE SET stop = EXCLUDED.stop",
                (container_id, stop),
            )
            tx.execute("DELETE FROM container_stops WHERE stop <= ?", (stop - STOPS_KEPT,))
            _publish(tx, REAP, ids=[f.id for f in removed], container_id=container_id)
            return removed

        return self._run(remove)

    def snapshot(self) -> Deferred[tuple[int, list[PortForward]]]:
        def snapshot(tx: Transaction) -> tuple[int, list[PortForward]]:
            tx.read_one_snapshot()
            (rev,) = tx.one("SELECT rev FROM revision")
            return int(rev), _select(tx)

        return self._run(snapshot, read_only=True)

    def stop_mark(self) -> Deferred[int]:
        def stop_mark(tx: Transaction) -> int:
            (last,) = tx.one("SELECT COALESCE(max(stop), 0) FROM container_stops")
            return int(last)

        return self._run(stop_mark, read_only=True)

    def secret(self, name: str) -> Deferred[bytes]:
        def secret(tx: Transaction) -> bytes:
            row = tx.first("SELECT value FROM secrets WHERE name = ?", (name,))
            if row is None:
                # Whichever node makes it first, every node reads that one.
                tx.execute(
                    "INSERT INTO secrets (name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
                    (name, secrets.token_bytes(32)),
                )
                row = tx.one("SELECT value FROM secrets WHERE name = ?", (name,))
            return bytes(row[0])

        return self._run(secret)
