"""The parent of ``--workers N`` with a fake reactor, and its pure parts."""

from __future__ import annotations

import os
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.python.reflect import namedAny
from twisted.scripts.twistd import ServerOptions
from twisted.trial import unittest

from rexecpf.tap import Options
from rexecpf.workers import WORKER_ENVIRON, WorkerParent, WorkerSockets, child_argv, merge_metrics


class FakeProcess:
    def __init__(self, pid: int, protocol: Any, env: dict[str, str], fds: dict[int, Any]) -> None:
        self.pid = pid
        self.protocol = protocol
        self.env = env
        self.fds = fds
        self.signals: list[str] = []

    def signalProcess(self, name: str) -> None:  # noqa: N802
        self.signals.append(name)

    def end(self, reason: Exception) -> None:
        self.protocol.processEnded(Failure(reason))


class FakeReactor(Clock):
    running = True

    def __init__(self) -> None:
        super().__init__()
        self.processes: list[FakeProcess] = []
        self.stopped = False

    def spawnProcess(self, protocol: Any, executable: str, args: list[str], env: dict[str, str],  # noqa: N802
                     childFDs: dict[int, Any]) -> FakeProcess:  # noqa: N803
        process = FakeProcess(1000 + len(self.processes), protocol, env, childFDs)
        self.processes.append(process)
        return process

    def listenUNIXDatagram(self, path: str, protocol: Any) -> Any:  # noqa: N802
        class Port:
            def stopListening(self) -> None:
                pass

        return Port()

    def stop(self) -> None:
        self.stopped = True


class WorkerParentTests(unittest.TestCase):
    def setUp(self) -> None:
        self.reactor = FakeReactor()
        self.parent = WorkerParent(self.reactor, ["python", "twistd"], [], 2, 3.0, environ={"NOTIFY_SOCKET": "/x"})
        self.parent.startService()
        self.addCleanup(self.stop)

    def stop(self) -> None:
        """Stop (if the test did not), end every worker left: the parent removes its directory."""
        if self.parent.running:
            self.parent.stopService()
        for process in self.reactor.processes:
            if process.protocol._slot.process is process:
                process.end(ProcessDone(0))
        assert self.parent._directory is not None
        self.assertFalse(os.path.exists(self.parent._directory))

    def ready(self, index: int) -> None:
        self.parent._notified(self.parent.slots[index], "READY=1")

    def test_workers_get_their_own_notify_socket_and_index(self) -> None:
        """Each worker has its index and a private NOTIFY_SOCKET, never systemd's."""
        first, second = self.reactor.processes
        self.assertEqual(WorkerSockets.from_environ(first.env).index, 0)  # type: ignore[union-attr]
        self.assertEqual(WorkerSockets.from_environ(second.env).index, 1)  # type: ignore[union-attr]
        self.assertNotEqual(first.env["NOTIFY_SOCKET"], "/x")
        self.assertNotEqual(first.env["NOTIFY_SOCKET"], second.env["NOTIFY_SOCKET"])

    def test_ready_once_all_are(self) -> None:
        self.ready(0)
        self.assertFalse(self.parent.ready.called)
        self.ready(1)
        self.assertTrue(self.parent.ready.called)

    def test_restart_with_backoff(self) -> None:
        """A ready worker that dies is started again at once, then after 0.5, 1, 2 s while it keeps dying."""
        self.ready(0)
        self.ready(1)
        delays = []
        for _ in range(4):
            before = len(self.reactor.processes)
            self.parent.slots[0].process.end(ProcessTerminated(signal=9))
            waited = 0.0
            while len(self.reactor.processes) == before:
                self.reactor.advance(0.25)
                waited += 0.25
            delays.append(waited)
        self.assertEqual(delays, [0.25, 0.5, 1.0, 2.0])  # the first is at once: the first tick
        self.assertEqual(self.parent.slots[0].restarts, 4)
        self.assertFalse(self.reactor.stopped)
        # Up for long enough, the next death restarts at once again.
        self.reactor.advance(60)
        self.parent.slots[0].process.end(ProcessTerminated(signal=9))
        before = len(self.reactor.processes)
        self.reactor.advance(0)
        self.assertEqual(len(self.reactor.processes), before + 1)

    def test_death_before_ready_stops(self) -> None:
        """A worker that dies before it was ever ready stops the parent (which then exits 1)."""
        self.ready(1)
        self.reactor.processes[0].end(ProcessTerminated(exitCode=1))
        self.assertTrue(self.reactor.stopped)
        self.assertTrue(self.parent.failed)
        self.assertEqual(len(self.reactor.processes), 2)

    def test_sighup_and_sigterm_passed_on(self) -> None:
        """reload() passes HUP on; stopping sends TERM and ends once every worker exited; none restarts."""
        self.ready(0)
        self.ready(1)
        self.parent.reload()
        self.assertEqual([p.signals for p in self.reactor.processes], [["HUP"], ["HUP"]])
        stopped = self.parent.stopService()
        self.assertEqual([p.signals for p in self.reactor.processes], [["HUP", "TERM"], ["HUP", "TERM"]])
        self.reactor.processes[0].end(ProcessDone(0))
        self.assertNoResult(stopped)
        self.reactor.processes[1].end(ProcessDone(0))
        self.successResultOf(stopped)
        self.reactor.advance(60)
        self.assertEqual(len(self.reactor.processes), 2)

    def test_sighup_waits_for_a_worker_to_be_ready(self) -> None:
        """
        SIGHUP to a worker still starting would end it (its handler is not
        installed yet: the default action): it is passed on once the worker
        is ready; a worker started again meanwhile reads the file anyway.
        """
        self.ready(0)
        self.parent.reload()
        first, second = self.reactor.processes
        self.assertEqual((first.signals, second.signals), (["HUP"], []))
        self.ready(1)
        self.assertEqual(second.signals, ["HUP"])
        self.ready(1)
        self.assertEqual(second.signals, ["HUP"])
        # Pending for a worker that died before it was ready: not for the next one.
        self.parent.slots[0].process.end(ProcessTerminated(signal=9))
        self.reactor.advance(0)
        self.parent.reload()
        self.parent.slots[0].process.end(ProcessTerminated(signal=9))
        self.reactor.advance(0.5)
        third = self.reactor.processes[-1]
        self.ready(0)
        self.assertEqual(third.signals, [])

    def test_killed_after_the_grace_period(self) -> None:
        """Workers still alive 5 s after the grace period are killed."""
        self.ready(0)
        self.ready(1)
        self.parent.stopService()
        self.reactor.advance(3.0 + 4.9)
        self.assertEqual(self.reactor.processes[0].signals, ["TERM"])
        self.reactor.advance(0.2)
        self.assertEqual(self.reactor.processes[0].signals, ["TERM", "KILL"])


class MergeTests(unittest.TestCase):
    def test_labelled_by_worker(self) -> None:
        """Every worker's samples are kept, labelled; a worker that did not answer is up 0."""
        parent = WorkerParent(Clock(), [], [], 3, 1.0)
        text = (
            "# HELP rexecpf_relays_total Relays ended, by kind.\n"
            "# TYPE rexecpf_relays_total counter\n"
            'rexecpf_relays_total{kind="tunnel"} 2.0\n'
            "# HELP rexecpf_forwards Port forwards that exist.\n"
            "# TYPE rexecpf_forwards gauge\n"
            "rexecpf_forwards 4.0\n"
        )
        merged = merge_metrics(parent, [(0, text), (1, text.replace("2.0", "5.0")), (2, None)])
        samples = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(merged.decode())
            for sample in family.samples
        }
        self.assertEqual(samples[("rexecpf_relays_total", (("kind", "tunnel"), ("worker", "0")))], 2.0)
        self.assertEqual(samples[("rexecpf_relays_total", (("kind", "tunnel"), ("worker", "1")))], 5.0)
        self.assertEqual(samples[("rexecpf_forwards", (("worker", "1"),))], 4.0)
        self.assertEqual(
            [samples[("rexecpf_worker_up", (("worker", str(i)),))] for i in range(3)], [1.0, 1.0, 0.0]
        )


class OptionsTests(unittest.TestCase):
    def test_workers_range(self) -> None:
        for bad in ("0", "257", "x"):
            with self.assertRaises(usage.UsageError):
                Options().parseOptions(["--demo", "--workers", bad])
        options = Options()
        options.parseOptions(["--demo", "--workers", "4"])
        self.assertEqual(options["workers"], 4)

    def test_workers_need_nodaemon(self) -> None:
        options = Options()
        options.parent = {"nodaemon": False}  # type: ignore[attr-defined]
        with self.assertRaises(usage.UsageError):
            options.parseOptions(["--demo", "--workers", "2"])

    def test_workers_refuse_uid_and_gid(self) -> None:
        """twistd's --uid/--gid: the parent's private directory and sockets would be root's."""
        for given in ({"uid": 65534}, {"gid": 65534}):
            options = Options()
            options.parent = {"nodaemon": True, "uid": None, "gid": None, **given}  # type: ignore[attr-defined]
            with self.assertRaisesRegex(usage.UsageError, "--uid/--gid"):
                options.parseOptions(["--demo", "--workers", "2"])
        options = Options()
        options.parent = {"nodaemon": True, "uid": 65534, "gid": None}  # type: ignore[attr-defined]
        options.parseOptions(["--demo"])  # one process: yes
        self.assertEqual(options["workers"], 1)

    def test_child_argv(self) -> None:
        """A worker runs twistd -n rexecpf with the parent's options, the config by absolute path, no --workers."""
        options = Options()
        options.parseOptions(["--demo", "--listen", "tcp:8080", "--workers", "2", "--log-format", "json"])
        argv = child_argv(options)
        self.assertEqual(argv[3:], ["--nodaemon", "--pidfile=", "rexecpf", "--demo", "--listen", "tcp:8080",
                                    "--log-format", "json"])
        self.assertNotIn("--workers", argv)

    def test_child_argv_logger(self) -> None:
        """
        twistd has resolved ``--logger`` to an object by the time the parent
        builds its workers' command line: the workers get its name back (not
        its repr, which their twistd cannot import), also for ``--log-format
        json``, which sets the logger.
        """
        for argv, logger in (
            (["-n", "--logger=twisted.logger.LogPublisher", "rexecpf", "--demo", "--workers", "2"],
             "twisted.logger._observer.LogPublisher"),
            (["-n", "rexecpf", "--demo", "--workers", "2", "--log-format", "json"], "rexecpf.ops.json_log_observer"),
        ):
            options = ServerOptions()
            options.parseOptions(argv)
            worker_argv = child_argv(options.subOptions)
            self.assertIn(f"--logger={logger}", worker_argv)
            self.assertIs(namedAny(logger), options["logger"])

    def test_environ_round_trip(self) -> None:
        sockets = WorkerSockets(1, (5, 6), 7, ("127.0.0.1", 9100), 42)
        self.assertEqual(WorkerSockets.from_environ({WORKER_ENVIRON: sockets.to_environ()}), sockets)
        self.assertIsNone(WorkerSockets.from_environ({}))


class ScrapeTests(unittest.TestCase):
    def test_unreadable_worker_metrics_still_answered(self) -> None:
        """
        A worker whose metrics cannot be parsed (cut short as it died) counts
        as not answering: the scrape is still answered, with the others'.
        """
        from twisted.internet.defer import succeed
        from twisted.web.test.requesthelper import DummyRequest

        from rexecpf.workers import WorkersMetricsResource

        parent = WorkerParent(Clock(), [], [], 2, 1.0)
        good = "# TYPE rexecpf_forwards gauge\nrexecpf_forwards 4.0\n"
        parent.read_workers = lambda: succeed([(0, good), (1, '# TYPE a counter\na_total{x="y')])  # type: ignore[method-assign]
        request = DummyRequest([b"metrics"])
        request.path = b"/metrics"
        WorkersMetricsResource(parent).render_GET(request)
        self.assertEqual(request.finished, 1)
        samples = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(b"".join(request.written).decode())
            for sample in family.samples
        }
        self.assertEqual(samples[("rexecpf_forwards", (("worker", "0"),))], 4.0)
        self.assertEqual(samples[("rexecpf_worker_up", (("worker", "1"),))], 0.0)

    def test_metrics_cut_short_are_not_taken(self) -> None:
        """A worker's answer shorter than its Content-Length (it died as it wrote) is no answer."""
        from twisted.internet.error import ConnectionDone
        from twisted.internet.testing import StringTransport

        from rexecpf.workers import _MetricsFetch

        whole = b"rexecpf_forwards 4.0\nrexecpf_relays_total 2.0\n"
        head = b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(whole)
        for body, answered in ((whole, True), (whole[:21], False)):
            fetch = _MetricsFetch()
            fetch.makeConnection(StringTransport())
            fetch.dataReceived(head + body)
            fetch.connectionLost(Failure(ConnectionDone()))
            if answered:
                self.assertEqual(self.successResultOf(fetch.done), whole.decode())
            else:
                self.failureResultOf(fetch.done, ValueError)

    def test_a_worker_that_does_not_answer_in_time_is_hung_up_on(self) -> None:
        """
        A worker that took the connection but does not answer within 5 s is
        left out of the scrape, and the connection to it is closed (not
        kept until it answers, if it ever does).
        """
        from twisted.internet.testing import MemoryReactorClock, StringTransport

        reactor = MemoryReactorClock()
        parent = WorkerParent(reactor, [], [], 1, 1.0, metrics=True)
        parent._directory = self.mktemp()
        parent.slots[0].process = object()
        scraped = parent.read_workers()
        factory = reactor.unixClients[0][1]
        transport = StringTransport()
        factory.buildProtocol(None).makeConnection(transport)
        self.assertEqual(transport.value(), b"GET /metrics HTTP/1.0\r\n\r\n")
        reactor.advance(5.0)
        self.assertEqual(self.successResultOf(scraped), [(0, None)])
        self.assertTrue(transport.disconnecting)

    def test_scrapes_at_once_share_one_read(self) -> None:
        """
        However many scrapes come while one is under way, each worker is
        read once and every one of them gets the same answer; the next
        scrape reads the workers again.
        """
        from twisted.internet.error import ConnectionDone
        from twisted.internet.testing import MemoryReactorClock, StringTransport

        reactor = MemoryReactorClock()
        parent = WorkerParent(reactor, [], [], 2, 1.0, metrics=True)
        parent._directory = self.mktemp()
        for slot in parent.slots:
            slot.process = object()
        scrapes = [parent.scrape() for _ in range(100)]
        self.assertEqual(len(reactor.unixClients), 2)
        for index, (_, factory, *_rest) in enumerate(reactor.unixClients):
            fetch = factory.buildProtocol(None)
            fetch.makeConnection(StringTransport())
            body = b"rexecpf_forwards %d.0\n" % (index + 3)
            fetch.dataReceived(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            fetch.connectionLost(Failure(ConnectionDone()))
        answers = {self.successResultOf(scrape) for scrape in scrapes}
        self.assertEqual(len(answers), 1)
        samples = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(answers.pop().decode())
            for sample in family.samples
        }
        self.assertEqual(samples[("rexecpf_forwards", (("worker", "0"),))], 3.0)
        self.assertEqual(samples[("rexecpf_forwards", (("worker", "1"),))], 4.0)
        parent.scrape()
        self.assertEqual(len(reactor.unixClients), 4)
