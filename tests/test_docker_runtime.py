"""
One behavioural suite for :class:`IDockerRuntime`, run against
:class:`FakeDockerRuntime` and against :class:`DockerRuntime` on a real engine
(skipped where ``docker info`` fails), so the fake cannot drift from Docker.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from rexecpf.backends.docker import (
    ContainerEvent,
    DockerContainer,
    DockerRuntime,
    IDockerRuntime,
    IEventWatch,
)
from rexecpf.model import APIError
from rexecpf.testing import FakeDockerRuntime
from tests import _docker


class EngineDriver:
    """Creates and ends containers on the engine behind a runtime."""

    runtime: Any

    def start(self, test: TestCase) -> Awaitable[None]: ...

    def run(self, name: str, labels: dict[str, str]) -> Awaitable[str]: ...

    def stop(self, container_id: str) -> Awaitable[None]: ...

    def remove(self, container_id: str) -> Awaitable[None]: ...


class FakeDriver(EngineDriver):
    async def start(self, test: TestCase) -> None:
        self.runtime = FakeDockerRuntime()

    async def run(self, name: str, labels: dict[str, str]) -> str:
        return self.runtime.run(name=name, labels=labels).id  # type: ignore[no-any-return]

    async def stop(self, container_id: str) -> None:
        self.runtime.stop(container_id)

    async def remove(self, container_id: str) -> None:
        self.runtime.remove(container_id)


class RealDriver(EngineDriver):
    async def start(self, test: TestCase) -> None:
        from twisted.internet import reactor

        self.runtime = DockerRuntime(reactor, os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock"))
        self.runtime.startService()
        test.addCleanup(self.runtime.stopService)
        self._test = test

    async def run(self, name: str, labels: dict[str, str]) -> str:
        cid: str = await deferToThread(
            _docker.run_container, _docker.SLEEPER, name=name, labels=labels
        )
        self._test.addCleanup(deferToThread, _docker.remove_quietly, cid)
        return cid

    async def stop(self, container_id: str) -> None:
        await deferToThread(_docker.docker, "stop", "-t", "1", container_id)

    async def remove(self, container_id: str) -> None:
        await deferToThread(_docker.docker, "rm", "-f", container_id)


async def wait_for(
    condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition"
) -> None:
    """Poll ``condition`` on the real reactor until it holds (bounded)."""
    from twisted.internet import reactor

    deadline = reactor.seconds() + timeout
    while not condition():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await deferLater(reactor, 0.02, lambda: None)


def make_idocker_runtime_tests(driver_factory: Callable[[], EngineDriver]) -> type[TestCase]:
    """:return: a TestCase class checking an :class:`IDockerRuntime` through ``driver_factory()``."""

    class Tests(TestCase):
        def setUp(self) -> Deferred[None]:
            self.driver = driver_factory()
            return ensureDeferred(self.driver.start(self))

        def name(self) -> str:
            return f"rexecpf-test-{uuid.uuid4().hex[:12]}"

        def test_interface(self) -> None:
            """The runtime provides IDockerRuntime."""
            self.assertTrue(verifyObject(IDockerRuntime, self.driver.runtime))

        async def test_inspect_forms(self) -> None:
            """A container is found by its full id, its short id and its name, with the same record."""
            name = self.name()
            cid = await self.driver.run(name, {"rexecpf.owner": "alice"})
            self.assertEqual(len(cid), 64)
            records = [await self.driver.runtime.inspect(ref) for ref in (cid, cid[:12], name)]
            for record in records:
                self.assertIsInstance(record, DockerContainer)
                self.assertEqual(record.id, cid)
                self.assertEqual(record.name, name)
                self.assertTrue(record.running)
                self.assertEqual(record.status, "running")
                self.assertEqual(record.labels.get("rexecpf.owner"), "alice")
                self.assertTrue(any(ip for _, ip in record.networks), record.networks)

        async def test_inspect_unknown(self) -> None:
            """An unknown name, an unknown id and a reference Docker could not hold are all None."""
            for ref in (self.name(), "f" * 64, "../../info", "a b", ""):
                self.assertIsNone(await self.driver.runtime.inspect(ref), ref)

        async def test_stopped_container(self) -> None:
            """A stopped container is found, not running, with no IP address."""
            name = self.name()
            cid = await self.driver.run(name, {})
            await self.driver.stop(cid)
            record = await self.driver.runtime.inspect(name)
            self.assertFalse(record.running)
            self.assertEqual(record.status, "exited")
            self.assertFalse(any(ip for _, ip in record.networks))

        async def test_removed_container(self) -> None:
            """A removed container is not found."""
            cid = await self.driver.run(self.name(), {})
            await self.driver.remove(cid)
            self.assertIsNone(await self.driver.runtime.inspect(cid))

        async def test_ping(self) -> None:
            """ping fires with None while the engine answers."""
            self.assertIsNone(await self.driver.runtime.ping())

        async def test_events(self) -> None:
            """
            A watch is connected, then hears die and stop of a stopped
            container and destroy of a removed one, with the full id and name.
            """
            events: list[ContainerEvent] = []
            connected: list[bool] = []
            watch = self.driver.runtime.watch(events.append, lambda: connected.append(True))
            self.assertTrue(verifyObject(IEventWatch, watch))
            self.addCleanup(watch.stop)
            await wait_for(lambda: bool(connected), what="connected")
            name = self.name()
            cid = await self.driver.run(name, {})
            await self.driver.stop(cid)

            def seen(action: str) -> bool:
                return any(e.action == action and e.container_id == cid for e in events)

            await wait_for(lambda: seen("die") and seen("stop"), what="die and stop")
            self.assertIn(name, {e.name for e in events if e.container_id == cid})
            await self.driver.remove(cid)
            await wait_for(lambda: seen("destroy"), what="destroy")

        async def test_watch_stop(self) -> None:
            """Stopping a watch ends it promptly, with None, and no more events arrive."""
            from twisted.internet import reactor

            events: list[ContainerEvent] = []
            connected: list[bool] = []
            watch = self.driver.runtime.watch(events.append, lambda: connected.append(True))
            await wait_for(lambda: bool(connected), what="connected")
            started = reactor.seconds()
            watch.stop()
            self.assertIsNone(await watch.ended)
            self.assertLess(reactor.seconds() - started, 2.0)
            cid = await self.driver.run(self.name(), {})
            await self.driver.remove(cid)
            await deferLater(reactor, 0.3, lambda: None)
            self.assertEqual([e for e in events if e.container_id == cid], [])

    return Tests


class FakeDockerRuntimeTests(make_idocker_runtime_tests(FakeDriver)):  # type: ignore[misc]
    """The behavioural suite against :class:`FakeDockerRuntime`."""


class DockerRuntimeTests(make_idocker_runtime_tests(RealDriver)):  # type: ignore[misc]
    """The behavioural suite against :class:`DockerRuntime` and a real engine."""

    skip = _docker.skip_reason()


class UnreachableEngineTests(TestCase):
    """:class:`DockerRuntime` when no engine answers at its URL."""

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.runtime = DockerRuntime(reactor, f"unix://{self.mktemp()}.sock", timeout=2)
        self.runtime.startService()
        self.addCleanup(self.runtime.stopService)

    async def test_inspect(self) -> None:
        """inspect fails with 503 Backend unavailable, not an SDK error."""
        with self.assertRaises(APIError) as caught:
            await self.runtime.inspect("web")
        self.assertEqual(caught.exception.code, 503)
        self.assertEqual(caught.exception.message, "Backend unavailable")

    async def test_ping(self) -> None:
        """ping fails with 503."""
        with self.assertRaises(APIError) as caught:
            await self.runtime.ping()
        self.assertEqual(caught.exception.code, 503)

    async def test_watch(self) -> None:
        """A watch that cannot connect ends with 503, without calling connected."""
        connected: list[bool] = []
        watch = self.runtime.watch(lambda event: None, lambda: connected.append(True))
        with self.assertRaises(APIError) as caught:
            await watch.ended
        self.assertEqual(caught.exception.code, 503)
        self.assertEqual(connected, [])
