"""
:class:`DockerEngines` (several Docker engines as one backend) on
:class:`FakeDockerRuntime` engines and a :class:`Clock`: look-ups across
engines, names on two engines, an engine that is down, events, one reconcile
for all; :class:`ForwardService` on top of it; ``[[backend.engines]]``.
"""

from __future__ import annotations

import uuid
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from rexecpf.backends import engines as engines_module
from rexecpf.backends.docker import BACKOFF_FIRST, DockerBackend
from rexecpf.backends.engines import DockerEngines
from rexecpf.config import ConfigError, EngineConfig, parse_config
from rexecpf.forwards import ForwardService
from rexecpf.model import APIError, Container, Principal
from rexecpf.store import SQLiteForwardStore
from rexecpf.testing import FakeDockerRuntime
from tests.test_backends import BackendDriver, make_icontainer_backend_tests

ALICE = Principal("alice")
OWNED = {"rexecpf.owner": "alice"}


def _engines(clock: Any, count: int = 2, **kwargs: Any) -> tuple[DockerEngines, list[FakeDockerRuntime]]:
    runtimes = [FakeDockerRuntime() for _ in range(count)]
    backends = [
        (f"engine-{index + 1}", DockerBackend(clock, runtime, reconcile_seconds=None))
        for index, runtime in enumerate(runtimes)
    ]
    return DockerEngines(clock, backends, **kwargs), runtimes


class TwoFakeEnginesDriver(BackendDriver):
    """Containers on two fake engines, the second engine first."""

    async def start(self, test: TestCase) -> None:
        from twisted.internet import reactor

        self.backend, self.runtimes = _engines(reactor)
        self.backend.startService()
        test.addCleanup(self.backend.stopService)
        self._next = 1

    async def add(self, owner: str | None) -> str:
        runtime = self.runtimes[self._next]
        self._next = 1 - self._next
        labels = {"rexecpf.owner": owner} if owner else {}
        return runtime.run(name=f"c-{uuid.uuid4().hex[:10]}", labels=labels).name  # type: ignore[no-any-return]

    def _on(self, reference: str) -> FakeDockerRuntime:
        return next(r for r in self.runtimes if r._resolve(reference) is not None)

    async def stop(self, reference: str) -> None:
        self._on(reference).stop(reference)

    async def remove(self, reference: str) -> None:
        self._on(reference).remove(reference)


class FakeEnginesBackendTests(make_icontainer_backend_tests(TwoFakeEnginesDriver)):  # type: ignore[misc]
    """The backend suite against :class:`DockerEngines` over two fake engines."""


class DockerEnginesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.backend, (self.one, self.two) = _engines(self.clock)
        self.stopped: list[str] = []
        self.backend.subscribe(self.stopped.append)
        self.reconciles: list[float] = []
        self.backend.set_reconciler(lambda: succeed(self.reconciles.append(self.clock.seconds())))
        self.backend.startService()
        self.addCleanup(self.backend.stopService)

    def inspect(self, reference: str) -> Container | None:
        return self.successResultOf(self.backend.inspect(reference))  # type: ignore[no-any-return]

    def failure(self, reference: str) -> APIError:
        return self.failureResultOf(self.backend.inspect(reference), APIError).value  # type: ignore[no-any-return]

    def test_found_on_either_engine(self) -> None:
        """A container is found on whichever engine has it, by full id, short id or name."""
        web = self.one.run(name="web", labels=OWNED)
        db = self.two.run(name="db", labels=OWNED, networks=(("bridge", "172.31.0.2"),))
        for record, address in ((web, "172.17.0.2"), (db, "172.31.0.2")):
            for reference in (record.id, record.id[:12], record.name):
                container = self.inspect(reference)
                self.assertEqual((container.id, container.address, container.owner), (record.id, address, "alice"))
        self.assertIsNone(self.inspect("nothing"))
        self.assertIsNone(self.inspect("../etc"))

    def test_full_id_asks_its_engine_only(self) -> None:
        """Once found, a full id is asked of its engine alone (not of every engine on every request)."""
        db = self.two.run(name="db")
        self.assertEqual(self.inspect(db.id).id, db.id)
        asked = self.one.inspections
        for _ in range(3):
            self.clock.advance(5)  # past the engine's cache
            self.assertEqual(self.inspect(db.id).id, db.id)
        self.assertEqual(self.one.inspections, asked)

    def test_full_id_gone_from_its_engine(self) -> None:
        """A full id that its engine no longer has is None, and forgotten."""
        db = self.two.run(name="db")
        self.inspect(db.id)
        self.two.remove(db.id)
        self.assertIsNone(self.inspect(db.id))
        self.assertNotIn(db.id, self.backend._home)

    def test_remembered_is_bounded(self) -> None:
        """The full id -> engine memory is bounded: past the bound it starts over."""
        self.patch(engines_module, "MAX_REMEMBERED", 3)
        records = [self.two.run() for _ in range(5)]
        for record in records:
            self.inspect(record.id)
            self.assertLessEqual(len(self.backend._home), 3)
        for record in records:
            self.assertEqual(self.inspect(record.id).id, record.id)

    def test_same_name_on_two_engines(self) -> None:
        """
        A name on two engines names neither: 404 Container not found with a
        detail that says so, never one picked silently; the full ids work.
        """
        first = self.one.run(name="web")
        second = self.two.run(name="web")
        error = self.failure("web")
        self.assertEqual((error.code, error.message), (404, "Container not found"))
        self.assertIn("more than one Docker engine", error.detail)
        self.assertIn("engine-1, engine-2", error.detail)
        self.assertEqual(self.inspect(first.id).id, first.id)
        self.assertEqual(self.inspect(second.id).id, second.id)

    def test_engine_down(self) -> None:
        """
        While engine 2 is down: its containers are 503 naming it (not 404:
        nothing is reaped), engine 1's are found by full id, a name is 503
        (engine 2 might have it too), and check still answers.
        """
        web = self.one.run(name="web")
        db = self.two.run(name="db")
        self.inspect(db.id)
        self.two.go_down()
        error = self.failure(db.id)
        self.assertEqual((error.code, error.message), (503, "Backend unavailable"))
        self.assertIn("engine engine-2", error.detail)
        self.assertEqual(self.inspect(web.id).id, web.id)
        self.assertEqual(self.failure("web").code, 503)
        self.assertIn("the full id works", self.failure("web").detail)
        self.assertEqual(self.failure("nothing").code, 503)
        self.assertEqual(self.failure("f" * 64).code, 503)
        self.assertIsNone(self.successResultOf(self.backend.check()))
        self.one.go_down()
        error = self.failureResultOf(self.backend.check(), APIError).value
        self.assertEqual(error.code, 503)
        self.assertIn("engine-1", error.detail)
        self.assertIn("engine-2", error.detail)

    def test_unknown_full_id_found_while_another_is_down(self) -> None:
        """A full id never seen before is found on its engine even while another engine is down."""
        web = self.one.run(name="web")
        self.two.go_down()
        self.assertEqual(self.inspect(web.id).id, web.id)

    def test_stopped_on_each_engine(self) -> None:
        """A container stopping on any engine is announced by its full id."""
        web = self.one.run(name="web")
        db = self.two.run(name="db")
        self.two.stop("db")
        self.one.remove("web")
        self.assertEqual(set(self.stopped), {web.id, db.id})

    def test_one_periodic_reconcile(self) -> None:
        """One reconcile every reconcile_seconds for all engines, plus one per (re)connection."""
        self.assertEqual(self.reconciles, [0, 0])  # each engine's first connection
        self.clock.advance(30)
        self.assertEqual(self.reconciles, [0, 0, 30])
        self.two.go_down()
        self.two.come_up()
        self.clock.advance(BACKOFF_FIRST)
        self.assertEqual(self.reconciles, [0, 0, 30, 30 + BACKOFF_FIRST])
        self.assertTrue(self.backend.connected)

    def test_one_reconcile_at_a_time(self) -> None:
        """Reconciles asked for by several engines during one run make one more run after it."""
        running: list[Deferred[None]] = []
        self.backend.set_reconciler(lambda: running.append(Deferred()) or running[-1])
        self.backend.reconcile()
        for backend in self.backend.engines:
            backend.reconcile()
        self.assertEqual(len(running), 1)
        running[0].callback(None)
        self.assertEqual(len(running), 2)
        running[1].callback(None)
        self.assertEqual(len(running), 2)

    def test_stop_service(self) -> None:
        """Stopping it stops every engine's watch and every timer."""
        self.two.go_down()
        self.successResultOf(self.backend.stopService() or succeed(None))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertFalse(any(backend.running for backend in self.backend.engines))


class ForwardsOnEnginesTests(TestCase):
    """:class:`ForwardService` on two fake engines (real SQLite store)."""

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor = reactor
        self.backend, (self.one, self.two) = _engines(reactor)
        self.store = SQLiteForwardStore(reactor, self.mktemp())
        self.addCleanup(self.store.close)
        self.forwards = self.service(self.backend)
        self.web = self.one.run(name="web", labels=OWNED)
        self.db = self.two.run(name="db", labels=OWNED, networks=(("bridge", "172.31.0.2"),))

    def service(self, backend: DockerEngines) -> ForwardService:
        forwards = ForwardService(self.reactor, self.store, backend, _limits(), port_probe=lambda i, p: True)
        backend.set_reconciler(forwards.reconcile)
        backend.startService()
        forwards.startService()
        self.addCleanup(backend.stopService)
        self.addCleanup(forwards.stopService)
        return forwards

    async def create(self, reference: str, port: int = 8000) -> Any:
        return await self.forwards.create(ALICE, reference, b'{"container_port": %d}' % port)

    async def test_stop_on_engine_two(self) -> None:
        """A stop on engine 2 reaps its container's forwards; engine 1's stay."""
        first = await self.create("web")
        second = await self.create("db")
        self.assertEqual(second.container_id, self.db.id)
        self.two.stop("db")
        await _until(lambda: self.forwards.cached(second.id) is None)
        self.assertEqual(await self.store.list_forwards(), [first])

    async def test_name_wins_over_an_id_prefix(self) -> None:
        """
        As in Docker: a name on one engine wins over an id that starts with
        the same letters on another (``db`` is also a prefix of ``dbe1...``).
        """
        self.one.run(name="other", labels=OWNED, container_id="db" + "e1" * 31)
        forward = await self.create("db")
        self.assertEqual(forward.container_id, self.db.id)

    async def test_engine_down_reaps_nothing(self) -> None:
        """While engine 2 is down its container is 503, engine 1's works, and a reconcile keeps both."""
        first = await self.create("web")
        second = await self.create("db")
        self.two.go_down()
        with self.assertRaises(APIError) as caught:
            await self.forwards.list(ALICE, self.db.id)
        self.assertEqual(caught.exception.code, 503)
        self.assertEqual(await self.forwards.list(ALICE, self.web.id), [first])
        self.assertEqual((await self.forwards.reach(ALICE, first.id))[1].id, self.web.id)
        self.assertEqual(await self.forwards.reconcile(), 0)
        self.assertEqual(len(await self.store.list_forwards()), 2)
        # It exits meanwhile: reaped once engine 2 is back (its reconnection reconciles).
        self.two.exit_silently("db")
        self.two.come_up()
        await _until(lambda: self.forwards.cached(second.id) is None)
        self.assertEqual(await self.store.list_forwards(), [first])

    async def test_after_a_restart(self) -> None:
        """A new process (nothing remembered, no engine stored) finds each forward's container again."""
        first = await self.create("web")
        second = await self.create("db")
        backend = DockerEngines(
            self.reactor,
            [(name, DockerBackend(self.reactor, b._runtime, reconcile_seconds=None))
             for name, b in zip(self.backend.names, self.backend.engines, strict=True)],
        )
        forwards = self.service(backend)
        await forwards.ready
        self.assertEqual((await forwards.reach(ALICE, second.id))[1].address, "172.31.0.2")
        self.assertEqual((await forwards.reach(ALICE, first.id))[1].address, "172.17.0.2")


def _limits() -> Any:
    from rexecpf.config import LimitsConfig

    return LimitsConfig()


async def _until(condition: Any) -> None:
    from tests.test_docker_runtime import wait_for

    await wait_for(condition, timeout=5.0)


class EnginesConfigTests(SynchronousTestCase):
    """``[[backend.engines]]``."""

    def error(self, backend: dict[str, Any]) -> str:
        with self.assertRaises(ConfigError) as caught:
            parse_config({"backend": backend})
        return str(caught.exception)

    def test_engines(self) -> None:
        """Each engine has its url; network and owner_label default to [backend]'s."""
        backend = parse_config(
            {
                "backend": {
                    "kind": "docker",
                    "network": "apps",
                    "engines": [{"url": "unix:///a.sock"}, {"url": "tcp://h:2375", "owner_label": "team"}],
                }
            }
        ).backend
        self.assertEqual(
            backend.docker_engines(),
            (
                EngineConfig("unix:///a.sock", "apps", "rexecpf.owner"),
                EngineConfig("tcp://h:2375", "apps", "team"),
            ),
        )

    def test_url_is_one_engine(self) -> None:
        """Without engines, url (and network, owner_label) is the one engine."""
        backend = parse_config({"backend": {"kind": "docker", "url": "unix:///x", "network": "n"}}).backend
        self.assertEqual(backend.docker_engines(), (EngineConfig("unix:///x", "n", "rexecpf.owner"),))

    def test_errors_name_the_key(self) -> None:
        """Every mistake is one line naming the key."""
        docker = {"kind": "docker"}
        cases = [
            ({**docker, "engines": []}, "backend.engines:"),
            ({**docker, "engines": {"url": "x"}}, "backend.engines:"),
            ({"engines": [{"url": "x"}]}, 'backend.engines: only for kind = "docker"'),
            ({**docker, "url": "x", "engines": [{"url": "y"}]}, "backend.url:"),
            ({**docker, "engines": ["x"]}, "backend.engines[0]:"),
            ({**docker, "engines": [{"url": "x"}, {"network": "n"}]}, "backend.engines[1].url: missing"),
            ({**docker, "engines": [{"url": ""}]}, "backend.engines[0].url:"),
            ({**docker, "engines": [{"url": "x", "owner_label": ""}]}, "backend.engines[0].owner_label:"),
            ({**docker, "engines": [{"url": "x", "network": 1}]}, "backend.engines[0].network:"),
            ({**docker, "engines": [{"url": "x", "urls": "y"}]}, "backend.engines[0].urls: unknown key"),
            ({**docker, "engines": [{"url": "x"}, {"url": "x"}]}, "backend.engines[1].url: 'x' appears twice"),
        ]
        for backend, start in cases:
            with self.subTest(start=start):
                message = self.error(backend)
                self.assertTrue(message.startswith(start), message)
                self.assertNotIn("\n", message)


class BuildTests(SynchronousTestCase):
    """tap: several engines make one :class:`DockerEngines`, one engine a :class:`DockerBackend`."""

    def build(self, engines: list[dict[str, str]]) -> Any:
        from twisted.application.service import MultiService

        from rexecpf.tap import _docker_backend

        backend: dict[str, Any] = {"kind": "docker", "reconcile_seconds": 7}
        if engines:
            backend["engines"] = engines
        self.top = MultiService()
        return _docker_backend(parse_config({"backend": backend}), Clock(), self.top)

    def test_several(self) -> None:
        backend = self.build([{"url": "unix:///a.sock"}, {"url": "unix:///b.sock", "network": "n"}])
        self.assertIsInstance(backend, DockerEngines)
        self.assertEqual(backend.names, ["unix:///a.sock", "unix:///b.sock"])
        self.assertEqual([b._network for b in backend.engines], ["", "n"])
        self.assertEqual([b._reconcile_seconds for b in backend.engines], [None, None])
        self.assertEqual(backend._reconcile_seconds, 7)
        # each engine's runtime, started before the backends
        self.assertEqual([runtime.url for runtime in self.top], ["unix:///a.sock", "unix:///b.sock"])

    def test_one(self) -> None:
        backend = self.build([])
        self.assertIsInstance(backend, DockerBackend)
        self.assertEqual(backend._reconcile_seconds, 7)
