# -*- test-case-name: tests.test_docker_runtime -*-
"""
Fakes shared by the tests, held honest by the behavioural suites that run
against them and against the real thing.

:class:`FakeDockerRuntime` stands in for :class:`rexecpf.backends.docker.DockerRuntime`:
an in-memory engine whose containers the test creates, stops, kills and
removes, which it can take down and bring back, and which resolves
references (full id, unique id prefix, name) as Docker does.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from rexecpf.backends import IContainerBackend, StoppedCallback
from rexecpf.backends.docker import (
    ContainerEvent,
    DockerContainer,
    IDockerRuntime,
    IEventWatch,
    is_reference,
)
from rexecpf.model import (
    BACKEND_UNAVAILABLE,
    CONTAINER_NOT_RUNNING,
    DOMAIN_CLAIMED,
    LIMIT_EXCEEDED,
    LOCAL_PORT_UNAVAILABLE,
    PORT_ALREADY_FORWARDED,
    SLUG_TAKEN,
    TOO_MANY_DOMAINS,
    APIError,
    Container,
    PortForward,
)
from rexecpf.store import IForwardStore

__all__ = ["FakeBackend", "FakeDockerRuntime", "MemoryForwardStore"]


@implementer(IEventWatch)
class _FakeWatch:
    def __init__(self, runtime: FakeDockerRuntime, deliver: Callable[[ContainerEvent], object]):
        self.ended: Deferred[None] = Deferred()
        self._runtime = runtime
        self.deliver = deliver

    def stop(self) -> None:
        self._runtime._watches.discard(self)
        if not self.ended.called:
            self.ended.callback(None)


@implementer(IDockerRuntime)
class FakeDockerRuntime:
    """
    An in-memory Docker engine.  Everything answers at once (synchronously).

    :ivar available: whether the engine answers; see :meth:`go_down` and
        :meth:`come_up`.
    """

    def __init__(self) -> None:
        self._containers: dict[str, DockerContainer] = {}
        self._watches: set[_FakeWatch] = set()
        self.available = True
        #: how many inspections reached the engine (to test caching)
        self.inspections = 0

    # --- driving it

    def run(
        self,
        name: str | None = None,
        labels: Mapping[str, str] | None = None,
        networks: tuple[tuple[str, str], ...] = (("bridge", "172.17.0.2"),),
        running: bool = True,
        container_id: str | None = None,
    ) -> DockerContainer:
        """
        Create (and start, unless ``running`` is false) a container.

        :return: its record.
        """
        self._require_up()
        cid = container_id or secrets.token_hex(32)
        name = name or f"fake_{cid[:8]}"
        if any(c.name == name for c in self._containers.values()):
            raise ValueError(f"the name {name!r} is taken")
        container = DockerContainer(
            id=cid,
            name=name,
            running=running,
            status="running" if running else "created",
            labels=dict(labels or {}),
            networks=networks if running else tuple((n, "") for n, _ in networks),
            network_mode=networks[0][0] if networks else "none",
        )
        self._containers[cid] = container
        self._emit("create", container)
        if running:
            self._emit("start", container)
        return container

    def stop(self, reference: str) -> None:
        """``docker stop``: the container dies, then has stopped."""
        self._exit(reference, "kill", "die", "stop")

    def kill(self, reference: str) -> None:
        """``docker kill``."""
        self._exit(reference, "kill", "die")

    def remove(self, reference: str) -> None:
        """``docker rm -f``."""
        container = self._get(reference)
        if container.running:
            self._exit(reference, "kill", "die")
        del self._containers[container.id]
        self._emit("destroy", container)

    def go_down(self) -> None:
        """The engine stops answering; open event streams end."""
        self.available = False
        for watch in list(self._watches):
            watch.stop()

    def come_up(self) -> None:
        """The engine answers again."""
        self.available = True

    def exit_silently(self, reference: str) -> None:
        """The container exits while nobody listens (no events)."""
        container = self._get(reference)
        self._containers[container.id] = attrs.evolve(
            container,
            running=False,
            status="exited",
            networks=tuple((n, "") for n, _ in container.networks),
        )

    # --- internals

    def _require_up(self) -> None:
        if not self.available:
            raise BACKEND_UNAVAILABLE("the Docker engine does not answer: (fake) down")

    def _get(self, reference: str) -> DockerContainer:
        found = self._resolve(reference)
        if found is None:
            raise KeyError(reference)
        return found

    def _resolve(self, reference: str) -> DockerContainer | None:
        if reference in self._containers:
            return self._containers[reference]
        for container in self._containers.values():
            if container.name == reference:
                return container
        matches = [c for c in self._containers.values() if c.id.startswith(reference)]
        return matches[0] if len(matches) == 1 else None

    def _exit(self, reference: str, *actions: str) -> DockerContainer:
        container = self._get(reference)
        if not container.running:
            return container
        stopped = attrs.evolve(
            container,
            running=False,
            status="exited",
            networks=tuple((n, "") for n, _ in container.networks),
        )
        self._containers[container.id] = stopped
        for action in actions:
            self._emit(action, stopped)
        return stopped

    def _emit(self, action: str, container: DockerContainer) -> None:
        event = ContainerEvent(action, container.id, container.name)
        for watch in list(self._watches):
            watch.deliver(event)

    # --- IDockerRuntime

    def inspect(self, reference: str) -> Deferred[DockerContainer | None]:
        if not self.available:
            return fail(BACKEND_UNAVAILABLE("the Docker engine does not answer: (fake) down"))
        self.inspections += 1
        if not is_reference(reference):
            return succeed(None)
        return succeed(self._resolve(reference))

    def ping(self) -> Deferred[None]:
        if not self.available:
            return fail(BACKEND_UNAVAILABLE("the Docker engine does not answer: (fake) down"))
        return succeed(None)

    def watch(
        self, deliver: Callable[[ContainerEvent], object], connected: Callable[[], object]
    ) -> IEventWatch:
        watch = _FakeWatch(self, deliver)
        if not self.available:
            watch.ended.errback(BACKEND_UNAVAILABLE("the Docker engine does not answer: (fake) down"))
            return watch
        self._watches.add(watch)
        connected()
        return watch


@implementer(IForwardStore)
class MemoryForwardStore:
    """:class:`IForwardStore` in memory, answering synchronously."""

    def __init__(self) -> None:
        self.forwards: dict[str, PortForward] = {}
        self._secrets: dict[str, bytes] = {}
        #: container id -> the number of its latest stop
        self.stops: dict[str, int] = {}
        #: bumped by every write (:meth:`snapshot`); no change is published
        self.rev = 0

    def _ordered(self) -> list[PortForward]:
        return sorted(self.forwards.values(), key=lambda f: f.created_ms)

    def add(self, forward: PortForward, limit: int, stop_mark: int | None = None) -> Deferred[PortForward]:
        if stop_mark is not None and self.stops.get(forward.container_id, 0) > stop_mark:
            return fail(CONTAINER_NOT_RUNNING("it stopped meanwhile"))
        same = [f for f in self.forwards.values() if f.container_id == forward.container_id]
        if any(f.container_port == forward.container_port for f in same):
            return fail(PORT_ALREADY_FORWARDED("already forwarded"))
        if len(same) >= limit:
            return fail(LIMIT_EXCEEDED(f"at most {limit}"))
        if any(f.local_port == forward.local_port for f in self.forwards.values()):
            return fail(LOCAL_PORT_UNAVAILABLE("in use"))
        if forward.slug is not None and any(
            f.owner == forward.owner and f.slug == forward.slug for f in self.forwards.values()
        ):
            return fail(SLUG_TAKEN("in use"))
        try:
            for domain in forward.domains:
                self._claimed_elsewhere(forward.id, forward.owner, domain)
        except APIError as error:
            return fail(error)
        self.forwards[forward.id] = forward
        self.rev += 1
        return succeed(forward)

    def _claimed_elsewhere(self, forward_id: str, owner: str, domain: str) -> None:
        for other in self.forwards.values():
            if other.id != forward_id and (
                domain in other.verified_domains or (other.owner == owner and domain in other.domains)
            ):
                raise DOMAIN_CLAIMED(f"{domain} is claimed by another forward")

    def set_domain(self, forward_id: str, domain: str, verified: bool, limit: int) -> Deferred[PortForward | None]:
        forward = self.forwards.get(forward_id)
        if forward is None:
            return succeed(None)
        try:
            self._claimed_elsewhere(forward_id, forward.owner, domain)
        except APIError as error:
            return fail(error)
        if domain not in forward.domains:
            if len(forward.domains) >= limit:
                return fail(TOO_MANY_DOMAINS(f"at most {limit}"))
            forward = attrs.evolve(forward, domains=(*forward.domains, domain))
        if verified and domain not in forward.verified_domains:
            forward = attrs.evolve(
                forward, verified_domains=tuple(d for d in forward.domains if d in forward.verified_domains or d == domain)
            )
        if forward != self.forwards[forward_id]:
            self.forwards[forward_id] = forward
            self.rev += 1
        return succeed(forward)

    def remove_domain(self, forward_id: str, domain: str) -> Deferred[PortForward | None]:
        forward = self.forwards.get(forward_id)
        if forward is None or domain not in forward.domains:
            return succeed(forward)
        forward = attrs.evolve(
            forward,
            domains=tuple(d for d in forward.domains if d != domain),
            verified_domains=tuple(d for d in forward.verified_domains if d != domain),
        )
        self.forwards[forward_id] = forward
        self.rev += 1
        return succeed(forward)

    def find_domain(self, domain: str) -> Deferred[PortForward | None]:
        return succeed(next((f for f in self.forwards.values() if domain in f.verified_domains), None))

    def find_slug(self, owner: str, slug: str) -> Deferred[PortForward | None]:
        return succeed(next((f for f in self.forwards.values() if f.owner == owner and f.slug == slug), None))

    def get(self, forward_id: str) -> Deferred[PortForward | None]:
        return succeed(self.forwards.get(forward_id))

    def list_forwards(self, container_id: str | None = None) -> Deferred[list[PortForward]]:
        return succeed(
            [f for f in self._ordered() if container_id is None or f.container_id == container_id]
        )

    def remove(self, forward_id: str) -> Deferred[bool]:
        removed = self.forwards.pop(forward_id, None) is not None
        self.rev += removed
        return succeed(removed)

    def remove_container(self, container_id: str) -> Deferred[list[PortForward]]:
        removed = [f for f in self._ordered() if f.container_id == container_id]
        for forward in removed:
            del self.forwards[forward.id]
        self.stops[container_id] = max(self.stops.values(), default=0) + 1
        self.rev += 1
        return succeed(removed)

    def snapshot(self) -> Deferred[tuple[int, list[PortForward]]]:
        return succeed((self.rev, self._ordered()))

    def stop_mark(self) -> Deferred[int]:
        return succeed(max(self.stops.values(), default=0))

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
