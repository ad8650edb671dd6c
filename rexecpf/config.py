# -*- test-case-name: tests.test_config -*-
"""
The configuration file (TOML), read and validated up front.

Every key has a default; a missing section means its defaults.  Anything wrong
(bad TOML, an unknown key, a wrong type, an impossible value) raises
:class:`ConfigError` whose message is one line naming the key, e.g.
``limits.forwards_per_container: must be an integer >= 1, got 0``.

Relative paths in the file (``server.state``, ``backend.inventory``) are taken
relative to the directory of the configuration file, so a unit file can run
from any working directory.
"""

from __future__ import annotations

import ipaddress
import json
import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import attrs

__all__ = [
    "AuthConfig",
    "BackendConfig",
    "Config",
    "ConfigError",
    "EngineConfig",
    "DomainsConfig",
    "LimitsConfig",
    "ServerConfig",
    "StoreConfig",
    "TLSConfig",
    "TOKEN_PATTERN",
    "demo_config",
    "load_config",
    "mask_url_password",
    "parse_config",
    "parse_inventory",
    "InventoryEntry",
]

#: Tokens travel as WebSocket subprotocols, so they are limited to
#: subprotocol-safe characters.
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9\-._~]+\Z")
_SHA256_PATTERN = re.compile(r"sha256:[0-9a-fA-F]{64}\Z")
_USER_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9\-._@]{0,63}\Z")
_LABEL_PATTERN = re.compile(r"[a-z0-9]([a-z0-9\-]{0,61}[a-z0-9])?\Z")


class ConfigError(Exception):
    """
    The configuration is unusable.  ``str(error)`` is one line naming the key.
    """


@attrs.frozen
class ServerConfig:
    listen: tuple[str, ...] = ("tcp:8080:interface=127.0.0.1",)
    public_url: str = "http://127.0.0.1:8080"
    state: str = "rexecpf.sqlite3"
    proxy_domain: str = ""
    shutdown_grace_seconds: float = 10.0
    metrics_listen: str = ""
    log_format: str = "text"


@attrs.frozen
class StoreConfig:
    #: ``postgresql://...``: the PostgreSQL store; empty: SQLite at ``server.state``
    url: str = ""
    #: how often a node re-reads every forward from the store (besides the
    #: change feed, and whenever the feed reconnects)
    resync_seconds: float = 30.0
    #: how long a node cut off from the store's change feed keeps its open
    #: connections before it closes them (``/healthz`` is 503 at once)
    cut_off_grace_seconds: float = 10.0


@attrs.frozen
class AuthConfig:
    #: user -> token, or user -> "sha256:<hex>"
    users: Mapping[str, str] = attrs.field(factory=dict)
    admins: tuple[str, ...] = ()
    #: users who may give their forwards custom domains (``["*"]``: every user)
    custom_domains: tuple[str, ...] = ()
    #: lifetime of a browser session cookie for the HTTP proxy
    session_seconds: float = 12 * 3600.0


@attrs.frozen
class EngineConfig:
    """One Docker engine: a ``[[backend.engines]]`` table, or ``[backend] url``."""

    url: str = "unix:///var/run/docker.sock"
    network: str = ""
    owner_label: str = "rexecpf.owner"


@attrs.frozen
class BackendConfig:
    kind: str = "static"
    inventory: str = "containers.toml"
    url: str = "unix:///var/run/docker.sock"
    network: str = ""
    owner_label: str = "rexecpf.owner"
    reconcile_seconds: float = 30.0
    #: ``[[backend.engines]]``; empty: the one engine at ``url``
    engines: tuple[EngineConfig, ...] = ()

    def docker_engines(self) -> tuple[EngineConfig, ...]:
        """:return: every Docker engine to follow (at least one)."""
        return self.engines or (EngineConfig(self.url, self.network, self.owner_label),)


@attrs.frozen
class LimitsConfig:
    forwards_per_container: int = 10
    proxy_body_bytes: int = 104857600
    tunnel_bytes_per_second: int = 10485760
    tunnel_idle_seconds: float = 300.0
    local_ports: tuple[int, int] = (20000, 29999)
    local_interface: str = "127.0.0.1"
    #: open WebSocket tunnels per user (handshakes in progress included); 0: no cap
    tunnels_per_user: int = 256
    #: open local_port connections (counted for the forward's owner), proxied
    #: requests in flight and upgraded proxy connections, per user; 0: no cap
    connections_per_user: int = 1024


@attrs.frozen
class TLSConfig:
    #: a directory of ``{host}.pem`` certificates served by SNI on every
    #: ``ssl:`` endpoint of ``server.listen`` (empty: none; see rexecpf.tls)
    certificates: str = ""
    #: an endpoint answering ``GET /tls/ask?domain=NAME`` (Caddy's on-demand
    #: TLS ``ask``): 200 when a forward claims the name (empty: none)
    ask_listen: str = ""


@attrs.frozen
class DomainsConfig:
    #: prove each custom domain by a DNS TXT record ``_rexecpf.{domain}``;
    #: false: every domain a permitted user names is claimed at once (the
    #: operator proves ownership some other way)
    verify: bool = True
    #: the DNS server the TXT records are asked of, ``host`` or ``host:port``
    #: (an IP address); empty: the system's resolvers (``/etc/resolv.conf``)
    resolver: str = ""
    #: the most custom domains one forward may have
    per_forward: int = 10


@attrs.frozen
class InventoryEntry:
    """One ``[[container]]`` of a static inventory."""

    id: str
    owner: str | None
    address: str
    state: str


@attrs.frozen
class Config:
    server: ServerConfig = ServerConfig()
    store: StoreConfig = StoreConfig()
    auth: AuthConfig = AuthConfig()
    backend: BackendConfig = BackendConfig()
    limits: LimitsConfig = LimitsConfig()
    tls: TLSConfig = TLSConfig()
    domains: DomainsConfig = DomainsConfig()
    #: Set for ``--demo``: the static inventory held in memory, not in a file.
    demo_inventory: tuple[InventoryEntry, ...] | None = None


# --- value checkers: each returns the coerced value or raises ValueError(why)


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {_show(value)}")
    return value


def _nonempty_string(value: Any) -> str:
    if not _string(value):
        raise ValueError("must not be empty")
    return value


def _integer(minimum: int, maximum: int | None = None) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if (
            not isinstance(value, int)
            or isinstance(value, bool)
            or value < minimum
            or (maximum is not None and value > maximum)
        ):
            bound = f">= {minimum}" if maximum is None else f"{minimum}-{maximum}"
            raise ValueError(f"must be an integer {bound}, got {_show(value)}")
        return value

    return check


def _seconds(minimum_exclusive: float = 0.0) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        if (
            not isinstance(value, (int, float))
            or isinstance(value, bool)
            or value != value
            or value <= minimum_exclusive
            or value == float("inf")
        ):
            raise ValueError(f"must be a number of seconds > {minimum_exclusive:g}, got {_show(value)}")
        return float(value)

    return check


def _grace_seconds(value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < float("inf"):
        raise ValueError(f"must be a number of seconds >= 0, got {_show(value)}")
    return float(value)


def _listen(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError("must be a non-empty list of endpoint strings")
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"must be a list of endpoint strings, got {_show(item)}")
    return tuple(value)


def _endpoint_or_empty(value: Any) -> str:
    return _string(value).strip()


def _public_url(value: Any) -> str:
    text = _string(value)
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an http:// or https:// URL, got {_show(value)}")
    if parts.query or parts.fragment:
        raise ValueError("must not have a query or fragment")
    return text.rstrip("/")


def _domain(value: Any) -> str:
    text = _string(value).strip().lower().strip(".")
    if text:
        for label in text.split("."):
            if not _LABEL_PATTERN.match(label):
                raise ValueError(f"must be a DNS domain name, got {_show(value)}")
    return text


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {_show(value)}")
    return value


def _resolver(value: Any) -> str:
    text = _string(value).strip()
    if not text:
        return ""
    host, port = text, "53"
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else "53"
    elif text.count(":") == 1:
        host, port = text.split(":")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f'must be an IP address with an optional port ("127.0.0.1:5353"), got {_show(value)}') from None
    if not (port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(f"has a port that is not a number 1-65535, got {_show(value)}")
    return text


def resolver_address(text: str) -> tuple[str, int]:
    """:return: ``(host, port)`` of a ``[domains] resolver`` value (checked already)."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else 53
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, int(port)
    return text, 53


def _one_of(*choices: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(map(repr, choices))}, got {_show(value)}")
        return str(value)

    return check


def _port_range(value: Any) -> tuple[int, int]:
    text = _string(value)
    match = re.fullmatch(r"\s*(\d{1,5})\s*-\s*(\d{1,5})\s*", text)
    if not match:
        raise ValueError(f'must look like "20000-29999", got {_show(value)}')
    low, high = int(match.group(1)), int(match.group(2))
    if not 1 <= low <= high <= 65535:
        raise ValueError(f"must be a range within 1-65535 with low <= high, got {_show(value)}")
    return (low, high)


def _ip_address(value: Any) -> str:
    text = _string(value)
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ValueError(f"must be an IP address, got {_show(value)}") from None


def mask_url_password(url: str) -> str:
    """
    :return: ``url`` fit for a log line or an error message: its password
        (in the user part or a ``password=`` parameter) replaced by ``***``.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(a URL that does not parse)"
    netloc = parts.netloc
    user, at, hosts = netloc.rpartition("@")
    if at and ":" in user:
        netloc = f"{user.partition(':')[0]}:***@{hosts}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, "***" if k == "password" else v) for k, v in pairs], safe="*/:,")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _store_url(value: Any) -> str:
    """
    A libpq connection URI (``postgresql://`` or ``postgres://``), or empty.
    Checked without the PostgreSQL driver (start-up parses it again with
    libpq); the password is never repeated in a message.
    """
    text = _string(value).strip()
    if not text:
        return ""
    shown = mask_url_password(text)
    try:
        parts = urlsplit(text)
    except ValueError as error:
        raise ValueError(f"is not a URL ({error}): {shown}") from None
    if parts.scheme not in ("postgresql", "postgres"):
        # Not echoed: it may be a key=value connection string with a password.
        got = f"the scheme {parts.scheme!r}" if parts.scheme else "no scheme"
        raise ValueError(f"must be a postgresql:// URL (or empty for SQLite at server.state), got {got}")
    # libpq takes several hosts: postgresql://h1:5432,h2:5433/db
    for host in parts.netloc.rpartition("@")[2].split(","):
        _, colon, port = host.rpartition("]")[2].rpartition(":")
        if colon and port and not (port.isdigit() and 1 <= int(port) <= 65535):
            raise ValueError(f"has a port that is not a number 1-65535: {shown}")
    return text


def _name(key: str) -> str:
    """A key as it can be printed on one line (quoted when it is not plain)."""
    return key if re.fullmatch(r"[A-Za-z0-9_\-]+", key) else json.dumps(key)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_SECTIONS: dict[str, dict[str, Callable[[Any], Any]]] = {
    "server": {
        "listen": _listen,
        "public_url": _public_url,
        "state": _nonempty_string,
        "proxy_domain": _domain,
        "shutdown_grace_seconds": _grace_seconds,
        "metrics_listen": _endpoint_or_empty,
        "log_format": _one_of("text", "json"),
    },
    "store": {
        "url": _store_url,
        "resync_seconds": _seconds(),
        "cut_off_grace_seconds": _seconds(),
    },
    "auth": {
        "users": lambda value: value,  # checked below, key by key
        "admins": lambda value: value,
        "custom_domains": lambda value: value,
        "session_seconds": _seconds(),
    },
    "backend": {
        "kind": _one_of("static", "docker"),
        "inventory": _nonempty_string,
        "url": _nonempty_string,
        "network": _string,
        "owner_label": _nonempty_string,
        "reconcile_seconds": _seconds(),
        "engines": lambda value: value,  # checked below, engine by engine
    },
    "limits": {
        "forwards_per_container": _integer(1),
        "proxy_body_bytes": _integer(1),
        "tunnel_bytes_per_second": _integer(1),
        "tunnel_idle_seconds": _seconds(),
        "local_ports": _port_range,
        "local_interface": _ip_address,
        "tunnels_per_user": _integer(0),
        "connections_per_user": _integer(0),
    },
    "tls": {
        "certificates": _endpoint_or_empty,
        "ask_listen": _endpoint_or_empty,
    },
    "domains": {
        "verify": _boolean,
        "resolver": _resolver,
        "per_forward": _integer(1, 100),
    },
}

_CLASSES: dict[str, type] = {
    "server": ServerConfig,
    "store": StoreConfig,
    "auth": AuthConfig,
    "backend": BackendConfig,
    "limits": LimitsConfig,
    "tls": TLSConfig,
    "domains": DomainsConfig,
}


def _users(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ConfigError(f"auth.users: must be a table of user = token, got {_show(value)}")
    users: dict[str, str] = {}
    for name, token in value.items():
        key = f"auth.users.{_name(name)}"
        if not _USER_PATTERN.match(name):
            raise ConfigError(f"{key}: a user name is letters, digits and -._@ (at most 64)")
        if not isinstance(token, str):
            raise ConfigError(f"{key}: must be a string token, got {_show(token)}")
        if token.startswith("sha256:"):
            if not _SHA256_PATTERN.match(token):
                raise ConfigError(f'{key}: a hashed token is "sha256:" and 64 hex digits')
            users[name] = "sha256:" + token[7:].lower()
        else:
            # Never echo the token itself: it is a secret.
            if not TOKEN_PATTERN.match(token):
                raise ConfigError(
                    f"{key}: a token may hold only letters, digits and -._~ "
                    "(it travels as a WebSocket subprotocol)"
                )
            users[name] = token
    return users


def _admins(value: Any, users: Mapping[str, str]) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ConfigError(f"auth.admins: must be a list of user names, got {_show(value)}")
    for name in value:
        if name not in users:
            raise ConfigError(f"auth.admins: {_name(name)} is not a user in auth.users")
    return tuple(value)


_ENGINE_KEYS: dict[str, Callable[[Any], Any]] = {
    "url": _nonempty_string,
    "network": _string,
    "owner_label": _nonempty_string,
}


def _engines(backend: Mapping[str, Any]) -> tuple[EngineConfig, ...]:
    """
    ``[[backend.engines]]``: each table's ``network`` and ``owner_label``
    default to ``[backend]``'s; ``url`` is required and unique.
    """
    defaults = BackendConfig()
    value = backend["engines"]
    if not isinstance(value, list) or not value:
        raise ConfigError(
            f"backend.engines: must be a non-empty array of tables ([[backend.engines]]), got {_show(value)}"
        )
    if backend.get("kind", defaults.kind) != "docker":
        raise ConfigError('backend.engines: only for kind = "docker"')
    if "url" in backend:
        raise ConfigError("backend.url: give either url (one engine) or [[backend.engines]], not both")
    engines: list[EngineConfig] = []
    for index, item in enumerate(value):
        where = f"backend.engines[{index}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: must be a table, got {_show(item)}")
        values: dict[str, Any] = {}
        for key, setting in item.items():
            if key not in _ENGINE_KEYS:
                raise ConfigError(f"{where}.{_name(key)}: unknown key (known: {', '.join(_ENGINE_KEYS)})")
            try:
                values[key] = _ENGINE_KEYS[key](setting)
            except ValueError as error:
                raise ConfigError(f"{where}.{key}: {error}") from None
        if "url" not in values:
            raise ConfigError(f"{where}.url: missing (each engine needs its url)")
        if any(engine.url == values["url"] for engine in engines):
            raise ConfigError(f"{where}.url: {values['url']!r} appears twice")
        values.setdefault("network", backend.get("network", defaults.network))
        values.setdefault("owner_label", backend.get("owner_label", defaults.owner_label))
        engines.append(EngineConfig(**values))
    return tuple(engines)


def _custom_domains(value: Any, users: Mapping[str, str]) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ConfigError(f'auth.custom_domains: must be a list of user names (or ["*"]), got {_show(value)}')
    for name in value:
        if name != "*" and name not in users:
            raise ConfigError(f"auth.custom_domains: {_name(name)} is not a user in auth.users")
    return tuple(value)


def parse_config(data: Mapping[str, Any], base_dir: Path | None = None) -> Config:
    """
    Validate parsed TOML and build a :class:`Config`.

    :param data: the TOML document as a mapping.
    :param base_dir: the directory that relative paths are taken from, or
        ``None`` to keep them as they are (relative to the working directory).
    :raises ConfigError: naming the first bad key.
    """
    sections: dict[str, Any] = {}
    for section_name, section in data.items():
        if section_name not in _SECTIONS:
            raise ConfigError(
                f"{_name(section_name)}: unknown section (known: {', '.join(_SECTIONS)})"
            )
        if not isinstance(section, dict):
            raise ConfigError(f"{section_name}: must be a table")
        checkers = _SECTIONS[section_name]
        values: dict[str, Any] = {}
        for key, value in section.items():
            if key not in checkers:
                raise ConfigError(f"{section_name}.{_name(key)}: unknown key")
            try:
                values[key] = checkers[key](value)
            except ValueError as error:
                raise ConfigError(f"{section_name}.{key}: {error}") from None
        sections[section_name] = values

    auth = sections.get("auth", {})
    if "users" in auth:
        auth["users"] = _users(auth["users"])
    if "admins" in auth:
        auth["admins"] = _admins(auth["admins"], auth.get("users", {}))
    if "custom_domains" in auth:
        auth["custom_domains"] = _custom_domains(auth["custom_domains"], auth.get("users", {}))

    backend = sections.get("backend", {})
    if "engines" in backend:
        backend["engines"] = _engines(backend)
    tls = sections.get("tls", {})
    if tls.get("certificates"):
        listen = sections.get("server", {}).get("listen", ServerConfig().listen)
        if not any(description.startswith("ssl:") for description in listen):
            raise ConfigError("tls.certificates: no ssl: endpoint in server.listen would serve them")

    if base_dir is not None:
        for section_name, key in (("server", "state"), ("backend", "inventory"), ("tls", "certificates")):
            value = sections.get(section_name, {}).get(key)
            if value:
                sections[section_name][key] = str(base_dir / Path(value).expanduser())

    built = {name: _CLASSES[name](**sections.get(name, {})) for name in _SECTIONS}
    return Config(**built)


def load_config(path: str | Path) -> Config:
    """
    Read and validate a configuration file.

    :raises ConfigError: the file cannot be read, is not TOML, or a key is bad.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the configuration file: {error.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: the configuration file is not UTF-8") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None
    return parse_config(data, base_dir=path.resolve().parent)


DEMO_USER = "demo"
DEMO_TOKEN = "demo-token"
DEMO_CONTAINER = "demo"


def demo_config() -> Config:
    """
    The embedded ``--demo`` configuration: one running container ``demo``
    owned by ``demo`` at 127.0.0.1, token ``demo-token``, state in the
    working directory.
    """
    return Config(
        auth=AuthConfig(users={DEMO_USER: DEMO_TOKEN}),
        demo_inventory=(
            InventoryEntry(id=DEMO_CONTAINER, owner=DEMO_USER, address="127.0.0.1", state="running"),
        ),
    )


def parse_inventory(data: Mapping[str, Any]) -> tuple[InventoryEntry, ...]:
    """
    Validate a static inventory (``[[container]]`` entries).

    :raises ConfigError: naming the bad entry and key.
    """
    for key in data:
        if key != "container":
            raise ConfigError(f"{_name(key)}: unknown key (the inventory holds [[container]] entries)")
    containers = data.get("container", [])
    if not isinstance(containers, list):
        raise ConfigError("container: must be an array of tables ([[container]])")
    entries: list[InventoryEntry] = []
    seen: set[str] = set()
    for index, item in enumerate(containers):
        where = f"container[{index}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: must be a table")
        for key in item:
            if key not in ("id", "owner", "address", "state"):
                raise ConfigError(f"{where}.{_name(key)}: unknown key")
        try:
            cid = _nonempty_string(item.get("id"))
        except ValueError as error:
            raise ConfigError(f"{where}.id: {error}") from None
        if cid in seen:
            raise ConfigError(f"{where}.id: {cid!r} appears twice")
        seen.add(cid)
        owner = item.get("owner")
        if owner is not None and not isinstance(owner, str):
            raise ConfigError(f"{where}.owner: must be a string, got {_show(owner)}")
        try:
            address = _nonempty_string(item.get("address", "127.0.0.1"))
            state = _string(item.get("state", "running"))
        except ValueError as error:
            raise ConfigError(f"{where}: {error}") from None
        entries.append(InventoryEntry(id=cid, owner=owner, address=address, state=state))
    return tuple(entries)
