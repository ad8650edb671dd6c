"""
Faults in the store, for real.  Disk full: the state file lives on a tiny
tmpfs that the test fills up (needs root and ``mount -t tmpfs``, skipped
otherwise).  Read-only: the store's connection refuses every write with
SQLITE_READONLY, as a read-only file does (``PRAGMA query_only``, through
:meth:`SQLiteForwardStore.refuse_writes`: Linux will not remount a file
system read-only, bind mount or not, while the daemon holds its file open
for writing).  Either way the API answers 503 "Store unavailable" (JSON),
reads go on, nothing half-written is seen, /healthz is 503, and all recovers
when the fault clears.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import subprocess
import tempfile
import time
import unittest
from pathlib import Path
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from rexecpf.store import HEALTH_CHECK_SECONDS
from tests.functional import inprocess
from tests.functional.daemon import Daemon
from tests.functional.peers import free_port_in


def _mount(target: Path, options: str) -> bool:
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)],
                            capture_output=True)
    return result.returncode == 0


def _can_mount() -> bool:
    if os.geteuid() != 0:
        return False
    probe = Path(tempfile.mkdtemp(prefix="rexecpf-mount-probe-"))
    if not _mount(probe, "size=64k"):
        return False
    subprocess.run(["umount", str(probe)], check=False)
    return True


@unittest.skipUnless(_can_mount(), "needs root and mount -t tmpfs")
class StoreFaultTests(unittest.TestCase):
    def setUp(self) -> None:
        directory = Path(tempfile.mkdtemp(prefix="rexecpf-faults-"))
        self.statefs = directory / "statefs"
        self.statefs.mkdir()
        self.assertTrue(_mount(self.statefs, "size=1m,mode=0755"))
        self.addCleanup(lambda: subprocess.run(["umount", "-l", str(self.statefs)], check=False))
        self.daemon = Daemon(directory, containers=[{"id": "c1", "owner": "alice"}],
                             limits="forwards_per_container = 1000")
        config = self.daemon.config.read_text().replace(
            'state = "state.sqlite3"', 'state = "statefs/state.sqlite3"'
        )
        self.daemon.config.write_text(config)
        self.daemon.start()
        self.addCleanup(self.daemon.stop)

    def health(self) -> int:
        return self.daemon.request("GET", "/healthz", user=None, timeout=10)[0]

    def assertUnavailable(self, result: tuple[int, Any]) -> None:
        code, document = result
        self.assertEqual(code, 503, document)
        self.assertEqual(document["error"]["message"], "Store unavailable")

    def test_disk_full(self) -> None:
        """Disk full: creates and deletes are 503, healthz 503; freeing space recovers."""
        acknowledged = {f["id"]: f for f in (self.daemon.create("c1", port)[1] for port in (1, 2, 3))}
        filler = self.statefs / "filler"
        with contextlib.suppress(OSError), open(filler, "wb") as handle:
            while True:
                handle.write(b"\0" * 4096)
                handle.flush()
        refused = None
        for port in range(100, 400):
            code, document = self.daemon.create("c1", port)
            if code == 201:
                acknowledged[document["id"]] = document
                continue
            refused = (code, document)
            break
        self.assertIsNotNone(refused, "the disk never filled up")
        assert refused is not None
        self.assertUnavailable(refused)
        deadline = time.monotonic() + HEALTH_CHECK_SECONDS + 10
        while self.health() != 503:  # within the period of /healthz's cached check
            self.assertLess(time.monotonic(), deadline, "/healthz never reported the full disk")
            time.sleep(0.1)
        victim = next(iter(acknowledged))
        code, document, _ = self.daemon.request("DELETE", f"/api/containers/c1/port-forwards/{victim}")
        if code == 204:  # a delete may still fit in the WAL's free pages
            del acknowledged[victim]
        else:
            self.assertUnavailable((code, document))
        # nothing half-written: what is listed is exactly what was acknowledged
        self.assertEqual({f["id"]: f for f in self.daemon.list("c1")}, acknowledged)
        filler.unlink()
        deadline = time.monotonic() + 10
        while self.health() != 200:
            self.assertLess(time.monotonic(), deadline, "no recovery after freeing space")
            time.sleep(0.1)
        code, document = self.daemon.create("c1", 9999)
        self.assertEqual(code, 201, document)
        acknowledged[document["id"]] = document
        self.daemon.kill()
        self.daemon.start()
        self.assertEqual({f["id"]: f for f in self.daemon.list("c1")}, acknowledged)


class ReadOnlyStoreTests(TestCase):
    """The in-process daemon (real sockets) with its store turned read-only under it."""

    @inlineCallbacks
    def setUp(self) -> Any:
        self.directory = self.mktemp()
        self.daemon = inprocess.Daemon(self.directory, local_ports="30000-30999")
        yield self.daemon.start()
        self.addCleanup(self.daemon.stop)
        self.echo = yield inprocess.echo_server()
        self.addCleanup(self.echo.stop)
        self.http = inprocess._http

    @inlineCallbacks
    def call(self, method: str, path: str, body: Any = None) -> Any:
        """:return: (status, JSON document or None) of one API request as alice."""
        response = yield self.http.request(
            method, f"{self.daemon.base}{path}", data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {inprocess.TOKENS['alice']}"},
        )
        content = yield response.content()
        if content:
            self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        return response.code, json.loads(content) if content else None

    @inlineCallbacks
    def listed(self) -> Any:
        code, document = yield self.call("GET", "/api/containers/c1/port-forwards")
        self.assertEqual(code, 200, document)
        return {forward["id"]: forward for forward in document}

    def assertUnavailable(self, result: tuple[int, Any]) -> None:
        code, document = result
        self.assertEqual(code, 503, document)
        self.assertEqual(document["error"]["message"], "Store unavailable")

    @inlineCallbacks
    def test_read_only(self) -> Any:
        """
        A read-only store: creates and deletes are 503 (JSON) and change
        nothing, not even a listener; reads, tunnels and local ports go on;
        /healthz is 503.  Writable again: /healthz recovers by itself, writes
        work, and a restart finds exactly what was acknowledged.
        """
        acknowledged = {}
        for port in (self.echo.port, self.echo.port + 1):
            forward = yield self.daemon.create(port)
            acknowledged[forward["id"]] = forward
        victim = next(iter(acknowledged.values()))
        tunnel, tunnel_factory = yield inprocess.connect_ws(
            self.daemon.ws_url(victim["id"]), ["Bearer", inprocess.TOKENS["alice"]], port=self.daemon.port
        )
        self.addCleanup(inprocess.close_ws, tunnel, tunnel_factory)

        yield self.daemon.components.store.refuse_writes(True)
        wanted_local_port = free_port_in(range(30000, 31000), exclude={f["local_port"] for f in acknowledged.values()})
        self.assertUnavailable((yield self.call(
            "POST", "/api/containers/c1/port-forwards", {"container_port": 7, "local_port": wanted_local_port})))
        self.assertUnavailable((yield self.call(
            "DELETE", f"/api/containers/c1/port-forwards/{victim['id']}")))
        # /healthz reuses its last store check for a few seconds (HEALTH_CHECK_SECONDS)
        deadline = time.monotonic() + HEALTH_CHECK_SECONDS + 10
        while (health := (yield self.call("GET", "/healthz")))[0] != 503:
            self.assertLess(time.monotonic(), deadline, "/healthz never reported the read-only store")
            yield inprocess.sleep(0.1)
        self.assertEqual(health[1]["status"], "unavailable")
        # nothing half-written: the same forwards, no listener for the refused one
        self.assertEqual((yield self.listed()), acknowledged)
        self.assertEqual((yield self.call("GET", f"/api/containers/c1/port-forwards/{victim['id']}")),
                         (200, victim))
        with self.assertRaises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", wanted_local_port), timeout=2).close()
        # what exists goes on working: the open tunnel, a new one, the local port
        tunnel.sendMessage(b"still open", isBinary=True)
        self.assertEqual((yield tunnel.wait_for(10)), b"still open")
        another, another_factory = yield inprocess.connect_ws(
            self.daemon.ws_url(victim["id"]), ["Bearer", inprocess.TOKENS["alice"]], port=self.daemon.port
        )
        yield inprocess.close_ws(another, another_factory)
        echoed = yield inprocess.connect_tcp_roundtrip(victim["local_port"], b"local")
        self.assertEqual(echoed, b"local")

        # each refused write was logged for the operator (trial counts them as errors unless flushed)
        self.assertTrue(self.flushLoggedErrors(sqlite3.OperationalError))
        yield self.daemon.components.store.refuse_writes(False)
        deadline = time.monotonic() + 10
        while (yield self.call("GET", "/healthz"))[0] != 200:
            self.assertLess(time.monotonic(), deadline, "no recovery once writable")
            yield inprocess.sleep(0.1)
        code, created = yield self.call(
            "POST", "/api/containers/c1/port-forwards", {"container_port": 7, "local_port": wanted_local_port})
        self.assertEqual(code, 201, created)
        acknowledged[created["id"]] = created
        code, _ = yield self.call("DELETE", f"/api/containers/c1/port-forwards/{victim['id']}")
        self.assertEqual(code, 204)
        del acknowledged[victim["id"]]
        self.assertEqual((yield tunnel_factory.closed)[0], 1001)  # its tunnel went with it
        self.assertEqual((yield self.listed()), acknowledged)

        # the state file holds exactly that, for the next process
        yield self.daemon.stop()
        self.daemon = inprocess.Daemon(self.directory, local_ports="30000-30999")
        yield self.daemon.start()
        self.addCleanup(self.daemon.stop)
        stored = yield self.listed()

        def durable(forwards: dict[str, Any]) -> dict[str, Any]:
            # the URLs name the new process's port; the rest is the stored forward
            return {key: {k: v for k, v in f.items() if not k.endswith("_url")} for key, f in forwards.items()}

        self.assertEqual(durable(stored), durable(acknowledged))


class HealthWritesNothingTests(TestCase):
    """``/healthz`` is unauthenticated: a flood of it must not turn into a flood of fsync'd writes."""

    @inlineCallbacks
    def test_healthz_flood_does_not_write(self) -> Any:
        """Fifty /healthz within the check period: the store writes nothing."""
        daemon = inprocess.Daemon(self.mktemp())
        yield daemon.start()
        self.addCleanup(daemon.stop)
        store = daemon.components.store

        @inlineCallbacks
        def health() -> Any:
            response = yield inprocess._http.get(f"{daemon.base}/healthz")
            yield response.content()
            return response.code

        self.assertEqual((yield health()), 200)
        before = yield store.changes()
        started = time.monotonic()
        codes = []
        for _ in range(50):
            codes.append((yield health()))
        elapsed = time.monotonic() - started
        self.assertEqual(set(codes), {200})
        # at most one store check per period (the first answer may have been cached already)
        self.assertLessEqual((yield store.changes()) - before, int(elapsed // HEALTH_CHECK_SECONDS) + 1)
