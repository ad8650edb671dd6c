# -*- test-case-name: tests.test_tap -*-
"""
``twistd rexecpf``: command-line options and the service tree.

This is the only module that picks the global reactor.  Every start-up
failure a user can cause (a bad configuration file, an unusable state file,
an endpoint that cannot listen) ends the process with one line on stderr
and a non-zero status, never a traceback.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import importlib.abc
import os
import pwd
import re
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, cast

import attrs
from twisted.application.service import IServiceCollection, MultiService, Service
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.python.util import switchUID

from rexecpf.backends.docker import DockerBackend, DockerRuntime
from rexecpf.backends.engines import DockerEngines
from rexecpf.backends.static import StaticBackend, read_inventory
from rexecpf.config import (
    DEMO_CONTAINER,
    DEMO_TOKEN,
    Config,
    ConfigError,
    ServerConfig,
    demo_config,
    load_config,
    mask_url_password,
)
from rexecpf.feed import IChangeFeed, PostgresChangeFeed, SQLiteChangeFeed
from rexecpf.store import SQLiteForwardStore, open_sqlite_for_check

# twistd imports this module to read the options, before the configuration
# is known; so it imports only what imports neither the reactor nor
# twisted.internet.endpoints (which imports pyOpenSSL).  The service's own
# modules are imported in build(), after makeService() has decided whether
# the process needs TLS at all (see leave_out_tls); tests/test_imports.py
# keeps it so.
if TYPE_CHECKING:
    from rexecpf.api import API
    from rexecpf.auth import Authenticator
    from rexecpf.endpoints import OwnSockets
    from rexecpf.feed import ChangeFollower
    from rexecpf.forwards import ForwardService
    from rexecpf.listeners import LocalListeners
    from rexecpf.metrics import Metrics
    from rexecpf.ops import Notifier, Readiness, Reloader
    from rexecpf.proxy import ProxyService
    from rexecpf.web import RexecSite
    from rexecpf.workers import WorkerSockets

__all__ = ["Options", "makeService", "StartupError"]

_log = Logger()


#: The most ``--workers`` (more processes than cores only cost memory).
MAX_WORKERS = 256


class StartupError(SystemExit):
    """Ends start-up with one line on stderr and exit status 1."""

    def __init__(self, line: str) -> None:
        super().__init__(f"rexecpf: error: {line}")


class Options(usage.Options):
    """Options of ``twistd rexecpf``."""

    synopsis = "[--config FILE | --demo] [--listen ENDPOINT]... [--public-url URL] [--state PATH] [--workers N]"
    longdesc = (
        "Serve the rexecpf REST API, HTTP proxy and WebSocket tunnels.  "
        "Try: twistd -n rexecpf --demo"
    )
    optFlags = [
        ["demo", None, "Run the embedded demo: container 'demo' at 127.0.0.1, token 'demo-token'."],
    ]
    optParameters = [
        ["config", "c", None, "The configuration file (TOML)."],
        ["public-url", None, None, "Override [server] public_url."],
        ["state", None, None, "Override [server] state (the SQLite file)."],
        ["log-format", None, None, "Override [server] log_format: text or json (one JSON object a line)."],
        ["workers", None, 1, "Run N worker processes sharing the sockets and the store (needs --nodaemon).",
         int],
    ]

    #: twistd's log observer factory for ``log_format = "json"``.
    json_logger = "rexecpf.ops.json_log_observer"

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, endpoint: str) -> None:
        """Override [server] listen with this Twisted endpoint (repeatable)."""
        self["listen"].append(endpoint)

    def postOptions(self) -> None:
        if self["demo"] and self["config"]:
            raise usage.UsageError("give either --config or --demo, not both")
        if not self["demo"] and not self["config"]:
            raise usage.UsageError("a configuration file is required: --config FILE (or try --demo)")
        try:
            config = demo_config() if self["demo"] else load_config(self["config"])
            self["config_object"] = apply_overrides(config, self)
        except ConfigError as error:
            raise StartupError(str(error)) from None
        if self["log-format"] not in (None, "text", "json"):
            raise usage.UsageError("--log-format is text or json")
        if not 1 <= self["workers"] <= MAX_WORKERS:
            raise usage.UsageError(f"--workers is 1 to {MAX_WORKERS}")
        parent = getattr(self, "parent", None)
        if self["workers"] > 1 and parent is not None and not parent.get("nodaemon"):
            # The workers log to the parent's standard output, which a daemon closes.
            raise usage.UsageError("--workers needs --nodaemon (-n), as under systemd")
        if self["workers"] > 1 and parent is not None and (parent.get("uid") is not None or parent.get("gid") is not None):
            # The parent's private directory and sockets, made before twistd
            # drops privileges, would be root's: the workers could not reach them.
            raise usage.UsageError("--workers does not take twistd's --uid/--gid: start it as its user (systemd User=)")
        log_format = self["log-format"] or self["config_object"].server.log_format
        # twistd resolves its --logger option (a name) after this runs and
        # starts logging after that: JSON lines unless --logger was given.
        if log_format == "json" and parent is not None and not parent.get("logger"):
            parent["logger"] = self.json_logger


def with_backlog(description: str) -> str:
    """:return: a ``tcp:``/``tcp6:``/``ssl:``/``unix:`` server endpoint string with a ``backlog``."""
    from rexecpf.listeners import LISTEN_BACKLOG

    kind = description.partition(":")[0]
    if kind in ("tcp", "tcp6", "ssl", "unix") and "backlog=" not in description:
        return f"{description}:backlog={LISTEN_BACKLOG}"
    return description


def _url_of(endpoint: str) -> str | None:
    """
    :return: the ``http://`` URL a plain ``tcp:``/``tcp6:`` server endpoint
        string is reached at (the loopback address when it listens on every
        address), or ``None`` for any other kind of endpoint.
    """
    kind, _, rest = endpoint.partition(":")
    if kind not in ("tcp", "tcp6"):
        return None
    port = None
    interface = ""
    for part in re.split(r"(?<!\\):", rest):
        name, equals, value = part.replace("\\:", ":").partition("=")
        if not equals:
            port = port or name
        elif name == "port":
            port = value
        elif name == "interface":
            interface = value
    if port is None or not port.isdigit():
        return None
    if interface in ("", "0.0.0.0", "::"):
        interface = "127.0.0.1" if kind == "tcp" else "::1"
    host = f"[{interface}]" if ":" in interface else interface
    return f"http://{host}:{port}"


def apply_overrides(config: Config, options: Any) -> Config:
    """
    :return: ``config`` with ``--listen``, ``--public-url`` and ``--state`` applied.
    :raises ConfigError: when an override is not a valid value.
    """
    from rexecpf.config import parse_config

    server: dict[str, Any] = {}
    if options["listen"]:
        server["listen"] = list(options["listen"])
    if options["public-url"]:
        server["public_url"] = options["public-url"]
    elif options["listen"] and config.server.public_url == ServerConfig().public_url:
        # Left at its default, the public URL follows --listen, so that the
        # demo's curl line and the proxy_url/websocket_url it hands out work.
        derived = _url_of(options["listen"][0])
        if derived is not None:
            server["public_url"] = derived
    if options["state"]:
        server["state"] = options["state"]
    if not server:
        return config
    # Validate the overrides with the same rules as the file.
    checked = parse_config({"server": server}).server
    changes = {key: getattr(checked, key) for key in server}
    return attrs.evolve(config, server=attrs.evolve(config.server, **changes))


class EndpointListener(Service):
    """
    Listens on one endpoint while running.  Listening happens in
    ``privilegedStartService``, before the reactor runs, so a port in use
    ends start-up with one clear line.  The port is registered in
    ``own_sockets`` while it listens.
    """

    _log = Logger()

    def __init__(
        self,
        endpoint: IStreamServerEndpoint,
        factory: Any,
        description: str,
        own_sockets: OwnSockets | None = None,
    ) -> None:
        self._endpoint = endpoint
        self._own_sockets = own_sockets
        self._factory = factory
        self.description = description
        self.port: IListeningPort | None = None
        self.listening: Deferred[IListeningPort] | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self.listening = self._endpoint.listen(self._factory)
        failure: list[Failure] = []
        self.listening.addCallbacks(self._listening, failure.append)
        if failure:
            raise StartupError(f"cannot listen on {self.description}: {failure[0].getErrorMessage()}")

    def _listening(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        if self._own_sockets is not None:
            # No forward may lead here (read from the port: "tcp:0" gets a port).
            self._own_sockets.add(self, port)
        self._log.info("listening on {description}", description=self.description)
        return port

    def startService(self) -> None:
        if self.listening is None:
            self.privilegedStartService()
        super().startService()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            if self._own_sockets is not None:
                self._own_sockets.remove(self)
            return port.stopListening()  # type: ignore[no-any-return]
        return None


@attrs.define
class Components:
    """The parts of a running rexecpf, for tests and for later wiring."""

    config: Config
    service: MultiService
    forwards: ForwardService
    api: API
    site: RexecSite
    backend: Any
    store: Any
    authenticator: Authenticator
    metrics: Metrics
    readiness: Readiness
    reloader: Reloader
    listeners: list[EndpointListener]
    local_listeners: LocalListeners | None = None
    proxy: ProxyService | None = None
    follower: ChangeFollower | None = None


def build(
    config: Config,
    reactor: Any,
    config_path: str | None = None,
    notifier: Notifier | None = None,
    install_signals: bool = False,
    worker: WorkerSockets | None = None,
    user: tuple[int | None, int | None] | None = None,
) -> Components:
    """
    Build the service tree for ``config``.

    :param config_path: the file ``config`` came from, re-read on reload
        (``None`` for ``--demo``).
    :param notifier: where readiness is announced (``$NOTIFY_SOCKET``).
    :param install_signals: install the ``SIGHUP`` handler while running.
    :param worker: in a worker of ``--workers N``: the sockets it inherited
        (adopted in place of ``listen``; its metrics go to the parent).
    :param user: the ``(uid, gid)`` twistd switches to once the service is
        built (:func:`service_user`): the state file is opened as that user.
    :raises StartupError: for anything a user can fix (state file, endpoints).
    """
    if worker is not None and worker.store and worker.store != store_identity(config):
        # A worker started again reads the file again: it must share the
        # parent's store with the other workers.
        raise StartupError("server.state or store.url changed since rexecpf started: restart rexecpf to change them")
    store = _store(config, reactor, user)
    feed = _feed(config, reactor)
    try:
        return _assemble(config, reactor, store, feed, config_path, notifier, install_signals, worker)
    except BaseException:
        # In a running reactor (tests, --workers) the pools already have
        # threads, which would keep the process from exiting.
        store.close()
        feed.stop()
        raise


def _assemble(
    config: Config,
    reactor: Any,
    store: Any,
    feed: IChangeFeed,
    config_path: str | None,
    notifier: Notifier | None,
    install_signals: bool,
    worker: WorkerSockets | None,
) -> Components:
    """:func:`build` once the store and its change feed are open."""
    # Imported here, not at the top: see the comment there.
    from twisted.internet.endpoints import serverFromString

    from rexecpf.api import API, PublicURLs
    from rexecpf.auth import Authenticator
    from rexecpf.domains import DomainRules, TXTVerifier
    from rexecpf.endpoints import OwnSockets
    from rexecpf.feed import ChangeFollower, FeedHealth
    from rexecpf.forwards import ForwardService
    from rexecpf.http.ask import AskResource
    from rexecpf.listeners import LocalListeners
    from rexecpf.metrics import CountingBackend, Metrics, MetricsResource
    from rexecpf.ops import GracefulService, Readiness, Reloader, branch
    from rexecpf.proxy import HostRouter, ProxyResource, ProxyService
    from rexecpf.store import CachedCheck
    from rexecpf.tunnel import TunnelFactory, TunnelResource
    from rexecpf.web import Health, RexecSite, Root
    from rexecpf.workers import adopting_endpoint

    top = GracefulService(config.server.shutdown_grace_seconds, reactor)
    metrics = Metrics()

    backend: StaticBackend | DockerBackend | DockerEngines
    inventory: str | None = None
    if config.demo_inventory is not None:
        backend = StaticBackend(reactor, None, config.demo_inventory, config.limits.local_interface)
    elif config.backend.kind == "static":
        inventory = config.backend.inventory
        try:
            entries = read_inventory(inventory)
        except ConfigError as error:
            raise StartupError(str(error)) from None
        backend = StaticBackend(reactor, inventory, entries, config.limits.local_interface)
    else:
        backend = _docker_backend(config, reactor, top)
    backend.setServiceParent(top)
    counted = CountingBackend(backend, metrics)

    own_sockets = OwnSockets()
    domain_rules = DomainRules.from_config(
        config.auth.custom_domains,
        config.domains.verify,
        config.domains.per_forward,
        config.server.public_url,
        config.server.proxy_domain,
    )
    forwards = ForwardService(
        reactor,
        store,
        counted,
        config.limits,
        own_sockets=own_sockets,
        domain_rules=domain_rules,
        verifier=TXTVerifier.for_address(reactor, config.domains.resolver) if config.domains.verify else None,
    )
    forwards.setServiceParent(top)
    if isinstance(backend, DockerBackend | DockerEngines):
        # Every reconcile_seconds and whenever an event stream (re)connects.
        backend.set_reconciler(forwards.reconcile)
    metrics.observe_forwards(forwards)
    # Every node (or process sharing the SQLite file) hears of every other's
    # writes: it keeps their forwards, listens on their local_ports, and
    # closes what a delete or a reap elsewhere ends.
    follower = ChangeFollower(
        reactor,
        feed,
        forwards,
        resync_seconds=config.store.resync_seconds,
        grace_seconds=config.store.cut_off_grace_seconds,
    )
    follower.setServiceParent(top)

    authenticator = Authenticator(config.auth.users, config.auth.admins)
    urls = PublicURLs(config.server.public_url, config.server.proxy_domain)
    api = API(authenticator, forwards, urls)
    local_listeners = LocalListeners(reactor, forwards, config.limits, reuse_port=worker is not None)
    local_listeners.setServiceParent(top)
    tunnel = TunnelResource(TunnelFactory(reactor, authenticator, forwards, config.limits))
    proxy = ProxyService(
        reactor,
        authenticator,
        forwards,
        urls,
        session_key=lambda: store.secret("session"),
        session_seconds=config.auth.session_seconds,
        body_limit=config.limits.proxy_body_bytes,
        upgrade_rate=config.limits.tunnel_bytes_per_second,
        upgrade_idle=config.limits.tunnel_idle_seconds,
        metrics=metrics,
    )
    proxy.setServiceParent(top)
    # (Always: custom domains are routed with or without a proxy_domain.)
    host_router = HostRouter(proxy, config.server.proxy_domain)
    root = Root(
        api.resource(),
        Health(FeedHealth(follower, CachedCheck(reactor, store)), counted),
        proxy=ProxyResource(proxy),
        tunnel=tunnel,
        host_router=host_router,
    )
    # Request bodies over their limit are refused (413) while they arrive.
    site = RexecSite(
        root, proxy_body_bytes=config.limits.proxy_body_bytes, authenticate_api=authenticator.require
    )

    listeners = []
    # Under --workers, the first len(shared_endpoints(config)) are the
    # parent's sockets, in that order; metrics_listen is the parent's own.
    endpoints: list[tuple[str, Any, str]] = [(description, site, "server.listen") for description in config.server.listen]
    if config.tls.ask_listen:
        ask = AskResource(forwards.domain_claimed, reactor)
        endpoints.append((config.tls.ask_listen, RexecSite(ask), "tls.ask_listen"))
    if config.server.metrics_listen and worker is None:
        endpoints.append((config.server.metrics_listen, RexecSite(MetricsResource(metrics)), "server.metrics_listen"))
    if worker is not None and list(worker.endpoints) != shared_endpoints(config):
        # A worker started again reads the file again; the parent holds the
        # sockets of the endpoints it read at start-up.
        raise StartupError(
            f"server.listen or tls.ask_listen changed since rexecpf started (it listens on "
            f"{', '.join(worker.endpoints)}): restart rexecpf to change them"
        )
    certificates = _certificates(config)
    for index, (description, factory, key) in enumerate(endpoints):
        try:
            if certificates is not None and factory is site and description.startswith("ssl:"):
                from rexecpf.tls import sni_server_endpoint

                endpoint = sni_server_endpoint(
                    reactor, with_backlog(description), certificates,
                    tcp=worker.adopted(reactor, index) if worker is not None else None,
                )
            elif worker is not None:
                endpoint = worker.endpoint(reactor, index, with_backlog(description))
            else:
                endpoint = serverFromString(reactor, with_backlog(description))
        except (ValueError, TypeError, KeyError) as error:
            raise StartupError(f"{key}: {description!r} is not a valid endpoint: {error}") from None
        listener = EndpointListener(endpoint, factory, description, own_sockets)
        listener.setServiceParent(top)
        listeners.append(listener)
    if worker is not None and worker.metrics is not None:
        # The parent serves metrics_listen with every worker's metrics, read here.
        listener = EndpointListener(
            adopting_endpoint(reactor, worker.metrics, "unix:"), RexecSite(MetricsResource(metrics)),
            "the parent's metrics socket",
        )
        listener.setServiceParent(top)
        listeners.append(listener)
    if worker is not None and worker.metrics_address is not None:
        host, port = worker.metrics_address
        address = IPv6Address("TCP", host, port) if ":" in host else IPv4Address("TCP", host, port)
        own_sockets.add("metrics_listen", cast(IListeningPort, _Bound(address)))

    reloader = Reloader(
        reactor, config_path, authenticator, forwards, backend, inventory, install_signals,
        also=[certificates.load] if certificates is not None else [],
    )
    reloader.setServiceParent(top)

    def listening(listener: EndpointListener) -> Deferred[Any]:
        assert listener.listening is not None
        return branch(listener.listening).addCallback(
            lambda _: listener.port if listener.port is not None else _not_listening(listener)
        )

    waits: list[Any] = [(lambda listener=listener: listening(listener)) for listener in listeners]
    waits += [store.check, counted.check, lambda: branch(forwards.ready), follower.check]
    readiness = Readiness(reactor, notifier, waits)
    readiness.setServiceParent(top)
    top.stop_order([readiness, follower, *listeners, local_listeners], forwards, store)

    return Components(
        config, top, forwards, api, site, backend, store, authenticator, metrics, readiness, reloader,
        listeners, local_listeners, proxy, follower,
    )


def _certificates(config: Config) -> Any:
    """
    :return: the :class:`rexecpf.tls.CertificateDirectory` of ``[tls]
        certificates``, loaded, or ``None`` when it is not set (then no TLS
        module is imported).
    """
    if not config.tls.certificates:
        return None
    from rexecpf.tls import CertificateDirectory

    path = config.tls.certificates
    if not os.path.isdir(path) or not os.access(path, os.R_OK | os.X_OK):
        raise StartupError(f"tls.certificates: {path} is not a directory rexecpf can read")
    if not any(description.startswith("ssl:") for description in config.server.listen):
        _log.warn("tls.certificates: no ssl: endpoint in server.listen serves them")
    certificates = CertificateDirectory(path)
    certificates.load()
    return certificates


def _feed(config: Config, reactor: Any) -> IChangeFeed:
    """:return: the change feed of the store ``config`` names (see :func:`_store`)."""
    if config.store.url:
        return PostgresChangeFeed(reactor, config.store.url)
    return SQLiteChangeFeed(reactor, reactor, config.server.state)


def _store(config: Config, reactor: Any, user: tuple[int | None, int | None] | None = None) -> Any:
    """
    :return: the store ``config`` names: PostgreSQL at ``[store] url``, else
        SQLite at ``[server] state``, opened once first (:func:`_open_store`).
    """
    _open_store(config, user)
    if not config.store.url:
        _log.info("store: SQLite at {state}", state=config.server.state)
        return SQLiteForwardStore(reactor, config.server.state)
    from rexecpf.postgres import PostgresForwardStore

    _log.info("store: PostgreSQL at {url}", url=mask_url_password(config.store.url))
    return PostgresForwardStore(reactor, config.store.url)


def store_identity(config: Config) -> str:
    """:return: a digest naming the store ``config`` names (no password in it)."""
    return hashlib.sha256((config.store.url or f"sqlite:{config.server.state}").encode()).hexdigest()


def _open_store(config: Config, user: tuple[int | None, int | None] | None = None) -> None:
    """
    Open the store ``config`` names once, synchronously, creating or
    migrating its schema, so that a store that cannot be used stops
    start-up with one line (the password masked).  The parent of
    ``--workers`` does it before starting them: workers that all created a
    new SQLite file at once could find it locked.

    :param user: the ``(uid, gid)`` the process will run as
        (:func:`service_user`): a SQLite file is opened, or created, as that
        user, so that it is theirs and one they cannot use fails here.
    """
    url = config.store.url
    if not url:
        state = config.server.state
        as_whom = "" if user is None else " as " + ", ".join(
            f"{kind} {value}" for kind, value in zip(("uid", "gid"), user, strict=True) if value is not None
        ) + " (twistd --uid/--gid)"
        try:
            with acting_as(user):
                open_sqlite_for_check(state)
        except Exception as error:  # sqlite3.Error, OSError, RuntimeError: all user-fixable
            raise StartupError(f"server.state: cannot use {state}{as_whom}: {error}") from None
        return
    shown = mask_url_password(url)
    try:
        from rexecpf.postgres import open_postgres_for_check, redact
    except ImportError as error:
        raise StartupError(f"store.url: PostgreSQL needs psycopg (pip install 'psycopg[binary]'): {error}") from None
    try:
        open_postgres_for_check(url)
    except Exception as error:  # ValueError, psycopg.Error, RuntimeError: all user-fixable
        raise StartupError(f"store.url: cannot use {shown}: {redact(str(error), url)}") from None


def service_user(options: Any) -> tuple[int | None, int | None] | None:
    """
    :param options: the parsed ``rexecpf`` options (their ``parent`` is
        twistd's).
    :return: ``(uid, gid)`` that twistd switches to once the service is
        built (``--uid``/``--gid``; the user's own group when only ``--uid``
        is given, as twistd does), when the process runs as root and was
        given either; else ``None``.
    """
    parent = getattr(options, "parent", None)
    if parent is None or os.geteuid() != 0:
        return None
    uid, gid = parent.get("uid"), parent.get("gid")
    if uid is None and gid is None:
        return None
    if uid is not None and gid is None:
        gid = pwd.getpwuid(uid).pw_gid
    if not uid and not gid:
        return None  # root, as it is
    return uid, gid


@contextlib.contextmanager
def acting_as(user: tuple[int | None, int | None] | None) -> Iterator[None]:
    """
    Run the block with the effective uid, gid and groups that ``user``
    (:func:`service_user`) will have once twistd drops privileges, then be
    root again; nothing when ``user`` is ``None``.
    """
    if user is None:
        yield
        return
    egid, groups = os.getegid(), os.getgroups()
    uid, gid = user
    switchUID(uid or None, gid, euid=True)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(egid)
        os.setgroups(groups)


class _Bound:
    """A socket of the parent's (``metrics_listen`` under ``--workers``), for :class:`OwnSockets`."""

    def __init__(self, address: IPv4Address | IPv6Address) -> None:
        self._address = address

    def getHost(self) -> IPv4Address | IPv6Address:  # noqa: N802
        return self._address


def _not_listening(listener: EndpointListener) -> None:
    raise RuntimeError(f"not listening on {listener.description}")


def _docker_backend(config: Config, reactor: Any, top: MultiService) -> DockerBackend | DockerEngines:
    """
    :return: the Docker backend: one engine's, or for several
        ``[[backend.engines]]`` a :class:`DockerEngines` over one per engine.
        Each engine's runtime (the SDK's thread pool) is a child of ``top``
        started before the backends and stopped after them.  An engine need
        not answer at start-up: until it does, its containers answer 503.
    """
    try:
        import docker  # noqa: F401
    except ImportError:
        raise StartupError("backend.kind: \"docker\" needs the docker package (pip install docker)") from None
    settings = config.backend
    engines = settings.docker_engines()
    several = len(engines) > 1
    backends = []
    for engine in engines:
        runtime = DockerRuntime(reactor, engine.url)
        runtime.setServiceParent(top)
        backend = DockerBackend(
            reactor,
            runtime,
            network=engine.network,
            owner_label=engine.owner_label,
            # DockerEngines runs one periodic reconcile for all of them.
            reconcile_seconds=None if several else settings.reconcile_seconds,
        )
        backends.append((engine.url, backend))
    if not several:
        return backends[0][1]
    _log.info("Docker engines: {urls}", urls=", ".join(engine.url for engine in engines))
    return DockerEngines(reactor, backends, reconcile_seconds=settings.reconcile_seconds)


#: Server endpoint kinds that never use TLS.
PLAIN_ENDPOINT_KINDS = frozenset({"tcp", "tcp6", "unix", "systemd"})


def needs_tls(config: Config) -> bool:
    """
    :return: whether ``config`` may use TLS: ``True`` unless every endpoint
        it listens on is of a kind in :data:`PLAIN_ENDPOINT_KINDS` (an
        ``ssl:`` endpoint, or any kind a plugin adds, may need pyOpenSSL).
    """
    endpoints: Sequence[str] = [*config.server.listen, config.server.metrics_listen, config.tls.ask_listen]
    return any(
        description.partition(":")[0].strip().lower() not in PLAIN_ENDPOINT_KINDS
        for description in endpoints
        if description
    )


class _TLSLeftOut(importlib.abc.MetaPathFinder):
    """Refuses to import pyOpenSSL (see :func:`leave_out_tls`)."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> None:
        if fullname.partition(".")[0] == "OpenSSL":
            raise ModuleNotFoundError(
                f"No module named {fullname!r}: rexecpf leaves TLS out when no endpoint uses it",
                name=fullname,
            )
        return None


def leave_out_tls() -> None:
    """
    Make pyOpenSSL unimportable in this process, before the reactor is
    imported: the reactor, ``twisted.internet.endpoints`` and autobahn all
    try to import it and do without when they cannot, and it costs about
    6 MiB resident (pyOpenSSL, ``twisted.internet.ssl``,
    ``service_identity`` and the parts of ``cryptography`` they load).  For a
    process none of whose endpoints uses TLS (:func:`needs_tls`); a no-op
    once pyOpenSSL is loaded.
    """
    if "OpenSSL" in sys.modules or any(isinstance(finder, _TLSLeftOut) for finder in sys.meta_path):
        return
    sys.meta_path.insert(0, _TLSLeftOut())


def makeService(options: Options, reactor: Any = None) -> IServiceCollection:
    """
    :param options: parsed :class:`Options`.
    :param reactor: the reactor; the global one when ``None``.
    """
    config: Config = options["config_object"]
    if reactor is None:
        if not needs_tls(config):
            leave_out_tls()
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    from rexecpf.http._twisted import forget_exit_signal
    from rexecpf.ops import notifier_from_environ
    from rexecpf.workers import WorkerSockets, die_with_parent, ignore_stop_signals

    # After the graceful stop, exit with status 0 rather than re-raising SIGTERM.
    reactor.addSystemEventTrigger("after", "shutdown", forget_exit_signal, reactor)
    if options["workers"] > 1:
        return _workers_parent(options, config, reactor)
    worker = WorkerSockets.from_environ(os.environ)
    if worker is not None:
        die_with_parent(worker.parent_pid)
        # A terminal's ^C reaches the workers and the parent, which passes
        # SIGTERM on: a stop already under way ignores the second signal.
        reactor.addSystemEventTrigger("before", "shutdown", ignore_stop_signals)
    components = build(
        config,
        reactor,
        config_path=options["config"],
        notifier=notifier_from_environ(os.environ),
        install_signals=True,
        worker=worker,
        user=service_user(options),
    )
    if options["demo"]:
        _print_demo(config)
    freeze_startup_objects()
    return components.service


def shared_endpoints(config: Config) -> list[str]:
    """
    :return: the endpoints the parent of ``--workers N`` opens and every
        worker serves, in this order (``metrics_listen`` is the parent's).
    """
    return [*config.server.listen, *([config.tls.ask_listen] if config.tls.ask_listen else [])]


def _workers_parent(options: Options, config: Config, reactor: Any) -> IServiceCollection:
    """
    :return: the service of the parent of ``--workers N`` (see
        :mod:`rexecpf.workers`): it serves ``metrics_listen``, nothing else.
    """
    from twisted.internet.endpoints import serverFromString

    from rexecpf.ops import notifier_from_environ
    from rexecpf.web import RexecSite
    from rexecpf.workers import WorkerParent, WorkersMetricsResource, child_argv

    _open_store(config)
    top = MultiService()
    description = config.server.metrics_listen
    parent = WorkerParent(
        reactor,
        child_argv(options),
        shared_endpoints(config),
        options["workers"],
        config.server.shutdown_grace_seconds,
        notifier=notifier_from_environ(os.environ),
        metrics=bool(description),
        store=store_identity(config),
    )
    if description:
        try:
            endpoint = serverFromString(reactor, with_backlog(description))
        except (ValueError, TypeError, KeyError) as error:
            raise StartupError(f"server.metrics_listen: {description!r} is not a valid endpoint: {error}") from None
        parent.metrics_listener = EndpointListener(endpoint, RexecSite(WorkersMetricsResource(parent)), description)
        parent.metrics_listener.setServiceParent(top)  # listens before the workers start
    parent.setServiceParent(top)

    def exit_if_failed() -> None:
        if parent.failed:
            # A worker could not start (its error is above): fail as a
            # single process would, not with status 0.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)

    reactor.addSystemEventTrigger("after", "shutdown", exit_if_failed)
    return top


def freeze_startup_objects() -> None:
    """
    Move every object alive after start-up (modules, the service tree) out
    of the cyclic garbage collector's sight (``gc.freeze``): a full
    collection then walks only what was made since, instead of stalling
    every connection for tens of milliseconds (measured under the proxy
    benchmark: the longest pause went from 180 ms to 25-46 ms).  For a
    process that serves; tests, which build many services, do not call it.
    """
    gc.collect()
    gc.freeze()


def _print_demo(config: Config) -> None:
    base = config.server.public_url
    print(
        f"rexecpf demo: container {DEMO_CONTAINER!r} at 127.0.0.1, "
        f"user 'demo', token {DEMO_TOKEN!r}\n"
        f"  start something on port 8000 (python3 -m http.server 8000), then:\n"
        f"  curl -X POST {base}/api/containers/{DEMO_CONTAINER}/port-forwards "
        f'-H "Authorization: Bearer {DEMO_TOKEN}" '
        f"-d '{{\"container_port\": 8000, \"name\": \"demo\"}}'",
        file=sys.stdout,
        flush=True,
    )
