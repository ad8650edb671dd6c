# -*- test-case-name: tests.test_proxy -*-
"""
Connections to container ports: each carries one exchange at a time and
reads its response with the strict parser (:mod:`rexecpf.proxy.parser`);
kept alive between exchanges in a small pool per address and port.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure

from rexecpf.ends import TCPEnd, widen_transport
from rexecpf.proxy.parser import HeadReader, ProtocolError

if TYPE_CHECKING:
    from rexecpf.proxy.exchange import Exchange

__all__ = ["POOLED_IDLE_SECONDS", "ConnectionPool", "ContainerConnection"]

#: Seconds a kept-alive connection to a container may stay idle and still
#: be used: below the keep-alive timeout of common servers (2 s and more).
POOLED_IDLE_SECONDS = 2.0


class ConnectionPool:
    """
    Kept-alive connections to container ports, idle between two requests.

    :param clock: the time source.
    :param max_idle: connections kept per address and port; more are closed.
    :param idle_seconds: a connection idle longer is not used again (closed
        when it would be taken, or by :meth:`prune`): shorter than the
        keep-alive timeout of common servers, so that a request rarely meets
        a connection its server is closing.
    """

    def __init__(self, clock: IReactorTime, max_idle: int, idle_seconds: float) -> None:
        self._clock = clock
        self.max_idle = max_idle
        self.idle_seconds = idle_seconds
        self._idle: dict[tuple[str, int], list[ContainerConnection]] = {}

    def take(self, key: tuple[str, int]) -> ContainerConnection | None:
        """:return: an idle connection to ``key`` (address, port), or ``None``."""
        idle = self._idle.get(key)
        now = self._clock.seconds()
        while idle:
            connection = idle.pop()  # the most recently used first
            if now - connection.idle_since <= self.idle_seconds:
                return connection
            connection._t.loseConnection()
        return None

    def put(self, connection: ContainerConnection) -> None:
        """Keep ``connection`` (a response was read from it whole) for the next request."""
        idle = self._idle.setdefault(connection.key, [])
        if len(idle) >= self.max_idle:
            connection._t.loseConnection()
            return
        connection.idle_since = self._clock.seconds()
        idle.append(connection)

    def prune(self) -> None:
        """Close the connections idle longer than ``idle_seconds`` (the oldest are first)."""
        now = self._clock.seconds()
        for key, idle in list(self._idle.items()):
            while idle and now - idle[0].idle_since > self.idle_seconds:
                idle.pop(0)._t.loseConnection()
            if not idle:
                del self._idle[key]

    def forget(self, connection: ContainerConnection) -> None:
        """``connection`` is closed: it is not idle any more."""
        idle = self._idle.get(connection.key)
        if idle is not None and connection in idle:
            idle.remove(connection)
            if not idle:
                del self._idle[connection.key]

    def idle_count(self) -> int:
        """:return: how many connections are idle in the pool."""
        return sum(len(idle) for idle in self._idle.values())

    def close(self) -> None:
        """Close every idle connection."""
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                connection._t.loseConnection()


class ContainerConnection(TCPEnd):
    """
    A connection to a container port.  For each exchange it carries the
    request and reads the response head; the body is decoded by its framing
    and handed to the exchange, with this connection's transport as the
    client request's producer.  A response read whole from a connection that
    may stay open leaves it in the pool for the next request; after a 101 it
    is a relay end.
    """

    def __init__(self, exchange: Exchange, key: tuple[str, int], pool: ConnectionPool) -> None:
        super().__init__()
        self.exchange: Exchange | None = exchange
        self.key = key
        self.pool = pool
        self.reader = HeadReader()
        self.head_done = False
        self.decoder: Any = None
        self.relaying = False
        #: whether it served an earlier exchange (kept alive in the pool)
        self.reused = False
        self.idle_since = 0.0

    def connectionMade(self) -> None:
        widen_transport(self.transport)
        assert self.exchange is not None
        self.exchange.connected(self)

    def reuse(self, exchange: Exchange) -> None:
        """Serve ``exchange``: this connection was taken from the pool."""
        self.exchange = exchange
        self.reused = True

    def release(self, keep: bool) -> None:
        """
        The exchange is over: back to the pool when ``keep`` (the response was
        read whole and the connection may stay open), else closed.
        """
        self.exchange = None
        self.reader, self.head_done, self.decoder = HeadReader(), False, None
        transport = self._t
        if transport is None or not getattr(transport, "connected", True):
            return
        if keep:
            # A slow client may have left it paused: an idle connection reads,
            # so that its closing is noticed.
            transport.resumeProducing()
            self.pool.put(self)
        else:
            transport.loseConnection()

    def abort(self) -> None:
        self.exchange = None
        if self.transport is not None:
            self._t.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self.relaying:
            super().dataReceived(data)
            return
        exchange = self.exchange
        if exchange is None:
            # Idle, or closing: a server has nothing to say between answers.
            self._t.abortConnection()
            return
        if self.head_done:
            self.body_received(exchange, data)
            return
        try:
            head = self.reader.feed(data)
        except ProtocolError as error:
            exchange.head_failed(self, f"the container's response head is not valid HTTP/1.1: {error}")
            return
        if head is None:
            return
        self.head_done = True
        try:
            exchange.got_head(self, head, self.reader.rest)
        except Exception:
            # A bug, not the container's fault: the request must not hang.
            exchange.crashed(self)

    def body_received(self, exchange: Exchange, data: bytes) -> None:
        """Decode ``data`` by the response's framing (bad framing: the response is broken)."""
        try:
            self.decoder.dataReceived(data)
        except ProtocolError as error:
            exchange.bad_framing(f"bad response framing: {error}")

    def readConnectionLost(self) -> None:
        if self.relaying:
            super().readConnectionLost()
        else:
            self._t.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.relaying:
            super().connectionLost(reason)
            return
        exchange, self.exchange = self.exchange, None
        if exchange is None:
            self.pool.forget(self)
        elif not self.head_done:
            exchange.head_failed(self, "the container closed the connection before answering")
        else:
            exchange.body_lost(reason)
