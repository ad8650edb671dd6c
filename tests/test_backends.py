"""
One behavioural suite for :class:`IContainerBackend`, run against the static
backend (an inventory file), the Docker backend on :class:`FakeDockerRuntime`,
and the Docker backend on a real engine (skipped where ``docker info`` fails).
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from rexecpf.backends import IContainerBackend
from rexecpf.backends.docker import DockerBackend, DockerRuntime
from rexecpf.backends.static import StaticBackend, read_inventory
from rexecpf.model import Container
from rexecpf.testing import FakeBackend, FakeDockerRuntime
from tests import _docker
from tests.test_docker_runtime import wait_for


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


class BackendDriver:
    """Makes a started backend and changes the containers behind it."""

    backend: Any

    def start(self, test: TestCase) -> Awaitable[None]: ...

    def add(self, owner: str | None) -> Awaitable[str]:
        """:return: a reference to a new running container owned by ``owner``."""

    def stop(self, reference: str) -> Awaitable[None]: ...

    def remove(self, reference: str) -> Awaitable[None]: ...


class StaticDriver(BackendDriver):
    async def start(self, test: TestCase) -> None:
        self.path = test.mktemp()
        self.entries: dict[str, tuple[str | None, str]] = {}
        self._write()
        self.backend = StaticBackend(_reactor(), self.path)
        self.backend.startService()
        test.addCleanup(self.backend.stopService)

    def _write(self) -> None:
        lines = []
        for cid, (owner, state) in self.entries.items():
            lines.append("[[container]]")
            lines.append(f'id = "{cid}"')
            if owner is not None:
                lines.append(f'owner = "{owner}"')
            lines.append(f'address = "127.0.0.1"\nstate = "{state}"\n')
        with open(self.path, "w") as file:
            file.write("\n".join(lines) + "\n")

    async def add(self, owner: str | None) -> str:
        cid = f"c_{uuid.uuid4().hex[:10]}"
        self.entries[cid] = (owner, "running")
        self._write()
        from twisted.internet.task import deferLater

        for _ in range(200):  # the file is polled every 0.5 s
            if await self.backend.inspect(cid) is not None:
                return cid
            await deferLater(_reactor(), 0.02, lambda: None)
        raise AssertionError(f"{cid} never appeared in the inventory")

    async def stop(self, reference: str) -> None:
        self.entries[reference] = (self.entries[reference][0], "exited")
        self._write()

    async def remove(self, reference: str) -> None:
        del self.entries[reference]
        self._write()


class FakeDockerDriver(BackendDriver):
    async def start(self, test: TestCase) -> None:
        self.engine = FakeDockerRuntime()
        self.backend = DockerBackend(_reactor(), self.engine)
        self.backend.startService()
        test.addCleanup(self.backend.stopService)

    async def add(self, owner: str | None) -> str:
        labels = {"rexecpf.owner": owner} if owner else {}
        return self.engine.run(labels=labels).name  # type: ignore[no-any-return]

    async def stop(self, reference: str) -> None:
        self.engine.stop(reference)

    async def remove(self, reference: str) -> None:
        self.engine.remove(reference)


class RealDockerDriver(BackendDriver):
    async def start(self, test: TestCase) -> None:
        runtime = DockerRuntime(_reactor(), os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock"))
        self.backend = DockerBackend(_reactor(), runtime)
        runtime.startService()
        self.backend.startService()
        test.addCleanup(runtime.stopService)
        test.addCleanup(self.backend.stopService)
        self._test = test
        await wait_for(lambda: self.backend.connected, what="the event stream")

    async def add(self, owner: str | None) -> str:
        name = f"rexecpf-test-{uuid.uuid4().hex[:12]}"
        cid = await deferToThread(_docker.run_container, _docker.SLEEPER, owner=owner, name=name)
        self._test.addCleanup(deferToThread, _docker.remove_quietly, cid)
        return name

    async def stop(self, reference: str) -> None:
        await deferToThread(_docker.docker, "stop", "-t", "1", reference)

    async def remove(self, reference: str) -> None:
        await deferToThread(_docker.docker, "rm", "-f", reference)


def make_icontainer_backend_tests(driver_factory: Callable[[], BackendDriver]) -> type[TestCase]:
    """:return: a TestCase class checking an :class:`IContainerBackend` through ``driver_factory()``."""

    class Tests(TestCase):
        def setUp(self) -> Deferred[None]:
            self.driver = driver_factory()
            self.stopped: list[str] = []
            d = ensureDeferred(self.driver.start(self))
            d.addCallback(lambda _: self.driver.backend.subscribe(self.stopped.append))
            return d

        def test_interface(self) -> None:
            """The backend provides IContainerBackend."""
            self.assertTrue(verifyObject(IContainerBackend, self.driver.backend))

        async def test_running(self) -> None:
            """A running container is found with its owner and an address."""
            ref = await self.driver.add("alice")
            container = await self.driver.backend.inspect(ref)
            self.assertIsInstance(container, Container)
            self.assertTrue(container.running)
            self.assertEqual(container.owner, "alice")
            self.assertTrue(container.address)
            # Its canonical id finds it too.
            again = await self.driver.backend.inspect(container.id)
            self.assertEqual(again, container)

        async def test_no_owner(self) -> None:
            """A container without an owner has owner None."""
            ref = await self.driver.add(None)
            container = await self.driver.backend.inspect(ref)
            self.assertIsNone(container.owner)

        async def test_unknown(self) -> None:
            """An unknown container is None."""
            self.assertIsNone(await self.driver.backend.inspect("no-such-container-here"))

        async def test_check(self) -> None:
            """check fires with None while the backend answers."""
            self.assertIsNone(await self.driver.backend.check())

        async def test_stop(self) -> None:
            """A container that stops is announced (by its canonical id) within 2 s, and is then not running."""
            ref = await self.driver.add("alice")
            container = await self.driver.backend.inspect(ref)
            await self.driver.stop(ref)
            await wait_for(lambda: container.id in self.stopped, timeout=2.0, what="the stopped event")
            after = await self.driver.backend.inspect(ref)
            self.assertTrue(after is None or not after.running)

        async def test_remove(self) -> None:
            """A container that disappears is announced within 2 s, and is then unknown."""
            ref = await self.driver.add("alice")
            container = await self.driver.backend.inspect(ref)
            await self.driver.remove(ref)
            await wait_for(lambda: container.id in self.stopped, timeout=2.0, what="the stopped event")
            self.assertIsNone(await self.driver.backend.inspect(ref))

    return Tests


class StaticBackendTests(make_icontainer_backend_tests(StaticDriver)):  # type: ignore[misc]
    """The backend suite against :class:`StaticBackend`."""


class FakeDockerBackendTests(make_icontainer_backend_tests(FakeDockerDriver)):  # type: ignore[misc]
    """The backend suite against :class:`DockerBackend` on :class:`FakeDockerRuntime`."""


class DockerBackendTests(make_icontainer_backend_tests(RealDockerDriver)):  # type: ignore[misc]
    """The backend suite against :class:`DockerBackend` on a real engine."""

    skip = _docker.skip_reason()


class StaticInventoryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = Path(tempfile.mkdtemp()) / "containers.toml"
        self.write('[[container]]\nid = "c1"\nowner = "alice"\n[[container]]\nid = "c2"\nowner = "bob"\naddress = "10.0.0.2"\n')
        self.clock = Clock()
        self.backend = StaticBackend(self.clock, str(self.path), read_inventory(str(self.path)))
        self.stopped: list[str] = []
        self.backend.subscribe(self.stopped.append)
        self.backend.startService()
        self.addCleanup(self.backend.stopService)

    def write(self, text: str) -> None:
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(text)
        os.replace(temporary, self.path)

    def test_interface(self) -> None:
        """Both backends provide IContainerBackend."""
        verifyObject(IContainerBackend, self.backend)
        verifyObject(IContainerBackend, FakeBackend())

    def test_inspect(self) -> None:
        """Entries become containers; defaults are 127.0.0.1 and running."""
        c1 = self.successResultOf(self.backend.inspect("c1"))
        self.assertEqual((c1.owner, c1.address, c1.running), ("alice", "127.0.0.1", True))
        self.assertEqual(self.successResultOf(self.backend.inspect("c2")).address, "10.0.0.2")
        self.assertIsNone(self.successResultOf(self.backend.inspect("c3")))

    def test_stop_seen_within_two_seconds(self) -> None:
        """A container marked stopped is announced within 2 s of the change (Clock)."""
        self.write('[[container]]\nid = "c1"\nowner = "alice"\nstate = "exited"\n[[container]]\nid = "c2"\nowner = "bob"\n')
        self.clock.pump([0.5] * 4)
        self.assertEqual(self.stopped, ["c1"])
        self.assertFalse(self.successResultOf(self.backend.inspect("c1")).running)

    def test_removed_entry_is_stopped(self) -> None:
        """An entry that disappears is announced as stopped."""
        self.write('[[container]]\nid = "c2"\nowner = "bob"\n')
        self.clock.pump([0.5, 0.5])
        self.assertEqual(self.stopped, ["c1"])

    def test_file_being_written_is_not_read(self) -> None:
        """
        A file seen changing (here: truncated to nothing, as ``cat >`` does
        first) is read only once it stayed the same for a poll, so a
        half-written inventory stops nothing.
        """
        self.write("")
        self.clock.advance(0.5)
        self.write('[[container]]\nid = "c1"\nowner = "alice"\n[[container]]\nid = "c2"\nowner = "bob"\n# done\n')
        self.clock.pump([0.5] * 4)
        self.assertEqual(self.stopped, [])
        self.assertTrue(self.successResultOf(self.backend.inspect("c2")).running)

    def test_broken_file_keeps_old_inventory(self) -> None:
        """A file that does not parse is ignored (logged) and the last good one stays."""
        self.write("[[container]\nbroken")
        self.clock.advance(1.0)
        self.assertEqual(self.stopped, [])
        self.assertTrue(self.successResultOf(self.backend.inspect("c1")).running)
        self.flushLoggedErrors()

    def test_this_host_is_warned_of(self) -> None:
        """Start-up warns of each entry at a loopback address or local_interface (trusted users only)."""
        self.write(
            '[[container]]\nid = "lo"\nowner = "alice"\n'
            '[[container]]\nid = "iface"\nowner = "bob"\naddress = "10.0.0.9"\n'
            '[[container]]\nid = "far"\nowner = "bob"\naddress = "10.0.0.2"\n'
        )
        logged: list[Any] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        backend = StaticBackend(self.clock, str(self.path), read_inventory(str(self.path)), "10.0.0.9")
        backend.startService()
        self.addCleanup(backend.stopService)
        warned = [event["cid"] for event in logged if "trusted users only" in event.get("log_format", "")]
        self.assertEqual(warned, ["lo", "iface"])
