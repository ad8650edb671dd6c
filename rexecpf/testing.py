"""
Fakes shared by the tests.  Each is held honest by a behavioural test suite
that runs against it and against the real implementation.
"""

from __future__ import annotations

import secrets

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from rexecpf.backends import IContainerBackend, StoppedCallback
from rexecpf.model import (
    BACKEND_UNAVAILABLE,
    LIMIT_EXCEEDED,
    LOCAL_PORT_UNAVAILABLE,
    PORT_ALREADY_FORWARDED,
    Container,
    PortForward,
)
from rexecpf.store import IForwardStore

__all__ = ["FakeBackend", "MemoryForwardStore"]


@implementer(IForwardStore)
class MemoryForwardStore:
    """:class:`IForwardStore` in memory, answering synchronously."""

    def __init__(self) -> None:
        self.forwards: dict[str, PortForward] = {}
        self._secrets: dict[str, bytes] = {}

    def _ordered(self) -> list[PortForward]:
        return sorted(self.forwards.values(), key=lambda f: f.created_ms)

    def add(self, forward: PortForward, limit: int) -> Deferred[PortForward]:
        same = [f for f in self.forwards.values() if f.container_id == forward.container_id]
        if any(f.container_port == forward.container_port for f in same):
            return fail(PORT_ALREADY_FORWARDED("already forwarded"))
        if len(same) >= limit:
            return fail(LIMIT_EXCEEDED(f"at most {limit}"))
        if any(f.local_port == forward.local_port for f in self.forwards.values()):
            return fail(LOCAL_PORT_UNAVAILABLE("in use"))
        self.forwards[forward.id] = forward
        return succeed(forward)

    def get(self, forward_id: str) -> Deferred[PortForward | None]:
        return succeed(self.forwards.get(forward_id))

    def list_forwards(self, container_id: str | None = None) -> Deferred[list[PortForward]]:
        return succeed(
            [f for f in self._ordered() if container_id is None or f.container_id == container_id]
        )

    def remove(self, forward_id: str) -> Deferred[bool]:
        return succeed(self.forwards.pop(forward_id, None) is not None)

    def remove_container(self, container_id: str) -> Deferred[list[PortForward]]:
        removed = [f for f in self._ordered() if f.container_id == container_id]
        for forward in removed:
            del self.forwards[forward.id]
        return succeed(removed)

    def secret(self, name: str) -> Deferred[bytes]:
        return succeed(self._secrets.setdefault(name, secrets.token_bytes(32)))

    def check(self) -> Deferred[None]:
        return succeed(None)

    def close(self) -> None:
        pass


@implementer(IContainerBackend)
class FakeBackend:
    """
    :class:`IContainerBackend` driven by the test: ``add``, ``stop``,
    ``remove``, and ``available = False`` to play an unreachable engine.
    """

    def __init__(self) -> None:
        self.containers: dict[str, Container] = {}
        self.available = True
        self._subscribers: list[StoppedCallback] = []

    def add(self, container_id: str, owner: str | None, address: str = "127.0.0.1") -> Container:
        container = Container(id=container_id, owner=owner, address=address, running=True)
        self.containers[container_id] = container
        return container

    def stop(self, container_id: str) -> None:
        old = self.containers[container_id]
        self.containers[container_id] = Container(
            id=old.id, owner=old.owner, address=old.address, running=False, detail="it exited"
        )
        self._announce(container_id)

    def remove(self, container_id: str) -> None:
        del self.containers[container_id]
        self._announce(container_id)

    def _announce(self, container_id: str) -> None:
        for callback in list(self._subscribers):
            callback(container_id)

    def inspect(self, container_id: str) -> Deferred[Container | None]:
        if not self.available:
            return fail(BACKEND_UNAVAILABLE("the fake engine is down"))
        return succeed(self.containers.get(container_id))

    def subscribe(self, callback: StoppedCallback) -> None:
        self._subscribers.append(callback)

    def check(self) -> Deferred[None]:
        if not self.available:
            return fail(BACKEND_UNAVAILABLE("the fake engine is down"))
        return succeed(None)
