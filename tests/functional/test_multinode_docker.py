"""
Several nodes on several Docker engines: two real ``twistd -n rexecpf``
processes (on 127.0.0.2 and 127.0.0.3, each with its ``local_interface``)
sharing one PostgreSQL database, both with the Docker backend over two real
engines, the CI's dockerd and a second one started by the tests
(:mod:`tests.functional.second_engine`, shared by the whole test process).

- a forward created on one node, to a container on either engine, is served
  at once by the other through ``/p/`` and a tunnel (and within a second on
  its ``local_port``);
- ``docker stop`` of a container on engine 2 closes its tunnels, its proxied
  upgrades and its ``local_port`` connections on both nodes within seconds,
  and its forwards are gone from both nodes' API;
- a delete on one node closes the other's tunnel and ``local_port``
  connection within a second.

The containers are busybox ones, each serving an HTTP page (``httpd``), an
echo (``nc -e cat``) and a canned WebSocket upgrade (:data:`SERVE`).
Skipped without Docker, root or PostgreSQL, except under ``CI=true`` where
any of them missing is a failure.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from tests import _docker
from tests.functional.daemon import Daemon
from tests.functional.peers import local_port_range
from tests.functional.pgcluster import fresh_database, require_postgres
from tests.functional.rawws import RawWebSocket
from tests.functional.second_engine import IN_CI, SecondEngine, second_engine, skip_reason
from tests.functional.test_docker import DOCKER_URL, _port_open
from tests.functional.test_multinode import NODE_A, NODE_B, NodeChecks, closed, connect, echoes, poll

HTTP_PORT, ECHO_PORT, UPGRADE_PORT = 8000, 9000, 7000
#: The handshake key of the proxied upgrade, fixed so that the container's
#: canned 101 can carry the matching Sec-WebSocket-Accept (RFC 6455's sample).
UPGRADE_KEY = "dGhlIHNhbXBsZSBub25jZQ=="
UPGRADE_ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
#: A busybox container's command: an HTTP page on 8000, an echo on 9000, and
#: on 7000 a WebSocket upgrade that reads the request's head, answers 101
#: and then echoes the bytes (not frames) it is sent.
SERVE = [
    "sh",
    "-c",
    f"""
mkdir -p /www && echo hello > /www/index.html && httpd -p {HTTP_PORT} -h /www
cat > /upgrade <<'EOF'
#!/bin/sh
cr=$(printf '\\r')
while read -r line && [ "$line" != "$cr" ]; do :; done
printf 'HTTP/1.1 101 Switching Protocols\\r\\nUpgrade: websocket\\r\\nConnection: Upgrade\\r\\n'
printf 'Sec-WebSocket-Accept: {UPGRADE_ACCEPT}\\r\\n\\r\\n'
exec cat
EOF
chmod +x /upgrade
nc -ll -p {UPGRADE_PORT} -e /upgrade &
exec nc -ll -p {ECHO_PORT} -e cat
""",
]


def _stop(daemon: Daemon) -> None:
    """Stop a node; one that does not end on SIGTERM is killed (no orphan either way)."""
    try:
        daemon.stop()
    except subprocess.TimeoutExpired:
        daemon.kill(signal.SIGKILL)


class DockerNodesTests(NodeChecks):
    """Two nodes, one PostgreSQL, two Docker engines."""

    def setUp(self) -> None:
        reason = skip_reason()
        if reason is not None and not IN_CI:
            self.skipTest(reason)
        require_postgres()
        self.engine: SecondEngine = second_engine()
        url = fresh_database(self)
        self.directory = Path(tempfile.mkdtemp(prefix="rexecpf-dockernodes-"))
        self.addCleanup(shutil.rmtree, self.directory, True)
        low, high = local_port_range()
        engines = "".join(f'\n[[backend.engines]]\nurl = "{engine}"' for engine in (DOCKER_URL, self.engine.url))
        store = f'\n[store]\nurl = "{url}"\nresync_seconds = 30\n'
        self.a, self.b = (
            self.node(host, f'local_ports = "{low}-{high}"\nlocal_interface = "{host}"', engines, store)
            for host in (NODE_A, NODE_B)
        )

    def node(self, host: str, limits: str, engines: str, store: str) -> Daemon:
        directory = self.directory / host
        directory.mkdir()
        daemon = Daemon(
            directory, host=host, limits=limits, extra=store,
            backend=f'kind = "docker"\nreconcile_seconds = 30{engines}',
        )
        self.addCleanup(_stop, daemon)
        return daemon

    def start(self) -> None:
        self.a.start()
        self.b.start()

    def serving(self, engine: SecondEngine | None, sidecar: bool = False) -> tuple[str, str]:
        """
        Start a :data:`SERVE` container of alice's on ``engine`` (None: the
        CI's engine), removed at cleanup; wait until it serves.

        :param sidecar: the container only sleeps, and a second container in
            its network namespace (``--network container:ID``) serves: when
            the first stops, the connections stay open (its address leaves,
            nobody closes them), so what closes them is rexecpf.
        :return: the full id and the name of the (first) container.
        """
        docker = engine.docker if engine is not None else _docker.docker
        remove = engine.remove_quietly if engine is not None else _docker.remove_quietly
        name = f"rexecpf-test-{uuid.uuid4().hex[:12]}"

        def run(command: list[str], *options: str) -> str:
            argv = ["run", "-d", "--init", "--label", f"{_docker.TEST_LABEL}=1", *options, _docker.IMAGE, *command]
            cid = docker(*argv).splitlines()[-1]
            self.addCleanup(remove, cid)
            return cid

        owned = ("--label", f"{_docker.OWNER_LABEL}=alice", "--name", name)
        cid = run(_docker.SLEEPER if sidecar else SERVE, *owned)
        if sidecar:
            run(SERVE, "--network", f"container:{cid}")
        ip = engine.container_ip(cid) if engine is not None else _docker.container_ip(cid)
        for port in (HTTP_PORT, ECHO_PORT, UPGRADE_PORT):
            poll(partial(_port_open, ip, port), 15, f"the container listens on {ip}:{port}")
        return cid, name

    def created(self, daemon: Daemon, container: str, port: int) -> dict[str, Any]:
        code, forward = daemon.create(container, port)
        self.assertEqual(code, 201, forward)
        return forward  # type: ignore[no-any-return]

    def upgraded(self, daemon: Daemon, forward_id: str) -> RawWebSocket:
        """:return: a WebSocket upgrade proxied by ``daemon`` through ``/p/`` to the container, relaying."""
        upgrade = RawWebSocket(daemon.port, host=daemon.host)
        self.addCleanup(upgrade.close)
        status = upgrade.handshake(
            f"/p/{forward_id}/", token=None, key=UPGRADE_KEY, extra={"Authorization": "Bearer alice-token"}
        )
        self.assertEqual(status, 101, upgrade.body)
        self.assertTrue(echoes(upgrade.sock, b"upgraded"))
        return upgrade

    def assert_gone_from_both(self, cid: str, forward_ids: list[str], within: float) -> None:
        def gone() -> bool:
            return all(
                node.request("GET", f"/api/containers/{cid}/port-forwards/{forward_id}")[0] == 404
                for node in (self.a, self.b)
                for forward_id in forward_ids
            )

        poll(gone, within, "the forwards are gone from both nodes' API")

    def assert_all_closed(self, what: dict[str, Callable[[float], bool]], started: float, within: float) -> None:
        """Every check of ``what`` (given the time left) is true, all within ``within`` s of ``started``."""
        for name, closed_within in what.items():
            left = max(0.01, started + within - time.monotonic())
            self.assertTrue(closed_within(left), f"{name} was not closed within {within} s")
        self.assertLess(time.monotonic() - started, within)

    def closes_1001(self, ws: RawWebSocket) -> Callable[[float], bool]:
        def check(left: float) -> bool:
            ws.sock.settimeout(left)
            try:
                code, reason = ws.read_close()
            except AssertionError:  # (no close frame within ``left``)
                return False
            self.assertEqual(code, 1001, reason)
            return True

        return check

    def test_created_on_one_node_served_at_once_by_the_other(self) -> None:
        """
        For a container on engine 2 and one on engine 1: forwards created on
        A (by name) name the full id, and B serves them at once through /p/
        and a tunnel, and within a second on their local_port; both nodes
        list the same forwards.
        """
        containers = [self.serving(self.engine), self.serving(None)]
        self.start()
        for cid, name in containers:
            web = self.created(self.a, name, HTTP_PORT)
            self.assertEqual(web["container_id"], cid)
            code, page, _ = self.b.request("GET", f"/p/{web['id']}/")
            self.assertEqual((code, page), (200, b"hello\n"))
            echo = self.created(self.a, name, ECHO_PORT)
            self.tunnel(self.b, echo["id"])
            self.local(self.b, echo["local_port"])
            listed = sorted(f["id"] for f in self.a.list(cid))
            self.assertEqual(listed, sorted([web["id"], echo["id"]]))
            self.assertEqual(sorted(f["id"] for f in self.b.list(cid)), listed)

    def test_stop_on_engine_two_closes_on_both_nodes(self) -> None:
        """
        ``docker stop`` of a container on engine 2 (its servers in a sidecar,
        so that nothing but rexecpf closes the connections): its tunnels
        (1001), its proxied upgrades and its local_port connections close on
        both nodes within 5 s, and its forwards are gone from both nodes' API
        and /p/.
        """
        cid, name = self.serving(self.engine, sidecar=True)
        self.start()
        echo = self.created(self.a, name, ECHO_PORT)
        upgrade = self.created(self.b, name, UPGRADE_PORT)
        port = echo["local_port"]
        open_: dict[str, Callable[[float], bool]] = {}
        for node in (self.a, self.b):
            open_[f"the tunnel on {node.host}"] = self.closes_1001(self.tunnel(node, echo["id"]))
            sock = self.local(node, port)
            open_[f"the local_port connection on {node.host}"] = partial(closed, sock)
            proxied = self.upgraded(node, upgrade["id"])
            open_[f"the proxied upgrade on {node.host}"] = partial(closed, proxied.sock)
        self.engine.docker("stop", "-t", "1", cid)
        started = time.monotonic()
        self.assert_all_closed(open_, started, 5.0)
        self.assert_gone_from_both(cid, [echo["id"], upgrade["id"]], 5.0 - (time.monotonic() - started))
        for node in (self.a, self.b):
            self.assertEqual(node.request("GET", f"/p/{upgrade['id']}/")[0], 404)
        poll(lambda: connect(self.b.host, port) is None, 2.0, "B stops listening on the local_port")

    def test_delete_on_one_node_closes_the_other(self) -> None:
        """
        Deleted on A: B's tunnel gets 1001 and B's local_port connection
        closes within a second; B answers 404 for it on /p/ and the API.
        """
        cid, name = self.serving(self.engine)
        self.start()
        echo = self.created(self.b, name, ECHO_PORT)
        ws = self.tunnel(self.b, echo["id"])
        sock = self.local(self.b, echo["local_port"])
        code, _, _ = self.a.request("DELETE", f"/api/containers/{cid}/port-forwards/{echo['id']}")
        self.assertEqual(code, 204)
        started = time.monotonic()
        self.assert_all_closed(
            {"B's tunnel": self.closes_1001(ws), "B's local_port connection": partial(closed, sock)},
            started,
            1.0,
        )
        self.assertEqual(self.b.request("GET", f"/p/{echo['id']}/")[0], 404)
        self.assert_gone_from_both(cid, [echo["id"]], 0.0)
