# -*- test-case-name: tests.test_backends -*-
"""
The static backend: containers listed in a TOML inventory file.

The file is polled every half second on the injected clock (a ``stat``, and a
read only when size, mtime or inode changed), so changes are seen well within
the 2 seconds the contract allows.  When an entry disappears or stops being
``running``, subscribers hear that its container stopped.  A file that does not
parse while the service runs is logged and ignored (the last good inventory
stays: an editor may be half-way through writing it); a file that is missing
means no containers.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Iterable

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from rexecpf.backends import IContainerBackend, StoppedCallback
from rexecpf.config import ConfigError, InventoryEntry, parse_inventory
from rexecpf.model import Container

__all__ = ["StaticBackend", "read_inventory"]

POLL_SECONDS = 0.5
_NOTHING = object()


def read_inventory(path: str) -> tuple[InventoryEntry, ...]:
    """
    :return: the entries of an inventory file.
    :raises ConfigError: naming the file and the bad key.
    """
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except OSError as error:
        raise ConfigError(f"backend.inventory: cannot read {path}: {error.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"backend.inventory: {path} is not valid TOML: {error}") from None
    try:
        return parse_inventory(data)
    except ConfigError as error:
        raise ConfigError(f"backend.inventory: {path}: {error}") from None


def _containers(entries: Iterable[InventoryEntry]) -> dict[str, Container]:
    return {
        entry.id: Container(
            id=entry.id,
            owner=entry.owner,
            address=entry.address,
            running=entry.state == "running",
            detail="" if entry.state == "running" else f"its state is {entry.state!r}",
        )
        for entry in entries
    }


def _is_this_host(address: str, local_interface: str | None) -> bool:
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return address == "localhost"
    return ip.is_loopback or ip.is_unspecified or str(ip) == local_interface


@implementer(IContainerBackend)
class StaticBackend(Service):
    """
    :param clock: drives the polling.
    :param path: the inventory file, or ``None`` for a fixed inventory.
    :param entries: the inventory when there is no file (``--demo``), or the
        one already read at start-up.
    :param local_interface: ``[limits] local_interface``: an entry at this
        address, or at a loopback one, is this host (warned of at start-up).
    """

    _log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        path: str | None,
        entries: Iterable[InventoryEntry] = (),
        local_interface: str | None = None,
    ) -> None:
        self._clock = clock
        self._path = path
        self._containers = _containers(entries)
        self._local_interface = local_interface
        self._subscribers: list[StoppedCallback] = []
        self._signature: tuple[int, int, int] | None = self._stat()
        #: a new signature seen at the last poll, not yet acted on
        self._changing: object = _NOTHING
        self._poll = LoopingCall(self.poll)
        self._poll.clock = clock

    def startService(self) -> None:
        super().startService()
        for container in self._containers.values():
            if container.address and _is_this_host(container.address, self._local_interface):
                self._log.warn(
                    "container {cid} is at {address}, this host: its forwards reach every port of "
                    "the host on that address (rexecpf's own are refused); give it to trusted users only",
                    cid=container.id,
                    address=container.address,
                )
        if self._path is not None:
            self._poll.start(POLL_SECONDS, now=False)

    def stopService(self) -> Deferred[None] | None:
        if self._poll.running:
            self._poll.stop()
        return super().stopService()

    def inspect(self, container_id: str) -> Deferred[Container | None]:
        return succeed(self._containers.get(container_id))

    def subscribe(self, callback: StoppedCallback) -> None:
        self._subscribers.append(callback)

    def check(self) -> Deferred[None]:
        return succeed(None)

    def _stat(self) -> tuple[int, int, int] | None:
        if self._path is None:
            return None
        try:
            info = os.stat(self._path)
        except OSError:
            return None
        return (info.st_mtime_ns, info.st_size, info.st_ino)

    def poll(self) -> None:
        """Re-read the inventory if the file changed; announce stopped containers."""
        signature = self._stat()
        if signature == self._signature:
            self._changing = _NOTHING
            return
        if signature != self._changing:
            # Changed since the last poll: a writer may be half-way through
            # (an empty or truncated file is still valid TOML, and would stop
            # every container).  Act once it has stayed the same for a poll.
            self._changing = signature
            return
        self._changing = _NOTHING
        self._signature = signature
        if signature is None:
            self._log.warn("inventory {path} is missing: no containers", path=self._path)
            self.replace(())
            return
        assert self._path is not None
        try:
            entries = read_inventory(self._path)
        except ConfigError as error:
            self._log.error("inventory not reloaded: {error}", error=str(error))
            return
        self.replace(entries)

    def replace(self, entries: Iterable[InventoryEntry]) -> None:
        """
        Take a new inventory (the file changed, or a reload): every container
        that was listed and is no longer running is announced as stopped.
        """
        old, self._containers = self._containers, _containers(entries)
        stopped = [
            cid
            for cid in old
            if not (cid in self._containers and self._containers[cid].running)
        ]
        self._log.info(
            "inventory loaded: {count} containers, {stopped} stopped",
            count=len(self._containers),
            stopped=len(stopped),
        )
        for cid in stopped:
            for callback in list(self._subscribers):
                callback(cid)
