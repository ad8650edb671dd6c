# -*- test-case-name: tests.test_docker_backend,tests.test_docker_runtime,tests.test_backends -*-
"""
The Docker backend: containers of a Docker engine.

Two layers:

- :class:`IDockerRuntime` is the seam around the engine.  :class:`DockerRuntime`
  implements it with the docker SDK, whose blocking calls run on a
  :class:`~twisted.python.threadpool.ThreadPool` owned by the runtime (a
  Service: the pool starts and stops with it), never on the reactor thread.
  ``docker.errors.NotFound`` becomes ``None`` and every other SDK, HTTP or
  socket failure becomes ``APIError`` 503 (Backend unavailable) right here, so
  nothing above this module sees SDK types.  :class:`rexecpf.testing.FakeDockerRuntime`
  is the in-memory twin; ``tests/test_docker_runtime.py`` runs one behavioural
  suite against both.
- :class:`DockerBackend` is the :class:`~rexecpf.backends.IContainerBackend`:
  it turns engine records into :class:`~rexecpf.model.Container`, caches
  inspections briefly, follows the engine's event stream and reconnects to it
  with backoff, and triggers a reconcile of every forward periodically and
  each time the stream (re)connects.

Container ids.  A container is addressed by its full id, a unique prefix of
it (the short id) or its name, as Docker resolves them.  The backend answers
with the **full id** in :attr:`Container.id`, and :class:`ForwardService`
stores and reports forwards under that canonical id, whatever form was used
in the URL: the per-container limit and the one-forward-per-port rule then
hold however the container is named, a forward follows its container (not a
name that a later container may take), and the stopped events, which carry
full ids, reap exactly the right forwards.  So a forward created through
``/api/containers/web/port-forwards`` answers ``"container_id": "3f1c...(64
hex)"``, and can be listed, read and deleted through either form.  A
reference that is ambiguous (a prefix of several ids) or that is not a valid
Docker name or id is "not found".

Container state.  Running is what Docker says (``State.Running``).  The owner
is the value of the ``owner_label`` label (absent or empty: no owner, so only
admins see it).  The address is the IP on ``network`` if configured, else
the first network (in the engine's order) with an IP; a running container
with no such address counts as not running, with a detail saying why.

Events.  The stream of container events is read on a pool thread and each
event is delivered to the reactor with ``callFromThread``.  ``die``, ``stop``
and ``destroy`` announce the container as stopped (``kill`` is followed by
``die`` when it kills).  Any container event drops the cached inspection of
that container.  When the stream breaks (the engine restarts), the cache is
dropped and the backend reconnects with exponential backoff (0.25 s up to
5 s); each (re)connection triggers a reconcile, which catches whatever
happened while the stream was down.  While the engine cannot answer,
``inspect`` and ``check`` fail with 503 and nothing else happens: a
reconcile skips containers it cannot inspect.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Mapping
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorFromThreads, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import Attribute, Interface, implementer

from rexecpf.backends import IContainerBackend, StoppedCallback
from rexecpf.model import BACKEND_UNAVAILABLE, APIError, Container

__all__ = [
    "ContainerEvent",
    "DockerBackend",
    "DockerContainer",
    "DockerRuntime",
    "IDockerRuntime",
    "IEventWatch",
    "STOPPED_ACTIONS",
    "is_reference",
    "to_container",
]

#: Event actions after which a container no longer runs.
STOPPED_ACTIONS = frozenset({"die", "stop", "destroy"})

#: A Docker container name or (a prefix of) an id.  Anything else is never
#: sent to the engine: it cannot name a container.
_REFERENCE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,254}\Z")

#: How long an inspection is reused (events drop it sooner).
CACHE_SECONDS = 1.0
#: Reconnection backoff for the event stream.
BACKOFF_FIRST = 0.25
BACKOFF_MAX = 5.0


def is_reference(text: str) -> bool:
    """:return: whether ``text`` could name a Docker container."""
    return bool(_REFERENCE.match(text))


@attrs.frozen
class DockerContainer:
    """What the engine says of a container (the part rexecpf uses)."""

    #: the full (64 hex digit) id
    id: str
    #: without the leading ``/``
    name: str
    running: bool
    #: ``State.Status``: created, running, paused, restarting, exited, dead...
    status: str
    labels: Mapping[str, str] = attrs.field(factory=dict)
    #: ``(network name, IP address)`` in the engine's order; the IP may be ""
    networks: tuple[tuple[str, str], ...] = ()
    network_mode: str = ""


@attrs.frozen
class ContainerEvent:
    """One event of the engine's stream about a container."""

    #: die, stop, destroy, start, create, rename, connect, disconnect...
    action: str
    #: the full id
    container_id: str
    #: the container's name, when the event tells it
    name: str = ""


class IEventWatch(Interface):
    """A running subscription to the engine's container events."""

    ended = Attribute(
        "A Deferred that fires with None when the stream ends, because "
        "``stop()`` was called or because the engine closed it; it fails "
        "with APIError 503 when the stream could not be opened or broke."
    )

    def stop() -> None:
        """End the subscription promptly; ``ended`` fires soon after."""


class IDockerRuntime(Interface):
    """The Docker engine, as rexecpf needs it."""

    def inspect(reference: str) -> Deferred[DockerContainer | None]:
        """
        :param reference: a full id, a unique id prefix, or a name.
        :return: a Deferred firing with the container, or with ``None``
            when no single container has that reference; failing with
            ``APIError`` 503 when the engine cannot answer.
        """

    def ping() -> Deferred[None]:
        """
        :return: a Deferred firing with ``None`` when the engine answers;
            failing with ``APIError`` 503 otherwise.
        """

    def watch(
        deliver: Callable[[ContainerEvent], object], connected: Callable[[], object]
    ) -> IEventWatch:
        """
        Follow the engine's container events: ``connected()`` is called (on
        the reactor thread) once the stream is open, then ``deliver(event)``
        for each event, in order.

        :return: the subscription.
        """


def to_container(info: DockerContainer, network: str, owner_label: str) -> Container:
    """
    :param info: what the engine says.
    :param network: the network whose IP is the address, or ``""`` for the
        first network that has one.
    :param owner_label: the label holding the owner.
    :return: the container as rexecpf sees it.
    """
    owner = info.labels.get(owner_label) or None
    if not info.running:
        return Container(info.id, owner, None, False, f"its state is {info.status!r}")
    addresses = dict(info.networks)
    if network:
        address = addresses.get(network, "")
        if not address:
            detail = (
                f"it has no IP address on network {network!r}"
                if network in addresses
                else f"it is not attached to network {network!r}"
            )
            return Container(info.id, owner, None, False, detail)
        return Container(info.id, owner, address, True)
    for _name, address in info.networks:
        if address:
            return Container(info.id, owner, address, True)
    mode = f" (network mode {info.network_mode!r})" if info.network_mode else ""
    return Container(info.id, owner, None, False, f"it has no IP address on any network{mode}")


# ---------------------------------------------------------------- the SDK side


def _describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    text = text[:200]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def parse_inspection(data: Mapping[str, Any]) -> DockerContainer:
    """:return: the record of ``docker inspect`` output (the Engine API's JSON)."""
    state = data.get("State") or {}
    config = data.get("Config") or {}
    settings = data.get("NetworkSettings") or {}
    networks: list[tuple[str, str]] = []
    for name, endpoint in (settings.get("Networks") or {}).items():
        endpoint = endpoint or {}
        networks.append(
            (name, endpoint.get("IPAddress") or endpoint.get("GlobalIPv6Address") or "")
        )
    if not networks and settings.get("IPAddress"):
        networks.append(("", settings["IPAddress"]))
    return DockerContainer(
        id=data["Id"],
        name=(data.get("Name") or "").lstrip("/"),
        running=bool(state.get("Running")),
        status=str(state.get("Status") or ("running" if state.get("Running") else "unknown")),
        labels=dict(config.get("Labels") or {}),
        networks=tuple(networks),
        network_mode=str((data.get("HostConfig") or {}).get("NetworkMode") or ""),
    )


def parse_event(data: Mapping[str, Any]) -> ContainerEvent | None:
    """:return: the event of one JSON object of the engine's stream, if it is about a container."""
    kind = data.get("Type")
    actor = data.get("Actor") or {}
    attributes = actor.get("Attributes") or {}
    action = str(data.get("Action") or data.get("status") or "")
    if kind == "container":
        cid = actor.get("ID") or data.get("id")
        if not cid:
            return None
        # exec_start: sh -c ... and health_status: healthy carry a suffix
        return ContainerEvent(action.split(":", 1)[0], str(cid), str(attributes.get("name", "")))
    if kind == "network" and attributes.get("container"):
        return ContainerEvent(f"network-{action}", str(attributes["container"]))
    return None


@implementer(IEventWatch)
class _StreamWatch:
    """A subscription whose stream is read on a pool thread."""

    def __init__(self) -> None:
        self.ended: Deferred[None] = Deferred()
        self._lock = threading.Lock()
        self._stream: Any = None
        self.stopped = False

    def attach(self, stream: Any) -> bool:
        """(pool thread) :return: whether to read ``stream`` (not stopped meanwhile)."""
        with self._lock:
            if self.stopped:
                return False
            self._stream = stream
            return True

    def stop(self) -> None:
        with self._lock:
            self.stopped = True
            stream, self._stream = self._stream, None
        if stream is not None:
            _close_stream(stream)


def _close_stream(stream: Any) -> None:
    """Close a streaming response from any thread, waking its reader."""
    try:
        stream.close()  # docker's CancellableStream: shuts the socket down
    except Exception:
        try:
            stream._response.close()
        except Exception:
            pass


@implementer(IDockerRuntime)
class DockerRuntime(Service):
    """
    The Docker engine through the docker SDK, on a thread pool owned by this
    service.

    :param reactor: delivers results back to the reactor thread.
    :param url: the engine's address (``unix:///var/run/docker.sock``,
        ``tcp://host:2375``...).
    :param timeout: seconds for each (non-streaming) engine call.
    :param client_factory: ``(base_url, timeout) -> docker.DockerClient``
        (injected for tests).
    """

    _log = Logger()

    def __init__(
        self,
        reactor: IReactorFromThreads,
        url: str,
        timeout: float = 10.0,
        client_factory: Callable[[str, float], Any] | None = None,
        max_threads: int = 8,
    ) -> None:
        self._reactor = reactor
        self.url = url
        self._timeout = timeout
        self._client_factory = client_factory or _docker_client
        self._pool = ThreadPool(minthreads=0, maxthreads=max_threads, name="rexecpf-docker")
        self._lock = threading.Lock()
        self._client: Any = None
        self._watches: set[_StreamWatch] = set()

    def startService(self) -> None:
        super().startService()
        self._pool.start()

    def stopService(self) -> Deferred[None] | None:
        for watch in list(self._watches):
            watch.stop()
        # Every watch's reader wakes at once; calls in flight end within
        # ``timeout``.
        self._pool.stop()
        self._reset_client()
        return super().stopService()

    # --- the client, shared by the pool's threads

    def _get_client(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = self._client_factory(self.url, self._timeout)
            return self._client

    def _reset_client(self, broken: Any = None) -> None:
        with self._lock:
            if broken is not None and self._client is not broken:
                return
            client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:
                pass

    def _call(self, operation: Callable[[Any], Any]) -> Any:
        """
        (pool thread) Run ``operation(client)``; after a connection failure
        (the engine restarted: a pooled connection is dead) try once more
        with a new client.

        :raises APIError: 503 when the engine cannot answer.
        """
        import docker.errors
        import requests.exceptions

        last: BaseException | None = None
        for _attempt in range(2):
            client = None
            try:
                client = self._get_client()
                return operation(client)
            except docker.errors.APIError as error:
                # The engine answered (with an error): not a connection problem.
                raise BACKEND_UNAVAILABLE(f"the Docker engine failed: {_describe(error)}") from None
            except (docker.errors.DockerException, requests.exceptions.RequestException, OSError) as error:
                last = error
                self._reset_client(client)
        assert last is not None
        raise BACKEND_UNAVAILABLE(f"the Docker engine does not answer: {_describe(last)}")

    def _run(self, function: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return deferToThreadPool(self._reactor, self._pool, function, *args)  # type: ignore[arg-type]

    # --- IDockerRuntime

    def inspect(self, reference: str) -> Deferred[DockerContainer | None]:
        if not is_reference(reference):
            return succeed(None)
        return self._run(self._inspect, reference)

    def _inspect(self, reference: str) -> DockerContainer | None:
        import docker.errors

        def operation(client: Any) -> DockerContainer | None:
            try:
                data = client.api.inspect_container(reference)
            except docker.errors.NotFound:
                return None
            except docker.errors.APIError as error:
                # 400: an ambiguous prefix ("multiple IDs found").  It names
                # no single container.
                if error.status_code is not None and 400 <= error.status_code < 500:
                    return None
                raise
            return parse_inspection(data)

        return self._call(operation)  # type: ignore[no-any-return]

    def ping(self) -> Deferred[None]:
        return self._run(self._call, lambda client: client.ping() and None)

    def watch(
        self, deliver: Callable[[ContainerEvent], object], connected: Callable[[], object]
    ) -> IEventWatch:
        watch = _StreamWatch()
        self._watches.add(watch)

        def finished(result: Any) -> Any:
            self._watches.discard(watch)
            if isinstance(result, Failure) and not watch.stopped:
                watch.ended.errback(result)
            else:
                watch.ended.callback(None)

        self._run(self._follow, watch, deliver, connected).addBoth(finished)
        return watch

    def _follow(
        self,
        watch: _StreamWatch,
        deliver: Callable[[ContainerEvent], object],
        connected: Callable[[], object],
    ) -> None:
        """(pool thread) Read the event stream until it ends or is stopped."""
        import requests.exceptions
        import urllib3.exceptions

        def open_stream(client: Any) -> Any:
            return client.events(decode=True, filters={"type": ["container", "network"]})

        stream = self._call(open_stream)
        if not watch.attach(stream):
            _close_stream(stream)
            return
        self._reactor.callFromThread(connected)
        try:
            for data in stream:
                event = parse_event(data)
                if event is not None:
                    self._reactor.callFromThread(deliver, event)
        except (
            requests.exceptions.RequestException,
            urllib3.exceptions.HTTPError,
            OSError,
            ValueError,
        ) as error:
            if watch.stopped:
                return
            self._reset_client()
            raise BACKEND_UNAVAILABLE(f"the Docker event stream broke: {_describe(error)}") from None
        if not watch.stopped:
            # The engine closed the stream: it is going away.  Its pooled
            # connections go with it.
            self._reset_client()


def _docker_client(url: str, timeout: float) -> Any:
    import docker

    # version "auto" asks the engine (so this fails while it is down, and is
    # retried on the next call).
    return docker.DockerClient(base_url=url, timeout=int(timeout) or 1, version="auto")


# ---------------------------------------------------------------- the backend


@implementer(IContainerBackend)
class DockerBackend(Service):
    """
    :param clock: drives the cache, the reconnection backoff and the
        periodic reconcile.
    :param runtime: the engine.
    :param network: ``[backend] network``.
    :param owner_label: ``[backend] owner_label``.
    :param reconcile_seconds: how often to call the reconciler (``None``:
        never periodically, as for an engine of
        :class:`~rexecpf.backends.engines.DockerEngines`, which runs one
        periodic reconcile for all its engines).
    """

    _log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        runtime: IDockerRuntime,
        network: str = "",
        owner_label: str = "rexecpf.owner",
        reconcile_seconds: float | None = 30.0,
    ) -> None:
        self._clock = clock
        self._runtime = runtime
        self._network = network
        self._owner_label = owner_label
        self._reconcile_seconds = reconcile_seconds
        self._subscribers: list[StoppedCallback] = []
        #: reference -> (expiry, container)
        self._cache: dict[str, tuple[float, Container]] = {}
        #: full id -> the references whose inspection is cached
        self._references: dict[str, set[str]] = {}
        self._generation = 0
        self._inflight: dict[str, list[Deferred[Container | None]]] = {}
        self._watch: IEventWatch | None = None
        #: identifies the current watch (the one whose news counts)
        self._token: object | None = None
        self._retry: IDelayedCall | None = None
        self._backoff = BACKOFF_FIRST
        self._reconciler: Callable[[], Deferred[Any]] | None = None
        self._reconcile_runs = OneRunAtATime(self._log, lambda: bool(self.running))
        self._periodic = LoopingCall(self.reconcile)
        self._periodic.clock = clock
        #: whether the event stream is open now
        self.connected = False

    # --- lifecycle

    def set_reconciler(self, reconciler: Callable[[], Deferred[Any]]) -> None:
        """
        :param reconciler: called every ``reconcile_seconds`` and whenever the
            event stream (re)connects, e.g. ``ForwardService.reconcile``.
        """
        self._reconciler = reconciler

    def startService(self) -> None:
        super().startService()
        self._connect()
        if self._reconcile_seconds is not None:
            self._periodic.start(self._reconcile_seconds, now=False)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self._periodic.running:
            self._periodic.stop()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        watch, self._watch, self._token = self._watch, None, None
        self.connected = False
        if watch is not None:
            watch.stop()
            return watch.ended.addErrback(lambda _: None)
        return None

    def _connect(self) -> None:
        self._retry = None
        if not self.running:
            return
        token = object()
        self._token = token
        watch = self._runtime.watch(self._event, lambda: self._connected(token))
        if self._token is token:
            self._watch = watch
        watch.ended.addBoth(self._ended, token)

    def _connected(self, token: object) -> None:
        if token is not self._token:
            return
        self._log.info("following the Docker engine's events")
        self.connected = True
        self._backoff = BACKOFF_FIRST
        self._forget_all()
        self.reconcile()

    def _ended(self, result: Any, token: object) -> None:
        if token is not self._token:
            return
        self._token = None
        self._watch = None
        self.connected = False
        self._forget_all()
        if not self.running:
            return
        why = result.value.detail if isinstance(result, Failure) and isinstance(result.value, APIError) else (
            result.getErrorMessage() if isinstance(result, Failure) else "the engine closed it"
        )
        if isinstance(result, Failure) and not isinstance(result.value, APIError):
            self._log.failure("the Docker event stream failed", result)
        self._log.warn(
            "Docker event stream down ({why}); reconnecting in {delay}s", why=why, delay=self._backoff
        )
        self._retry = self._clock.callLater(self._backoff, self._connect)
        self._backoff = min(self._backoff * 2, BACKOFF_MAX)

    # --- reconcile

    def reconcile(self) -> Deferred[Any] | None:
        """
        Call the reconciler now (once at a time: a request during a run
        starts one more run after it).

        :return: a Deferred that fires when the run ends, or None when there
            is no reconciler.
        """
        if self._reconciler is None:
            return None
        return self._reconcile_runs(self._reconciler)

    # --- events

    def _event(self, event: ContainerEvent) -> None:
        self._generation += 1
        self._forget(event.container_id)
        if event.action == "create" or event.action == "rename":
            # a name may now belong to another container
            self._forget_names()
        if event.action in STOPPED_ACTIONS:
            self._log.info(
                "container {cid} {action}", cid=event.container_id[:12], action=event.action
            )
            for callback in list(self._subscribers):
                try:
                    callback(event.container_id)
                except Exception:
                    self._log.failure("a stopped-container subscriber failed")

    def _forget(self, container_id: str) -> None:
        for reference in self._references.pop(container_id, ()):
            self._cache.pop(reference, None)

    def _forget_names(self) -> None:
        for container_id, references in list(self._references.items()):
            for reference in list(references):
                if not container_id.startswith(reference):
                    references.discard(reference)
                    self._cache.pop(reference, None)

    def _forget_all(self) -> None:
        self._generation += 1
        self._cache.clear()
        self._references.clear()

    # --- IContainerBackend

    def subscribe(self, callback: StoppedCallback) -> None:
        self._subscribers.append(callback)

    def check(self) -> Deferred[None]:
        return self._runtime.ping()

    def inspect(self, container_id: str) -> Deferred[Container | None]:
        if not is_reference(container_id):
            return succeed(None)
        hit = self._cache.get(container_id)
        if hit is not None:
            if hit[0] > self._clock.seconds():
                return succeed(hit[1])
            del self._cache[container_id]
        waiting: Deferred[Container | None] = Deferred()
        if container_id in self._inflight:
            self._inflight[container_id].append(waiting)
            return waiting
        self._inflight[container_id] = [waiting]
        generation = self._generation

        def answered(info: DockerContainer | None) -> Container | None:
            if info is None:
                return None
            container = to_container(info, self._network, self._owner_label)
            if generation == self._generation and self.connected:
                # Only while events can tell us it changed.
                self._cache[container_id] = (self._clock.seconds() + CACHE_SECONDS, container)
                self._references.setdefault(container.id, set()).add(container_id)
            return container

        def deliver(result: Any) -> None:
            for waiter in self._inflight.pop(container_id, ()):
                if waiter.called:
                    continue  # cancelled by its caller
                if isinstance(result, Failure):
                    waiter.errback(result)
                else:
                    waiter.callback(result)

        self._runtime.inspect(container_id).addCallback(answered).addBoth(deliver)
        return waiting


class OneRunAtATime:
    """
    Runs a reconciler once at a time: a call during a run returns that run
    and starts one more after it (while ``keep_going()``), so that what
    changed during a run is not missed and runs never overlap.
    """

    def __init__(self, log: Logger, keep_going: Callable[[], bool]) -> None:
        self._log = log
        self._keep_going = keep_going
        self._running: Deferred[Any] | None = None
        self._again = False

    def __call__(self, function: Callable[[], Any]) -> Deferred[Any]:
        """:return: a Deferred that fires when the run ends (failures are logged)."""
        if self._running is not None:
            self._again = True
            return self._running
        self._again = False
        done = Deferred.fromCoroutine(_call_deferred(function))
        done.addErrback(lambda failure: self._log.failure("reconcile failed", failure))
        self._running = done

        def over(result: Any) -> Any:
            self._running = None
            if self._again and self._keep_going():
                self(function)
            return result

        done.addBoth(over)  # (at once, when the reconciler answered at once)
        return done


async def _call_deferred(function: Callable[[], Any]) -> Any:
    result = function()
    if isinstance(result, Deferred):
        result = await result
    return result

