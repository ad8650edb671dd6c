"""
Two real Docker engines: the CI's dockerd and a second one started by the
tests (:mod:`tests.functional.second_engine`, on its own bridge).

- :class:`DockerEngines` over both passes the shared
  :class:`IContainerBackend` suite (containers on either engine);
- a real ``twistd rexecpf`` with ``[[backend.engines]]`` for both: a
  container on engine 2 is forwarded and reached through ``/p/`` and a
  tunnel; a stop on engine 2 reaps within 2 s and leaves engine 1's
  forwards; a name on both engines is refused; engine 2 down -> its
  containers 503, engine 1 fine, ``/healthz`` 200; engine 2 back -> what died
  meanwhile is reaped and its events are followed again.

Skipped where Docker tests skip; elsewhere (not CI) also without root.
Under ``CI=true`` a second engine that does not start is a failure.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from rexecpf.backends.docker import DockerBackend, DockerRuntime
from rexecpf.backends.engines import DockerEngines
from tests import _docker
from tests.functional.second_engine import BRIDGE_ADDRESS, SecondEngine, second_engine, skip_reason
from tests.functional.test_docker import (
    DOCKER_URL,
    Rexecpf,
    _http_get,
    _port_open,
    _try_get,
    poll,
    websocket_echo,
)
from tests.test_backends import BackendDriver, make_icontainer_backend_tests
from tests.test_docker_runtime import wait_for

SKIP = skip_reason()


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


class RealEnginesDriver(BackendDriver):
    """Containers on the two real engines, the second engine first."""

    async def start(self, test: TestCase) -> None:
        self.engine: SecondEngine = await deferToThread(second_engine)
        self._test = test
        self._on: dict[str, SecondEngine | None] = {}
        self._next_on_two = True
        backends = []
        for url in (DOCKER_URL, self.engine.url):
            runtime = DockerRuntime(_reactor(), url)
            runtime.startService()
            test.addCleanup(runtime.stopService)
            backends.append((url, DockerBackend(_reactor(), runtime, reconcile_seconds=None)))
        self.backend = DockerEngines(_reactor(), backends)
        self.backend.startService()
        test.addCleanup(self.backend.stopService)
        await wait_for(lambda: self.backend.connected, what="both event streams")

    async def add(self, owner: str | None) -> str:
        name = f"rexecpf-test-{uuid.uuid4().hex[:12]}"
        engine = self.engine if self._next_on_two else None
        self._next_on_two = not self._next_on_two
        if engine is not None:
            cid = await deferToThread(engine.run_container, _docker.SLEEPER, owner=owner, name=name)
            self._test.addCleanup(deferToThread, engine.remove_quietly, cid)
        else:
            cid = await deferToThread(_docker.run_container, _docker.SLEEPER, owner=owner, name=name)
            self._test.addCleanup(deferToThread, _docker.remove_quietly, cid)
        self._on[name] = engine
        return name

    def _docker(self, reference: str) -> Any:
        engine = self._on[reference]
        return engine.docker if engine is not None else _docker.docker

    async def stop(self, reference: str) -> None:
        await deferToThread(self._docker(reference), "stop", "-t", "1", reference)

    async def remove(self, reference: str) -> None:
        await deferToThread(self._docker(reference), "rm", "-f", reference)


class TwoEnginesBackendTests(make_icontainer_backend_tests(RealEnginesDriver)):  # type: ignore[misc]
    """The backend suite against :class:`DockerEngines` over two real engines."""

    skip = SKIP


class TwoEnginesTests(TestCase):
    """A ``twistd rexecpf`` following two real engines."""

    skip = SKIP

    def setUp(self) -> None:
        self.engine = second_engine()
        self.rexecpf = Rexecpf(Path(self.mktemp()), reconcile_seconds=1, engines=[DOCKER_URL, self.engine.url])
        self.addCleanup(self.rexecpf.stop)

    def on_one(self, command: list[str], name: str | None = None) -> tuple[str, str]:
        """:return: the full id and name of a new container of alice's on engine 1."""
        name = name or f"rexecpf-test-{uuid.uuid4().hex[:12]}"
        cid = _docker.run_container(command, owner="alice", name=name)
        self.addCleanup(_docker.remove_quietly, cid)
        return cid, name

    def on_two(self, command: list[str], name: str | None = None) -> tuple[str, str]:
        """:return: the full id and name of a new container of alice's on engine 2."""
        name = name or f"rexecpf-test-{uuid.uuid4().hex[:12]}"
        cid = self.engine.run_container(command, owner="alice", name=name)
        self.addCleanup(self.engine.remove_quietly, cid)
        return cid, name

    def proxied(self, forward: dict[str, Any]) -> tuple[int, bytes]:
        return _http_get(forward["proxy_url"], {"Authorization": "Bearer alice-token"})

    def forward_status(self, cid: str, forward: dict[str, Any]) -> int:
        return self.rexecpf.request("GET", f"/api/containers/{cid}/port-forwards/{forward['id']}")[0]

    def test_forward_on_engine_two(self) -> None:
        """
        A busybox httpd on engine 2, forwarded through its name, is kept
        under its full id and answers through /p/; a `nc -e cat` on engine 2
        echoes through a tunnel.
        """
        cid, name = self.on_two(_docker.HTTPD)
        ip = self.engine.container_ip(cid)
        self.assertTrue(ip.startswith(BRIDGE_ADDRESS.rsplit(".", 1)[0] + "."), ip)
        poll(lambda: _try_get(f"http://{ip}:8000/"), 15, "httpd on engine 2 answers")
        forward = self.rexecpf.create(name, 8000)
        self.assertEqual(forward["container_id"], cid)
        self.assertEqual(self.proxied(forward), (200, b"hello\n"))

        echo, echo_name = self.on_two(["nc", "-ll", "-p", "9000", "-e", "cat"])
        poll(lambda: _port_open(self.engine.container_ip(echo), 9000), 15, "nc on engine 2 listens")
        tunnelled = self.rexecpf.create(echo_name, 9000)
        echoed = websocket_echo(
            "127.0.0.1", self.rexecpf.port, f"/ws/port-forward/{tunnelled['id']}", "alice-token", b"two engines\n"
        )
        self.assertEqual(echoed, b"two engines\n")

    def test_stop_on_engine_two(self) -> None:
        """`docker stop` on engine 2 reaps its container's forwards within 2 s; engine 1's stay."""
        one, one_name = self.on_one(_docker.SLEEPER)
        two, two_name = self.on_two(_docker.SLEEPER)
        kept = self.rexecpf.create(one_name, 8000)
        reaped = [self.rexecpf.create(two_name, 8000), self.rexecpf.create(two[:12], 8001)]
        self.engine.docker("stop", "-t", "1", two)
        poll(
            lambda: not self.rexecpf.stored(two) and all(self.forward_status(two, f) == 404 for f in reaped),
            2.0,
            "engine 2's forwards reaped",
        )
        self.assertEqual(self.rexecpf.stored(), [kept["id"]])
        self.assertEqual(self.forward_status(one, kept), 200)

    def test_same_name_on_both(self) -> None:
        """A name that both engines have is 404 saying so (neither is picked); the full ids work."""
        name = f"rexecpf-test-{uuid.uuid4().hex[:12]}"
        one, _ = self.on_one(_docker.SLEEPER, name=name)
        two, _ = self.on_two(_docker.SLEEPER, name=name)
        status, document, _ = self.rexecpf.request(
            "POST", f"/api/containers/{name}/port-forwards", {"container_port": 80}
        )
        self.assertEqual((status, document["error"]["message"]), (404, "Container not found"))
        self.assertIn("more than one Docker engine", document["error"]["detail"])
        self.assertEqual(self.rexecpf.create(one, 80)["container_id"], one)
        self.assertEqual(self.rexecpf.create(two, 80)["container_id"], two)

    def test_engine_two_down_and_back(self) -> None:
        """
        While engine 2 is down (its containers go on running: live restore)
        its containers are 503 Backend unavailable, through the API and
        /p/, and their forwards are kept (reconciles every second skip
        them); engine 1's containers and forwards work; /healthz is 200.
        Once it is back: the forward of the container that died meanwhile is
        reaped, the other works again, and engine 2's events are followed
        again (rm -f: reaped within 2 s).
        """
        one, one_name = self.on_one(_docker.HTTPD)
        two, two_name = self.on_two(_docker.HTTPD)
        doomed, doomed_name = self.on_two(_docker.SLEEPER)
        for ip in (_docker.container_ip(one), self.engine.container_ip(two)):
            poll(lambda ip=ip: _try_get(f"http://{ip}:8000/"), 15, f"httpd at {ip} answers")
        on_one = self.rexecpf.create(one_name, 8000)
        on_two = self.rexecpf.create(two_name, 8000)
        on_doomed = self.rexecpf.create(doomed_name, 8000)
        everything = sorted(f["id"] for f in (on_one, on_two, on_doomed))
        doomed_pid = int(self.engine.docker("inspect", "-f", "{{.State.Pid}}", doomed))

        self.addCleanup(second_engine)  # (runs before the containers' removal)
        self.engine.stop()
        os.kill(doomed_pid, signal.SIGKILL)  # dies while nobody watches
        for _ in range(3):  # over three reconcile periods
            for cid in (two, doomed):
                status, document, _ = self.rexecpf.request("GET", f"/api/containers/{cid}/port-forwards")
                self.assertEqual((status, document["error"]["message"]), (503, "Backend unavailable"))
                self.assertIn(self.engine.url, document["error"]["detail"])
            self.assertEqual(self.proxied(on_two)[0], 503)
            status, document, _ = self.rexecpf.request("GET", f"/api/containers/{one}/port-forwards")
            self.assertEqual((status, [f["id"] for f in document]), (200, [on_one["id"]]))
            self.assertEqual(self.proxied(on_one), (200, b"hello\n"))
            self.assertEqual(self.rexecpf.request("GET", "/healthz", token=None)[0], 200)
            self.assertEqual(self.rexecpf.stored(), everything)
            time.sleep(1)

        second_engine()
        poll(lambda: on_doomed["id"] not in self.rexecpf.stored(), 15, "the forward of the dead container is reaped")
        self.assertEqual(self.rexecpf.stored(), sorted([on_one["id"], on_two["id"]]))
        poll(lambda: self.proxied(on_two) == (200, b"hello\n"), 15, "engine 2's container answers through /p/")
        cid, name = self.on_two(_docker.SLEEPER)
        after = self.rexecpf.create(name, 8000)
        self.engine.docker("rm", "-f", cid)
        poll(lambda: after["id"] not in self.rexecpf.stored(), 2.0, "the forward is reaped within 2 s")
        self.assertEqual(self.rexecpf.stored(), sorted([on_one["id"], on_two["id"]]))
