# -*- test-case-name: tests.test_endpoints -*-
"""
Where a forward may lead: never to one of this daemon's own sockets.

A container whose address is on this host (the static inventory's default
``127.0.0.1``) can name any port of the host as its ``container_port``,
including the ports the daemon itself listens on: another user's
``local_port`` (so reading their app through one's own forward), the API,
``metrics_listen``; and a forward whose target is its own ``local_port``
loops, opening connections until no file descriptor is left.

:class:`OwnSockets` keeps what this daemon listens on (the bound address of
each listening port, as ``getHost()`` reports it); :func:`listener_reaches`
says whether a connection to an address would land on a listener; and
:func:`container_endpoint` is the one way the proxy, the tunnel and the
``local_port`` listeners connect to a container port: a name is resolved
first, and every address it resolves to is checked again (an address is
checked before, in :meth:`rexecpf.forwards.ForwardService.reach` and
``target``).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IResolutionReceiver,
    IStreamClientEndpoint,
)
from zope.interface import implementer

__all__ = [
    "OwnSockets",
    "address_is_local",
    "container_endpoint",
    "listener_reaches",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: ``(address, port)``: raises :class:`rexecpf.model.APIError` when a
#: connection there would reach one of the daemon's own sockets.
Refuse = Callable[[str, int], None]


def _ip(text: str) -> IPAddress | None:
    try:
        ip = ipaddress.ip_address(text.strip("[]").partition("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def address_is_local(address: str) -> bool:
    """
    :return: whether ``address`` is one of this host's own addresses (a
        socket can be bound to it), so that a connection to it stays on
        this host.
    """
    ip = _ip(address)
    if ip is None:
        return False
    if ip.is_loopback or ip.is_unspecified:
        return True
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.bind((str(ip), 0))
    except OSError:
        return False
    finally:
        probe.close()
    return True


def listener_reaches(listening: str, target: str, is_local: Callable[[str], bool] = address_is_local) -> bool:
    """
    :param listening: the address a socket is bound to (``0.0.0.0``/``::``:
        every address).
    :param target: the address a connection is made to.
    :return: whether a connection to ``target`` (on the listener's port)
        would be accepted by that listener: the same address, or a wildcard
        listener and a target that is this host (loopback, one of its
        addresses, or ``0.0.0.0``, which Linux takes for this host).  Either
        address family is taken to reach a wildcard listener (an IPv6
        wildcard usually takes IPv4 too).
    """
    bound, to = _ip(listening), _ip(target)
    if bound is None or to is None:
        return False
    if to.is_unspecified:
        return bound.is_unspecified or is_local(str(bound))
    if bound == to:
        return True
    return bound.is_unspecified and is_local(str(to))


class OwnSockets:
    """
    The TCP sockets this daemon listens on: its ``listen`` and
    ``metrics_listen`` endpoints and its ``local_port`` listeners, each by
    the address and port its listening port reports (``getHost()``, so a
    port ``0`` is known by the port it got).

    :param is_local: whether an address is this host's (injected for tests).
    """

    def __init__(self, is_local: Callable[[str], bool] = address_is_local) -> None:
        self._is_local = is_local
        self._listening: dict[object, tuple[str, int]] = {}

    def add(self, key: object, port: IListeningPort) -> None:
        """Register the listening ``port`` under ``key`` (a UNIX socket is ignored)."""
        address = port.getHost()
        if isinstance(address, (IPv4Address, IPv6Address)):
            self._listening[key] = (address.host, address.port)

    def remove(self, key: object) -> None:
        self._listening.pop(key, None)

    def reaches(self, address: str, port: int, also: Iterable[tuple[str, int]] = ()) -> bool:
        """
        :param also: more listeners, ``(address, port)``, e.g. those of the
            forwards (listening, about to, or failed to).
        :return: whether a connection to ``address:port`` lands on one of them.
        """
        listeners = [*self._listening.values(), *also]
        return any(
            bound_port == port and listener_reaches(bound, address, self._is_local)
            for bound, bound_port in listeners
        )


def container_endpoint(reactor: Any, host: str, port: int, refuse: Refuse, timeout: float) -> IStreamClientEndpoint:
    """
    :param host: the container's address, or a name.
    :param refuse: raises when ``(address, port)`` is one of the daemon's own
        sockets; called for each address a name resolves to.
    :return: a client endpoint to ``host:port``: TCP4/TCP6 for an address; for
        a name, each address it resolves to, in order, once all were checked.
    """
    host = host.strip("[]")
    ip = _ip(host)
    if ip is None:
        return _CheckedNameEndpoint(reactor, host, port, refuse, timeout)
    if ip.version == 6:
        return TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
    return TCP4ClientEndpoint(reactor, host, port, timeout=timeout)


@implementer(IResolutionReceiver)
class _Addresses:
    def __init__(self) -> None:
        self.found: list[str] = []
        self.done: Deferred[list[str]] = Deferred()

    def resolutionBegan(self, resolution: Any) -> None:
        pass

    def addressResolved(self, address: Any) -> None:
        if isinstance(address, (IPv4Address, IPv6Address)) and address.host not in self.found:
            self.found.append(address.host)

    def resolutionComplete(self) -> None:
        self.done.callback(self.found)


@implementer(IStreamClientEndpoint)
class _CheckedNameEndpoint:
    """A name: resolved, every address checked, then each tried in order."""

    def __init__(self, reactor: Any, name: str, port: int, refuse: Refuse, timeout: float) -> None:
        self._reactor = reactor
        self._name = name
        self._port = port
        self._refuse = refuse
        self._timeout = timeout

    @inlineCallbacks
    def connect(self, factory: IProtocolFactory) -> Any:
        receiver = _Addresses()
        self._reactor.nameResolver.resolveHostName(receiver, self._name, portNumber=self._port)
        addresses = yield receiver.done
        if not addresses:
            raise DNSLookupError(f"{self._name} did not resolve")
        for address in addresses:
            self._refuse(address, self._port)
        failure: ConnectError | None = None
        for address in addresses:
            endpoint = container_endpoint(self._reactor, address, self._port, self._refuse, self._timeout)
            try:
                protocol = yield endpoint.connect(factory)
            except ConnectError as error:
                failure = error
                continue
            return protocol
        assert failure is not None
        raise failure
