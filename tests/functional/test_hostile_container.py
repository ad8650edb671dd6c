"""
A hostile container behind a real rexecpf: a raw server scripted per case
with the exact bytes it answers (response splitting, bad framing, endless
heads, smuggled second responses...).  Each case checks what the client gets
byte for byte, and that the next request on the same client connection gets
a clean answer, from a fresh container connection when the first one was
poisoned.
"""

from __future__ import annotations

import json
import re
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from rexecpf.proxy.parser import MAX_FIELDS, MAX_HEAD_BYTES
from tests.functional.inprocess import until
from tests.functional.proxyenv import RawClient, listen, real_reactor, start_rexec

#: What the container answers once its script is over (and on new connections).
CLEAN = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nclean"

#: What the client gets for CLEAN (the Date made uniform by :func:`normalized`).
CLEAN_SEEN = b"HTTP/1.1 200 OK\r\nDate: -\r\nContent-Length: 5\r\n\r\nclean"

#: The head of a 502 made by the proxy.
BAD_GATEWAY_HEAD = (
    b"HTTP/1.1 502 Bad Gateway\r\nServer: rexecpf\r\nDate: -\r\nContent-Type: application/json\r\n"
    b"Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\nTransfer-Encoding: chunked\r\n\r\n"
)

HEAD_FAULT = "the container's response head is not valid HTTP/1.1: "


class Scripted(Protocol):
    """Answers each request head with the next answer its factory's script has for this connection."""

    def connectionMade(self) -> None:
        factory = self.factory  # type: ignore[attr-defined]
        self.index = len(factory.connections)
        factory.connections.append(self)
        self.buffer = b""
        self.requests: list[bytes] = []
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
            self.requests.append(head)
            script = self.factory.script  # type: ignore[attr-defined]
            answers = script[self.index] if self.index < len(script) else []
            answer = answers.pop(0) if answers else CLEAN
            assert self.transport is not None
            if callable(answer):
                answer(self.transport)
            else:
                self.transport.write(answer)

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True


def normalized(data: bytes) -> bytes:
    return re.sub(rb"\r\nDate: [^\r\n]*\r\n", b"\r\nDate: -\r\n", data)


def one_response(data: bytes) -> int | None:
    """:return: the length of the first complete response in ``data`` (Content-Length or chunked), else ``None``."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    head, body_start = data[:end].lower(), end + 4
    match = re.search(rb"\r\ncontent-length: (\d+)", head)
    if match:
        total = body_start + int(match.group(1))
        return total if len(data) >= total else None
    if b"\r\ntransfer-encoding: chunked" in head:
        last = data.find(b"\r\n0\r\n\r\n", body_start - 2)
        return last + 7 if last >= 0 else None
    return body_start if head.startswith(b"http/1.1 204") else None


def error_body(detail: str) -> bytes:
    """:return: the chunked JSON body of a 502 with ``detail``."""
    document = json.dumps({"error": {"code": 502, "message": "Bad gateway", "detail": detail}}).encode() + b"\n"
    return b"%x\r\n%s\r\n0\r\n\r\n" % (len(document), document)


class HostileContainerTests(TestCase):
    timeout = 60

    @inlineCallbacks
    def setUp(self) -> Any:
        self.rex = yield start_rexec(self)
        self.factory = Factory.forProtocol(Scripted)
        self.factory.connections = []  # type: ignore[attr-defined]
        self.factory.script = []  # type: ignore[attr-defined]
        port = yield listen(self, self.factory)
        self.fw = yield self.rex.forward(port)

    @inlineCallbacks
    def fresh(self) -> Any:
        """Start the next case anew: no kept-alive container connection left."""
        connections = self.factory.connections  # type: ignore[attr-defined]
        self.rex.proxy.pool.close()
        yield until(lambda: all(c.lost for c in connections), what="the pooled connections closed")
        connections[:] = []
        self.factory.script[:] = []  # type: ignore[attr-defined]

    def request(self, path: str = "/x", extra: str = "") -> bytes:
        return (
            f"GET /p/{self.fw.id}{path} HTTP/1.1\r\nHost: app\r\nAuthorization: Bearer alice-token\r\n{extra}\r\n"
        ).encode()

    @inlineCallbacks
    def connect(self) -> Any:
        client = RawClient()
        yield connectProtocol(TCP4ClientEndpoint(real_reactor(), "127.0.0.1", self.rex.port), client)
        self.addCleanup(lambda: client.transport.abortConnection() if client.transport.connected else None)
        return client

    @inlineCallbacks
    def exchange(self, client: RawClient, payload: bytes, complete: bool = True) -> Any:
        """
        Send ``payload``; :return: the response it gets (once complete, or,
        with ``complete=False``, once the proxy closes the connection).
        """
        start = len(client.data)
        client.transport.write(payload)
        if complete:
            length = yield until(lambda: one_response(client.data[start:]), what="a complete response")
            yield until(lambda: self.rex.forwards.live_count(self.fw.id) == 0, what="the request is over")
            return normalized(client.data[start:start + length])
        yield client.ended
        return normalized(client.data[start:])

    @inlineCallbacks
    def check(
        self,
        answers: list[Any],
        expected: bytes,
        closed: bool = False,
        poisoned: bool = True,
        extra: str = "",
    ) -> Any:
        """
        The container answers the first request with ``answers`` (on its
        first connection): the client gets exactly ``expected``; then a second
        request on the same client connection (a new one when ``closed``: the
        proxy closed it) gets the clean answer, over a new container
        connection when ``poisoned``.
        """
        self.factory.script.append(list(answers))  # type: ignore[attr-defined]
        client = yield self.connect()
        received = yield self.exchange(client, self.request(extra=extra), complete=not closed)
        self.assertEqual(received, expected)
        if closed:
            self.assertTrue(client.ended.called)
            client = yield self.connect()
        else:
            self.assertFalse(client.ended.called)
        received = yield self.exchange(client, self.request("/next"))
        self.assertEqual(received, CLEAN_SEEN)
        connections = self.factory.connections  # type: ignore[attr-defined]
        self.assertEqual(len(connections), 2 if poisoned else 1)
        self.assertEqual([len(c.requests) for c in connections], [1, 1] if poisoned else [2])
        if poisoned:
            yield until(lambda: connections[0].lost, what="the poisoned connection closed")

    def refused(self, answer: Any, fault: str, closed: bool = False, extra: str = "") -> Any:
        """The container's head is refused: a 502 naming ``fault``, nothing of its bytes passed on."""
        return self.check([answer], BAD_GATEWAY_HEAD + error_body(HEAD_FAULT + fault), closed=closed, extra=extra)

    # --- heads

    def test_bare_lf_splitting(self) -> Any:
        """The response-splitting answer with bare LFs: 502, nothing of it reaches the client."""
        return self.refused(
            b"HTTP/1.1 200 OK\nContent-Length: 0\n\nHTTP/1.1 200 SMUGGLED", "a bare LF in the response head"
        )

    def test_bare_lf_in_reason(self) -> Any:
        return self.refused(b"HTTP/1.1 200 OK\nX: 1\r\nContent-Length: 0\r\n\r\n", "bad status line")

    def test_bare_cr(self) -> Any:
        return self.refused(b"HTTP/1.1 200 OK\rContent-Length: 0\r\n\r\n", "bad status line")

    def test_bare_cr_in_value(self) -> Any:
        return self.refused(b"HTTP/1.1 200 OK\r\nX-A: a\rSet-Cookie: x=1\r\nContent-Length: 0\r\n\r\n", "bad field line")

    def test_content_length_forms(self) -> Any:
        """+10, 1_0, 1 0, -1 and 0x10 as Content-Length: each a 502."""
        work = []
        for value in (b"+10", b"1_0", b"1 0", b"-1", b"0x10"):
            work.append(b"HTTP/1.1 200 OK\r\nContent-Length: " + value + b"\r\n\r\n0123456789")
        return self._each(work, "bad Content-Length")

    @inlineCallbacks
    def _each(self, answers: list[bytes], fault: str) -> Any:
        for answer in answers:
            yield self.fresh()
            yield self.refused(answer, fault)

    def test_status_forms(self) -> Any:
        """+20, 2000 and 20 as a status: each a 502."""
        return self._each(
            [b"HTTP/1.1 " + code + b" OK\r\nContent-Length: 0\r\n\r\n" for code in (b"+20", b"2000", b"20", b"2_0")],
            "bad status line",
        )

    def test_differing_content_lengths(self) -> Any:
        return self._each(
            [
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nhi!",
                b"HTTP/1.1 200 OK\r\nContent-Length: 2, 3\r\n\r\nhi!",
            ],
            "Content-Length values differ",
        )

    def test_equal_content_lengths_rewritten(self) -> Any:
        """Equal Content-Lengths (a list, repeats, leading zeros, OWS): one, written from the number; kept alive."""
        return self.check(
            [b"HTTP/1.1 200 OK\r\nContent-Length: 005, 5\r\ncontent-length:\t 5 \r\n\r\nhello"],
            b"HTTP/1.1 200 OK\r\nDate: -\r\nContent-Length: 5\r\n\r\nhello",
            poisoned=False,
        )

    def test_chunked_not_last(self) -> Any:
        """chunked, gzip: the body would be read to close, and is not chunked; gzip cannot be passed on: 502."""
        return self.check(
            [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n5\r\nhello\r\n0\r\n\r\n"],
            BAD_GATEWAY_HEAD
            + error_body("the container used a transfer coding the proxy cannot pass on: chunked, gzip"),
        )

    def test_gzip_then_chunked(self) -> Any:
        return self.check(
            [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"],
            BAD_GATEWAY_HEAD
            + error_body("the container used a transfer coding the proxy cannot pass on: gzip, chunked"),
        )

    def test_chunked_and_content_length(self) -> Any:
        """Transfer-Encoding and Content-Length: chunked wins, the length is dropped, the connection not used again."""
        return self.check(
            [b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"],
            b"HTTP/1.1 200 OK\r\nDate: -\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        )

    def test_obs_fold(self) -> Any:
        return self.refused(b"HTTP/1.1 200 OK\r\nX-A: 1\r\n Set-Cookie: x=1\r\nContent-Length: 0\r\n\r\n", "bad field line")

    def test_nul_and_control_in_value(self) -> Any:
        return self._each(
            [
                b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 0\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nX-A: a\x1bb\r\nContent-Length: 0\r\n\r\n",
            ],
            "bad field line",
        )

    def test_space_before_colon(self) -> Any:
        return self.refused(b"HTTP/1.1 200 OK\r\nContent-Length : 5\r\n\r\nhello", "bad field line")

    def test_name_not_a_token(self) -> Any:
        return self.refused(b"HTTP/1.1 200 OK\r\nX<A>: 1\r\nContent-Length: 0\r\n\r\n", "bad field line")

    def test_many_interim_answers(self) -> Any:
        """600 x 100 Continue in one read: a 502, not a crash."""
        return self.refused(
            b"HTTP/1.1 100 Continue\r\n\r\n" * 600 + b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
            "more than 10 interim responses",
        )

    def test_endless_head(self) -> Any:
        """A head that grows without end: 502 once over the limit, the container connection dropped."""

        def endless(transport: Any) -> None:
            transport.write(b"HTTP/1.1 200 OK\r\nX-A: ")
            # Far more than the limit, in pieces: refused when it goes over.
            for _ in range(4 * MAX_HEAD_BYTES // 4096):
                transport.write(b"a" * 4096)

        return self.refused(endless, f"the response head is over {MAX_HEAD_BYTES} bytes")

    def test_too_many_fields(self) -> Any:
        return self.refused(
            b"HTTP/1.1 200 OK\r\n" + b"X-A: 1\r\n" * (MAX_FIELDS + 1) + b"Content-Length: 0\r\n\r\n",
            f"more than {MAX_FIELDS} fields in the response head",
        )

    # --- chunked bodies

    def test_bad_chunk_sizes(self) -> Any:
        """0x10, an empty extension, a 17-digit size: a 502 when nothing of the body was passed on."""
        return self._chunked_each(
            [
                (b"0x10\r\n" + b"a" * 16 + b"\r\n0\r\n\r\n"),
                (b"1;\r\na\r\n0\r\n\r\n"),
                (b"1" * 17 + b"\r\na\r\n0\r\n\r\n"),
            ]
        )

    @inlineCallbacks
    def _chunked_each(self, bodies: list[bytes]) -> Any:
        for body in bodies:
            yield self.fresh()
            yield self.check(
                [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body],
                BAD_GATEWAY_HEAD + error_body("bad response framing: bad chunk-size line"),
            )

    def test_bad_chunk_after_data(self) -> Any:
        """Junk after a good chunk: the client gets the head and that chunk, then a closed connection, no last chunk."""
        return self.check(
            [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n1; junk junk\r\nx\r\n0\r\n\r\n"],
            b"HTTP/1.1 200 OK\r\nDate: -\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
            closed=True,
        )

    def test_no_crlf_after_chunk_data(self) -> Any:
        return self.check(
            [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXY0\r\n\r\n"],
            b"HTTP/1.1 200 OK\r\nDate: -\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
            closed=True,
        )

    # --- after the response

    def test_second_response_after_a_complete_one(self) -> Any:
        """Bytes after a whole response: the client gets the first only; the connection is not used again."""
        return self.check(
            [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhiHTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nSMUGGLED"],
            b"HTTP/1.1 200 OK\r\nDate: -\r\nContent-Length: 2\r\n\r\nhi",
        )

    def test_upgrade_with_bare_lf_reason(self) -> Any:
        """On the 101 path too: a bare LF in the reason is a 502, and nothing is spliced."""
        return self.refused(
            b"HTTP/1.1 101 Switching\nX-Evil: 1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            "bad status line",
            extra="Connection: upgrade\r\nUpgrade: websocket\r\n",
        )
