# -*- test-case-name: tests.test_listeners -*-
"""
``local_port``: a plain TCP listener per forward, relaying to the container.

:class:`LocalListeners` observes the :class:`ForwardService`: every forward
added (including those restored at start-up) gets a listener on
``limits.local_interface:forward.local_port``; a forward removed loses its
listener, and its open connections are closed (they are tracked under the
forward, so the service closes them with the removal).

Each accepted connection stays paused while its container is looked up (at
accept time, so a container that stopped is refused) and the container port
is connected; then :func:`rexecpf.relay.splice_to_endpoint` joins them with
the tunnel's limits (``tunnel_bytes_per_second`` each way,
``tunnel_idle_seconds``).  A connection counts against the forward owner's
``connections_per_user``; one over that cap is closed as soon as it is
accepted (plain TCP has no way to say why) and logged.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IStreamClientEndpoint, IStreamServerEndpoint
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from rexecpf.config import LimitsConfig
from rexecpf.endpoints import container_endpoint
from rexecpf.ends import TCPEnd
from rexecpf.forwards import ForwardService
from rexecpf.model import APIError, PortForward
from rexecpf.relay import CLOSE_GOING_AWAY, CONNECT_TIMEOUT, Relay, RelayStats, splice_to_endpoint

__all__ = ["LISTEN_BACKLOG", "REFUSALS_LOG_SECONDS", "LocalListeners", "LocalConnection", "listening_socket"]

#: The listen queue of every socket rexecpf listens on, unless an endpoint
#: string says otherwise (Twisted's default is 50: clients past it have their
#: handshakes dropped and, in a burst, their connections reset).  nginx's.
LISTEN_BACKLOG = 511

#: Connections closed for being over their owner's cap are logged at most
#: once per forward in this many seconds.
REFUSALS_LOG_SECONDS = 10.0


def listening_socket(interface: str, port: int, backlog: int, reuse_port: bool = False) -> socket.socket:
    """
    :return: a non-blocking TCP socket listening on ``interface:port``
        (``SO_REUSEADDR`` as Twisted's own; with ``reuse_port``,
        ``SO_REUSEPORT`` too: the worker processes of one rexecpf each
        listen on the same address, and the kernel spreads the connections).
    :raises OSError: when it cannot listen.
    """
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((interface, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


@implementer(IStreamServerEndpoint)
class ReusePortServerEndpoint:
    """A TCP server endpoint whose socket has ``SO_REUSEPORT`` (see :func:`listening_socket`)."""

    def __init__(self, reactor: Any, port: int, backlog: int, interface: str) -> None:
        self._reactor = reactor
        self._port = port
        self._backlog = backlog
        self._interface = interface

    def listen(self, factory: Any) -> Deferred[IListeningPort]:
        try:
            sock = listening_socket(self._interface, self._port, self._backlog, reuse_port=True)
        except OSError as error:
            return fail(CannotListenError(self._interface, self._port, error))
        try:
            return succeed(self._reactor.adoptStreamPort(sock.fileno(), sock.family, factory))
        finally:
            sock.close()


class LocalConnection(TCPEnd):
    """One accepted connection: paused until spliced to the container."""

    _log = Logger()
    kind = "listener"
    listeners: LocalListeners
    forward_id: str

    def __init__(self) -> None:
        super().__init__()
        self.splice: Deferred[Relay] | None = None
        self._untrack: Callable[[], None] | None = None
        self._closed = False

    def connectionMade(self) -> None:
        super().connectionMade()  # pauses reading until attached
        forwards = self.listeners.forwards
        try:
            forwards.admit(self.forward_id, self.kind)
        except APIError as error:
            # Plain TCP has no way to say why: close at once, and log it.
            self.listeners._refused(self.forward_id, error)
            self._t.loseConnection()
            return
        self._untrack = forwards.track(self.forward_id, self)
        self.listeners._connect(self)

    def shutdown(self, reason: str) -> None:
        """The forward went away (or we stop): close now."""
        if self.relay is not None:
            self.relay.close(CLOSE_GOING_AWAY, reason)
        elif self.splice is not None:
            self.splice.cancel()
        else:
            self.abort()

    def ended(self, stats: RelayStats | None = None) -> None:
        """The connection is over: untrack it; a relay's end is logged and counted."""
        if self._untrack is not None:
            self._untrack()
            self._untrack = None
        if stats is not None:
            self.listeners.forwards.relay_ended(self.kind, self.forward_id, None, stats)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        if self.relay is None:
            self.ended()


class _ConnectionFactory(Factory):
    noisy = False  # each connection logs its own closing line; no start/stop lines

    def __init__(self, listeners: LocalListeners, forward_id: str) -> None:
        self.listeners = listeners
        self.forward_id = forward_id

    def buildProtocol(self, addr: Any) -> LocalConnection:
        protocol = LocalConnection()
        protocol.factory = self
        protocol.listeners = self.listeners
        protocol.forward_id = self.forward_id
        return protocol


class LocalListeners(Service):
    """
    :param reactor: listens, connects, and times the relays.
    :param forwards: the forwards to serve (this observes it).
    :param limits: ``[limits]``: interface, rate, idle timeout.
    :param endpoint: ``(address, port) -> IStreamClientEndpoint`` for the
        container port (:func:`rexecpf.endpoints.container_endpoint` by
        default, which refuses the daemon's own sockets).
    :param reuse_port: listen with ``SO_REUSEPORT``: under ``--workers``,
        every worker listens on every ``local_port``.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        forwards: ForwardService,
        limits: LimitsConfig,
        endpoint: Callable[[str, int], IStreamClientEndpoint] | None = None,
        reuse_port: bool = False,
    ) -> None:
        self._reactor = reactor
        self._reuse_port = reuse_port
        self.forwards = forwards
        self._limits = limits
        self._endpoint = endpoint or (
            lambda host, port: container_endpoint(
                reactor, host, port, forwards.refuse_own_socket, CONNECT_TIMEOUT
            )
        )
        #: forward id -> its listening port (once listening)
        self.ports: dict[str, IListeningPort] = {}
        self._closing: set[Deferred[Any]] = set()
        #: local_port -> the forward listening on it, or about to
        self._holders: dict[int, str] = {}
        #: local_port -> a forward whose port another forward here still
        #: holds (the change feed has not brought that one's removal yet)
        self._waiting: dict[int, PortForward] = {}
        #: local_ports whose listener is closing (a port is free only once closed)
        self._releasing: set[int] = set()
        #: forward id -> (when its last refusal was logged, refusals since)
        self._refusals: dict[str, tuple[float, int]] = {}
        forwards.observe(self)

    # -- ForwardObserver -------------------------------------------------

    def forward_added(self, forward: PortForward) -> None:
        number = forward.local_port
        holder = self._holders.get(number)
        if holder == forward.id:
            return
        if holder is not None:
            # Another node freed the port and gave it to this forward, and this
            # node heard of the new forward first: it listens once the old one goes.
            self._waiting[number] = forward
            return
        self._holders[number] = forward.id
        if number not in self._releasing:
            self._listen(forward)
        # (else: once the removed forward's listener has closed, _released)

    def _listen(self, forward: PortForward) -> None:
        interface = self._limits.local_interface
        endpoint: IStreamServerEndpoint
        if self._reuse_port:
            endpoint = ReusePortServerEndpoint(self._reactor, forward.local_port, LISTEN_BACKLOG, interface)
        else:
            server = TCP6ServerEndpoint if ":" in interface else TCP4ServerEndpoint
            endpoint = server(self._reactor, forward.local_port, backlog=LISTEN_BACKLOG, interface=interface)

        def listening(port: IListeningPort) -> None:
            if self.forwards.cached(forward.id) is None:
                # Removed while we were binding.
                self._stop(port, forward.local_port)
                return
            self.ports[forward.id] = port
            self.forwards.own_sockets.add(port, port)
            self._log.info(
                "forward {forward_id}: listening on {interface}:{port}",
                forward_id=forward.id,
                interface=interface,
                port=forward.local_port,
            )

        def failed(failure: Failure) -> None:
            self._log.error(
                "forward {forward_id}: cannot listen on {interface}:{port}: {error}",
                forward_id=forward.id,
                interface=interface,
                port=forward.local_port,
                error=failure.getErrorMessage(),
            )

        endpoint.listen(_ConnectionFactory(self, forward.id)).addCallbacks(listening, failed)

    def forward_removed(self, forward: PortForward, reason: str) -> None:
        self._refusals.pop(forward.id, None)
        number = forward.local_port
        waiting = self._waiting.get(number)
        if waiting is not None and waiting.id == forward.id:
            del self._waiting[number]
        if self._holders.get(number) == forward.id:
            del self._holders[number]
            waiting = self._waiting.pop(number, None)
            if waiting is not None:
                self._holders[number] = waiting.id
        port = self.ports.pop(forward.id, None)
        if port is not None:
            self.forwards.own_sockets.remove(port)
            self._stop(port, number)
        else:
            self._released(number)

    def _stop(self, port: IListeningPort, number: int | None) -> None:
        """
        Stop listening on ``port`` (``local_port`` ``number``); the forward
        holding ``number`` now listens once it is closed.
        """
        if number is not None:
            self._releasing.add(number)
        d: Deferred[Any] = Deferred.fromCoroutine(_maybe(port.stopListening()))  # type: ignore[arg-type]
        self._closing.add(d)

        def closed(result: object) -> None:
            self._closing.discard(d)
            if number is not None:
                self._releasing.discard(number)
                self._released(number)

        d.addBoth(closed)

    def _released(self, number: int) -> None:
        """``number`` is free here: the forward it was handed to (if any) listens on it."""
        holder = self._holders.get(number)
        if holder is None or holder in self.ports or number in self._releasing or not self.running:
            return
        forward = self.forwards.cached(holder)
        if forward is not None:
            self._listen(forward)

    # -- connections -----------------------------------------------------

    def _refused(self, forward_id: str, error: APIError) -> None:
        """
        A connection over its owner's cap was closed: log it, at most one
        line per forward every :data:`REFUSALS_LOG_SECONDS` (a flood of
        connections must not become a flood of log lines).
        """
        now = self._reactor.seconds()
        logged_at, since = self._refusals.get(forward_id, (None, 0))
        if logged_at is not None and now - logged_at < REFUSALS_LOG_SECONDS:
            self._refusals[forward_id] = (logged_at, since + 1)
            return
        self._refusals[forward_id] = (now, 0)
        forward = self.forwards.cached(forward_id)
        self._log.warn(
            "forward {forward_id} of {owner}: connection closed at once: {error}"
            " ({earlier} more since the last such line)",
            forward_id=forward_id,
            owner=forward.owner if forward is not None else "-",
            error=error.detail,
            earlier=since,
        )

    def _connect(self, connection: LocalConnection) -> None:
        limits = self._limits
        lookup = self.forwards.target(connection.forward_id)

        def reached(target: tuple[PortForward, Any]) -> Deferred[Relay] | None:
            forward, container = target
            if connection._pending_lost is not None:
                connection.ended()
                return None
            endpoint = self._endpoint(container.address, forward.container_port)
            connection.splice = splice_to_endpoint(
                self._reactor,
                endpoint,
                connection,
                connect_timeout=CONNECT_TIMEOUT,
                on_end=connection.ended,
                rate_a_to_b=limits.tunnel_bytes_per_second,
                rate_b_to_a=limits.tunnel_bytes_per_second,
                idle_seconds=limits.tunnel_idle_seconds,
            )
            return connection.splice

        def failed(failure: Failure) -> None:
            connection.splice = None
            if isinstance(failure.value, APIError):
                self._log.info(
                    "forward {forward_id}: connection refused: {error}",
                    forward_id=connection.forward_id,
                    error=failure.value.detail,
                )
            else:
                self._log.info(
                    "forward {forward_id}: cannot reach the container: {error}",
                    forward_id=connection.forward_id,
                    error=failure.getErrorMessage(),
                )
            connection.abort()
            connection.ended()

        def spliced(relay: Relay | None) -> None:
            connection.splice = None

        lookup.addCallback(reached).addCallbacks(spliced, failed)

    # -- Service ---------------------------------------------------------

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        self._holders.clear()
        self._waiting.clear()
        for port in list(self.ports.values()):
            self.forwards.own_sockets.remove(port)
            self._stop(port, None)
        self.ports.clear()
        return DeferredList(list(self._closing))


async def _maybe(result: Any) -> Any:
    if isinstance(result, Deferred):
        return await result
    return result
