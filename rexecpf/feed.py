# -*- test-case-name: tests.test_feed -*-
"""
The change feed: how every node (and every process sharing a SQLite file)
hears at once of the forwards another one added, deleted or reaped.

Every write of a store (add, domain change, remove, reap) bumps the store's one revision
number and publishes a :class:`Change` carrying it, inside the writing
transaction (:func:`encode_change`), so that changes are published only when
committed, numbered in commit order:

- PostgreSQL: ``pg_notify('rexecpf_changes', payload)``, heard by
  :class:`PostgresChangeFeed` on a ``LISTEN`` connection of its own, on a
  thread of its own;
- SQLite: a row in the ``changes`` table (the latest :data:`CHANGES_KEPT`),
  read by :class:`SQLiteChangeFeed`, which polls ``PRAGMA data_version`` (no
  disk write, no lock) on a connection of its own that never writes.

:class:`ChangeFollower` feeds them, in order, to the one consumer
(:class:`rexecpf.forwards.ForwardService`): :meth:`FeedConsumer.apply` for
each change, :meth:`FeedConsumer.resync` (re-read every forward from the
store) when the feed (re)connects, when a revision is skipped, and every
``resync_seconds``.  While the feed is down ``/healthz`` is 503; after
``cut_off_grace_seconds`` down, the consumer closes its connections
(:meth:`FeedConsumer.cut_off`) until a resync succeeds again.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import attrs
from twisted.application.service import Service
from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from rexecpf.model import STORE_UNAVAILABLE, PortForward

__all__ = [
    "CHANNEL",
    "CHANGES_KEPT",
    "Change",
    "ChangeFollower",
    "FeedConsumer",
    "FeedHealth",
    "IChangeFeed",
    "MissLookups",
    "NOTIFY_MAX_BYTES",
    "UPDATE",
    "PostgresChangeFeed",
    "SQLiteChangeFeed",
    "decode_change",
    "encode_change",
]

#: The PostgreSQL ``NOTIFY`` channel.
CHANNEL = "rexecpf_changes"

#: How many of the latest changes the SQLite ``changes`` table keeps: a
#: process further behind than that finds a gap, and resyncs.
CHANGES_KEPT = 1000

ADD = "add"
DELETE = "delete"
REAP = "reap"
#: a forward's domains changed (carries the whole forward as it is now)
UPDATE = "update"

_log = Logger()


@attrs.frozen
class Change:
    """
    One committed write of the store.

    :ivar rev: the store's revision after it (1, 2, ... in commit order).
    :ivar op: ``"add"`` (``forward``), ``"update"`` (``forward``, as it
        is now: its domains changed), ``"delete"`` (``ids``) or ``"reap"``
        (``container_id`` stopped; ``ids`` were its forwards).  An add or
        update too big for ``NOTIFY`` has no ``forward``, only its id in
        ``ids``: it is applied by a resync.
    """

    rev: int
    op: str
    forward: PortForward | None = None
    ids: tuple[str, ...] = ()
    container_id: str | None = None


#: The largest ``NOTIFY`` payload PostgreSQL takes (it must be shorter than 8000 bytes).
NOTIFY_MAX_BYTES = 7999


def encode_change(
    rev: int,
    op: str,
    forward: PortForward | None = None,
    ids: tuple[str, ...] | list[str] = (),
    container_id: str | None = None,
    max_bytes: int | None = None,
) -> str:
    """
    :param max_bytes: the most the payload may take (``NOTIFY``:
        :data:`NOTIFY_MAX_BYTES`); an add or update whose forward would not
        fit (one with many long domains) names only its id instead, and
        whoever applies it reads the store again (:class:`ChangeFollower`).
    :return: the JSON payload of a change (a delete or a reap names only ids,
        so that a reap of ten forwards stays far below ``NOTIFY``'s 8000 bytes).
    """
    document: dict[str, Any] = {"v": 1, "rev": rev, "op": op}
    if forward is not None:
        document["forward"] = attrs.asdict(forward)
    if ids:
        document["ids"] = list(ids)
    if container_id is not None:
        document["container_id"] = container_id
    payload = json.dumps(document, separators=(",", ":"))
    if forward is not None and max_bytes is not None and len(payload.encode("utf-8")) > max_bytes:
        del document["forward"]
        document["ids"] = [forward.id]
        payload = json.dumps(document, separators=(",", ":"))
    return payload


def decode_change(payload: str) -> Change:
    """:raises ValueError: on a payload that is not a change of version 1."""
    try:
        document = json.loads(payload)
        if document.get("v") != 1 or document.get("op") not in (ADD, UPDATE, DELETE, REAP):
            raise ValueError(f"not a change this rexecpf knows: {payload[:200]!r}")
        forward = document.get("forward")
        return Change(
            rev=int(document["rev"]),
            op=document["op"],
            forward=PortForward(**forward) if forward is not None else None,
            ids=tuple(str(i) for i in document.get("ids", ())),
            container_id=document.get("container_id"),
        )
    except (KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"a malformed change: {error}") from None


class IChangeFeed(Interface):
    """Delivers the store's committed changes, in order, on the reactor thread."""

    def start(receive: Callable[[Change], None], connected: Callable[[bool], None]) -> None:
        """
        Begin: ``receive(change)`` for every change committed from now on;
        ``connected(True)`` each time the feed is (again) listening (changes
        committed before may have been missed: resync), ``connected(False)``
        when it lost the store.
        """

    def stop() -> Deferred[None]:
        """Stop listening; fires once nothing runs any more (promptly)."""


class FeedConsumer(Protocol):
    """What the feed's changes are applied to (:class:`rexecpf.forwards.ForwardService`)."""

    def apply(self, change: Change) -> None: ...

    def resync(self) -> Deferred[int]:
        """Re-read every forward; fires with the store's revision read."""

    def cut_off(self, reason: str) -> None:
        """Cut off from the store for too long: close every live connection, take no new one."""

    def rejoin(self) -> None:
        """In touch with the store again (after a resync)."""


#: The close reason of every connection of a node cut off from the store.
CUT_OFF = "cut off from the store"

#: How soon a failed resync is tried again while the node is cut off (or has
#: never read the store).
RESYNC_RETRY_SECONDS = 1.0


class ChangeFollower(Service):
    """
    Follows an :class:`IChangeFeed` for a :class:`FeedConsumer`: changes in
    revision order (those at or below the last resync's revision are
    ignored; one skipped resyncs), resyncs on every (re)connection and every
    ``resync_seconds``, and the cut-off rule.

    :ivar up: whether the feed is connected (``/healthz``: :meth:`check`).
    """

    _log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        feed: IChangeFeed,
        consumer: FeedConsumer,
        resync_seconds: float = 30.0,
        grace_seconds: float = 10.0,
    ) -> None:
        self._clock = clock
        self._feed = feed
        self._consumer = consumer
        self._resync_seconds = resync_seconds
        self._grace_seconds = grace_seconds
        self.up = False
        #: the revision the consumer is at (``None``: no resync yet)
        self.rev: int | None = None
        self._resyncing: Deferred[int] | None = None
        self._again = False
        self._held: list[Change] = []
        self._cut_off = False
        self._grace: IDelayedCall | None = None
        self._periodic: LoopingCall | None = None
        self._retry: IDelayedCall | None = None
        #: /healthz checks waiting for the first resync
        self._starting: list[Deferred[None]] = []
        #: how many resyncs finished (for tests and the log)
        self.resyncs = 0

    # --- lifecycle

    def startService(self) -> None:
        super().startService()
        # Until the feed first connects, the node counts as cut off: the grace
        # period runs from the start.
        self._grace = self._clock.callLater(self._grace_seconds, self._grace_over)
        self._feed.start(self._received, self._connected)
        self._periodic = LoopingCall(self.resync)
        self._periodic.clock = self._clock
        self._periodic.start(self._resync_seconds, now=False).addErrback(
            lambda failure: self._log.failure("periodic resync", failure)
        )

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._periodic is not None and self._periodic.running:
            self._periodic.stop()
        for timer in (self._grace, self._retry):
            if timer is not None and timer.active():
                timer.cancel()
        self._grace = self._retry = None
        self._started(Failure(STORE_UNAVAILABLE("stopping")))
        return self._feed.stop()

    # --- health

    def check(self) -> Deferred[None]:
        """
        :return: fires when the feed is connected (and, after a cut-off,
            resynced); fails with 503 otherwise.  Never touches the store.
        """
        if self.up and not self._cut_off and self.rev is not None:
            return succeed(None)
        if self.running and self.rev is None and not self._cut_off:
            # Starting: wait for the first resync (within the grace period),
            # so that the first /healthz of a node just started is not 503.
            waiter: Deferred[None] = Deferred()
            self._starting.append(waiter)
            return waiter
        return fail(STORE_UNAVAILABLE("cut off from the store's change feed"))

    def _started(self, failure: Failure | None) -> None:
        starting, self._starting = self._starting, []
        for waiter in starting:
            if failure is None:
                waiter.callback(None)
            else:
                waiter.errback(failure)

    # --- the feed's events

    def _connected(self, up: bool) -> None:
        if not self.running:
            return
        if up:
            self._log.info("change feed connected: resyncing")
            self.up = True
            self.resync()
            return
        if self.up:
            self._log.warn(
                "change feed lost: /healthz is 503; connections close in {grace}s unless it is back",
                grace=self._grace_seconds,
            )
        self.up = False
        if self._grace is None or not self._grace.active():
            self._grace = self._clock.callLater(self._grace_seconds, self._grace_over)

    def _grace_over(self) -> None:
        # (A resync that succeeds while the feed is up cancels this.)
        self._grace = None
        self._cut_off = True
        self._started(Failure(STORE_UNAVAILABLE("cut off from the store's change feed")))
        self._log.warn("cut off from the store for {grace}s: closing every connection", grace=self._grace_seconds)
        self._consumer.cut_off(CUT_OFF)

    def _received(self, change: Change) -> None:
        if not self.running:
            return
        if self._resyncing is not None or self.rev is None:
            if len(self._held) >= CHANGES_KEPT:
                # Bounded: drop them, and resync once more after this one
                # (its snapshot holds them all).
                self._held.clear()
                self._again = True
            self._held.append(change)
            return
        self._take(change)

    def _take(self, change: Change) -> None:
        assert self.rev is not None
        if change.rev <= self.rev:
            return  # already in the snapshot (or an echo seen twice)
        if change.rev > self.rev + 1:
            self._log.info("change feed skipped from {rev} to {got}: resyncing", rev=self.rev, got=change.rev)
            self._held.append(change)
            self.resync()
            return
        if change.op in (ADD, UPDATE) and change.forward is None:
            # Too big to carry its forward: read every forward again, at one
            # revision (this one or later), changes after it held meanwhile.
            self._log.info("change {rev} names only its forward: resyncing", rev=change.rev)
            self.resync()
            return
        self.rev = change.rev
        try:
            self._consumer.apply(change)
        except Exception:
            self._log.failure("could not apply change {rev}", rev=change.rev)

    # --- resync

    def resync(self) -> Deferred[int] | None:
        """
        Re-read every forward from the store (one at a time: a resync asked
        for while one runs runs again after it).

        :return: the Deferred of the resync under way (``None`` when queued).
        """
        if self._resyncing is not None:
            self._again = True
            return None
        self._again = False
        resyncing = self._resyncing = self._consumer.resync()

        def done(rev: int) -> None:
            self.resyncs += 1
            self.rev = rev if self.rev is None else max(self.rev, rev)
            if self._cut_off and self.up:
                self._cut_off = False
                self._log.info("in touch with the store again")
                self._consumer.rejoin()
            if self.up and self._grace is not None and self._grace.active():
                self._grace.cancel()
                self._grace = None
            if self.up and not self._cut_off:
                self._started(None)

        def failed(failure: Failure) -> None:
            self._log.warn("resync failed: {error}", error=failure.getErrorMessage())
            if self.running and (self._cut_off or self.rev is None) and not (self._retry and self._retry.active()):
                # Not in touch yet: try again soon, not in resync_seconds.
                self._retry = self._clock.callLater(RESYNC_RETRY_SECONDS, self.resync)

        def after(_: object) -> None:
            self._resyncing = None
            held, self._held = sorted(self._held, key=lambda c: c.rev), []
            if self.rev is None:
                self._held = held  # kept for the next resync
            else:
                for change in held:
                    if self._resyncing is not None:
                        self._held.append(change)
                    else:
                        self._take(change)
            if self._again and self._resyncing is None:
                self.resync()

        resyncing.addCallbacks(done, failed).addBoth(after)
        return resyncing


class _Check(Protocol):
    def check(self) -> Deferred[None]: ...


class FeedHealth:
    """
    ``/healthz``'s store check: 503 at once while the change feed is down
    (no store access), else the store's own (cached) check.
    """

    def __init__(self, follower: ChangeFollower, store: _Check) -> None:
        self._follower = follower
        self._store = store

    def check(self) -> Deferred[None]:
        return self._follower.check().addCallback(lambda _: self._store.check())


# --- cache misses -------------------------------------------------------


class MissLookups:
    """
    Store reads for forward ids not in a node's memory (created on another
    node, not yet heard of), bounded so that random ids cannot flood the
    store: the same id is read once at a time, an id found missing is not
    read again for ``negative_seconds``, and at most ``per_second`` reads
    start in a second (beyond: not found, without a read).

    :param read: ``forward_id -> Deferred[PortForward | None]`` (the store's ``get``).
    """

    def __init__(
        self,
        clock: IReactorTime,
        read: Callable[[str], Deferred[PortForward | None]],
        per_second: int = 20,
        negative_seconds: float = 1.0,
        max_negative: int = 4096,
    ) -> None:
        self._clock = clock
        self._read = read
        self._per_second = per_second
        self._negative_seconds = negative_seconds
        self._max_negative = max_negative
        self._negative: dict[str, float] = {}
        self._reading: dict[str, list[Deferred[PortForward | None]]] = {}
        self._window = -1
        self._started = 0
        #: how many store reads were made (for tests)
        self.reads = 0

    def lookup(self, forward_id: str) -> Deferred[PortForward | None]:
        now = self._clock.seconds()
        until = self._negative.get(forward_id)
        if until is not None:
            if until > now:
                return succeed(None)
            del self._negative[forward_id]
        waiting = self._reading.get(forward_id)
        answer: Deferred[PortForward | None] = Deferred()
        if waiting is not None:
            waiting.append(answer)
            return answer
        window = int(now)
        if window != self._window:
            self._window, self._started = window, 0
        if self._started >= self._per_second:
            return succeed(None)
        self._started += 1
        self.reads += 1
        self._reading[forward_id] = [answer]

        def answered(result: PortForward | Failure | None) -> None:
            waiting = self._reading.pop(forward_id, [])
            if result is None:
                self._remember_missing(forward_id)
            for d in waiting:
                if isinstance(result, Failure):
                    d.errback(result)
                else:
                    d.callback(result)

        self._read(forward_id).addBoth(answered)
        return answer

    def forget(self, forward_id: str) -> None:
        """``forward_id`` was just heard of: it is not missing any more."""
        self._negative.pop(forward_id, None)

    def _remember_missing(self, forward_id: str) -> None:
        now = self._clock.seconds()
        if len(self._negative) >= self._max_negative:
            for key in [k for k, until in self._negative.items() if until <= now]:
                del self._negative[key]
            while len(self._negative) >= self._max_negative:
                del self._negative[next(iter(self._negative))]
        self._negative[forward_id] = now + self._negative_seconds


# --- SQLite -------------------------------------------------------------


def _open_reader(connection: sqlite3.Connection) -> None:
    connection.isolation_level = None
    connection.execute("PRAGMA busy_timeout = 5000")
    # This connection only reads: it can never write, whatever runs on it.
    connection.execute("PRAGMA query_only = ON")


@implementer(IChangeFeed)
class SQLiteChangeFeed:
    """
    The changes of a SQLite state file shared by several processes on one
    host: every ``interval`` seconds (on ``clock``), on a thread, ``PRAGMA
    data_version`` tells whether any other connection committed; when one
    did, the ``changes`` rows after the last one read are delivered.  A poll
    that fails (the file cannot be read) counts as disconnected.

    :param reactor: for the connection's thread to report back.
    """

    _log = Logger()

    def __init__(self, reactor: Any, clock: IReactorTime, path: str, interval: float = 0.2) -> None:
        self._pool = adbapi.ConnectionPool(
            "sqlite3",
            path,
            check_same_thread=False,
            cp_min=1,
            cp_max=1,
            cp_openfun=_open_reader,
            cp_noisy=False,
            cp_reactor=reactor,
        )
        self._clock = clock
        self._interval = interval
        self._loop: LoopingCall | None = None
        self._version: int | None = None
        self._after: int | None = None
        self._up = False
        self._receive: Callable[[Change], None] = lambda change: None
        self._connected: Callable[[bool], None] = lambda up: None

    def start(self, receive: Callable[[Change], None], connected: Callable[[bool], None]) -> None:
        self._receive, self._connected = receive, connected
        self._loop = LoopingCall(self._poll)
        self._loop.clock = self._clock
        self._loop.start(self._interval, now=True)

    def _poll(self) -> Deferred[None]:
        after, known = self._after, self._version

        def read(connection: sqlite3.Connection) -> tuple[int, int, list[tuple[int, str]]]:
            (version,) = connection.execute("PRAGMA data_version").fetchone()
            if version == known and after is not None:
                return version, after, []
            connection.execute("BEGIN")
            try:
                (rev,) = connection.execute("SELECT rev FROM revision").fetchone()
                rows = [] if after is None else connection.execute(
                    "SELECT rev, payload FROM changes WHERE rev > ? ORDER BY rev", (after,)
                ).fetchall()
            finally:
                connection.execute("COMMIT")
            return version, rev, rows

        def polled(result: tuple[int, int, list[tuple[int, str]]]) -> None:
            self._version, rev, rows = result
            self._after = rev if not rows else max(rev, rows[-1][0])
            if not self._up:
                self._up = True
                self._connected(True)
            for _, payload in rows:
                try:
                    change = decode_change(payload)
                except ValueError as error:
                    self._log.warn("change feed: {error}", error=error)
                    continue
                self._receive(change)

        def failed(failure: Failure) -> None:
            self._log.warn("change feed cannot read the state file: {error}", error=failure.getErrorMessage())
            self._version = None
            if self._up:
                self._up = False
                self._connected(False)

        d: Deferred[Any] = self._pool.runWithConnection(read)
        return d.addCallbacks(polled, failed)

    def stop(self) -> Deferred[None]:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._pool.running:
            self._pool.close()
        return succeed(None)


# --- PostgreSQL ---------------------------------------------------------


@implementer(IChangeFeed)
class PostgresChangeFeed:
    """
    ``LISTEN rexecpf_changes`` on a psycopg connection of its own (outside
    the store's pool), on a thread of its own: each notification reaches the
    reactor thread with ``callFromThread``.  A lost connection is reported,
    then connected again (every ``retry_seconds``); the connection is also
    pinged every ``ping_seconds``, so a server that went away silently is
    found.  :meth:`stop` ends the thread within ``poll_seconds``.

    :param url: a ``postgresql://`` URL.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        url: str,
        poll_seconds: float = 0.2,
        retry_seconds: float = 0.5,
        ping_seconds: float = 5.0,
    ) -> None:
        from rexecpf.postgres import connection_settings

        self._reactor = reactor
        self._settings = {**connection_settings(url), "connect_timeout": "3"}
        self._url = url
        self._poll_seconds = poll_seconds
        self._retry_seconds = retry_seconds
        self._ping_seconds = ping_seconds
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._ended: Deferred[None] = Deferred()

    def start(self, receive: Callable[[Change], None], connected: Callable[[bool], None]) -> None:
        self._thread = threading.Thread(
            target=self._listen, args=(receive, connected), name="rexecpf-change-feed", daemon=True
        )
        self._thread.start()

    def _listen(self, receive: Callable[[Change], None], connected: Callable[[bool], None]) -> None:
        import psycopg

        from rexecpf.postgres import redact

        call = self._reactor.callFromThread
        up = False
        try:
            while not self._stopping.is_set():
                try:
                    with psycopg.connect(**self._settings) as connection:
                        connection.execute(f"LISTEN {CHANNEL}")
                        up = True
                        call(connected, True)
                        pinged = time.monotonic()
                        while not self._stopping.is_set():
                            for notify in connection.notifies(timeout=self._poll_seconds):
                                try:
                                    change = decode_change(notify.payload)
                                except ValueError as error:
                                    call(self._log.warn, "change feed: {error}", error=str(error))
                                    continue
                                call(receive, change)
                            if time.monotonic() - pinged >= self._ping_seconds:
                                connection.execute("SELECT 1")
                                pinged = time.monotonic()
                except psycopg.Error as error:
                    if self._stopping.is_set():
                        break
                    message = redact(str(error), self._url)
                    call(self._log.warn, "change feed: {error}", error=message)
                    if up:
                        up = False
                        call(connected, False)
                    self._stopping.wait(self._retry_seconds)
        finally:
            call(self._ended.callback, None)

    def stop(self) -> Deferred[None]:
        """
        :return: fires when the thread ended, or after at most
            ``STOP_WAIT_SECONDS`` (a connect in progress): the thread is a
            daemon thread, so it never holds the process.
        """
        self._stopping.set()
        if self._thread is None or not self._thread.is_alive() or self._ended.called:
            return succeed(None)
        stopped: Deferred[None] = Deferred()

        def fire(_: object = None) -> None:
            if not stopped.called:
                stopped.callback(None)

        timer = self._reactor.callLater(STOP_WAIT_SECONDS, fire)

        def ended(_: object) -> None:
            if timer.active():
                timer.cancel()
            fire()

        self._ended.addCallback(ended)
        return stopped


#: How long :meth:`PostgresChangeFeed.stop` waits for its thread.
STOP_WAIT_SECONDS = 1.0
