"""
The only module that touches Twisted's and Autobahn's private names.

rexecpf needs a few things neither library offers publicly: the request
line of a request whose body is still arriving, answers (414, 431, 400)
where ``HTTPChannel`` closes without a word, a connection taken over from
``twisted.web`` with the bytes it had already read, a clean exit status
after a graceful stop, Autobahn's frame state, and Autobahn's Twisted
adapter without the WAMP session its package ``__init__`` drags in.  Each
private name is read here without a default, so that a release that renames
one fails loudly rather than changing behaviour quietly;
:data:`PRIVATE_NAMES` lists them all, and ``tests/test_twisted_private.py``
checks that each is still there in the installed versions (setup.py bounds
both below 27).
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

from twisted.internet.interfaces import IProtocol
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web import http, server

__all__ = [
    "PRIVATE_NAMES",
    "WebSocketClientFactory",
    "WebSocketClientProtocol",
    "WebSocketResource",
    "WebSocketServerFactory",
    "WebSocketServerProtocol",
    "HTTPChannel",
    "Request",
    "forget_exit_signal",
    "frame_header_size",
    "parse_websocket_data",
    "request_disconnected",
    "writes_plain_frames",
]

#: Every private name used, by where it is defined: ``(module, class)`` ->
#: names (pinned by ``tests/test_twisted_private.py``).
PRIVATE_NAMES: dict[tuple[str, str], tuple[str, ...]] = {
    ("twisted.web.http", "HTTPChannel"): (
        "_command",
        "_path",
        "_version",
        "_savedTimeOut",
        "_HTTPChannel__first_line",
        "_dataBuffer",
        "_respondToBadRequestAndDisconnect",
    ),
    ("twisted.web.http", "Request"): ("_disconnected", "_cleanup"),
    ("twisted.internet.base", "ReactorBase"): ("_exitSignal",),
    ("autobahn.websocket.protocol", "WebSocketProtocol"): (
        "_dataReceived",
        "_perMessageCompress",
        "send_queue",
        "current_frame",
    ),
}


# -- twisted.web ---------------------------------------------------------------


class HTTPChannel(http.HTTPChannel):
    """
    Twisted's ``HTTPChannel`` with public names for its private state and
    hooks (:class:`rexecpf.web.RexecChannel`, the site's protocol, is one):
    a request it cannot read (:meth:`line_too_long`, :meth:`bad_request`),
    the request line of a request still being read, the idle timeout put
    aside, and a connection taken over (:meth:`hand_over`).  A
    :class:`Request` whose streamed body waits for its consumer keeps the
    channel from reading more when its writes drain.
    """

    #: whoever took the connection over (:meth:`hand_over`)
    _new_owner: IProtocol | None = None

    def lineLengthExceeded(self, line: bytes) -> None:
        self.line_too_long(in_request_line=bool(self._HTTPChannel__first_line))  # type: ignore[attr-defined]

    def line_too_long(self, in_request_line: bool) -> None:
        """
        A line over ``MAX_LENGTH``: Twisted closes the connection.

        :param in_request_line: whether it is the request line (else a header line).
        """
        super().lineLengthExceeded(b"")

    def _respondToBadRequestAndDisconnect(self) -> None:
        self.bad_request()

    def bad_request(self) -> None:
        """A request that cannot be parsed: Twisted answers a bare 400 and closes."""
        super()._respondToBadRequestAndDisconnect()

    def resumeProducing(self) -> None:
        """
        The writes to the client have drained: Twisted resumes reading from
        it as well (while no request is being handled).  A request whose
        streamed body waits for its consumer pauses it again at once, before
        anything is read: otherwise each drain (as often as an answer
        streaming to the client makes one) would let one more read of the
        body in, with no bound.
        """
        super().resumeProducing()
        for request in self.requests:
            if isinstance(request, Request):
                request.hold_reads()

    def request_line(self) -> tuple[bytes, bytes, bytes]:
        """:return: the method, target and version of the request being read."""
        return self._command, self._path, self._version

    def target(self) -> bytes:
        """:return: the target (path and query) of the request being read, as sent."""
        path: bytes = self._path
        return path

    def put_timeout_aside(self) -> None:
        """Stop the idle timeout while the response is made; the channel starts it again when it is done."""
        self._savedTimeOut = self.setTimeout(None)

    def hand_over(self, owner: IProtocol) -> bytes:
        """
        Take the connection over (as Twisted's own WebSocket support does):
        the channel stays the transport's protocol, but from now on the
        bytes that arrive and the connection's loss go to ``owner``.

        :return: the bytes read already and not parsed (a pipelined request,
            or the new protocol's first bytes).
        """
        buffered = b"".join(self._dataBuffer)
        self._dataBuffer = []
        self._new_owner = owner
        return buffered

    def dataReceived(self, data: bytes) -> None:
        if self._new_owner is not None:
            self._new_owner.dataReceived(data)
            return
        super().dataReceived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._new_owner is not None:
            self._new_owner.connectionLost(reason)
            return
        super().connectionLost(reason)


class Request(server.Request):
    """
    ``twisted.web.server.Request`` with public names for what rexecpf reads or
    changes of its private state: whether the client went away, and the
    cleanup once the response is done (:meth:`cleanup`).
    """

    @property
    def disconnected(self) -> bool:
        """Whether the client went away."""
        return bool(self._disconnected)

    def hold_reads(self) -> None:
        """The channel has just resumed reading from the client (see :meth:`HTTPChannel.resumeProducing`)."""

    def _cleanup(self) -> None:
        self.cleanup()

    def cleanup(self) -> None:
        """The response is done: let the channel go on to the next request."""
        super()._cleanup()


def request_disconnected(request: Any) -> bool:
    """:return: whether the client of ``request`` (any ``twisted.web`` request) went away."""
    return bool(request._disconnected)


# -- the reactor ----------------------------------------------------------------


def forget_exit_signal(reactor: Any) -> None:
    """
    After a graceful stop, let twistd exit with status 0: twistd re-raises
    the signal that stopped the reactor (exit status -15 for SIGTERM) unless
    the reactor's ``_exitSignal`` is cleared.  Pinned by
    ``tests.functional.test_ops`` (a SIGTERM ends with status 0).
    """
    reactor._exitSignal = None


# -- Autobahn ---------------------------------------------------------------------


def _skip_package_init(name: str) -> None:
    """
    Put package ``name`` in ``sys.modules`` without running its
    ``__init__``, so that its submodules import alone (a no-op once it is
    imported).  ``autobahn.twisted``'s ``__init__`` imports
    ``autobahn.twisted.wamp`` (WAMP sessions, and through ``wamp.auth``
    the ``cryptography`` package) only to re-export names: about 8 MiB
    resident per process that rexecpf never uses (bench/idle_rss.py).
    Nothing in autobahn reads the package's own names (``__ident__``,
    ``install_reactor``).  ``tests/test_imports.py`` pins that a daemon
    imports no WAMP, and the functional tests run real tunnels through such
    daemons (``twistd rexecpf``).
    """
    if name in sys.modules:
        return
    parent, _, child = name.rpartition(".")
    spec = importlib.util.find_spec(name)
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError(f"{name} is not a package any more", name=name)
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    setattr(sys.modules[parent], child, package)


_skip_package_init("autobahn.twisted")
from autobahn.twisted.resource import WebSocketResource  # noqa: E402
from autobahn.twisted.websocket import (  # noqa: E402
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)


def parse_websocket_data(protocol: Any, data: bytes) -> None:
    """Hand ``data`` to Autobahn's parser (its Twisted adapter only logs first)."""
    protocol._dataReceived(data)


def writes_plain_frames(protocol: Any) -> bool:
    """
    :return: whether nothing Autobahn holds could be overtaken by frames
        written to the transport directly: no per-message compression, and
        an empty send queue (it holds delayed writes, empty unless a "sync"
        or "chopsize" write was asked for).
    """
    return protocol._perMessageCompress is None and not protocol.send_queue


def frame_header_size(protocol: Any) -> int:
    """:return: the size of the header of the frame ``protocol`` is receiving."""
    frame = protocol.current_frame
    length = frame.length
    extended = 0 if length < 126 else 2 if length < 1 << 16 else 8
    return 2 + extended + (4 if frame.mask else 0)
