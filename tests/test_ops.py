"""
Operations, in memory: sd_notify messages, readiness order and the watchdog
on a Clock, the graceful stop order, reload on SIGHUP, JSON logs, the
relay-end log line, and the ``--log-format`` option.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import tempfile
import textwrap
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import Logger, formatEvent, globalLogPublisher
from twisted.scripts.twistd import ServerOptions
from twisted.trial.unittest import SynchronousTestCase

from rexecpf.auth import Authenticator
from rexecpf.backends.static import StaticBackend, read_inventory
from rexecpf.config import LimitsConfig
from rexecpf.forwards import GOING_AWAY, ForwardService
from rexecpf.http._twisted import forget_exit_signal
from rexecpf.ops import (
    GracefulService,
    Notifier,
    Readiness,
    Reloader,
    json_log_observer,
    notifier_from_environ,
)
from rexecpf.relay import RelayStats
from rexecpf.testing import FakeBackend, MemoryForwardStore
from tests.test_live import Drainable, Live


class RecordingNotifier:
    """Stands in for :class:`Notifier`: records what was sent."""

    def __init__(self, watchdog_seconds: float | None = None) -> None:
        self.watchdog_seconds = watchdog_seconds
        self.sent: list[str] = []

    def notify(self, message: str) -> None:
        self.sent.append(message)


class NotifierTests(SynchronousTestCase):
    def receiver(self, address: str) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind("\0" + address[1:] if address.startswith("@") else address)
        sock.settimeout(5)
        self.addCleanup(sock.close)
        return sock

    def test_path_socket(self) -> None:
        """A notification arrives as one datagram on a socket named by its path."""
        path = os.path.join(tempfile.mkdtemp(), "notify")
        receiver = self.receiver(path)
        notifier = notifier_from_environ({"NOTIFY_SOCKET": path})
        assert notifier is not None
        self.addCleanup(notifier.close)
        notifier.notify("READY=1")
        self.assertEqual(receiver.recv(100), b"READY=1")

    def test_abstract_socket(self) -> None:
        """``@name`` names a socket in the abstract namespace."""
        address = f"@rexecpf-test-{os.getpid()}"
        receiver = self.receiver(address)
        notifier = Notifier(address)
        self.addCleanup(notifier.close)
        notifier.notify("STOPPING=1")
        self.assertEqual(receiver.recv(100), b"STOPPING=1")

    def test_nobody_listening(self) -> None:
        """Sending to a socket that is gone is logged, never raised."""
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        notifier = Notifier(os.path.join(tempfile.mkdtemp(), "gone"))
        self.addCleanup(notifier.close)
        notifier.notify("READY=1")
        self.assertEqual(len(logged), 1)

    def test_environment(self) -> None:
        """No NOTIFY_SOCKET: no notifier; WATCHDOG_USEC gives the period unless WATCHDOG_PID is another process."""
        self.assertIsNone(notifier_from_environ({}))
        notifier = notifier_from_environ({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1000000"}, pid=7)
        assert notifier is not None
        self.addCleanup(notifier.close)
        self.assertEqual(notifier.watchdog_seconds, 1.0)
        other = notifier_from_environ(
            {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "8"}, pid=7
        )
        assert other is not None
        self.addCleanup(other.close)
        self.assertIsNone(other.watchdog_seconds)


class ReadinessTests(SynchronousTestCase):
    def test_ready_only_when_everything_answered(self) -> None:
        """READY=1 is sent only once every wait fired; STOPPING=1 when the service stops."""
        notifier = RecordingNotifier()
        first: Deferred[None] = Deferred()
        second: Deferred[None] = Deferred()
        readiness = Readiness(Clock(), notifier, [lambda: first, lambda: second])  # type: ignore[arg-type]
        readiness.startService()
        first.callback(None)
        self.assertEqual(notifier.sent, [])
        second.callback(None)
        self.assertEqual(notifier.sent, ["READY=1"])
        self.successResultOf(readiness.ready)
        readiness.stopService()
        self.assertEqual(notifier.sent, ["READY=1", "STOPPING=1"])

    def test_failure_is_not_ready(self) -> None:
        """A wait that fails means no READY=1, and one error line."""
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        notifier = RecordingNotifier()
        readiness = Readiness(Clock(), notifier, [lambda: succeed(None), lambda: 1 / 0])  # type: ignore[arg-type]
        readiness.startService()
        self.assertEqual(notifier.sent, [])
        self.assertIn("not ready", formatEvent(logged[-1]))

    def test_watchdog_period(self) -> None:
        """WATCHDOG=1 is sent every half watchdog period, on the clock, until the service stops."""
        clock = Clock()
        notifier = RecordingNotifier(watchdog_seconds=1.0)
        readiness = Readiness(clock, notifier, [])  # type: ignore[arg-type]
        readiness.startService()
        self.assertEqual(notifier.sent, ["WATCHDOG=1", "READY=1"])
        clock.pump([0.25] * 8)
        self.assertEqual(notifier.sent.count("WATCHDOG=1"), 5)
        readiness.stopService()
        clock.advance(5)
        self.assertEqual(notifier.sent.count("WATCHDOG=1"), 5)
        self.assertEqual(clock.getDelayedCalls(), [])


class Recorder(Service):
    def __init__(self, name: str, journal: list[str]) -> None:
        self.name = name
        self._journal = journal

    def stopService(self) -> None:
        super().stopService()
        self._journal.append(f"stop {self.name}")


class GracefulStopTests(SynchronousTestCase):
    def test_order(self) -> None:
        """
        A stop closes listeners first, tunnels at once, waits for requests in
        flight, then stops the rest and closes the store last.
        """
        journal: list[str] = []
        clock = Clock()
        store = MemoryForwardStore()
        store.close = lambda: journal.append("close store")  # type: ignore[method-assign]
        forwards = ForwardService(clock, store, FakeBackend(), LimitsConfig())
        top = GracefulService(grace_seconds=10, clock=clock)
        backend = Recorder("backend", journal)
        backend.setServiceParent(top)
        forwards.setServiceParent(top)
        listener = Recorder("listener", journal)
        listener.setServiceParent(top)
        top.stop_order([listener], forwards, store)
        top.startService()
        tunnel, request = Live("tunnel"), Drainable()
        forwards.track("pf_a", tunnel)
        untrack = forwards.track("pf_a", request)
        stopped = top.stopService()
        self.assertEqual(journal, ["stop listener"])
        self.assertEqual(tunnel.reasons, [GOING_AWAY])
        self.assertNoResult(stopped)
        clock.advance(3)
        untrack()
        assert request.draining is not None
        request.draining.callback(None)
        self.successResultOf(stopped)
        self.assertEqual(journal, ["stop listener", "stop backend", "close store"])
        self.assertEqual(request.reasons, [])

    def test_forget_exit_signal(self) -> None:
        """forget_exit_signal clears the signal twistd would re-raise."""

        class Reactor:
            _exitSignal: int | None = signal.SIGTERM

        reactor = Reactor()
        forget_exit_signal(reactor)
        self.assertIsNone(reactor._exitSignal)


def _write_config(path: Path, users: str) -> None:
    path.write_text(
        textwrap.dedent(
            f"""
            [auth]
            users = {{ {users} }}
            [backend]
            inventory = "containers.toml"
            """
        )
    )


class ReloadTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = Path(tempfile.mkdtemp())
        self.config = self.directory / "rexecpf.toml"
        self.inventory = self.directory / "containers.toml"
        self.inventory.write_text('[[container]]\nid = "c1"\nowner = "alice"\n')
        _write_config(self.config, 'alice = "alice-token", bob = "bob-token"')
        self.auth = Authenticator({"alice": "alice-token", "bob": "bob-token"})
        self.clock = Clock()
        self.backend = StaticBackend(self.clock, str(self.inventory), read_inventory(str(self.inventory)))
        self.forwards = ForwardService(self.clock, MemoryForwardStore(), self.backend, LimitsConfig())
        self.reloader = Reloader(None, str(self.config), self.auth, self.forwards, self.backend,
                                 str(self.inventory))

    def test_tokens_and_inventory(self) -> None:
        """
        A reload takes new tokens at once, revokes removed ones (closing that
        user's connections only) and re-reads the inventory.
        """
        alice, bob = Live(), Live()
        self.forwards.track("pf_a", alice, user="alice")
        self.forwards.track("pf_b", bob, user="bob")
        _write_config(self.config, 'alice = "alice-token", carol = "carol-token"')
        self.inventory.write_text('[[container]]\nid = "c2"\nowner = "carol"\n')
        self.assertTrue(self.reloader.reload())
        self.assertEqual(self.auth.authenticate("carol-token").name, "carol")  # type: ignore[union-attr]
        self.assertIsNone(self.auth.authenticate("bob-token"))
        self.assertEqual((alice.reasons, bob.reasons), ([], ["token revoked"]))
        self.assertIsNone(self.successResultOf(self.backend.inspect("c1")))
        self.assertIsNotNone(self.successResultOf(self.backend.inspect("c2")))

    def test_custom_domain_users(self) -> None:
        """A reload changes who may claim custom domains ([auth] custom_domains)."""
        self.assertFalse(self.forwards.domain_rules.allowed("bob"))
        _write_config(self.config, 'alice = "alice-token", bob = "bob-token"')
        self.config.write_text(self.config.read_text().replace("[backend]", 'custom_domains = ["bob"]\n[backend]'))
        self.assertTrue(self.reloader.reload())
        self.assertTrue(self.forwards.domain_rules.allowed("bob"))
        self.assertFalse(self.forwards.domain_rules.allowed("alice"))

    def test_broken_file_is_ignored(self) -> None:
        """A file that does not load is one error line; the old tokens stay."""
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.config.write_text("[auth\nusers = ")
        self.assertFalse(self.reloader.reload())
        self.assertEqual(len(logged), 1)
        self.assertIn("reload failed, configuration kept", formatEvent(logged[0]))
        self.assertEqual(self.auth.authenticate("bob-token").name, "bob")  # type: ignore[union-attr]

    def test_broken_inventory_is_ignored(self) -> None:
        """A broken inventory fails the whole reload: tokens are not changed either."""
        _write_config(self.config, 'alice = "alice-token"')
        self.inventory.write_text("[[container]]\nid = 3\n")
        self.assertFalse(self.reloader.reload())
        self.assertIsNotNone(self.auth.authenticate("bob-token"))

    def test_signal_handler_installed_and_restored(self) -> None:
        """SIGHUP is handled while the service runs (reload from the reactor thread), restored after."""
        calls: list[Any] = []

        class Reactor:
            def callFromThread(self, function: Any, *args: Any) -> None:
                calls.append(function)

        before = signal.getsignal(signal.SIGHUP)
        reloader = Reloader(Reactor(), str(self.config), self.auth, self.forwards, self.backend,
                            str(self.inventory), install_signal=True)
        reloader.startService()
        try:
            os.kill(os.getpid(), signal.SIGHUP)
        finally:
            reloader.stopService()
        self.assertEqual(calls, [reloader.reload])
        self.assertEqual(signal.getsignal(signal.SIGHUP), before)


class LogTests(SynchronousTestCase):
    def test_json_lines(self) -> None:
        """The JSON observer writes one JSON object per event, one per line."""
        out = io.StringIO()
        observer = json_log_observer(out)
        log = Logger(observer=observer, namespace="test")
        log.info("one {n}", n=1)
        log.info("two")
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 2)
        self.assertEqual(json.loads(lines[0])["n"], 1)
        self.assertEqual(json.loads(lines[0])["text"], "one 1")

    def test_relay_end_line(self) -> None:
        """A relay's end is one line with the forward id, user, bytes each way and duration."""
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        forwards = ForwardService(Clock(), MemoryForwardStore(), FakeBackend(), LimitsConfig())
        observed: list[tuple[str, RelayStats]] = []
        forwards.relay_observers.append(lambda kind, stats: observed.append((kind, stats)))
        stats = RelayStats(10, 20, 1.5, 1000, "peer closed")
        forwards.relay_ended("tunnel", "pf_x", "alice", stats)
        self.assertEqual(observed, [("tunnel", stats)])
        (event,) = logged
        self.assertEqual(
            formatEvent(event),
            "tunnel pf_x of alice closed: 10 bytes in, 20 bytes out, 1.500s, close 1000 peer closed",
        )
        self.assertEqual((event["forward_id"], event["bytes_in"], event["bytes_out"]), ("pf_x", 10, 20))

    def test_log_format_option(self) -> None:
        """``--log-format json`` (or ``[server] log_format``) makes twistd log JSON lines."""
        directory = Path(tempfile.mkdtemp())
        config = directory / "rexecpf.toml"
        config.write_text('[server]\nlog_format = "json"\n')
        for argv in (
            ["-n", "rexecpf", "--config", str(config)],
            ["-n", "rexecpf", "--demo", "--log-format", "json"],
        ):
            options = ServerOptions()
            options.parseOptions(argv)
            self.assertIs(options["logger"], json_log_observer)
        options = ServerOptions()
        options.parseOptions(["-n", "rexecpf", "--demo"])
        self.assertIsNone(options["logger"])
