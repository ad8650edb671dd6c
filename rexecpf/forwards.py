# -*- test-case-name: tests.test_api -*-
"""
:class:`ForwardService`: create, read, delete and reap forwards.

It owns what lives as long as a forward: observers (the ``local_port``
listeners) hear of every forward added and removed, and every live
connection (a tunnel, a listener connection, a proxied request or upgrade)
is tracked under its forward, so deleting the forward or stopping its
container closes them at once.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, fail, inlineCallbacks, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from rexecpf.backends import IContainerBackend
from rexecpf.config import LimitsConfig
from rexecpf.domains import (
    DomainRules,
    TXTVerifier,
    check_slug,
    normalise_domain,
    slug_label,
    split_slug_label,
    verification_token,
)
from rexecpf.endpoints import OwnSockets, listener_reaches
from rexecpf.feed import ADD, REAP, UPDATE, Change, MissLookups
from rexecpf.model import (
    CONTAINER_NOT_FOUND,
    CONTAINER_NOT_RUNNING,
    DOMAIN_NOT_FOUND,
    DOMAINS_NOT_ALLOWED,
    FORWARD_NOT_FOUND,
    INVALID_DOMAIN,
    INVALID_PORT,
    INVALID_REQUEST,
    INVALID_SLUG,
    LIMIT_EXCEEDED,
    LOCAL_PORT_UNAVAILABLE,
    PORT_ALREADY_FORWARDED,
    PORT_NOT_ALLOWED,
    STORE_UNAVAILABLE,
    TOO_MANY_DOMAINS,
    APIError,
    CloseReason,
    Container,
    PortForward,
    Principal,
    new_forward_id,
)
from rexecpf.relay import RelayStats
from rexecpf.store import IForwardStore

#: the one line each relay logs when it ends (its namespace names the subject)
_relay_log = Logger(namespace="rexecpf.relay")

__all__ = [
    "CreateRequest",
    "ForwardObserver",
    "ForwardService",
    "GOING_AWAY",
    "LiveConnection",
    "parse_create_request",
    "port_is_bindable",
]

#: Why a forward went away; live connections get it as their close reason.
DELETED = CloseReason.DELETED
CONTAINER_STOPPED = CloseReason.CONTAINER_STOPPED

#: What a forward id looks like (:func:`rexecpf.model.new_forward_id`): anything
#: else is not found without a store read.
_FORWARD_ID = re.compile(r"pf_[a-z0-9]{24}")
#: A forward's own host label under ``proxy_domain``: its id with ``-`` for ``_``.
_FORWARD_LABEL = re.compile(r"pf-[a-z0-9]{24}")
#: One label of a host name (lowercase).
_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")

#: How long a removed forward's id is remembered, so that a late store read
#: (a cache miss, a resync) cannot bring it back.
TOMBSTONE_SECONDS = 300.0
#: ... and how many are remembered at most (the oldest go first): a user
#: creating and deleting forwards in a loop cannot grow them without bound.
MAX_TOMBSTONES = 65536

#: How many times a create that picked its ``local_port`` picks another when
#: another node took that one meanwhile.
LOCAL_PORT_ATTEMPTS = 8

_FIELDS = {"container_port", "local_port", "name", "pass_preflight", "domains", "slug"}

#: The most entries a create's ``domains`` may list before it is not read at
#: all (``[domains] per_forward`` is the real limit: 429 above it).
_MAX_LISTED_DOMAINS = 100


@attrs.frozen
class CreateRequest:
    container_port: int
    local_port: int | None = None
    name: str | None = None
    pass_preflight: bool = False
    #: custom domains, normalised (:func:`rexecpf.domains.normalise_domain`), no repeats
    domains: tuple[str, ...] = ()
    slug: str | None = None
    #: those of ``domains`` whose proof was found (set by the create itself)
    verified: tuple[str, ...] = ()


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"the field {key!r} appears twice")
        result[key] = value
    return result


def _is_port(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535


def parse_create_request(body: bytes) -> CreateRequest:
    """
    Read the body of a create request, whatever its Content-Type.

    :raises APIError: 400 Invalid request (not UTF-8 JSON, not an object,
        unknown or repeated field, ``name`` not a string of 1-100
        characters, ``pass_preflight`` not a boolean, ``container_port``
        missing, ``domains`` not a list), then 400 Invalid port, 400 Invalid
        domain (one is not a host name, or is listed twice), 400 Invalid slug.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise INVALID_REQUEST("the body is not valid UTF-8") from None
    if not text.strip():
        raise INVALID_REQUEST("the body is empty; send a JSON object")
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except ValueError as error:
        raise INVALID_REQUEST(f"the body is not JSON: {error}") from None
    except RecursionError:
        raise INVALID_REQUEST("the body is not JSON that can be read: nested too deeply") from None
    if not isinstance(data, dict):
        raise INVALID_REQUEST("the body must be a JSON object")
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        raise INVALID_REQUEST(f"unknown field {unknown[0]!r}; known: {', '.join(sorted(_FIELDS))}")
    if "container_port" not in data:
        raise INVALID_REQUEST("container_port is required")
    name = data.get("name")
    if name is not None and (not isinstance(name, str) or not 1 <= len(name) <= 100):
        raise INVALID_REQUEST("name must be a string of 1-100 characters")
    pass_preflight = data.get("pass_preflight", False)
    if not isinstance(pass_preflight, bool):
        raise INVALID_REQUEST("pass_preflight must be true or false")
    container_port = data["container_port"]
    if not _is_port(container_port):
        raise INVALID_PORT("container_port must be an integer 1-65535")
    local_port = data.get("local_port")
    if local_port is not None and not _is_port(local_port):
        raise INVALID_PORT("local_port must be an integer 1-65535")
    listed = data.get("domains", [])
    if not isinstance(listed, list) or len(listed) > _MAX_LISTED_DOMAINS:
        raise INVALID_REQUEST(f"domains must be a list of at most {_MAX_LISTED_DOMAINS} host names")
    domains: list[str] = []
    for value in listed:
        domain = normalise_domain(value)
        if domain in domains:
            raise INVALID_DOMAIN(f"{domain} is listed twice")
        domains.append(domain)
    slug = data.get("slug")
    if slug is not None:
        check_slug(slug)
    return CreateRequest(
        container_port=container_port,
        local_port=local_port,
        name=name,
        pass_preflight=pass_preflight,
        domains=tuple(domains),
        slug=slug,
    )


def port_is_bindable(interface: str, port: int) -> bool:
    """
    :return: whether a TCP listener could bind ``interface:port`` now (with
        ``SO_REUSEADDR``, as Twisted's listeners do).
    """
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((interface, port))
    except OSError:
        return False
    finally:
        probe.close()
    return True


class LiveConnection(Protocol):
    """
    Something open on behalf of a forward: a tunnel, a proxied request...

    A connection that serves requests which may be allowed to finish (a
    proxied HTTP request) may also have a ``drain()`` method: stop taking new
    work, and return a Deferred that fires once the work in hand is done.  On a
    graceful stop, :meth:`ForwardService.drain` waits for those (up to the
    grace period) and shuts every other connection at once.
    """

    def shutdown(self, reason: str) -> None:
        """Close now, telling the peer ``reason`` where the protocol can."""


#: The close reason of every live connection on a stop.
GOING_AWAY = CloseReason.GOING_AWAY


@attrs.define
class _Tracked:
    forward_id: str
    user: str | None
    kind: str
    #: ``(user, group)`` the connection counts against in ``[limits]``, if any
    counted: tuple[str, str] | None = None


def _cap_group(kind: str) -> str:
    """:return: the ``[limits]`` key that caps connections of ``kind`` per user."""
    return "tunnels_per_user" if kind == "tunnel" else "connections_per_user"


class ForwardObserver(Protocol):
    def forward_added(self, forward: PortForward) -> None: ...

    def forward_removed(self, forward: PortForward, reason: str) -> None: ...


class ForwardService(Service):
    """
    :param clock: the time source for ``created_at``.
    :param store: where forwards are kept.
    :param backend: where containers are looked up.
    :param limits: ``[limits]`` of the configuration.
    :param port_probe: ``(interface, port) -> bool``, whether a local port
        can be bound (injected for tests).
    :param own_sockets: the daemon's listening sockets, which no forward may
        lead to (the forwards' own ``local_port`` listeners are added here).
    :param domain_rules: who may claim custom domains, and which names not
        (by default nobody: no custom domains, no stable names).
    :param verifier: checks a domain's TXT record (``None``: none is ever
        found, so with ``verify`` every domain stays unverified).
    """

    _log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        store: IForwardStore,
        backend: IContainerBackend,
        limits: LimitsConfig,
        port_probe: Callable[[str, int], bool] = port_is_bindable,
        own_sockets: OwnSockets | None = None,
        domain_rules: DomainRules | None = None,
        verifier: TXTVerifier | None = None,
    ) -> None:
        self._clock = clock
        self.domain_rules = domain_rules if domain_rules is not None else DomainRules()
        self._verifier = verifier
        #: the key of the verification tokens (loaded on first use)
        self._domain_key: bytes | None = None
        #: verified domain -> the id of the forward that has it
        self._by_domain: dict[str, str] = {}
        #: (owner, slug) -> the id of the forward named so
        self._by_slug: dict[tuple[str, str], str] = {}
        self.own_sockets = own_sockets if own_sockets is not None else OwnSockets()
        self._store = store
        self._backend = backend
        self.limits = limits
        self._port_probe = port_probe
        self._forwards: dict[str, PortForward] = {}
        self._reserved_ports: set[int] = set()
        self._live: dict[str, set[LiveConnection]] = {}
        self._tracked: dict[LiveConnection, _Tracked] = {}
        #: (user, [limits] key) -> how many tracked connections count against it
        self._per_user: dict[tuple[str, str], int] = {}
        #: how many times :meth:`reconcile` ran (for the metrics)
        self.reconcile_runs = 0
        self._observers: list[ForwardObserver] = []
        #: creates in flight; while there are any, every container stop is
        #: reaped (which records it in the store, see :meth:`_create`) and the
        #: forwards a reap removes before their create finished are remembered
        self._creating = 0
        self._removed_while_creating: set[str] = set()
        #: called with (kind, stats) as each relay ends (:meth:`relay_ended`)
        self.relay_observers: list[Callable[[str, RelayStats], None]] = []
        #: containers whose forwards are being reaped after a stopped event
        self._reaping: set[str] = set()
        #: fires once the stored forwards are loaded and reconciled
        self.ready: Deferred[None] = Deferred()
        #: removed forward id -> until when it is remembered (oldest first)
        self._tombstones: dict[str, float] = {}
        #: store reads for ids not in memory (another node's new forwards)
        self._misses = MissLookups(clock, store.get)
        #: store reads for host names not in memory (``d:{domain}``, ``s:{owner}/{slug}``)
        self._host_misses = MissLookups(clock, self._read_host)
        #: why new connections are refused (cut off from the store), or None
        self._cut_off: str | None = None
        backend.subscribe(self._container_stopped)

    # --- lifecycle

    def startService(self) -> None:
        super().startService()
        self._start().addErrback(self._failed_start)

    def _failed_start(self, failure: Any) -> None:
        self._log.failure("could not load the stored forwards", failure)
        if not self.ready.called:
            self.ready.errback(failure)

    @inlineCallbacks
    def _start(self) -> Any:
        stored = yield self._store.list_forwards()
        # (The change feed may have brought some already: kept, not announced twice.)
        fresh = [f for f in stored if f.id not in self._forwards and f.id not in self._tombstones]
        for forward in fresh:
            self._keep(forward)
        yield self.reconcile()
        for forward in fresh:
            if forward.id in self._forwards:
                self._notify_added(forward)
        self._log.info("{count} forwards restored", count=len(self._forwards))
        self.ready.callback(None)

    def stopService(self) -> Deferred[None] | None:
        for connection in list(self._tracked):
            self._shutdown(connection, GOING_AWAY)
        return super().stopService()

    def drain(self, grace_seconds: float) -> Deferred[None]:
        """
        The live-connection half of a graceful stop: every connection with a
        ``drain()`` method is asked to finish what it is doing; every other
        one (tunnels, listener connections) is shut at once with
        :data:`GOING_AWAY`.  After ``grace_seconds`` whatever is still open is
        shut too.

        :return: a Deferred firing (with ``None``) once every drainable
            connection finished, or the grace period ended.
        """
        waits: list[Deferred[Any]] = []
        for connection in list(self._tracked):
            drain = getattr(connection, "drain", None)
            if drain is None:
                self._shutdown(connection, GOING_AWAY)
            else:
                waits.append(maybeDeferred(drain))
        done: Deferred[None] = Deferred()
        if not waits:
            done.callback(None)
            return done
        self._log.info(
            "waiting up to {grace}s for {count} requests to finish",
            grace=grace_seconds,
            count=len(waits),
        )

        def expire() -> None:
            left = list(self._tracked)
            if left:
                self._log.warn("grace period over: closing {count} connections", count=len(left))
            for connection in left:
                self._shutdown(connection, GOING_AWAY)
            if not done.called:
                done.callback(None)

        timer = self._clock.callLater(grace_seconds, expire)

        def finished(_: object) -> None:
            if timer.active():
                timer.cancel()
            if not done.called:
                done.callback(None)

        DeferredList(waits, consumeErrors=True).addCallback(finished)
        return done

    @inlineCallbacks
    def reconcile(self) -> Any:
        """
        Check the container of every stored forward; reap those that stopped
        or are gone.  When the backend cannot answer, nothing is touched.

        :return: a Deferred firing with the number of forwards reaped.
        """
        self.reconcile_runs += 1
        reaped = 0
        for container_id in sorted({f.container_id for f in self._forwards.values()}):
            try:
                container = yield self._backend.inspect(container_id)
            except APIError as error:
                self._log.warn(
                    "reconcile skipped {cid}: {error}", cid=container_id, error=error.detail
                )
                continue
            if container is None or not container.running:
                removed = yield self.reap(container_id, CONTAINER_STOPPED)
                reaped += len(removed)
        return reaped

    # --- observers and live connections

    def relay_ended(self, kind: str, forward_id: str, user: str | None, stats: RelayStats) -> None:
        """
        A tunnel, listener or upgraded connection of ``forward_id`` ended: its
        one log line, then the observers (:attr:`relay_observers`, e.g. the
        metrics).  The relay's ``a`` end is the client, ``b`` the container.

        :param kind: ``"tunnel"``, ``"listener"`` or ``"upgrade"``.
        :param user: the user it was opened for (``None``: not known, as for
            a ``local_port`` connection).
        """
        _relay_log.info(
            "{kind} {forward_id} of {user} closed: {bytes_in} bytes in, {bytes_out} bytes out, "
            "{duration:.3f}s, close {close_code} {close_reason}",
            kind=kind,
            forward_id=forward_id,
            user=user or "-",
            bytes_in=stats.bytes_a_to_b,
            bytes_out=stats.bytes_b_to_a,
            duration=stats.duration,
            close_code=stats.close_code,
            close_reason=stats.close_reason or "",
            throttled=stats.throttled_a_to_b + stats.throttled_b_to_a,
        )
        for observer in self.relay_observers:
            observer(kind, stats)

    def observe(self, observer: ForwardObserver) -> None:
        """Tell ``observer`` of every forward added or removed from now on."""
        self._observers.append(observer)

    def _notify_added(self, forward: PortForward) -> None:
        for observer in self._observers:
            observer.forward_added(forward)

    def track(
        self,
        forward_id: str,
        connection: LiveConnection,
        user: str | None = None,
        kind: str | None = None,
    ) -> Callable[[], None]:
        """
        Keep ``connection`` under its forward so that removing the forward
        shuts it down.

        :param user: the user it was opened for, so that revoking that
            user's token (:meth:`shutdown_user`) closes it.  It counts
            against that user's cap (:meth:`admit`); a connection opened for
            nobody (``local_port``) counts against the forward's owner.
        :param kind: ``"tunnel"``, ``"listener"``, ``"proxy"``... (for the
            metrics); by default the connection's ``kind`` attribute, else
            ``"other"``.
        :return: a function to call when the connection ends by itself.
        """
        connections = self._live.setdefault(forward_id, set())
        connections.add(connection)
        kind = kind or getattr(connection, "kind", None) or "other"
        counted_for = self._counted_for(forward_id, user)
        counted = (counted_for, _cap_group(kind)) if counted_for else None
        if counted is not None:
            self._per_user[counted] = self._per_user.get(counted, 0) + 1
        self._tracked[connection] = _Tracked(forward_id, user, kind, counted)

        def untrack() -> None:
            connections.discard(connection)
            if not connections and self._live.get(forward_id) is connections:
                del self._live[forward_id]
            self._uncount(self._tracked.pop(connection, None))

        return untrack

    def _counted_for(self, forward_id: str, user: str | None) -> str | None:
        """
        :return: whom a connection counts against in ``[limits]``: the user
            it was opened for, else (a ``local_port`` connection) the owner
            of its forward.
        """
        if user:
            return user
        forward = self._forwards.get(forward_id)
        return forward.owner if forward is not None and forward.owner else None

    def _uncount(self, tracked: _Tracked | None) -> None:
        if tracked is None or tracked.counted is None:
            return
        left = self._per_user[tracked.counted] - 1
        if left:
            self._per_user[tracked.counted] = left
        else:
            del self._per_user[tracked.counted]

    def admit(self, forward_id: str, kind: str, user: str | None = None) -> None:
        """
        Check a new connection against the per-user caps of ``[limits]``
        (``tunnels_per_user`` for a tunnel, ``connections_per_user`` for
        anything else); track it right after, in the same turn of the
        reactor, so that the count it was admitted on stays true.

        :param kind: as for :meth:`track`.
        :param user: the user it is opened for; ``None`` counts it against
            the forward's owner (a ``local_port`` connection).
        :raises APIError: 429 Limit exceeded, when that user already has
            as many open connections of the kind as the cap allows.
        """
        counted_for = self._counted_for(forward_id, user)
        if counted_for is None:
            return
        group = _cap_group(kind)
        cap: int = getattr(self.limits, group)
        if cap and self._per_user.get((counted_for, group), 0) >= cap:
            what = "tunnels" if group == "tunnels_per_user" else "connections"
            raise LIMIT_EXCEEDED(f"a user may have at most {cap} open {what} (limits.{group})")

    def user_count(self, user: str, kind: str) -> int:
        """:return: how many open connections of ``kind``'s group count against ``user``."""
        return self._per_user.get((user, _cap_group(kind)), 0)

    def _shutdown(self, connection: LiveConnection, reason: str) -> None:
        tracked = self._tracked.pop(connection, None)
        if tracked is not None:
            self._uncount(tracked)
            connections = self._live.get(tracked.forward_id)
            if connections is not None:
                connections.discard(connection)
                if not connections:
                    del self._live[tracked.forward_id]
        connection.shutdown(reason)

    def live_count(self, forward_id: str | None = None, kind: str | None = None) -> int:
        """:return: how many live connections (of one forward, of one kind) are open."""
        return sum(
            1
            for tracked in self._tracked.values()
            if (forward_id is None or tracked.forward_id == forward_id)
            and (kind is None or tracked.kind == kind)
        )

    def live_counts(self) -> dict[str, int]:
        """:return: kind -> how many live connections of that kind are open."""
        counts: dict[str, int] = {}
        for tracked in self._tracked.values():
            counts[tracked.kind] = counts.get(tracked.kind, 0) + 1
        return counts

    def shutdown_user(self, name: str, reason: str) -> int:
        """
        Close every live connection opened for user ``name`` (their token was
        revoked); nobody else's is touched.

        :return: how many were closed.
        """
        mine = [c for c, tracked in self._tracked.items() if tracked.user == name]
        for connection in mine:
            self._shutdown(connection, reason)
        if mine:
            self._log.info(
                "closed {count} connections of {user}: {reason}", count=len(mine), user=name, reason=reason
            )
        return len(mine)

    @inlineCallbacks
    def recheck_access(self, principal_of: Callable[[str], Principal | None], reason: str) -> Any:
        """
        After a reload (admins or container owners may have changed): close
        every live connection whose user may no longer use its forward's
        container, as :meth:`container_for` would now decide: the user is
        gone, or neither owns it nor is an admin.  Connections of no user
        (``local_port``) are not touched.  A container the backend cannot
        answer for keeps its connections (logged).

        :param principal_of: user name -> the principal now, or ``None``.
        :return: a Deferred firing with how many were closed.
        """
        forward_ids = sorted({t.forward_id for t in self._tracked.values() if t.user is not None})
        closed = 0
        for forward_id in forward_ids:
            forward = self._forwards.get(forward_id)
            if forward is None:
                continue  # (removing a forward closes its connections)
            try:
                container: Container | None = yield self._backend.inspect(forward.container_id)
            except APIError as error:
                self._log.warn(
                    "access of {forward_id} not re-checked: {error}", forward_id=forward_id, error=error.detail
                )
                continue
            for connection, tracked in list(self._tracked.items()):
                if tracked.forward_id != forward_id or tracked.user is None:
                    continue
                principal = principal_of(tracked.user)
                if principal is None or container is None or not principal.may_use(container):
                    self._log.info(
                        "closing a {kind} of {user} to {forward_id}: {reason}",
                        kind=tracked.kind, user=tracked.user, forward_id=forward_id, reason=reason,
                    )
                    self._shutdown(connection, reason)
                    closed += 1
        return closed

    def _forget(self, forwards: Iterable[PortForward], reason: str) -> None:
        for forward in forwards:
            self._bury(forward.id)
            # (Known or not: the change feed may have brought a create's own
            # forward before the create ended.)
            self._drop(forward.id)
            if self._creating:
                self._removed_while_creating.add(forward.id)
            for connection in list(self._live.get(forward.id, ())):
                self._shutdown(connection, reason)
            for observer in self._observers:
                observer.forward_removed(forward, reason)
            self._log.info(
                "forward {forward_id} of {container_id} removed: {reason}",
                forward_id=forward.id,
                container_id=forward.container_id,
                reason=reason,
            )

    # --- lookups

    def cached(self, forward_id: str) -> PortForward | None:
        """:return: the forward, from memory (no store read)."""
        return self._forwards.get(forward_id)

    def forwards(self) -> list[PortForward]:
        """:return: every forward known, from memory."""
        return list(self._forwards.values())

    @inlineCallbacks
    def container_for(self, principal: Principal, container_id: str) -> Any:
        """
        :return: a Deferred firing with the container if ``principal`` may
            see it; fails with 404 Container not found otherwise, exactly as
            if it did not exist.
        """
        container = yield self._backend.inspect(container_id)
        if container is None or not principal.may_use(container):
            raise CONTAINER_NOT_FOUND(f"no container {container_id!r}")
        return container

    def reach(self, principal: Principal, forward_id: str) -> Deferred[tuple[PortForward, Container]]:
        """
        Resolve a forward for the proxy and the tunnel: the caller must still
        own its container, and the container must be running.  (On every
        proxied request: a plain callback, no generator.)

        :return: a Deferred firing with ``(forward, container)``; fails with
            404 Port forward not found (also for someone else's forward) or
            409 Container not running.
        """
        forward = self._forwards.get(forward_id)
        if forward is None or self._cut_off is not None:
            return self.find(forward_id).addCallback(lambda found: self._reach(principal, found))
        return self._reach(principal, forward)

    def _reach(self, principal: Principal, forward: PortForward) -> Deferred[tuple[PortForward, Container]]:
        forward_id = forward.id

        def usable(container: Container | None) -> tuple[PortForward, Container]:
            if container is None or not principal.may_use(container):
                raise FORWARD_NOT_FOUND(f"no port forward {forward_id!r}")
            if not container.running or not container.address:
                raise CONTAINER_NOT_RUNNING(container.detail or "the container is not running")
            self.refuse_own_socket(container.address, forward.container_port)
            return (forward, container)

        return self._backend.inspect(forward.container_id).addCallback(usable)

    @inlineCallbacks
    def target(self, forward_id: str) -> Any:
        """
        Resolve a forward for a local listener, which has no principal: the
        forward's container must still be running.

        :return: a Deferred firing with ``(forward, container)``; fails with
            404 Port forward not found or 409 Container not running.
        """
        forward = yield self.find(forward_id)
        container = yield self._backend.inspect(forward.container_id)
        if container is None or not container.running or not container.address:
            detail = container.detail if container is not None else ""
            raise CONTAINER_NOT_RUNNING(detail or "the container is not running")
        self.refuse_own_socket(container.address, forward.container_port)
        return (forward, container)

    def refuse_own_socket(self, address: str, port: int, also: Iterable[tuple[str, int]] = ()) -> None:
        """
        Refuse a target that is one of this daemon's own listening sockets:
        an endpoint of ``listen`` or ``metrics_listen``, or any forward's
        ``local_port`` (whether or not it listens yet).  Checked when a
        forward is created and again on every connection (the sockets may
        have changed since: a later forward, a new container address).

        :param also: more listeners to count, ``(address, port)``.
        :raises APIError: 403 Port not allowed.
        """
        interface = self.limits.local_interface
        local = [(interface, f.local_port) for f in self._forwards.values() if f.local_port == port]
        if port in self._reserved_ports:
            local.append((interface, port))
        if self.own_sockets.reaches(address, port, [*local, *also]):
            raise PORT_NOT_ALLOWED(
                f"port {port} at {address} is a socket of rexecpf itself: a forward may not lead there"
            )

    # --- the change feed (rexecpf.feed.ChangeFollower drives these)

    def apply(self, change: Change) -> None:
        """
        Apply a change another node (or this one) committed: an added
        forward is kept and its ``local_port`` listened on; a deleted or
        reaped one is dropped and everything open on its behalf closed
        (1001).  Idempotent: this node's own changes come back, too.
        """
        if change.op == ADD:
            if change.forward is not None:
                self._learn(change.forward)
            return
        if change.op == UPDATE:
            if change.forward is not None:
                self._update(change.forward)
            return
        ids = set(change.ids)
        reaped = change.op == REAP
        gone = [
            f for f in self._forwards.values()
            if f.id in ids or (reaped and f.container_id == change.container_id)
        ]
        if self._creating:
            # A create in flight here whose forward another node reaped.
            self._removed_while_creating.update(i for i in ids if i not in self._forwards)
        for forward_id in ids:
            self._bury(forward_id)
        self._forget(gone, CONTAINER_STOPPED if reaped else DELETED)

    @inlineCallbacks
    def resync(self) -> Any:
        """
        Re-read every forward from the store and apply the differences:
        forwards not known here are kept (and listened on), forwards known
        here but no longer stored are dropped.  A forward this node added
        while the store was being read is kept (the read may predate it).

        :return: a Deferred firing with the store's revision read.
        """
        known = set(self._forwards)
        rev, stored = yield self._store.snapshot()
        ids = {forward.id for forward in stored}
        gone = [f for forward_id, f in self._forwards.items() if forward_id in known and forward_id not in ids]
        self._forget(gone, DELETED)
        for forward in stored:
            if forward.id in known and forward.id in self._forwards:
                self._update(forward)
            else:
                self._learn(forward)
        return rev

    def cut_off(self, reason: str) -> None:
        """
        This node is cut off from the store: nothing it knows can be trusted,
        so every live connection is closed (1001, ``reason``) and new ones
        are refused (503) until :meth:`rejoin`.
        """
        self._cut_off = reason
        for connection in list(self._tracked):
            self._shutdown(connection, reason)

    def rejoin(self) -> None:
        """In touch with the store again (after a resync): connections are taken again."""
        self._cut_off = None

    def find(self, forward_id: str) -> Deferred[PortForward]:
        """
        A forward for a connection: from memory, else (a forward another
        node created that this one has not heard of yet) from the store,
        within :class:`rexecpf.feed.MissLookups`'s bounds.

        :return: a Deferred firing with the forward; fails with 404 Port
            forward not found, or 503 while cut off from the store.
        """
        if self._cut_off is not None:
            return fail(STORE_UNAVAILABLE(self._cut_off))
        forward = self._forwards.get(forward_id)
        if forward is not None:
            return succeed(forward)
        if not _FORWARD_ID.fullmatch(forward_id) or forward_id in self._tombstones:
            return fail(FORWARD_NOT_FOUND(f"no port forward {forward_id!r}"))

        def found(forward: PortForward | None) -> PortForward:
            if forward is None or forward.id in self._tombstones:
                raise FORWARD_NOT_FOUND(f"no port forward {forward_id!r}")
            self._learn(forward)
            return forward

        return self._misses.lookup(forward_id).addCallback(found)

    def _learn(self, forward: PortForward) -> None:
        """Keep ``forward`` (heard of from the store) and announce it, once."""
        if forward.id in self._forwards or forward.id in self._tombstones:
            return
        self._misses.forget(forward.id)
        self._keep(forward)
        self._notify_added(forward)

    def _update(self, forward: PortForward) -> None:
        """A forward's domains changed (elsewhere, or a resync read it so): keep it as it is now."""
        if forward.id in self._tombstones:
            return
        if forward.id not in self._forwards:
            self._learn(forward)
        elif self._forwards[forward.id] != forward:
            self._keep(forward)

    def _keep(self, forward: PortForward) -> None:
        """Keep ``forward`` in memory (replacing what was known of it), its domains and slug indexed."""
        self._drop(forward.id)
        self._forwards[forward.id] = forward
        for domain in forward.verified_domains:
            self._by_domain[domain] = forward.id
            self._host_misses.forget("d:" + domain)
        if forward.slug is not None:
            self._by_slug[(forward.owner, forward.slug)] = forward.id
            self._host_misses.forget(f"s:{forward.owner}/{forward.slug}")

    def _drop(self, forward_id: str) -> None:
        forward = self._forwards.pop(forward_id, None)
        if forward is None:
            return
        for domain in forward.verified_domains:
            if self._by_domain.get(domain) == forward_id:
                del self._by_domain[domain]
        if forward.slug is not None and self._by_slug.get((forward.owner, forward.slug)) == forward_id:
            del self._by_slug[(forward.owner, forward.slug)]

    def _bury(self, forward_id: str) -> None:
        """Remember that ``forward_id`` was removed (for :data:`TOMBSTONE_SECONDS`)."""
        now = self._clock.seconds()
        tombstones = self._tombstones
        while tombstones:
            oldest = next(iter(tombstones))
            if tombstones[oldest] > now:
                break
            del tombstones[oldest]
        tombstones.pop(forward_id, None)
        while len(tombstones) >= MAX_TOMBSTONES:
            del tombstones[next(iter(tombstones))]
        tombstones[forward_id] = now + TOMBSTONE_SECONDS

    # --- the API's operations

    def create(self, principal: Principal, container_id: str, body: bytes) -> Deferred[PortForward]:
        """
        Create a forward; errors come in the contract's order.

        :return: a Deferred firing with the new :class:`PortForward`.
        """
        self._creating += 1

        def done(result: Any) -> Any:
            self._creating -= 1
            if not self._creating:
                self._removed_while_creating.clear()
            return result

        return self._create(principal, container_id, body).addBoth(done)

    @inlineCallbacks
    def _create(self, principal: Principal, container_id: str, body: bytes) -> Any:
        # Read before the container is looked at: a stop of it recorded after
        # this (by a reap, on any node) refuses the forward inside the store's
        # transaction.  A store that cannot answer fails the create after the
        # container's own errors, as it would have without this read.
        marked = yield self._store.stop_mark().addCallbacks(
            lambda mark: (mark, None), lambda failure: (None, failure)
        )
        container: Container = yield self.container_for(principal, container_id)
        request = parse_create_request(body)
        for domain in request.domains:
            self._check_domain(principal, domain)
        if len(request.domains) > self.domain_rules.per_forward:
            raise TOO_MANY_DOMAINS(f"a forward may have at most {self.domain_rules.per_forward} domains")
        if request.slug is not None:
            self._check_slug_host(principal, request.slug)
        if not container.running:
            raise CONTAINER_NOT_RUNNING(container.detail or "the container is not running")
        stop_mark, unavailable = marked
        if unavailable is not None:
            unavailable.raiseException()
        if container.address:
            self.refuse_own_socket(container.address, request.container_port)
        # Forwards are kept under the backend's canonical id (Docker: the
        # full id), whatever form of it the URL used.
        existing: list[PortForward] = yield self._store.list_forwards(container.id)
        if any(f.container_port == request.container_port for f in existing):
            raise PORT_ALREADY_FORWARDED(
                f"container port {request.container_port} is already forwarded"
            )
        limit = self.limits.forwards_per_container
        if len(existing) >= limit:
            raise LIMIT_EXCEEDED(f"a container may have at most {limit} forwards")
        verified = yield self._verify(principal.name, request.domains)
        request = attrs.evolve(request, verified=verified)
        taken_elsewhere: set[int] = set()
        for attempt in range(1, LOCAL_PORT_ATTEMPTS + 1):
            try:
                forward = yield self._add(principal, container, request, limit, stop_mark, taken_elsewhere)
            except APIError as error:
                # Picked here, taken meanwhile on another node (whose forward
                # this node has not heard of yet): pick another.
                if request.local_port is not None or error.kind is not LOCAL_PORT_UNAVAILABLE:
                    raise
                if attempt == LOCAL_PORT_ATTEMPTS:
                    raise
                continue
            break
        if forward.id in self._removed_while_creating:
            # A reap removed it between its write and now.
            raise CONTAINER_NOT_RUNNING("the container stopped while the forward was being created")
        if forward.id not in self._forwards and forward.id not in self._tombstones:
            # (Not when the change feed brought it first, nor once it is gone.)
            self._keep(forward)
            self._notify_added(forward)
        return forward

    @inlineCallbacks
    def _add(
        self,
        principal: Principal,
        container: Container,
        request: CreateRequest,
        limit: int,
        stop_mark: int | None,
        taken_elsewhere: set[int],
    ) -> Any:
        """
        :meth:`_create`'s last step: pick the ``local_port`` and store the
        forward.  A picked port the store finds taken is added to
        ``taken_elsewhere``, which the next pick avoids.
        """
        local_port = self._reserve_local_port(request.local_port, taken_elsewhere)
        try:
            if container.address:
                # Its own local_port as its target: a loop.
                self.refuse_own_socket(
                    container.address, request.container_port, [(self.limits.local_interface, local_port)]
                )
            yield self._refuse_another_target(local_port)
            forward = PortForward(
                id=new_forward_id(),
                container_id=container.id,
                container_port=request.container_port,
                local_port=local_port,
                name=request.name,
                created_ms=int(self._clock.seconds() * 1000),
                owner=principal.name,
                pass_preflight=request.pass_preflight,
                slug=request.slug,
                domains=request.domains,
                verified_domains=request.verified,
            )
            yield self._store.add(forward, limit, stop_mark)
        except APIError as error:
            if error.kind is LOCAL_PORT_UNAVAILABLE:
                taken_elsewhere.add(local_port)
            raise
        finally:
            self._reserved_ports.discard(local_port)
        return forward

    @inlineCallbacks
    def _refuse_another_target(self, local_port: int) -> Any:
        """
        A ``local_port`` that is where another forward leads (its container
        address on this host, its ``container_port`` the same) would take
        that forward's connections: 409 Local port unavailable.
        """
        interface = self.limits.local_interface
        for other in [f for f in self._forwards.values() if f.container_port == local_port]:
            container = yield self._backend.inspect(other.container_id)
            if container is not None and container.address and listener_reaches(interface, container.address):
                raise LOCAL_PORT_UNAVAILABLE(f"local port {local_port} is where another forward leads")

    def _reserve_local_port(self, requested: int | None, taken_elsewhere: set[int] | None = None) -> int:
        low, high = self.limits.local_ports
        interface = self.limits.local_interface
        taken = {f.local_port for f in self._forwards.values()} | self._reserved_ports | (taken_elsewhere or set())
        if requested is not None:
            if not low <= requested <= high:
                raise LOCAL_PORT_UNAVAILABLE(f"local_port must be within {low}-{high}")
            if requested in taken or not self._port_probe(interface, requested):
                raise LOCAL_PORT_UNAVAILABLE(f"local port {requested} is in use")
            self._reserved_ports.add(requested)
            return requested
        # (nor, when picking, a port that another forward leads to: see _refuse_another_target)
        taken |= {f.container_port for f in self._forwards.values()}
        for port in range(low, high + 1):
            if port not in taken and self._port_probe(interface, port):
                self._reserved_ports.add(port)
                return port
        raise LOCAL_PORT_UNAVAILABLE(f"no free local port left in {low}-{high}")

    @inlineCallbacks
    def list(self, principal: Principal, container_id: str) -> Any:
        """:return: a Deferred firing with the container's forwards, oldest first."""
        container = yield self.container_for(principal, container_id)
        forwards = yield self._store.list_forwards(container.id)
        return forwards

    @inlineCallbacks
    def get(self, principal: Principal, container_id: str, forward_id: str) -> Any:
        """:return: a Deferred firing with the forward."""
        container = yield self.container_for(principal, container_id)
        forward = yield self._store.get(forward_id)
        if forward is None or forward.container_id != container.id:
            raise FORWARD_NOT_FOUND(f"no port forward {forward_id!r} on {container_id!r}")
        return forward

    # --- custom domains and stable names

    def domain_key(self) -> Deferred[bytes]:
        """:return: a Deferred firing with the key of the verification tokens (kept in the store)."""
        if self._domain_key is not None:
            return succeed(self._domain_key)

        def loaded(key: bytes) -> bytes:
            self._domain_key = key
            return key

        return self._store.secret("domain-verification").addCallback(loaded)

    def verification_token(self, user: str, domain: str) -> str | None:
        """
        :return: the TXT value that proves ``domain`` for ``user``
            (:func:`rexecpf.domains.verification_token`); ``None`` before
            the key was loaded (:meth:`domain_key`: the API loads it before
            it describes a forward).
        """
        if self._domain_key is None:
            return None
        return verification_token(self._domain_key, user, domain)

    def _check_domain(self, principal: Principal, domain: str) -> None:
        """:raises APIError: 403 when ``principal`` may not claim domains, 400 for the service's own names."""
        if not self.domain_rules.allowed(principal.name):
            raise DOMAINS_NOT_ALLOWED(f"{principal.name} may not use custom domains (auth.custom_domains)")
        self.domain_rules.refuse_reserved(domain)

    def _check_slug_host(self, principal: Principal, slug: str) -> None:
        """:raises APIError: 400 Invalid slug when the stable host cannot be made."""
        if not self.domain_rules.proxy_domain:
            raise INVALID_SLUG("stable names need server.proxy_domain, which this rexecpf does not have")
        label = slug_label(slug, principal.name)
        if split_slug_label(label) != (slug, principal.name) or not _DNS_LABEL.fullmatch(label):
            raise INVALID_SLUG(
                f"the user name {principal.name!r} cannot be part of a host name ({label!r} is not a DNS "
                "label of at most 63 lowercase letters, digits and hyphens): no slug for this user"
            )

    @inlineCallbacks
    def _verify(self, user: str, domains: tuple[str, ...]) -> Any:
        """:return: a Deferred firing with those of ``domains`` whose proof is found now."""
        if not domains:
            return ()
        if not self.domain_rules.verify:
            return domains
        key = yield self.domain_key()
        if self._verifier is None:
            return ()
        verifier = self._verifier
        found = yield DeferredList(
            [verifier.verify(domain, verification_token(key, user, domain)) for domain in domains],
            consumeErrors=True,
        )
        return tuple(domain for domain, (ok, proven) in zip(domains, found, strict=True) if ok and proven)

    @inlineCallbacks
    def put_domain(self, principal: Principal, container_id: str, forward_id: str, value: str) -> Any:
        """
        Give a forward a custom domain, or check its proof again (a verified
        domain stays verified).

        :return: a Deferred firing with ``(created, forward, domain)``;
            fails with 404 (container, forward), 403 Custom domains not
            allowed, 400 Invalid domain, 429 Too many domains, 409 Domain
            already claimed.
        """
        forward: PortForward = yield self.get(principal, container_id, forward_id)
        if not self.domain_rules.allowed(principal.name):
            raise DOMAINS_NOT_ALLOWED(f"{principal.name} may not use custom domains (auth.custom_domains)")
        domain = normalise_domain(value)
        # (The forward's owner claims it: an admin acting on it claims it for the owner.)
        owner = Principal(forward.owner or principal.name)
        self.domain_rules.refuse_reserved(domain)
        created = domain not in forward.domains
        if created and len(forward.domains) >= self.domain_rules.per_forward:
            raise TOO_MANY_DOMAINS(f"a forward may have at most {self.domain_rules.per_forward} domains")
        if domain in forward.verified_domains:
            verified = True
        else:
            verified = domain in (yield self._verify(owner.name, (domain,)))
        changed = yield self._store.set_domain(forward.id, domain, verified, self.domain_rules.per_forward)
        if changed is None:
            raise FORWARD_NOT_FOUND(f"no port forward {forward_id!r} on {container_id!r}")
        self._update(changed)
        return created, changed, domain

    @inlineCallbacks
    def delete_domain(self, principal: Principal, container_id: str, forward_id: str, value: str) -> Any:
        """
        Take a custom domain from a forward: it is no longer routed (at once
        on every node) and anyone may claim it.

        :return: a Deferred firing with the forward as it is now; fails with
            404 (container, forward, or the forward does not have it).
        """
        forward: PortForward = yield self.get(principal, container_id, forward_id)
        try:
            domain = normalise_domain(value)
        except APIError:
            domain = value
        if domain not in forward.domains:
            raise DOMAIN_NOT_FOUND(f"{forward_id} has no domain {value[:80]!r}")
        changed = yield self._store.remove_domain(forward.id, domain)
        if changed is None:
            raise FORWARD_NOT_FOUND(f"no port forward {forward_id!r} on {container_id!r}")
        self._update(changed)
        return changed

    @inlineCallbacks
    def get_domain(self, principal: Principal, container_id: str, forward_id: str, value: str) -> Any:
        """:return: a Deferred firing with ``(forward, domain)``; fails with 404 as :meth:`delete_domain`."""
        forward: PortForward = yield self.get(principal, container_id, forward_id)
        try:
            domain = normalise_domain(value)
        except APIError:
            domain = value
        if domain not in forward.domains:
            raise DOMAIN_NOT_FOUND(f"{forward_id} has no domain {value[:80]!r}")
        return forward, domain

    def _read_host(self, key: str) -> Deferred[PortForward | None]:
        """A store read for :attr:`_host_misses`: ``d:{domain}`` or ``s:{owner}/{slug}``."""
        kind, _, name = key.partition(":")
        if kind == "d":
            return self._store.find_domain(name)
        owner, _, slug = name.rpartition("/")
        return self._store.find_slug(owner, slug)

    def _stable_host(self, host: str) -> tuple[str | None, str]:
        """
        :return: ``(forward id or None, miss key)`` for a host that is a
            verified custom domain or a stable name, from memory.
        """
        proxy = self.domain_rules.proxy_domain
        if proxy and host.endswith("." + proxy):
            parts = split_slug_label(host[: -len(proxy) - 1])
            if parts is None:
                return None, ""
            slug, owner = parts
            return self._by_slug.get((owner, slug)), f"s:{owner}/{slug}"
        return self._by_domain.get(host), "d:" + host

    def host_forward(self, host: str) -> str | None:
        """
        :return: the id of the forward a verified custom domain or a stable
            host (``{slug}--{user}.{proxy_domain}``) names, from memory;
            ``None`` when none is known here.
        """
        return self._stable_host(host)[0]

    def find_host(self, host: str) -> Deferred[PortForward]:
        """
        :return: a Deferred firing with the forward a custom domain or a
            stable host names: from memory, else from the store (bounded as
            :meth:`find` is); fails with 404 Port forward not found.
        """
        forward_id, key = self._stable_host(host)
        if forward_id is not None:
            return self.find(forward_id)
        if not key or self._cut_off is not None:
            return fail(FORWARD_NOT_FOUND(f"no port forward at {host!r}"))

        def found(forward: PortForward | None) -> PortForward:
            if forward is None or forward.id in self._tombstones:
                raise FORWARD_NOT_FOUND(f"no port forward at {host!r}")
            # (Known here, maybe, but not yet with this domain: the feed is behind.)
            self._update(forward)
            return forward

        return self._host_misses.lookup(key).addCallback(found)

    def domain_claimed(self, domain: str) -> Deferred[bool]:
        """
        For a TLS front (Caddy's on-demand ``ask``, Traefik): whether a
        certificate for ``domain`` should be had, that is whether it is a
        verified custom domain or a stable host (``{slug}--{user}.{proxy_domain}``)
        of a live forward, or a live forward's ``pf-xxxx.{proxy_domain}``.
        Reads memory, then the store on a miss (bounded: see :meth:`find`).

        :return: a Deferred firing with ``True`` or ``False`` (never failing:
            a store that cannot answer is ``False``).
        """
        try:
            host = normalise_domain(domain)
        except APIError:
            return succeed(False)
        proxy = self.domain_rules.proxy_domain
        if proxy and host.endswith("." + proxy):
            label = host[: -len(proxy) - 1]
            if _FORWARD_LABEL.fullmatch(label):
                lookup = self.find(label.replace("-", "_"))
            else:
                lookup = self.find_host(host)
        else:
            lookup = self.find_host(host)
        return lookup.addCallbacks(lambda _: True, lambda _: False)

    @inlineCallbacks
    def delete(self, principal: Principal, container_id: str, forward_id: str) -> Any:
        """
        Delete a forward and close everything open on its behalf.

        :return: a Deferred firing with the deleted forward.
        """
        forward = yield self.get(principal, container_id, forward_id)
        removed = yield self._store.remove(forward_id)
        if not removed:
            raise FORWARD_NOT_FOUND(f"no port forward {forward_id!r} on {container_id!r}")
        self._forget([forward], DELETED)
        return forward

    @inlineCallbacks
    def reap(self, container_id: str, reason: str = CONTAINER_STOPPED) -> Any:
        """
        Delete every forward of a container that stopped.

        :return: a Deferred firing with the forwards removed.
        """
        removed = yield self._store.remove_container(container_id)
        # Forwards in memory but not in the store (none, unless something
        # else wrote the file) go too.
        ids = {f.id for f in removed}
        stale = [f for f in self._forwards.values() if f.container_id == container_id and f.id not in ids]
        self._forget(list(removed) + stale, reason)
        return removed

    def _container_stopped(self, container_id: str) -> None:
        if not self._creating and not any(f.container_id == container_id for f in self._forwards.values()):
            # With a create in flight the reap runs anyway: it records the
            # stop in the store, which refuses that create's forward.
            return
        if container_id in self._reaping:
            # Docker says die, then stop or destroy: one reap is enough.
            return
        self._reaping.add(container_id)
        reaping = self.reap(container_id)
        reaping.addErrback(
            lambda failure: self._log.failure(
                "could not reap the forwards of {cid}", failure, cid=container_id
            )
        )
        reaping.addBoth(lambda _: self._reaping.discard(container_id))


def succeed_none() -> Deferred[None]:
    return succeed(None)
