"""
The private names of Twisted and Autobahn that rexecpf uses
(:data:`rexecpf.http._twisted.PRIVATE_NAMES`) are all still there in the
installed versions: on the class, or on an instance made the way rexecpf
meets one (a channel that has read a request line, a WebSocket that has
read a frame header).
"""

from __future__ import annotations

import base64
import importlib
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import http

from rexecpf.http._twisted import PRIVATE_NAMES, HTTPChannel, Request


def _channel() -> http.HTTPChannel:
    """:return: a channel in the middle of reading a request's head."""
    channel = http.HTTPChannel()
    channel.makeConnection(StringTransport())
    channel.dataReceived(b"GET /x HTTP/1.1\r\nHost: h\r\n")
    return channel


def _websocket() -> WebSocketServerProtocol:
    """:return: an open server WebSocket in the middle of reading a frame."""
    factory = WebSocketServerFactory()
    factory.protocol = WebSocketServerProtocol
    protocol = factory.buildProtocol(None)
    protocol.makeConnection(StringTransport())
    key = base64.b64encode(b"0123456789abcdef")
    protocol.dataReceived(
        b"GET / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    # a masked binary frame of 10 bytes, of which 2 came
    protocol.dataReceived(b"\x82\x8a" + b"\x00\x00\x00\x00" + b"ab")
    return protocol


def _global_reactor() -> Any:
    """:return: the reactor twistd runs (its ``_exitSignal`` is what twistd reads)."""
    from twisted.internet import reactor

    return reactor


_INSTANCES = {
    ("twisted.web.http", "HTTPChannel"): _channel,
    ("twisted.web.http", "Request"): lambda: http.Request(_channel()),
    ("twisted.internet.base", "ReactorBase"): lambda: _global_reactor(),
    ("autobahn.websocket.protocol", "WebSocketProtocol"): _websocket,
}


class PrivateNamesTests(SynchronousTestCase):
    def test_names_exist(self) -> None:
        """Every pinned name is on its class or on an instance made as rexecpf meets one."""
        self.assertEqual(set(PRIVATE_NAMES), set(_INSTANCES))
        for (module, name), attributes in PRIVATE_NAMES.items():
            cls = getattr(importlib.import_module(module), name)
            instance: Any = _INSTANCES[(module, name)]()
            self.assertIsInstance(instance, cls)
            for attribute in attributes:
                with self.subTest(cls=name, attribute=attribute):
                    self.assertTrue(
                        hasattr(cls, attribute) or hasattr(instance, attribute),
                        f"{module}.{name}.{attribute} is gone: see rexecpf/http/_twisted.py",
                    )

    def test_websocket_frame_state(self) -> None:
        """The frame state rexecpf reads is what it expects: a header of 2 + 4 (mask) bytes."""
        from rexecpf.http._twisted import frame_header_size, writes_plain_frames

        protocol = _websocket()
        self.assertEqual(frame_header_size(protocol), 6)
        self.assertTrue(writes_plain_frames(protocol))

    def test_hooks_overridden(self) -> None:
        """Each private method rexecpf overrides is one the base class still defines and calls."""
        self.assertTrue(callable(http.HTTPChannel._respondToBadRequestAndDisconnect))
        self.assertTrue(callable(http.Request._cleanup))
        self.assertIsNot(HTTPChannel._respondToBadRequestAndDisconnect, http.HTTPChannel._respondToBadRequestAndDisconnect)
        self.assertIsNot(Request._cleanup, http.Request._cleanup)

    def test_channel_request_line(self) -> None:
        """The request line of a request still being read is where the channel keeps it."""
        channel = HTTPChannel()
        channel.makeConnection(StringTransport())
        channel.dataReceived(b"POST /p/x?a=1 HTTP/1.1\r\nHost: h\r\n")
        self.assertEqual(channel.request_line(), (b"POST", b"/p/x?a=1", b"HTTP/1.1"))
        self.assertEqual(channel.target(), b"/p/x?a=1")
