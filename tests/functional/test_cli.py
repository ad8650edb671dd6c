"""
The ``rexecpf`` command against a real rexecpf, and real peers through it:
OpenSSH (``ProxyCommand 'rexecpf tunnel ... --stdio'``), PostgreSQL (through
``rexecpf tunnel --listen`` and through the forward's ``local_port``) and
websocat as a raw WebSocket client.
"""

from __future__ import annotations

import json
import os
import shlex
import sys

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.server import Site
from twisted.web.static import Data

from tests.functional import peers
from tests.functional.inprocess import TOKENS, Daemon, echo_server, free_port, listen, sleep

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLI = [sys.executable, "-m", "rexecpf.cli"]
ALICE = TOKENS["alice"]


def cli_env(daemon: Daemon, token: str | None = ALICE) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env["REXECPF_URL"] = daemon.base
    env.pop("REXECPF_TOKEN", None)
    if token is not None:
        env["REXECPF_TOKEN"] = token
    return env


def run(argv, env, stdin: bytes | None = None, timeout: float = 60):
    """:return: a Deferred firing with (stdout, stderr, status)."""
    if stdin is not None:
        argv = ["/bin/sh", "-c", f"printf %s {shlex.quote(stdin.decode())} | {shlex.join(argv)}"]
    d = getProcessOutputAndValue(argv[0], argv[1:], env=env, reactor=reactor)
    d.addTimeout(timeout, reactor)
    return d


class DaemonMixin:
    @inlineCallbacks
    def setUp(self):
        self.daemon = Daemon(self.mktemp())
        yield self.daemon.start()
        self.addCleanup(self.daemon.stop)
        self.echo = yield echo_server()
        self.addCleanup(self.echo.stop)
        self.env = cli_env(self.daemon)

    @inlineCallbacks
    def listen(self, forward_id, where):
        """Run ``rexecpf tunnel FORWARD --listen WHERE`` until the test ends."""
        output = _Collect()
        process = reactor.spawnProcess(
            output, CLI[0], CLI + ["tunnel", forward_id, "--listen", where], env=self.env
        )
        self.addCleanup(output.stop)
        for _ in range(100):
            yield sleep(0.1)
            if b"Forwarding from" in output.out:
                return process
        self.fail(f"rexecpf tunnel --listen did not start: {output.out!r}")

    def cli(self, *args, env=None, **kw):
        return run(CLI + list(args), env or self.env, **kw)


class ForwardCommandTests(DaemonMixin, TestCase):
    @inlineCallbacks
    def test_create_list_delete(self):
        """
        ``forward create`` prints the new forward, ``forward list`` shows it
        (table and ``--json``), ``forward delete`` removes it; status 0.
        """
        out, err, status = yield self.cli("forward", "create", "c1", str(self.echo.port), "--name", "web")
        self.assertEqual((status, err), (0, b""))
        lines = out.decode().splitlines()
        self.assertEqual(lines[0].split(), ["ID", "PORT", "LOCAL", "NAME", "CREATED"])
        fid = lines[1].split()[0]
        self.assertTrue(fid.startswith("pf_"))
        out, _, status = yield self.cli("forward", "list", "c1", "--json")
        self.assertEqual(status, 0)
        [forward] = json.loads(out)
        self.assertEqual((forward["id"], forward["name"]), (fid, "web"))
        out, _, status = yield self.cli("forward", "delete", "c1", fid)
        self.assertEqual((status, out.decode().strip()), (0, f"deleted {fid}"))
        out, _, status = yield self.cli("forward", "list", "c1")
        self.assertEqual(out.decode().splitlines()[1:], [])

    @inlineCallbacks
    def test_create_pass_preflight(self):
        """``forward create --pass-preflight`` makes a forward that passes CORS preflights; without it, one that does not."""
        out, err, status = yield self.cli("forward", "create", "c1", str(self.echo.port), "--pass-preflight", "--json")
        self.assertEqual((status, err), (0, b""))
        self.assertTrue(json.loads(out)["pass_preflight"])
        out, err, status = yield self.cli("forward", "create", "c1", str(free_port()), "--json")
        self.assertEqual((status, err), (0, b""))
        self.assertFalse(json.loads(out)["pass_preflight"])

    @inlineCallbacks
    def test_errors(self):
        """
        Each failure is one line on stderr and status 1: bad token (401),
        unknown container (404), unknown forward (404), server not reachable.
        """
        cases = [
            (["forward", "list", "c1"], cli_env(self.daemon, "bad-token"), "401 Unauthorized"),
            (["forward", "list", "nope"], self.env, "404 Container not found"),
            (["forward", "delete", "c1", "pf_nope"], self.env, "404 Port forward not found"),
            (["--url", f"http://127.0.0.1:{free_port()}", "forward", "list", "c1"], self.env, "connection refused"),
            (["forward", "list", "c1"], cli_env(self.daemon, None), "no token"),
            # a server that is not rexecpf: an answer of the wrong shape
            (["--url", self.not_rexecpf, "forward", "list", "c1"], self.env, "is it a rexecpf server?"),
        ]
        for args, env, expected in cases:
            out, err, status = yield self.cli(*args, env=env)
            self.assertEqual(status, 1, (args, err))
            self.assertEqual(out, b"")
            lines = err.decode().splitlines()
            self.assertEqual(len(lines), 1, err)
            self.assertTrue(lines[0].startswith("rexecpf: error: "), lines[0])
            self.assertIn(expected, lines[0])


    @inlineCallbacks
    def test_usage_errors_and_option_places(self):
        """
        A usage error is one line and status 2; ``--url``/``--token`` work
        after the subcommand as well as before it.
        """
        out, err, status = yield self.cli("forward", "frobnicate")
        self.assertEqual(status, 2, err)
        self.assertEqual(len(err.decode().splitlines()), 1, err)
        self.assertTrue(err.startswith(b"rexecpf: error: "), err)
        env = cli_env(self.daemon, None)
        env.pop("REXECPF_URL", None)
        out, err, status = yield self.cli(
            "forward", "list", "c1", "--url", self.daemon.base, "--token", TOKENS["alice"], env=env
        )
        self.assertEqual((status, err), (0, b""))
        self.assertEqual(out.decode().split(), ["ID", "PORT", "LOCAL", "NAME", "CREATED"])

    @inlineCallbacks
    def setUp(self):
        yield super().setUp()
        answer = Data(b'{"not": "a list"}', "application/json")
        answer.isLeaf = True  # the same answer at every path
        site = Site(answer)
        listening = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
        self.addCleanup(listening.stopListening)
        self.not_rexecpf = f"http://127.0.0.1:{listening.getHost().port}"


class TunnelCommandTests(DaemonMixin, TestCase):
    @inlineCallbacks
    def test_tunnel_errors(self):
        """
        ``tunnel`` failures are one line and status 1: bad token (401),
        unknown forward (404), container port refused (502), server down.
        """
        forward = yield self.daemon.create(self.echo.port)
        dead = yield self.daemon.create(free_port())
        cases = [
            ([forward["id"]], cli_env(self.daemon, "bad-token"), "401 Unauthorized"),
            (["pf_nope"], self.env, "404 Port forward not found"),
            ([dead["id"]], self.env, "502 Bad gateway"),
            (["--url", f"http://127.0.0.1:{free_port()}", forward["id"]], self.env, "connection refused"),
        ]
        for args, env, expected in cases:
            if args[0] == "--url":
                argv = args[:2] + ["tunnel", args[2], "--stdio"]
            else:
                argv = ["tunnel", args[0], "--stdio"]
            out, err, status = yield self.cli(*argv, env=env)
            self.assertEqual(status, 1, (argv, err))
            lines = err.decode().splitlines()
            self.assertEqual(len(lines), 1, err)
            self.assertIn(expected, lines[0])

    @inlineCallbacks
    def test_stdio_eof_closes(self):
        """
        ``tunnel --stdio`` delivers what it read, closes the tunnel when
        stdin reaches end of file (the container sees its connection end)
        and exits with status 0.
        """
        received = []
        closed = Deferred()

        class Recorder(Protocol):
            def dataReceived(self, data):
                received.append(data)

            def connectionLost(self, reason):
                closed.callback(b"".join(received))

        peer = yield listen(Factory.forProtocol(Recorder))
        self.addCleanup(peer.stop)
        forward = yield self.daemon.create(peer.port)
        # Without the close the tunnel would stay open until the idle
        # timeout (300 s): the timeout makes that a failure.
        out, err, status = yield self.cli(
            "tunnel", forward["id"], "--stdio", stdin=b"to the container", timeout=30
        )
        self.assertEqual(status, 0, err)
        got = yield closed
        self.assertEqual(got, b"to the container")

    @inlineCallbacks
    def test_listen(self):
        """
        ``tunnel --listen`` carries each accepted connection over its own
        WebSocket.
        """
        forward = yield self.daemon.create(self.echo.port)
        port = free_port()
        yield self.listen(forward["id"], f"127.0.0.1:{port}")
        from tests.functional.inprocess import connect_tcp_roundtrip

        for payload in (b"first connection", b"second connection"):
            echoed = yield connect_tcp_roundtrip(port, payload)
            self.assertEqual(echoed, payload)
        # Each local connection closed: so is its tunnel.
        for _ in range(50):
            if self.daemon.forwards.live_count(forward["id"]) == 0:
                break
            yield sleep(0.1)
        self.assertEqual(self.daemon.forwards.live_count(forward["id"]), 0)


from twisted.internet.protocol import ProcessProtocol  # noqa: E402


class _Collect(ProcessProtocol):
    def __init__(self):
        self.out = b""
        self.ended = Deferred()

    def processEnded(self, reason):
        self.ended.callback(None)

    def stop(self):
        if not self.ended.called:
            self.transport.signalProcess("KILL")
        return self.ended

    def outReceived(self, data):
        self.out += data

    def errReceived(self, data):
        self.out += data


class PeerTests(DaemonMixin, TestCase):
    @inlineCallbacks
    def test_ssh_proxycommand(self):
        """
        OpenSSH runs a command on a loopback sshd with ``ProxyCommand
        'rexecpf tunnel URL --stdio'``.
        """
        if not peers.SSHServer.available():
            raise SkipTest("OpenSSH is not installed")
        sshd = peers.SSHServer(self.mktemp())
        self.addCleanup(sshd.stop)
        forward = yield self.daemon.create(sshd.port)
        proxy = " ".join(map(shlex.quote, CLI + ["tunnel", self.daemon.ws_url(forward["id"]), "--stdio"]))
        argv = sshd.ssh_command(["-o", f"ProxyCommand={proxy}"], "echo through-the-tunnel")
        out, err, status = yield run(argv, self.env)
        self.assertEqual((status, out.strip()), (0, b"through-the-tunnel"), err)

    @inlineCallbacks
    def test_postgres(self):
        """
        psql reaches PostgreSQL through ``rexecpf tunnel --listen`` and
        through the forward's ``local_port`` listener.
        """
        if not peers.PostgresServer.available():
            raise SkipTest("PostgreSQL is not installed")
        pg = peers.PostgresServer(self.mktemp())
        self.addCleanup(pg.stop)
        forward = yield self.daemon.create(pg.port)
        port = free_port()
        yield self.listen(forward["id"], str(port))
        sql = "select 'pg-' || (6 * 7)"
        for via in (port, forward["local_port"]):
            out, err, status = yield run(pg.psql_argv("127.0.0.1", via, sql), pg.psql_env())
            self.assertEqual((status, out.strip()), (0, b"pg-42"), err)

    @inlineCallbacks
    def test_websocat(self):
        """
        websocat, as a raw WebSocket client with ``Sec-WebSocket-Protocol:
        Bearer, TOKEN``, gets its bytes echoed through the tunnel.
        """
        websocat = peers.websocat_path()
        if websocat is None:
            raise SkipTest("websocat is not installed")
        forward = yield self.daemon.create(self.echo.port)
        argv = [
            websocat, "--binary", "-1", f"--header=Sec-WebSocket-Protocol: Bearer, {ALICE}",
            self.daemon.ws_url(forward["id"]),
        ]
        # -1: one message each way, then exit.
        out, err, status = yield run(argv, self.env, stdin=b"hello websocat")
        self.assertEqual((status, out.strip()), (0, b"hello websocat"), err)


class DomainCommandTests(TestCase):
    @inlineCallbacks
    def setUp(self):
        self.daemon = Daemon(
            self.mktemp(),
            sections={
                "server": {"proxy_domain": "preview.test"},
                "auth": {"custom_domains": ["alice"]},
                "domains": {"verify": False},
            },
        )
        yield self.daemon.start()
        self.addCleanup(self.daemon.stop)
        self.env = cli_env(self.daemon)

    def cli(self, *args):
        return run(CLI + list(args), self.env)

    @inlineCallbacks
    def test_create_with_domains_and_slug_then_add_list_remove(self):
        """
        ``forward create --domain D --domain E --slug S``, then ``domain add``,
        ``domain list`` and ``domain remove``; a bad domain is one error line.
        """
        out, err, status = yield self.cli(
            "forward", "create", "c1", "8080", "--domain", "a.example", "--domain", "B.example", "--slug", "web", "--json"
        )
        self.assertEqual((status, err), (0, b""))
        forward = json.loads(out)
        self.assertEqual([d["domain"] for d in forward["domains"]], ["a.example", "b.example"])
        self.assertEqual(forward["proxy_url"], f"http://web--alice.preview.test:{self.daemon.port}/")
        out, err, status = yield self.cli("domain", "add", "c1", forward["id"], "c.example")
        self.assertEqual((status, err), (0, b""))
        self.assertEqual(out.decode().split()[:6], ["DOMAIN", "VERIFIED", "TXT-NAME", "TXT-VALUE", "c.example", "yes"])
        out, _, status = yield self.cli("domain", "list", "c1", forward["id"], "--json")
        self.assertEqual([d["domain"] for d in json.loads(out)], ["a.example", "b.example", "c.example"])
        out, _, status = yield self.cli("domain", "remove", "c1", forward["id"], "a.example")
        self.assertEqual((status, out.decode().strip()), (0, "removed a.example"))
        out, err, status = yield self.cli("domain", "add", "c1", forward["id"], "bad_name.example")
        self.assertEqual(status, 1)
        self.assertIn(b"Invalid domain", err)
        self.assertEqual(len(err.decode().strip().splitlines()), 1)
