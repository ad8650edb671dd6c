# -*- test-case-name: tests.test_tap -*-
"""
``twistd rexecpf``: command-line options and the service tree.

This is the only module that picks the global reactor.  Every start-up
failure a user can cause (a bad configuration file, an unusable state file,
an endpoint that cannot listen) ends the process with one line on stderr
and a non-zero status, never a traceback.
"""

from __future__ import annotations

import sys
from typing import Any

import attrs
from twisted.application.service import IServiceCollection, MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from rexecpf.api import API, PublicURLs
from rexecpf.auth import Authenticator
from rexecpf.backends.static import StaticBackend, read_inventory
from rexecpf.config import DEMO_CONTAINER, DEMO_TOKEN, Config, ConfigError, demo_config, load_config
from rexecpf.forwards import ForwardService
from rexecpf.proxy import HostRouter, ProxyResource, ProxyService, limited_request_factory
from rexecpf.store import SQLiteForwardStore, open_sqlite_for_check
from rexecpf.web import Health, RexecSite, Root

__all__ = ["Options", "makeService", "StartupError"]


class StartupError(SystemExit):
    """Ends start-up with one line on stderr and exit status 1."""

    def __init__(self, line: str) -> None:
        super().__init__(f"rexecpf: error: {line}")


class Options(usage.Options):
    """Options of ``twistd rexecpf``."""

    synopsis = "[--config FILE | --demo] [--listen ENDPOINT]... [--public-url URL] [--state PATH]"
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
    ]

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
    ends start-up with one clear line.
    """

    _log = Logger()

    def __init__(self, endpoint: IStreamServerEndpoint, factory: Any, description: str) -> None:
        self._endpoint = endpoint
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
    proxy: Any = None


def build(config: Config, reactor: Any) -> Components:
    """
    Build the service tree for ``config``.

    :raises StartupError: for anything a user can fix (state file, endpoints).
    """
    state = config.server.state
    try:
        open_sqlite_for_check(state)
    except Exception as error:  # sqlite3.Error, OSError, RuntimeError: all user-fixable
        raise StartupError(f"server.state: cannot use {state}: {error}") from None

    top = MultiService()
    store = SQLiteForwardStore(reactor, state)

    if config.demo_inventory is not None:
        backend = StaticBackend(reactor, None, config.demo_inventory)
    elif config.backend.kind == "static":
        try:
            entries = read_inventory(config.backend.inventory)
        except ConfigError as error:
            raise StartupError(str(error)) from None
        backend = StaticBackend(reactor, config.backend.inventory, entries)
    else:
        raise StartupError("backend.kind: the docker backend is not available in this build")
    backend.setServiceParent(top)

    forwards = ForwardService(reactor, store, backend, config.limits)
    forwards.setServiceParent(top)

    authenticator = Authenticator(config.auth.users, config.auth.admins)
    urls = PublicURLs(config.server.public_url, config.server.proxy_domain)
    api = API(authenticator, forwards, urls)
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
    )
    proxy.setServiceParent(top)
    host_router = HostRouter(proxy, config.server.proxy_domain) if config.server.proxy_domain else None
    root = Root(
        api.resource(), Health(store, backend), proxy=ProxyResource(proxy), host_router=host_router
    )
    site = RexecSite(root)
    # Request bodies over the limit are refused (413) while they arrive.
    site.requestFactory = limited_request_factory(config.limits.proxy_body_bytes)

    for description in config.server.listen:
        try:
            endpoint = serverFromString(reactor, description)
        except (ValueError, TypeError, KeyError) as error:
            raise StartupError(f"server.listen: {description!r} is not a valid endpoint: {error}") from None
        EndpointListener(endpoint, site, description).setServiceParent(top)

    return Components(config, top, forwards, api, site, backend, store, proxy)


def makeService(options: Options, reactor: Any = None) -> IServiceCollection:
    """
    :param options: parsed :class:`Options`.
    :param reactor: the reactor; the global one when ``None``.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    config: Config = options["config_object"]
    components = build(config, reactor)
    if options["demo"]:
        _print_demo(config)
    return components.service


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
