"""
:class:`DockerBackend` on :class:`FakeDockerRuntime` and a :class:`Clock`:
the mapping to containers, the cache, reconnection with backoff, the
reconcile hook; and :class:`ForwardService` on top of it (canonical ids,
ownership, reaping, an engine that is down).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from rexecpf.backends.docker import (
    BACKOFF_FIRST,
    BACKOFF_MAX,
    CACHE_SECONDS,
    DockerBackend,
    DockerContainer,
    parse_event,
    parse_inspection,
    to_container,
)
from rexecpf.config import LimitsConfig
from rexecpf.forwards import ForwardService
from rexecpf.model import APIError, Principal
from rexecpf.store import SQLiteForwardStore
from rexecpf.testing import FakeDockerRuntime

ALICE = Principal("alice")
BOB = Principal("bob")
ROOT = Principal("root", admin=True)


def record(**changes: Any) -> DockerContainer:
    values: dict[str, Any] = dict(
        id="a" * 64,
        name="web",
        running=True,
        status="running",
        labels={"rexecpf.owner": "alice"},
        networks=(("bridge", "172.17.0.2"), ("backend", "10.0.0.5")),
    )
    values.update(changes)
    return DockerContainer(**values)


class ToContainerTests(SynchronousTestCase):
    """From the engine's record to rexecpf's :class:`Container`."""

    def test_first_network(self) -> None:
        """Without a configured network the address is the first network's IP."""
        container = to_container(record(), "", "rexecpf.owner")
        self.assertEqual((container.id, container.owner, container.address), ("a" * 64, "alice", "172.17.0.2"))
        self.assertTrue(container.running)

    def test_first_network_with_an_ip(self) -> None:
        """A network without an IP is passed over."""
        container = to_container(record(networks=(("none", ""), ("b", "10.1.1.1"))), "", "rexecpf.owner")
        self.assertEqual(container.address, "10.1.1.1")

    def test_configured_network(self) -> None:
        """With a configured network the address is the IP on it."""
        self.assertEqual(to_container(record(), "backend", "rexecpf.owner").address, "10.0.0.5")

    def test_not_on_network(self) -> None:
        """A running container not on the configured network is not running, and the detail says why."""
        container = to_container(record(), "other", "rexecpf.owner")
        self.assertFalse(container.running)
        self.assertIn("not attached to network 'other'", container.detail)

    def test_no_address(self) -> None:
        """A running container with no IP anywhere (network mode host or none) is not running."""
        container = to_container(
            record(networks=(("host", ""),), network_mode="host"), "", "rexecpf.owner"
        )
        self.assertFalse(container.running)
        self.assertIn("no IP address", container.detail)
        self.assertIn("host", container.detail)

    def test_not_running(self) -> None:
        """An exited container is not running; the detail names its state."""
        container = to_container(record(running=False, status="exited"), "", "rexecpf.owner")
        self.assertFalse(container.running)
        self.assertEqual(container.detail, "its state is 'exited'")

    def test_owner(self) -> None:
        """The owner is the value of the configured label; absent or empty means no owner."""
        self.assertEqual(to_container(record(labels={"x": "bob"}), "", "x").owner, "bob")
        self.assertIsNone(to_container(record(labels={}), "", "rexecpf.owner").owner)
        self.assertIsNone(to_container(record(labels={"rexecpf.owner": ""}), "", "rexecpf.owner").owner)

    def test_parse_inspection(self) -> None:
        """The Engine API's inspect document becomes a record."""
        parsed = parse_inspection(
            {
                "Id": "b" * 64,
                "Name": "/web",
                "State": {"Running": True, "Status": "running"},
                "Config": {"Labels": {"rexecpf.owner": "alice"}},
                "HostConfig": {"NetworkMode": "default"},
                "NetworkSettings": {"Networks": {"bridge": {"IPAddress": "172.17.0.3"}}},
            }
        )
        self.assertEqual(parsed.name, "web")
        self.assertEqual(parsed.networks, (("bridge", "172.17.0.3"),))
        self.assertEqual(parsed.labels, {"rexecpf.owner": "alice"})

    def test_parse_event(self) -> None:
        """Container and network events become ContainerEvents; others are dropped."""
        die = parse_event({"Type": "container", "Action": "die", "Actor": {"ID": "c" * 64, "Attributes": {"name": "web"}}})
        self.assertEqual((die.action, die.container_id, die.name), ("die", "c" * 64, "web"))
        execute = parse_event({"Type": "container", "Action": "exec_start: sh", "Actor": {"ID": "c" * 64}})
        self.assertEqual(execute.action, "exec_start")
        connect = parse_event({"Type": "network", "Action": "connect", "Actor": {"ID": "n", "Attributes": {"container": "c" * 64}}})
        self.assertEqual((connect.action, connect.container_id), ("network-connect", "c" * 64))
        self.assertIsNone(parse_event({"Type": "image", "Action": "pull", "Actor": {"ID": "x"}}))


class DockerBackendTests(SynchronousTestCase):
    """The backend's cache, events, reconnection and reconcile, on a Clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.engine = FakeDockerRuntime()
        self.backend = DockerBackend(self.clock, self.engine, reconcile_seconds=30)
        self.reconciles: list[float] = []
        self.backend.set_reconciler(lambda: succeed(self.reconciles.append(self.clock.seconds())))
        self.stopped: list[str] = []
        self.backend.subscribe(self.stopped.append)
        self.backend.startService()
        self.addCleanup(self.backend.stopService)

    def inspect(self, reference: str) -> Any:
        return self.successResultOf(self.backend.inspect(reference))

    def test_cache(self) -> None:
        """Inspections are reused for CACHE_SECONDS, then asked again."""
        self.engine.run(name="web")
        self.inspect("web")
        self.inspect("web")
        self.assertEqual(self.engine.inspections, 1)
        self.clock.advance(CACHE_SECONDS + 0.01)
        self.inspect("web")
        self.assertEqual(self.engine.inspections, 2)

    def test_event_drops_cache(self) -> None:
        """An event about a container drops its cached inspection at once."""
        web = self.engine.run(name="web")
        self.assertTrue(self.inspect("web").running)
        self.engine.stop("web")
        self.assertFalse(self.inspect("web").running)
        self.assertEqual(self.stopped, [web.id, web.id])  # die, stop

    def test_name_taken_over(self) -> None:
        """A name that a new container takes is not answered from the cache of the old one."""
        old = self.engine.run(name="web")
        self.assertEqual(self.inspect("web").id, old.id)
        self.engine.remove("web")
        new = self.engine.run(name="web")
        self.assertEqual(self.inspect("web").id, new.id)

    def test_unknown_is_not_cached(self) -> None:
        """An unknown name is asked again: the container may be created meanwhile."""
        self.assertIsNone(self.inspect("later"))
        self.engine.run(name="later")
        self.assertIsNotNone(self.inspect("later"))

    def test_invalid_reference(self) -> None:
        """A reference Docker cannot hold is None without asking the engine."""
        self.assertIsNone(self.inspect("../containers"))
        self.assertEqual(self.engine.inspections, 0)

    def test_concurrent_inspections_share(self) -> None:
        """Inspections of one reference in flight together make one engine call."""
        calls: list[Deferred[Any]] = []
        self.engine.inspect = lambda reference: calls.append(Deferred()) or calls[-1]  # type: ignore[method-assign]
        first = self.backend.inspect("web")
        second = self.backend.inspect("web")
        self.assertEqual(len(calls), 1)
        calls[0].callback(record())
        self.assertEqual(self.successResultOf(first), self.successResultOf(second))

    def test_down(self) -> None:
        """While the engine is down inspect and check fail with 503."""
        self.engine.go_down()
        for d in (self.backend.inspect("web"), self.backend.check()):
            error = self.failureResultOf(d, APIError).value
            self.assertEqual((error.code, error.message), (503, "Backend unavailable"))

    def test_reconnect_with_backoff(self) -> None:
        """
        When the event stream ends the backend reconnects with growing
        delays (capped), and reconciles once it is connected again.
        """
        self.assertTrue(self.backend.connected)
        self.assertEqual(len(self.reconciles), 1)  # on the first connection
        self.engine.go_down()
        self.assertFalse(self.backend.connected)
        delays = []
        delay = BACKOFF_FIRST
        for _ in range(8):
            self.clock.advance(delay - 0.001)
            self.assertFalse(self.backend.connected)
            self.clock.advance(0.001)
            delays.append(delay)
            delay = min(delay * 2, BACKOFF_MAX)
        self.assertEqual(delays[-1], BACKOFF_MAX)
        self.assertEqual(len(self.reconciles), 1)
        self.engine.come_up()
        self.clock.advance(BACKOFF_MAX)
        self.assertTrue(self.backend.connected)
        self.assertEqual(len(self.reconciles), 2)
        # The backoff starts over.
        self.engine.go_down()
        self.engine.come_up()
        self.clock.advance(BACKOFF_FIRST)
        self.assertTrue(self.backend.connected)

    def test_periodic_reconcile(self) -> None:
        """The reconciler runs every reconcile_seconds."""
        self.clock.advance(30)
        self.clock.advance(30)
        self.assertEqual(self.reconciles, [0, 30, 60])

    def test_one_reconcile_at_a_time(self) -> None:
        """A reconcile asked for during one runs once after it, not alongside."""
        running: list[Deferred[None]] = []
        self.backend.set_reconciler(lambda: running.append(Deferred()) or running[-1])
        self.backend.reconcile()
        self.backend.reconcile()
        self.backend.reconcile()
        self.assertEqual(len(running), 1)
        running[0].callback(None)
        self.assertEqual(len(running), 2)
        running[1].callback(None)
        self.assertEqual(len(running), 2)

    def test_stop_service(self) -> None:
        """Stopping the backend ends its watch, its timers and its reconnections."""
        self.engine.go_down()
        self.successResultOf(self.backend.stopService() or succeed(None))
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ForwardsOnDockerTests(TestCase):
    """:class:`ForwardService` on the Docker backend (fake engine, real SQLite store)."""

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.engine = FakeDockerRuntime()
        self.backend = DockerBackend(reactor, self.engine)
        self.store = SQLiteForwardStore(reactor, self.mktemp())
        self.forwards = ForwardService(
            reactor, self.store, self.backend, LimitsConfig(), port_probe=lambda i, p: True
        )
        self.backend.set_reconciler(self.forwards.reconcile)
        self.backend.startService()
        self.forwards.startService()
        self.addCleanup(self.store.close)
        self.addCleanup(self.forwards.stopService)
        self.addCleanup(self.backend.stopService)
        self.web = self.engine.run(name="web", labels={"rexecpf.owner": "alice"})

    async def create(self, reference: str = "web", port: int = 8000, principal: Principal = ALICE) -> Any:
        return await self.forwards.create(principal, reference, b'{"container_port": %d}' % port)

    async def test_canonical_id(self) -> None:
        """
        A forward created through a name is kept under the full id, and is
        listed, read and deleted through the name, the short id or the full id.
        """
        forward = await self.create("web")
        self.assertEqual(forward.container_id, self.web.id)
        for reference in ("web", self.web.id[:12], self.web.id):
            self.assertEqual(await self.forwards.list(ALICE, reference), [forward])
            self.assertEqual(await self.forwards.get(ALICE, reference, forward.id), forward)
        await self.forwards.delete(ALICE, self.web.id[:12], forward.id)
        self.assertEqual(await self.forwards.list(ALICE, "web"), [])

    async def test_one_port_whatever_the_name(self) -> None:
        """The same container port cannot be forwarded twice through two forms of the id."""
        await self.create("web")
        with self.assertRaises(APIError) as caught:
            await self.create(self.web.id[:12])
        self.assertEqual(caught.exception.code, 403)

    async def test_someone_elses(self) -> None:
        """A container labelled for another user is 404 Container not found; admins see it."""
        with self.assertRaises(APIError) as caught:
            await self.forwards.list(BOB, "web")
        self.assertEqual((caught.exception.code, caught.exception.message), (404, "Container not found"))
        self.assertEqual(await self.forwards.list(ROOT, "web"), [])

    async def test_unlabelled(self) -> None:
        """An unlabelled container is 404 to every user but admins."""
        self.engine.run(name="nobodys")
        for principal in (ALICE, BOB):
            with self.assertRaises(APIError) as caught:
                await self.create("nobodys", principal=principal)
            self.assertEqual(caught.exception.code, 404)
        forward = await self.create("nobodys", principal=ROOT)
        self.assertEqual(await self.forwards.list(ROOT, "nobodys"), [forward])

    async def test_reaped_on_stop(self) -> None:
        """Stopping the container reaps its forwards, whichever form created them."""
        await self.create("web", 8000)
        await self.create(self.web.id[:12], 8001)
        self.engine.stop("web")
        await self._until_empty()

    async def test_down_touches_nothing(self) -> None:
        """While the engine is down API calls fail with 503 and a reconcile keeps every forward."""
        forward = await self.create()
        self.engine.go_down()
        for call in (
            self.forwards.list(ALICE, "web"),
            self.forwards.create(ALICE, "web", b'{"container_port": 9}'),
            self.forwards.delete(ALICE, "web", forward.id),
        ):
            with self.assertRaises(APIError) as caught:
                await call
            self.assertEqual(caught.exception.code, 503)
        self.assertEqual(await self.forwards.reconcile(), 0)
        self.assertEqual(await self.store.list_forwards(), [forward])

    async def test_missed_while_down(self) -> None:
        """A container that exited while the engine was down is reaped once it comes back."""
        await self.create()
        self.engine.go_down()
        self.engine.exit_silently("web")
        self.assertEqual(len(await self.store.list_forwards()), 1)
        self.engine.come_up()
        await self._until_empty()

    async def _until_empty(self) -> None:
        from twisted.internet import reactor
        from twisted.internet.task import deferLater

        for _ in range(100):
            if not await self.store.list_forwards() and not self.forwards.forwards():
                return
            await deferLater(reactor, 0.05, lambda: None)
        self.fail("the forwards were not reaped within 5 s")
