# -*- test-case-name: tests.test_workers -*-
"""
``twistd rexecpf --workers N``: N worker processes on one host, so that every
core serves.

The parent opens every listening socket before any worker exists, then runs
N workers (``twistd -n rexecpf`` again, with the same options) that adopt
them (``reactor.adoptStreamPort``) and share the store; the parent serves
nothing itself but ``metrics_listen``.

- A ``tcp:``/``tcp6:``/``ssl:`` endpoint is opened once per worker, every
  copy on the same address with ``SO_REUSEPORT``: the kernel spreads new
  connections evenly over the workers by a hash of the client's address.
  (One socket shared by all workers would leave the balancing to whichever
  worker wakes first, and Twisted accepts up to 100 connections at a time:
  a burst would land on one worker.)  The parent keeps every worker's copy
  open, so while a worker restarts the connections the kernel gives its
  socket wait in its backlog instead of being refused.
- Any other endpoint (``unix:``, ``systemd:``, whose socket systemd opened)
  is one socket, opened (or adopted) by the parent and shared by all.
- ``local_port`` listeners are opened by each worker with ``SO_REUSEPORT``
  (every worker learns every forward from the change feed).
- ``metrics_listen`` is served by the parent: a scrape reads every worker's
  metrics over a private UNIX socket and answers them all, each sample
  labelled ``worker="0"``... plus ``rexecpf_worker_up`` and
  ``rexecpf_worker_restarts``.
- Each worker tells the parent ``READY=1`` (and ``WATCHDOG=1``) on a private
  ``$NOTIFY_SOCKET``; only the parent talks to systemd: ``READY=1`` once
  every worker is ready, ``STOPPING=1``, ``WATCHDOG=1`` (a worker that misses
  its watchdog is killed and restarted).
- ``SIGHUP`` is passed to every worker; ``SIGTERM`` too, and the parent
  exits (status 0) once every worker has drained and exited.  A worker that
  dies is started again (at once, then after 0.5, 1, 2... up to 30 s while it
  keeps dying); one that dies before it was ever ready ends start-up.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Mapping, Sequence
from types import FrameType
from typing import Any

import attrs
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from twisted.application.service import Service
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol, serverFromString
from twisted.internet.error import ProcessDone
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.internet.protocol import DatagramProtocol, Factory, ProcessProtocol, Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.reflect import fullyQualifiedName
from twisted.web import server
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from zope.interface import implementer

from rexecpf.listeners import listening_socket
from rexecpf.ops import Notifier

__all__ = ["WORKER_ENVIRON", "WorkerParent", "WorkerSockets", "child_argv"]

#: The environment variable that makes a ``twistd rexecpf`` a worker: a JSON
#: object with its index and the descriptors it inherited (see WorkerSockets).
WORKER_ENVIRON = "REXECPF_WORKER"

#: ``twistd`` run by the parent's own interpreter (the virtualenv's, whatever the PATH).
TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"

#: Restart delays of a worker that keeps dying: the first restart is at once.
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
#: A worker that ran this long before it died is restarted at once again.
STABLE_SECONDS = 30.0
#: A worker's metrics not read within this time are left out of a scrape.
SCRAPE_TIMEOUT = 5.0
#: The most a worker's metrics may weigh (they are a few KiB).
MAX_METRICS_BYTES = 4 * 1024 * 1024
#: After SIGTERM, workers still alive this long after the grace period are killed.
KILL_AFTER_GRACE = 5.0


@attrs.frozen
class WorkerSockets:
    """
    What a worker inherited from its parent.

    :ivar index: 0 to N-1.
    :ivar listen: the descriptor of each ``[server] listen`` endpoint, in order.
    :ivar metrics: a listening UNIX socket where the worker serves its
        metrics to the parent (``None``: no ``metrics_listen``).
    :ivar metrics_address: the ``(host, port)`` the parent serves
        ``metrics_listen`` on (a forward may not lead there), or ``None``.
    :ivar endpoints: the endpoints (:func:`rexecpf.tap.shared_endpoints`)
        ``listen`` holds the sockets of, as the parent read them.
    :ivar store: the store the parent opened (:func:`rexecpf.tap.store_identity`).
    """

    index: int
    listen: tuple[int, ...]
    metrics: int | None = None
    metrics_address: tuple[str, int] | None = None
    parent_pid: int = 0
    endpoints: tuple[str, ...] = ()
    store: str = ""

    def to_environ(self) -> str:
        return json.dumps(attrs.asdict(self))

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> WorkerSockets | None:
        """:return: this worker's sockets, or ``None`` in a process that is not a worker."""
        raw = environ.get(WORKER_ENVIRON)
        if not raw:
            return None
        document = json.loads(raw)
        address = document.get("metrics_address")
        return cls(
            index=int(document["index"]),
            listen=tuple(int(fd) for fd in document["listen"]),
            metrics=document.get("metrics"),
            metrics_address=tuple(address) if address else None,  # type: ignore[arg-type]
            parent_pid=int(document.get("parent_pid", 0)),
            endpoints=tuple(document.get("endpoints", ())),
            store=str(document.get("store", "")),
        )

    def endpoint(self, reactor: Any, index: int, description: str) -> IStreamServerEndpoint:
        """:return: the endpoint of ``listen[index]``, adopting its inherited socket."""
        return adopting_endpoint(reactor, self.listen[index], description)

    def adopted(self, reactor: Any, index: int) -> IStreamServerEndpoint:
        """:return: a plain stream endpoint on ``listen[index]`` (for a TLS wrapper of one's own)."""
        return _AdoptedOnce(reactor, self.listen[index])


def _family(fd: int) -> socket.AddressFamily:
    probe = socket.socket(fileno=fd)
    try:
        return probe.family
    finally:
        probe.detach()


@implementer(IStreamServerEndpoint)
class _AdoptedOnce:
    """Listens by adopting the inherited socket ``fd``, then closes the inherited copy."""

    def __init__(self, reactor: Any, fd: int) -> None:
        self._reactor = reactor
        self._fd = fd

    def listen(self, factory: Any) -> Deferred[IListeningPort]:
        os.set_blocking(self._fd, False)
        port = self._reactor.adoptStreamPort(self._fd, _family(self._fd), factory)
        os.close(self._fd)
        return succeed(port)


class _TLSOnAdopted:
    """
    Stands in for the reactor while an ``ssl:`` endpoint string is parsed in
    a worker: its ``listenSSL`` gives the TLS factory the parent's socket
    is adopted with (what the reactor's own ``listenSSL`` wraps a factory in).
    """

    def __init__(self, reactor: Any, fd: int) -> None:
        self._reactor = reactor
        self._fd = fd

    def listenSSL(self, port: int, factory: Any, contextFactory: Any, backlog: int = 50,  # noqa: N802, N803
                  interface: str = "") -> IListeningPort:
        from twisted.protocols.tls import TLSMemoryBIOFactory

        os.set_blocking(self._fd, False)
        adopted: IListeningPort = self._reactor.adoptStreamPort(
            self._fd, _family(self._fd), TLSMemoryBIOFactory(contextFactory, False, factory)
        )
        os.close(self._fd)
        return adopted

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


def adopting_endpoint(reactor: Any, fd: int, description: str) -> IStreamServerEndpoint:
    """
    :return: an endpoint that listens on the inherited socket ``fd`` in place
        of ``description`` (TLS for an ``ssl:`` one, as its string says).
    """
    if description.partition(":")[0] == "ssl":
        return serverFromString(_TLSOnAdopted(reactor, fd), description)  # type: ignore[no-any-return]
    return _AdoptedOnce(reactor, fd)


class _Opened:
    """What :class:`_Opener` returns for a ``tcp:``/``ssl:`` endpoint: its per-worker sockets."""

    def __init__(self, sockets: list[socket.socket]) -> None:
        self.sockets = sockets


class _Opener:
    """
    Stands in for the reactor while the parent "listens" on an endpoint: a
    TCP or TLS one gets ``count`` sockets on one address with
    ``SO_REUSEPORT`` (port 0: the port the first one got); anything else
    (``unix:``, ``systemd:``) listens with the real reactor.
    """

    def __init__(self, reactor: Any, count: int) -> None:
        self._reactor = reactor
        self._count = count

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> _Opened:  # noqa: N802
        first = listening_socket(interface, port, backlog, reuse_port=True)
        bound = first.getsockname()[1]
        return _Opened([first] + [listening_socket(interface, bound, backlog, reuse_port=True)
                                  for _ in range(self._count - 1)])

    def listenSSL(self, port: int, factory: Any, contextFactory: Any, backlog: int = 50,  # noqa: N802, N803
                  interface: str = "") -> _Opened:
        return self.listenTCP(port, factory, backlog, interface)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


class ParentSocket:
    """
    One ``[server] listen`` endpoint as the parent holds it: a socket per
    worker, or one real (not reading) port shared by all.
    """

    def __init__(self, reactor: Any, description: str, count: int) -> None:
        self.description = description
        self._sockets: list[socket.socket] = []
        self._port: Any = None
        outcome: list[Any] = []
        serverFromString(_Opener(reactor, count), description).listen(Factory()).addBoth(outcome.append)
        result = outcome[0]
        if isinstance(result, Failure):
            result.raiseException()
        if isinstance(result, _Opened):
            self._sockets = result.sockets
        else:
            # Opened for real: never accept here, only the workers do.
            result.stopReading()
            self._port = result
        for fd in self.fds():
            os.set_inheritable(fd, True)

    def fds(self) -> list[int]:
        if self._port is not None:
            return [self._port.fileno()]
        return [sock.fileno() for sock in self._sockets]

    def fd_for(self, index: int) -> int:
        fds = self.fds()
        return fds[index % len(fds)]

    def address(self) -> Any:
        if self._port is not None:
            return self._port.getHost()
        return self._sockets[0].getsockname()

    def close(self) -> None:
        for sock in self._sockets:
            sock.close()
        if self._port is not None:
            self._port.stopListening()


def child_argv(options: Any) -> list[str]:
    """
    :param options: the parent's parsed ``rexecpf`` options.
    :return: the command line of one worker: ``twistd -n rexecpf`` with the
        same options but ``--workers``.
    """
    argv = [sys.executable, "-c", TWISTD, "--nodaemon", "--pidfile="]
    parent = getattr(options, "parent", None)
    if parent is not None and parent.get("logger"):
        # twistd has resolved its --logger (a name) to the object by now: pass its name on.
        logger = parent["logger"]
        argv.append(f"--logger={logger if isinstance(logger, str) else fullyQualifiedName(logger)}")
    argv.append("rexecpf")
    if options["demo"]:
        argv.append("--demo")
    if options["config"]:
        argv += ["--config", os.path.abspath(options["config"])]
    for endpoint in options["listen"]:
        argv += ["--listen", endpoint]
    for name in ("public-url", "state", "log-format"):
        if options[name]:
            argv += [f"--{name}", options[name]]
    return argv


class _WorkerProcess(ProcessProtocol):
    def __init__(self, parent: WorkerParent, slot: _Slot) -> None:
        self._parent = parent
        self._slot = slot

    def processEnded(self, reason: Failure) -> None:  # noqa: N802
        self._parent._ended(self._slot, reason)


class _Notifications(DatagramProtocol):
    """A worker's ``$NOTIFY_SOCKET``: its sd_notify datagrams reach the parent here."""

    noisy = False

    def __init__(self, parent: WorkerParent, slot: _Slot) -> None:
        self._parent = parent
        self._slot = slot

    def datagramReceived(self, data: bytes, addr: Any) -> None:  # noqa: N802
        for line in data.decode("utf-8", "replace").splitlines():
            self._parent._notified(self._slot, line.strip())


@attrs.define
class _Slot:
    index: int
    process: Any = None
    pid: int | None = None
    started_at: float = 0.0
    ready: bool = False
    ever_ready: bool = False
    last_ping: float = 0.0
    failures: int = 0
    restarts: int = 0
    restart_call: Any = None
    #: a SIGHUP came while it was starting: passed on once it is ready
    reload_pending: bool = False
    notify_port: Any = None
    metrics_socket: socket.socket | None = None


class WorkerParent(Service):
    """
    The parent of ``--workers N``: opens the sockets, runs and restarts the
    workers, passes signals on, and talks to systemd for all of them.

    :param reactor: spawns the workers and runs the timers.
    :param argv: a worker's command line (:func:`child_argv`).
    :param listen: ``[server] listen``.
    :param count: N.
    :param grace_seconds: ``[server] shutdown_grace_seconds`` (the workers
        drain for that long; the parent kills what is left a little later).
    :param notifier: systemd's ``$NOTIFY_SOCKET``, or ``None``.
    :param metrics: whether there is a ``metrics_listen`` (served by the
        parent: set :attr:`metrics_listener` to its listener, whose address
        the workers are told so that no forward leads there).
    :param environ: the environment the workers start from.
    :param store: the store it opened (:func:`rexecpf.tap.store_identity`).
    """

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        argv: list[str],
        listen: Sequence[str],
        count: int,
        grace_seconds: float,
        notifier: Notifier | None = None,
        metrics: bool = False,
        environ: Mapping[str, str] | None = None,
        store: str = "",
    ) -> None:
        self._reactor = reactor
        self._argv = argv
        self._listen = listen
        self._store = store
        self._grace = grace_seconds
        self._notifier = notifier
        self._metrics = metrics
        self._environ = dict(os.environ if environ is None else environ)
        self.slots = [_Slot(index) for index in range(count)]
        self._sockets: list[ParentSocket] = []
        self._directory: str | None = None
        self._stopping = False
        self._all_ready = False
        self._watchdog: LoopingCall | None = None
        self._previous_hup: Any = None
        self._exited: Deferred[None] | None = None
        #: the listener of metrics_listen (an EndpointListener), if any
        self.metrics_listener: Any = None
        #: set when a worker could not start: the parent exits non-zero
        self.failed = False
        #: fires once every worker said READY=1
        self.ready: Deferred[None] = Deferred()
        #: the scrapes waiting for the one under way (see scrape)
        self._scrapes: list[Deferred[bytes]] = []

    # -- start -----------------------------------------------------------

    def privilegedStartService(self) -> None:
        """Open every socket before the reactor runs (and before any privilege is dropped)."""
        from rexecpf.tap import StartupError, with_backlog

        super().privilegedStartService()
        for description in self._listen:
            try:
                self._sockets.append(ParentSocket(self._reactor, with_backlog(description), len(self.slots)))
            except Exception as error:
                raise StartupError(f"cannot listen on {description}: {error}") from None
            self._log.info("listening on {description} for {count} workers",
                           description=description, count=len(self.slots))
        self._directory = tempfile.mkdtemp(prefix="rexecpf-workers-")
        for slot in self.slots:
            if self._metrics:
                slot.metrics_socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                slot.metrics_socket.bind(self._path(slot, "metrics"))
                slot.metrics_socket.listen(16)
                slot.metrics_socket.setblocking(False)
                os.set_inheritable(slot.metrics_socket.fileno(), True)
            slot.notify_port = self._reactor.listenUNIXDatagram(
                self._path(slot, "notify"), _Notifications(self, slot)
            )

    def _path(self, slot: _Slot, kind: str) -> str:
        assert self._directory is not None
        return os.path.join(self._directory, f"{kind}-{slot.index}.sock")

    def startService(self) -> None:
        if not self._sockets and self._directory is None:
            self.privilegedStartService()
        super().startService()
        self._previous_hup = signal.signal(signal.SIGHUP, self._on_hup)
        if self._notifier is not None and self._notifier.watchdog_seconds:
            self._watchdog = LoopingCall(self._watchdog_beat)
            self._watchdog.clock = self._reactor
            self._watchdog.start(self._notifier.watchdog_seconds / 2, now=True)
        for slot in self.slots:
            self._spawn(slot)

    def _spawn(self, slot: _Slot) -> None:
        slot.restart_call = None
        if self._stopping:
            return
        listen = [sock.fd_for(slot.index) for sock in self._sockets]
        metrics = slot.metrics_socket.fileno() if slot.metrics_socket is not None else None
        worker = WorkerSockets(slot.index, tuple(listen), metrics, self._metrics_address(), os.getpid(),
                               tuple(self._listen), self._store)
        env = {name: value for name, value in self._environ.items()
               if not name.startswith(("LISTEN_", "WATCHDOG_", "NOTIFY_SOCKET"))}
        env[WORKER_ENVIRON] = worker.to_environ()
        env["NOTIFY_SOCKET"] = self._path(slot, "notify")
        if self._notifier is not None and self._notifier.watchdog_seconds:
            env["WATCHDOG_USEC"] = str(int(self._notifier.watchdog_seconds * 1e6))
        fds: dict[int, Any] = {0: 0, 1: 1, 2: 2}
        fds.update({fd: fd for fd in listen})
        if metrics is not None:
            fds[metrics] = metrics
        slot.ready = False
        slot.reload_pending = False  # it reads the file as it starts
        slot.started_at = self._reactor.seconds()
        slot.last_ping = slot.started_at
        slot.process = self._reactor.spawnProcess(
            _WorkerProcess(self, slot), self._argv[0], self._argv, env=env, childFDs=fds
        )
        slot.pid = slot.process.pid
        self._log.info("worker {index} started (pid {pid})", index=slot.index, pid=slot.pid)

    def _metrics_address(self) -> tuple[str, int] | None:
        port = getattr(self.metrics_listener, "port", None)
        address = port.getHost() if port is not None else None
        if isinstance(address, IPv4Address | IPv6Address):
            return (address.host, address.port)
        return None

    # -- what workers say ------------------------------------------------

    def _notified(self, slot: _Slot, line: str) -> None:
        if line == "READY=1" and slot.process is not None:
            slot.ready = slot.ever_ready = True
            slot.last_ping = self._reactor.seconds()
            self._log.info("worker {index} (pid {pid}) is ready", index=slot.index, pid=slot.pid)
            if slot.reload_pending:
                slot.reload_pending = False
                self._signal(slot, "HUP")
            if not self._all_ready and all(s.ever_ready for s in self.slots):
                self._all_ready = True
                self._log.info("ready: {count} workers", count=len(self.slots))
                if self._notifier is not None:
                    self._notifier.notify("READY=1")
                self.ready.callback(None)
        elif line == "WATCHDOG=1":
            slot.last_ping = self._reactor.seconds()

    def _watchdog_beat(self) -> None:
        assert self._notifier is not None and self._notifier.watchdog_seconds
        now = self._reactor.seconds()
        for slot in self.slots:
            if slot.ready and slot.process is not None and now - slot.last_ping > self._notifier.watchdog_seconds:
                self._log.error("worker {index} (pid {pid}) missed its watchdog: killing it",
                                index=slot.index, pid=slot.pid)
                self._signal(slot, "KILL")
        self._notifier.notify("WATCHDOG=1")

    def _ended(self, slot: _Slot, reason: Failure) -> None:
        how = _how(reason)
        pid, slot.process, slot.pid = slot.pid, None, None
        slot.ready = False
        if self._stopping:
            self._log.info("worker {index} (pid {pid}) {how}", index=slot.index, pid=pid, how=how)
            if all(s.process is None for s in self.slots) and self._exited is not None:
                self._exited.callback(None)
            return
        if not slot.ever_ready:
            self._log.error("worker {index} (pid {pid}) {how} before it was ready: stopping",
                            index=slot.index, pid=pid, how=how)
            self.failed = True
            if self._reactor.running:
                self._reactor.stop()
            return
        now = self._reactor.seconds()
        if now - slot.started_at >= STABLE_SECONDS:
            slot.failures = 0
        delay = 0.0 if slot.failures == 0 else min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (slot.failures - 1))
        slot.failures += 1
        slot.restarts += 1
        self._log.warn("worker {index} (pid {pid}) {how}: restarting it in {delay}s",
                       index=slot.index, pid=pid, how=how, delay=delay)
        slot.restart_call = self._reactor.callLater(delay, self._spawn, slot)

    # -- signals and stop ------------------------------------------------

    def _signal(self, slot: _Slot, name: str) -> None:
        if slot.process is not None:
            try:
                slot.process.signalProcess(name)
            except Exception as error:  # ProcessExitedAlready, OSError: it is ending anyway
                self._log.debug("signal {name} to {pid}: {error}", name=name, pid=slot.pid, error=error)

    def _on_hup(self, number: int, frame: FrameType | None) -> None:
        self._reactor.callFromThread(self.reload)

    def reload(self) -> None:
        """Pass SIGHUP on to every worker (each re-reads the configuration file)."""
        self._log.info("reload: passing SIGHUP to {count} workers", count=len(self.slots))
        for slot in self.slots:
            if slot.ready:
                self._signal(slot, "HUP")
            elif slot.process is not None:
                # Its handler may not be installed yet: SIGHUP would end it.
                slot.reload_pending = True

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._stopping = True
        if self._notifier is not None:
            self._notifier.notify("STOPPING=1")
        if self._watchdog is not None and self._watchdog.running:
            self._watchdog.stop()
        if self._previous_hup is not None:
            signal.signal(signal.SIGHUP, self._previous_hup)
            self._previous_hup = None
        for slot in self.slots:
            if slot.restart_call is not None and slot.restart_call.active():
                slot.restart_call.cancel()
            slot.restart_call = None
        self._exited = Deferred()
        if all(slot.process is None for slot in self.slots):
            self._exited.callback(None)
        else:
            self._log.info("stopping {count} workers", count=sum(s.process is not None for s in self.slots))
            for slot in self.slots:
                self._signal(slot, "TERM")
            late = self._reactor.callLater(self._grace + KILL_AFTER_GRACE, self._kill_all)
            self._exited.addBoth(lambda result: late.cancel() if late.active() else None)
        return self._exited.addBoth(self._close)

    def _kill_all(self) -> None:
        for slot in self.slots:
            if slot.process is not None:
                self._log.error("worker {index} (pid {pid}) did not stop in time: killing it",
                                index=slot.index, pid=slot.pid)
                self._signal(slot, "KILL")

    def _close(self, result: object) -> None:
        for sock in self._sockets:
            sock.close()
        for slot in self.slots:
            if slot.notify_port is not None:
                slot.notify_port.stopListening()
            if slot.metrics_socket is not None:
                slot.metrics_socket.close()
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
        if self._notifier is not None:
            self._notifier.close()

    # -- metrics ---------------------------------------------------------

    def scrape(self) -> Deferred[bytes]:
        """
        :return: every worker's metrics in one exposition (:func:`merge_metrics`).

        Scrapes that come while one is under way share its answer: however
        many clients scrape at once, the parent reads each worker once at a
        time (at most ``MAX_METRICS_BYTES`` each) and merges once, so a flood
        of scrapes costs it no more memory than one.  (An answer is then at
        most ``SCRAPE_TIMEOUT`` older than the request.)
        """
        waiter: Deferred[bytes] = Deferred()
        self._scrapes.append(waiter)
        if len(self._scrapes) == 1:
            self.read_workers().addCallback(lambda scraped: merge_metrics(self, scraped)).addBoth(self._scraped)
        return waiter

    def _scraped(self, result: bytes | Failure) -> None:
        waiters, self._scrapes = self._scrapes, []
        for waiter in waiters:
            if waiter.called:
                continue
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)

    def read_workers(self) -> Deferred[list[tuple[int, str | None]]]:
        """:return: each worker's index and metrics text (``None``: it did not answer)."""

        def one(slot: _Slot) -> Deferred[tuple[int, str | None]]:
            if slot.process is None:
                return succeed((slot.index, None))
            endpoint = UNIXClientEndpoint(self._reactor, self._path(slot, "metrics"), timeout=SCRAPE_TIMEOUT)
            fetch = _MetricsFetch()
            d = connectProtocol(endpoint, fetch).addCallback(lambda _: fetch.done)
            d.addTimeout(SCRAPE_TIMEOUT, self._reactor)
            return d.addCallbacks(lambda text: (slot.index, text), lambda failure: (slot.index, None))

        return DeferredList([one(slot) for slot in self.slots]).addCallback(
            lambda results: [value for _, value in results]
        )


class _MetricsFetch(Protocol):
    """``GET /metrics`` in HTTP/1.0 on a worker's private socket: the body, once the worker closes."""

    def __init__(self) -> None:
        self._received: list[bytes] = []
        self._size = 0
        # Cancelled (the scrape's timeout): hang up, rather than hold the
        # connection until a worker that does not answer does.
        self.done: Deferred[str] = Deferred(lambda _: self.transport.abortConnection())  # type: ignore[union-attr]

    def connectionMade(self) -> None:  # noqa: N802
        self.transport.write(b"GET /metrics HTTP/1.0\r\n\r\n")  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self._size += len(data)
        if self._size > MAX_METRICS_BYTES:
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        self._received.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        head, _, body = b"".join(self._received).partition(b"\r\n\r\n")
        # HTTP/1.0 ends the body with the connection: a worker that died as it
        # wrote would pass for one with fewer samples, but for its Content-Length.
        length = re.search(rb"\r\ncontent-length: *(\d+)", head, re.IGNORECASE)
        if (
            self._size > MAX_METRICS_BYTES
            or head.split(b" ")[1:2] != [b"200"]
            or (length is not None and int(length.group(1)) != len(body))
        ):
            self.done.errback(ValueError("no metrics"))
        else:
            self.done.callback(body.decode("utf-8"))


def _how(reason: Failure) -> str:
    if isinstance(reason.value, ProcessDone):
        return "exited with status 0"
    signal_number = getattr(reason.value, "signal", None)
    if signal_number:
        return f"was killed by signal {signal_number}"
    return f"exited with status {getattr(reason.value, 'exitCode', '?')}"


class _Merged(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Any:
        return iter(self._families)


def merge_metrics(parent: WorkerParent, scraped: list[tuple[int, str | None]]) -> bytes:
    """
    :return: every worker's metrics in one exposition, each sample labelled
        with its ``worker``, and ``rexecpf_worker_up``/``rexecpf_worker_restarts``.
    """
    families: dict[str, Metric] = {}
    up = Metric("rexecpf_worker_up", "Whether the worker answered this scrape.", "gauge")
    restarts = Metric("rexecpf_worker_restarts", "Times the worker was started again after it died.", "counter")
    for index, text in scraped:
        worker = str(index)
        try:
            parsed = list(text_string_to_metric_families(text or ""))
        except ValueError:
            # Cut short (the worker died as it answered): it did not answer,
            # and the scrape is still answered with the others.
            parsed, text = [], None
        up.add_sample("rexecpf_worker_up", {"worker": worker}, 0.0 if text is None else 1.0)
        restarts.add_sample("rexecpf_worker_restarts_total", {"worker": worker},
                            float(parent.slots[index].restarts))
        for family in parsed:
            merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            for sample in family.samples:
                merged.add_sample(sample.name, {**sample.labels, "worker": worker}, sample.value,
                                  sample.timestamp)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged([*families.values(), up, restarts]))
    return generate_latest(registry)


class WorkersMetricsResource(Resource):
    """``metrics_listen`` under ``--workers``: ``/metrics`` of every worker, labelled."""

    isLeaf = True

    def __init__(self, parent: WorkerParent) -> None:
        super().__init__()
        self._parent = parent

    def render_GET(self, request: IRequest) -> Any:
        if request.path != b"/metrics":
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"not found: see /metrics\n"

        def answer(exposition: bytes) -> None:
            request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
            request.write(exposition)
            request.finish()

        finished: Deferred[None] = request.notifyFinish()  # type: ignore[attr-defined]
        finished.addErrback(lambda _: None)
        self._parent.scrape().addCallback(answer).addErrback(
            lambda failure: None if finished.called else Logger().failure("metrics", failure)
        )
        return server.NOT_DONE_YET


def die_with_parent(parent_pid: int) -> None:
    """
    In a worker: be sent SIGTERM if the parent dies (Linux ``PR_SET_PDEATHSIG``),
    so that a parent killed with SIGKILL leaves no worker behind.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before prctl: nobody will send it
        os.kill(os.getpid(), signal.SIGTERM)


def ignore_stop_signals() -> None:
    """In a worker that is stopping: ignore SIGTERM and SIGINT from now on."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
