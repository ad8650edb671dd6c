"""
What the proxy tests add to :mod:`tests.functional.inprocess`: a rexecpf
with containers ``cont_a`` and ``cont_b`` stopped at test cleanup, a small
Twisted "container" application, and raw HTTP clients.
"""

from __future__ import annotations

import hashlib
import json
import socket
import struct
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.web import server
from twisted.web.resource import Resource

from tests.functional.inprocess import (  # noqa: F401 - shared with the proxy tests
    TOKENS,
    Daemon,
    free_port,
    reactor,
    sleep,
    write_inventory,
)


def real_reactor() -> Any:
    """:return: the global reactor (functional tests only)."""
    return reactor


def temp_dir(testcase: Any) -> str:
    """:return: a new directory outside the source tree, removed at cleanup."""
    import shutil
    import tempfile

    directory = tempfile.mkdtemp(prefix="rexecpf-test-")
    testcase.addCleanup(shutil.rmtree, directory, True)
    return directory


@inlineCallbacks
def start_rexec(testcase: Any, **sections: Any) -> Any:
    """
    Start rexecpf (:class:`Daemon`) with containers ``cont_a`` (alice's) and
    ``cont_b`` (bob's); stopped at test cleanup.

    :param sections: ``section={key: value}`` merged into the configuration.
    """
    limits = {"local_ports": "20000-29999", **sections.pop("limits", {})}
    daemon = Daemon(
        temp_dir(testcase),
        containers={"cont_a": ("alice", "running"), "cont_b": ("bob", "running")},
        sections=sections,
        **limits,
    )
    testcase.addCleanup(daemon.stop)
    yield daemon.start()
    return daemon


# --- the test application ("the container") ------------------------------------


class Echo(Resource):
    """Answers JSON describing the request it got: method, uri, every header, body digest."""

    isLeaf = True

    def render(self, request: Any) -> bytes:
        body = request.content.read()
        document = {
            "method": request.method.decode(),
            "uri": request.uri.decode(),
            "headers": [
                [name.decode(), value.decode()]
                for name, values in request.requestHeaders.getAllRawHeaders()
                for value in values
            ],
            "body_length": len(body),
            "body_sha256": hashlib.sha256(body).hexdigest(),
            "client_proto": request.clientproto.decode(),
        }
        request.setHeader(b"content-type", b"application/json")
        path = request.path
        if path.startswith(b"/redirect/"):
            request.setResponseCode(302)
            request.setHeader(b"location", request.args.get(b"to", [b"/login"])[0])
        if path.startswith(b"/cookies"):
            request.responseHeaders.setRawHeaders(
                b"set-cookie", [b"a=1; Path=/", b"b=2; HttpOnly", b"c=3; Max-Age=60"]
            )
            request.responseHeaders.setRawHeaders(b"x-multi", [b"one", b"two"])
        if path.startswith(b"/hop"):
            request.responseHeaders.setRawHeaders(b"connection", [b"x-private"])
            request.responseHeaders.setRawHeaders(b"x-private", [b"secret"])
            request.responseHeaders.setRawHeaders(b"keep-alive", [b"timeout=5"])
            request.responseHeaders.setRawHeaders(b"proxy-authenticate", [b"Basic"])
        if path.startswith(b"/chunked"):
            # No Content-Length: twisted.web chunks it.
            for i in range(10):
                request.write(b"chunk %d\n" % i)
            request.finish()
            return server.NOT_DONE_YET
        if path.startswith(b"/big/"):
            size = int(path.split(b"/")[2])
            request.setHeader(b"content-length", b"%d" % size)
            request.setHeader(b"content-type", b"application/octet-stream")
            return b"x" * size
        if path.startswith(b"/hang"):
            return server.NOT_DONE_YET
        return json.dumps(document).encode()


class Truncating(Protocol):
    """
    A bad HTTP server: answers any request with a head announcing more body
    than it sends (``Content-Length`` or chunked, by path), then drops the
    connection.
    """

    def dataReceived(self, data: bytes) -> None:
        if b"\r\n\r\n" not in data:
            return
        assert self.transport is not None
        if data.startswith(b"GET /chunked"):
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n5\r\nworld\r\n"
            )
        elif data.startswith(b"GET /endless"):
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
            self.transport.write(b"y" * 40000)
            from twisted.internet import reactor

            reactor.callLater(0.3, self.transport.write, b"y" * 40000)
            return
        elif data.startswith(b"GET /reset"):
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"z" * 500)
            # closed with SO_LINGER 0 once written: a reset, not a close
            handle = self.transport.getHandle()  # type: ignore[attr-defined]
            handle.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"z" * 500)
        self.transport.loseConnection()  # a clean close, mid-body


@inlineCallbacks
def listen(testcase: Any, factory: Any) -> Any:
    """:return: a Deferred firing with the port a server factory listens on (127.0.0.1)."""
    port = yield TCP4ServerEndpoint(real_reactor(), 0, interface="127.0.0.1").listen(factory)
    testcase.addCleanup(port.stopListening)
    return port.getHost().port


def app_site() -> server.Site:
    return server.Site(Echo())


def truncating_factory() -> Factory:
    return Factory.forProtocol(Truncating)


class RawClient(Protocol):
    """Sends raw bytes, keeps every byte received, notes how the connection ended."""

    def __init__(self, payload: bytes = b"") -> None:
        self.payload = payload
        self.data = b""
        self.ended: Deferred[bytes] = Deferred()
        self.reason: Any = None
        self._waiting: list[tuple[bytes, Deferred[bytes]]] = []

    def received(self, marker: bytes) -> Deferred[bytes]:
        """:return: a Deferred firing with the data once it holds ``marker``."""
        waiter: Deferred[bytes] = Deferred()
        self._waiting.append((marker, waiter))
        self._wake()
        return waiter

    def _wake(self) -> None:
        for marker, waiter in list(self._waiting):
            if marker in self.data:
                self._waiting.remove((marker, waiter))
                waiter.callback(self.data)

    def connectionMade(self) -> None:
        assert self.transport is not None
        if self.payload:
            self.transport.write(self.payload)

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        self._wake()

    def connectionLost(self, reason: Any = None) -> None:
        self.reason = reason
        self.ended.callback(self.data)


@inlineCallbacks
def raw_request(port: int, payload: bytes, timeout: float = 10.0) -> Any:
    """
    Send ``payload`` to 127.0.0.1:``port`` and read until the server closes.

    :return: a Deferred firing with the :class:`RawClient` (``.data``, ``.reason``).
    """
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    client = RawClient(payload)
    yield connectProtocol(TCP4ClientEndpoint(real_reactor(), "127.0.0.1", port), client)
    yield client.ended.addTimeout(timeout, real_reactor())
    return client


def split_response(data: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """:return: status code, headers (lower-case names, in order) and the raw body of one response."""
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    code = int(lines[0].split(b" ")[1])
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.append((name.strip().lower(), value.strip()))
    return code, headers, body


def dechunk(body: bytes) -> bytes:
    """:return: the data of a complete chunked body (raises ValueError if it is not complete)."""
    out = b""
    while True:
        size_line, sep, body = body.partition(b"\r\n")
        if not sep:
            raise ValueError("incomplete chunked body")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return out
        out += body[:size]
        body = body[size + 2:]


def payload_of(headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    """:return: the data of a response body, dechunked when it is chunked."""
    if (b"transfer-encoding", b"chunked") in headers:
        return dechunk(body)
    return body


# --- a WebSocket application with its own subprotocol --------------------------

PAGE = b"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>ws app</title></head>
<body><div id="status">loading</div><div id="echo"></div>
<script>
// A slow fetch keeps headless Chromium's virtual time from running out
// before the (real-time) WebSocket exchange is done.
fetch("hold");
// A relative URL: works under /p/{id}/ and at the root of a forward's own origin.
var url = new URL("ws", location.href);
url.protocol = url.protocol.replace("http", "ws");
var ws = new WebSocket(url.href, ["echo.v1"]);
ws.onopen = function () { document.getElementById("status").textContent = "open " + ws.protocol; ws.send("hello from the browser"); };
ws.onmessage = function (event) { document.getElementById("echo").textContent = event.data; };
ws.onerror = function () { document.getElementById("status").textContent = "error"; };
</script></body></html>
"""


def ws_app_site() -> server.Site:
    """
    :return: a site serving ``/`` (an HTML page whose script opens a WebSocket
        to ``ws`` relative to itself) and ``/ws``: an Autobahn echo server that
        selects the subprotocol ``echo.v1`` and answers ``{protocol}:{message}``.
    """
    from autobahn.twisted.resource import WebSocketResource
    from autobahn.twisted.websocket import (
        WebSocketServerFactory,
        WebSocketServerProtocol,
    )

    class EchoProtocol(WebSocketServerProtocol):
        def onConnect(self, request: Any) -> Any:
            self.chosen = "echo.v1" if "echo.v1" in request.protocols else None
            return self.chosen

        def onMessage(self, payload: bytes, isBinary: bool) -> None:
            if isBinary:
                self.sendMessage(payload, True)
            else:
                self.sendMessage(f"{self.chosen}:{payload.decode()}".encode(), False)

    factory = WebSocketServerFactory()
    factory.protocol = EchoProtocol
    factory.setProtocolOptions(maxMessagePayloadSize=1 << 20, maxFramePayloadSize=1 << 20)

    class Page(Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> bytes:
            request.setHeader(b"content-type", b"text/html; charset=utf-8")
            return PAGE

    class Hold(Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> Any:
            from twisted.internet import reactor

            def answer() -> None:
                if not request._disconnected:
                    request.write(b"ok")
                    request.finish()

            call = reactor.callLater(1.5, answer)
            request.notifyFinish().addErrback(lambda _: call.cancel() if call.active() else None)
            return server.NOT_DONE_YET

    root = Resource()
    root.putChild(b"", Page())
    root.putChild(b"hold", Hold())
    root.putChild(b"ws", WebSocketResource(factory))
    return server.Site(root)
