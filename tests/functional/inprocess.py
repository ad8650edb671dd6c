"""
A real rexecpf built in-process on the running reactor, listening on
127.0.0.1, with a static inventory file the tests can edit; plus small real
peers (echo, sink, source servers) and a WebSocket test client.
"""

from __future__ import annotations

import hashlib
import json
import os
import textwrap
from collections.abc import Callable
from typing import Any

import attrs
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from treq.client import HTTPClient
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.web.client import Agent, HTTPConnectionPool

from rexecpf.config import parse_config
from rexecpf.model import Principal
from rexecpf.tap import build
from rexecpf.wsend import protocol_options
from tests.functional.peers import free_port

reactor: Any = _reactor

TOKENS = {"alice": "alice-token", "bob": "bob-token"}

_http = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))


def sleep(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


@inlineCallbacks
def until(condition: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    """
    Poll ``condition`` every 20 ms until it is true.

    :return: a Deferred firing with its value, or failing the test with
        ``AssertionError`` after ``timeout`` seconds.
    """
    deadline = reactor.seconds() + timeout
    while True:
        value = condition()
        if value:
            return value
        if reactor.seconds() > deadline:
            raise AssertionError(f"not true within {timeout} s: {what or condition}")
        yield sleep(0.02)


def write_inventory(path: str, containers: dict[str, tuple[str, str]]) -> None:
    """``containers``: id -> (owner, state); all at 127.0.0.1."""
    text = "".join(
        textwrap.dedent(
            f"""
            [[container]]
            id = "{cid}"
            owner = "{owner}"
            address = "127.0.0.1"
            state = "{state}"
            """
        )
        for cid, (owner, state) in containers.items()
    )
    tmp = path + ".tmp"
    with open(tmp, "w") as file:
        file.write(text)
    os.replace(tmp, path)


class Daemon:
    """
    A running rexecpf.  ``start()`` fires once it listens and has loaded its
    forwards; ``stop()`` stops the service tree and closes the store.

    :param containers: the static inventory, id -> (owner, state); by default
        ``c1`` of alice's and ``c2`` of bob's, all at 127.0.0.1.
    :param sections: ``section={key: value}`` merged into the configuration.
    :param limits: keys of the ``[limits]`` section.
    :param listen: more endpoints for ``[server] listen`` (after its ``tcp:`` one).
    """

    def __init__(
        self,
        directory: str,
        containers: dict[str, tuple[str, str]] | None = None,
        sections: dict[str, dict[str, Any]] | None = None,
        listen: tuple[str, ...] = (),
        **limits: Any,
    ) -> None:
        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.inventory = os.path.join(directory, "containers.toml")
        self.containers = containers or {"c1": ("alice", "running"), "c2": ("bob", "running")}
        write_inventory(self.inventory, self.containers)
        data: dict[str, dict[str, Any]] = {
            "server": {
                "listen": [f"tcp:{self.port}:interface=127.0.0.1", *listen],
                "public_url": self.base,
                "state": os.path.join(directory, "state.sqlite3"),
            },
            "auth": {"users": dict(TOKENS)},
            "backend": {"kind": "static", "inventory": self.inventory},
            "limits": dict(limits),
        }
        for section, values in (sections or {}).items():
            data.setdefault(section, {}).update(values)
        self.config = parse_config(data)
        self.components = build(self.config, reactor)

    @property
    def proxy(self) -> Any:
        return self.components.proxy

    @inlineCallbacks
    def forward(self, container_port: int, container: str | None = None, user: str = "alice") -> Any:
        """
        :param container: by default the first of the inventory.
        :return: a Deferred firing with a new forward (made in-process, not over HTTP).
        """
        container = container or next(iter(self.containers))
        body = json.dumps({"container_port": container_port}).encode()
        forward = yield self.forwards.create(Principal(user), container, body)
        return forward

    @property
    def forwards(self) -> Any:
        return self.components.forwards

    def start(self) -> Deferred[None]:
        self.components.service.privilegedStartService()
        self.components.service.startService()
        return self.components.forwards.ready

    @inlineCallbacks
    def stop(self) -> Any:
        if self.components.service.running:
            yield self.components.service.stopService()
        # Its thread pool would keep the test process alive after the tests.
        self.components.store.close()

    def set_state(self, cid: str, state: str) -> None:
        owner, _ = self.containers[cid]
        self.containers[cid] = (owner, state)
        write_inventory(self.inventory, self.containers)

    def ws_url(self, forward_id: str) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/port-forward/{forward_id}"

    @inlineCallbacks
    def create(self, port: int, cid: str = "c1", token: str = TOKENS["alice"], **extra: Any) -> Any:
        response = yield _http.post(
            f"{self.base}/api/containers/{cid}/port-forwards",
            json.dumps({"container_port": port, **extra}).encode(),
            headers={"Authorization": f"Bearer {token}"},
        )
        body = yield response.json()
        assert response.code == 201, body
        return body

    @inlineCallbacks
    def delete(self, forward_id: str, cid: str = "c1", token: str = TOKENS["alice"]) -> Any:
        response = yield _http.delete(
            f"{self.base}/api/containers/{cid}/port-forwards/{forward_id}",
            headers={"Authorization": f"Bearer {token}"},
        )
        yield response.content()
        return response.code


# --- container-side peers ------------------------------------------------


class Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


class _Source(Protocol):
    """Writes ``factory.size`` pseudo-random bytes as fast as it may, then closes."""

    def connectionMade(self) -> None:
        self.left = self.factory.size
        self.digest = hashlib.sha256()
        self.factory.protocols.append(self)
        self.transport.registerProducer(self, False)

    def resumeProducing(self) -> None:
        if self.left <= 0:
            return
        chunk = self.factory.chunk[: min(len(self.factory.chunk), self.left)]
        self.left -= len(chunk)
        self.digest.update(chunk)
        self.transport.write(chunk)
        if self.left <= 0:
            self.transport.unregisterProducer()
            self.transport.loseConnection()

    def pauseProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _Sink(Protocol):
    """Counts and hashes what it receives; fires ``factory.done`` at ``size`` bytes."""

    def connectionMade(self) -> None:
        self.count = 0
        self.digest = hashlib.sha256()
        self.factory.protocols.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.count += len(data)
        self.digest.update(data)
        if self.count >= self.factory.size and not self.factory.done.called:
            self.factory.done.callback(self.digest.hexdigest())


@attrs.define
class Peer:
    port: int
    listening: Any
    factory: Any

    def stop(self) -> Any:
        return self.listening.stopListening()


@inlineCallbacks
def listen(factory: Factory) -> Any:
    listening = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    return Peer(listening.getHost().port, listening, factory)


def echo_server() -> Deferred[Peer]:
    return listen(Factory.forProtocol(Echo))


def source_server(size: int) -> Deferred[Peer]:
    factory = Factory.forProtocol(_Source)
    factory.size = size
    factory.chunk = os.urandom(64 * 1024)
    factory.protocols = []
    return listen(factory)


def sink_server(size: int) -> Deferred[Peer]:
    factory = Factory.forProtocol(_Sink)
    factory.size = size
    factory.done = Deferred()
    factory.protocols = []
    return listen(factory)


# --- WebSocket test client -------------------------------------------------


class TestClient(WebSocketClientProtocol):
    """Collects messages; ``factory.opened`` / ``factory.closed`` fire."""

    def onOpen(self) -> None:
        self.received: list[bytes] = []
        self.count = 0
        self.digest = hashlib.sha256()
        self.factory.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.received.append(payload)
        self.count += len(payload)
        self.digest.update(payload)
        waiting = self.factory.waiting
        if waiting and self.count >= waiting[0][0]:
            _, d = waiting.pop(0)
            d.callback(b"".join(self.received))

    def wait_for(self, count: int) -> Deferred[bytes]:
        d: Deferred[bytes] = Deferred()
        if self.count >= count:
            d.callback(b"".join(self.received))
        else:
            self.factory.waiting.append((count, d))
        return d

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        if not self.factory.opened.called:
            self.factory.opened.errback(Exception(self.wasNotCleanReason or reason))
        if not self.factory.closed.called:
            self.factory.closed.callback((code, reason))


@inlineCallbacks
def connect_ws(
    url: str,
    protocols: list[str] | None = None,
    headers: dict[str, str] | None = None,
    port: int | None = None,
) -> Any:
    """:return: (protocol, factory), once open (fails on a refused handshake)."""
    factory = WebSocketClientFactory(url, protocols=protocols or [], headers=headers, reactor=reactor)
    factory.protocol = TestClient
    factory.setProtocolOptions(**protocol_options())
    factory.opened = Deferred()
    factory.closed = Deferred()
    factory.waiting = []
    assert port is not None
    yield TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
    protocol = yield factory.opened
    return protocol, factory


@inlineCallbacks
def close_ws(protocol: TestClient, factory: Any) -> Any:
    """Close (if still open) and wait until the connection is gone."""
    if not factory.closed.called:
        protocol.sendClose()
    result = yield factory.closed
    yield sleep(0)
    return result


class _RawHTTP(Protocol):
    def connectionMade(self) -> None:
        self.buffer = b""
        self.transport.write(self.factory.request)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data

    def connectionLost(self, reason: Any) -> None:
        self.factory.done.callback(self.buffer)


@inlineCallbacks
def raw_handshake(port: int, path: str, headers: dict[str, str]) -> Any:
    """
    Send a WebSocket opening handshake; :return: (status, headers dict,
    body bytes) of an answer that is not 101 (read until the server closes).
    """
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
    ] + [f"{k}: {v}" for k, v in headers.items()]
    factory = Factory.forProtocol(_RawHTTP)
    factory.request = ("\r\n".join(lines) + "\r\n\r\n").encode()
    factory.done = Deferred()
    factory.done.addTimeout(15, reactor)
    yield TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
    data = yield factory.done
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        parsed[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), parsed, body


class _RoundTrip(Protocol):
    def connectionMade(self) -> None:
        self.buffer = b""
        self.transport.write(self.factory.payload)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) >= len(self.factory.payload):
            self.transport.loseConnection()

    def connectionLost(self, reason: Any) -> None:
        self.factory.done.callback(self.buffer)


@inlineCallbacks
def connect_tcp_roundtrip(port: int, payload: bytes) -> Any:
    """Send ``payload`` to 127.0.0.1:port; :return: what came back (as much)."""
    factory = Factory.forProtocol(_RoundTrip)
    factory.payload = payload
    factory.done = Deferred()
    yield TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(factory)
    data = yield factory.done.addTimeout(15, reactor)
    return data
