# -*- test-case-name: tests.test_ops -*-
"""
Running under a service manager: readiness and watchdog notifications
(``$NOTIFY_SOCKET``), a graceful stop, a live reload on ``SIGHUP``, JSON log
lines, and the one log line written when a tunnel or listener connection ends.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterable, Mapping
from types import FrameType
from typing import IO, Any

import attrs
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import FileLogObserver, ILogObserver, LogEvent, Logger, eventAsJSON, formatEvent
from twisted.python.failure import Failure

from rexecpf.auth import Authenticator
from rexecpf.backends.static import StaticBackend, read_inventory
from rexecpf.config import ConfigError, load_config
from rexecpf.forwards import ForwardService
from rexecpf.model import CloseReason

__all__ = [
    "GracefulService",
    "Notifier",
    "Readiness",
    "Reloader",
    "json_log_observer",
    "notifier_from_environ",
]


class Notifier:
    """
    Sends ``sd_notify`` datagrams (``READY=1``, ``STOPPING=1``, ``WATCHDOG=1``)
    to the service manager's socket.  Sending never blocks and never raises:
    a lost notification is logged.

    :param address: the value of ``$NOTIFY_SOCKET``: a path, or ``@name`` for
        the abstract namespace.
    :param watchdog_seconds: the watchdog period asked for (``$WATCHDOG_USEC``),
        or ``None``.
    """

    _log = Logger()

    def __init__(self, address: str, watchdog_seconds: float | None = None) -> None:
        self.address = address
        self.watchdog_seconds = watchdog_seconds
        self._target = "\0" + address[1:] if address.startswith("@") else address
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._socket.setblocking(False)

    def notify(self, message: str) -> None:
        """Send one notification, e.g. ``READY=1``."""
        try:
            self._socket.sendto(message.encode("utf-8"), self._target)
        except OSError as error:
            self._log.warn("could not notify {address}: {error}", address=self.address, error=error)

    def close(self) -> None:
        self._socket.close()


def notifier_from_environ(environ: Mapping[str, str], pid: int | None = None) -> Notifier | None:
    """
    :param environ: the process environment.
    :param pid: this process's id (checked against ``$WATCHDOG_PID``).
    :return: a :class:`Notifier` for ``$NOTIFY_SOCKET``, or ``None`` when it
        is unset (not run by systemd: every notification is a no-op).
    """
    address = environ.get("NOTIFY_SOCKET", "")
    if not address or not (address.startswith("/") or address.startswith("@")):
        return None
    watchdog: float | None = None
    usec = environ.get("WATCHDOG_USEC", "")
    watchdog_pid = environ.get("WATCHDOG_PID", "")
    if usec.isdigit() and int(usec) > 0:
        if not watchdog_pid or watchdog_pid == str(pid if pid is not None else os.getpid()):
            watchdog = int(usec) / 1e6
    return Notifier(address, watchdog)


class Readiness(Service):
    """
    Tells the service manager ``READY=1`` once everything answers: every
    listener listens, the store and the backend answered a check, and the
    forwards were restored (``ForwardService.ready``).  Then ``WATCHDOG=1``
    every half watchdog period, from the reactor thread: if the reactor hangs,
    the pings stop and systemd restarts the service.

    :param clock: drives the watchdog.
    :param notifier: where to send, or ``None`` (nothing is sent).
    :param waits: callables returning the Deferreds to wait for; each is
        called at ``startService``.
    """

    _log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        notifier: Notifier | None,
        waits: Iterable[Callable[[], Deferred[Any]]],
    ) -> None:
        self._clock = clock
        self._notifier = notifier
        self._waits = list(waits)
        self._watchdog: LoopingCall | None = None
        #: fires once ready (whether or not a notifier is set)
        self.ready: Deferred[None] = Deferred()

    def startService(self) -> None:
        super().startService()
        if self._notifier is not None and self._notifier.watchdog_seconds:
            self._watchdog = LoopingCall(self._notifier.notify, "WATCHDOG=1")
            self._watchdog.clock = self._clock
            self._watchdog.start(self._notifier.watchdog_seconds / 2, now=True)
        checks = [maybeDeferred(wait) for wait in self._waits]
        gatherResults(checks, consumeErrors=True).addCallbacks(self._ready, self._not_ready)

    def _ready(self, _: object) -> None:
        if not self.running:
            return
        self._log.info("ready")
        if self._notifier is not None:
            self._notifier.notify("READY=1")
        self.ready.callback(None)

    def _not_ready(self, failure: Any) -> None:
        cause = getattr(failure.value, "subFailure", None) or failure
        self._log.error("not ready: {error}", error=cause.getErrorMessage())

    def stopService(self) -> Deferred[None] | None:
        if self._notifier is not None:
            self._notifier.notify("STOPPING=1")
        if self._watchdog is not None and self._watchdog.running:
            self._watchdog.stop()
        return super().stopService()


def branch(deferred: Deferred[Any]) -> Deferred[Any]:
    """
    :return: a new Deferred with the result of ``deferred``, which is left as
        it was (its result is not consumed, its failure not swallowed).
    """
    result: Deferred[Any] = Deferred()

    def copy(outcome: Any) -> Any:
        if isinstance(outcome, Failure):
            result.errback(outcome)
        else:
            result.callback(outcome)
        return outcome

    deferred.addBoth(copy)
    return result


class GracefulService(MultiService):
    """
    The top of the service tree, with an orderly stop:

    1. ``STOPPING=1`` (the :class:`Readiness` child) and stop accepting: every
       listener stops listening;
    2. live connections: tunnels and listener connections are closed at once
       ("going away", close code 1001); requests in flight may finish for up
       to ``grace_seconds``, then what is left is closed;
    3. the other children stop (newest first), then the store is closed, so
       no write is cut short.

    Requests that finished may still have bytes in their connection's write
    buffer: before the reactor stops, the stop waits (within the grace period)
    until the reactor has no pending writes.

    :param grace_seconds: ``[server] shutdown_grace_seconds``.
    :param clock: the reactor (``getWriters`` is used when it has it).
    """

    _log = Logger()

    def __init__(self, grace_seconds: float, clock: IReactorTime) -> None:
        super().__init__()
        self.grace_seconds = grace_seconds
        self._clock = clock
        self._first: list[Service] = []
        self._forwards: ForwardService | None = None
        self._store: Any = None

    def stop_order(self, first: Iterable[Service], forwards: ForwardService, store: Any) -> None:
        """
        :param first: stopped before anything else (readiness, listeners).
        :param forwards: drained next.
        :param store: closed last (``close()``).
        """
        self._first = list(first)
        self._forwards = forwards
        self._store = store

    @inlineCallbacks
    def stopService(self) -> Any:
        Service.stopService(self)
        self._log.info("stopping: no new connections, up to {grace}s for requests",
                       grace=self.grace_seconds)
        yield gatherResults([maybeDeferred(s.stopService) for s in self._first if s.running],
                            consumeErrors=True).addErrback(self._log_failure)
        deadline = self._clock.seconds() + self.grace_seconds
        if self._forwards is not None:
            yield self._forwards.drain(self.grace_seconds)
        yield self._flushed(deadline)
        rest = [s for s in reversed(list(self)) if s.running]
        yield gatherResults([maybeDeferred(s.stopService) for s in rest],
                            consumeErrors=True).addErrback(self._log_failure)
        if self._store is not None:
            self._store.close()
        self._log.info("stopped")

    @inlineCallbacks
    def _flushed(self, deadline: float) -> Any:
        writers = getattr(self._clock, "getWriters", None)
        while writers is not None and writers() and self._clock.seconds() < deadline:
            yield deferLater(self._clock, 0.02, lambda: None)

    def _log_failure(self, failure: Any) -> None:
        self._log.failure("while stopping", failure)


class Reloader(Service):
    """
    Re-reads the configuration file on ``SIGHUP``: users, tokens and admins
    (the :class:`Authenticator` is changed in place) and the static
    inventory.  A revoked token stops working at once, and its user's live
    connections are closed; so are the connections of a user who may no
    longer use the forward's container (no longer an admin, or the
    container's owner changed in the inventory: the forward stays, with
    the container, for its new owner).  Nothing else is interrupted (a
    ``local_port`` connection belongs to no user).  A file that does not
    load is logged in one line and ignored.  Other settings need a restart.

    :param reactor: for ``callFromThread`` out of the signal handler.
    :param path: the configuration file, or ``None`` (``--demo``).
    :param authenticator: changed in place.
    :param forwards: whose connections of revoked users are closed.
    :param backend: the backend; a :class:`StaticBackend` gets the new inventory.
    :param inventory: the inventory file the backend was started with.
    :param install_signal: whether ``startService`` installs the ``SIGHUP``
        handler (restored at ``stopService``).
    :param also: called first on every reload, whatever the file holds (the
        TLS certificate directory); each logs its own problems, and one that
        raises is logged and changes nothing else.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        path: str | None,
        authenticator: Authenticator,
        forwards: ForwardService,
        backend: Any,
        inventory: str | None,
        install_signal: bool = False,
        also: Iterable[Callable[[], object]] = (),
    ) -> None:
        self._reactor = reactor
        self._also = list(also)
        self._path = path
        self._authenticator = authenticator
        self._forwards = forwards
        self._backend = backend
        self._inventory = inventory
        self._install_signal = install_signal
        self._previous: Any = None
        #: fires with how many connections the last reload's access re-check closed
        self.rechecked: Deferred[int] | None = None

    def startService(self) -> None:
        super().startService()
        if self._install_signal:
            self._previous = signal.signal(signal.SIGHUP, self._on_signal)

    def stopService(self) -> Deferred[None] | None:
        if self._install_signal and self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None
        return super().stopService()

    def _on_signal(self, number: int, frame: FrameType | None) -> None:
        self._reactor.callFromThread(self.reload)

    def reload(self) -> bool:
        """
        Re-read the file and apply what can change while running.

        :return: whether the new configuration was taken.
        """
        for reload_more in self._also:
            try:
                reload_more()
            except Exception:
                self._log.failure("reload: {what} failed", what=reload_more)
        if self._path is None:
            self._log.warn("reload: no configuration file (--demo): nothing to reload")
            return False
        try:
            config = load_config(self._path)
            entries = None
            if isinstance(self._backend, StaticBackend) and self._inventory is not None:
                if config.backend.kind == "static" and config.backend.inventory != self._inventory:
                    self._log.warn("reload: backend.inventory changed: restart to use the new file")
                entries = read_inventory(self._inventory)
        except ConfigError as error:
            self._log.error("reload failed, configuration kept: {error}", error=str(error))
            return False
        revoked = self._authenticator.replace(config.auth.users, config.auth.admins)
        # who may claim custom domains: new claims only (a verified domain stays with its forward)
        self._forwards.domain_rules = attrs.evolve(
            self._forwards.domain_rules, users=frozenset(config.auth.custom_domains)
        )
        closed = sum(self._forwards.shutdown_user(name, CloseReason.TOKEN_REVOKED) for name in sorted(revoked))
        if entries is not None:
            self._backend.replace(entries)
        self.rechecked = self._forwards.recheck_access(self._authenticator.user, CloseReason.ACCESS_REVOKED)
        self.rechecked.addErrback(lambda failure: self._log.failure("access re-check failed", failure))
        self._log.info(
            "reloaded {path}: {users} users, {revoked} revoked, {closed} connections closed",
            path=self._path,
            users=len(config.auth.users),
            revoked=len(revoked),
            closed=closed,
        )
        return True


def json_log_observer(out: IO[str] | None = None) -> ILogObserver:
    """
    :param out: where to write; standard output by default (journald, under
        ``twistd --nodaemon``).
    :return: an observer writing one JSON object per event and per line.
    """
    return FileLogObserver(out if out is not None else sys.stdout, _json_line)


def _json_line(event: LogEvent) -> str:
    document = json.loads(eventAsJSON(event))
    document["text"] = formatEvent(event)
    return json.dumps(document) + "\n"
