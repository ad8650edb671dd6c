"""
Hostile HTTP against ``/api`` of a real daemon, over raw sockets: request
smuggling, bad header bytes, oversized lines, odd targets, path tricks,
HTTP/1.0, pipelining, huge bodies, non-UTF-8 URLs.  Each gets a correct 4xx
(or correct handling), nothing ambiguous reaches the API, and afterwards the
daemon still serves ``/healthz``.
"""

from __future__ import annotations

import json
import socket
import tempfile
import time
import unittest
from typing import Any

from tests.functional.daemon import Daemon

TOKEN = b"alice-token"
AUTH = b"Authorization: Bearer " + TOKEN + b"\r\n"
FORWARDS = b"/api/containers/c1/port-forwards"


class Response:
    def __init__(self, status: int, headers: dict[bytes, bytes], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<{self.status} {self.body[:200]!r}>"


def parse_responses(data: bytes) -> list[Response]:
    """Split a byte stream into the HTTP/1.1 responses it holds, in order."""
    responses = []
    while data:
        head, separator, rest = data.partition(b"\r\n\r\n")
        if not separator:
            break
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if b"content-length" in headers:
            length = int(headers[b"content-length"])
            body, data = rest[:length], rest[length:]
        elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            body = b""
            while True:
                size_line, _, rest = rest.partition(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                if size == 0:
                    rest = rest.partition(b"\r\n")[2]
                    break
                body += rest[:size]
                rest = rest[size + 2:]
            data = rest
        else:
            body, data = rest, b""
        responses.append(Response(status, headers, body))
    return responses


class HostileHTTPTests(unittest.TestCase):
    daemon: Daemon

    @classmethod
    def setUpClass(cls) -> None:
        cls.daemon = Daemon(
            tempfile.mkdtemp(prefix="rexecpf-hostile-"),
            containers=[{"id": "c1", "owner": "alice"}],
            limits="forwards_per_container = 100",
        ).start()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.daemon.stop()

    def tearDown(self) -> None:
        # After each attack the daemon still serves, and nothing was logged as a crash.
        status, document, _ = self.daemon.request("GET", "/healthz", user=None, timeout=5)
        self.assertEqual((status, document), (200, {"status": "ok"}))
        self.assertNotIn("Traceback", self.daemon.log())
        self.assertNotIn("Unhandled", self.daemon.log())

    # --- helpers

    def exchange(self, raw: bytes, timeout: float = 5.0, shutdown: bool = False) -> tuple[bytes, bool]:
        """Send ``raw``; :return: what came back and whether the server closed."""
        connection = socket.create_connection(("127.0.0.1", self.daemon.port), timeout=timeout)
        try:
            try:
                connection.sendall(raw)
                if shutdown:
                    connection.shutdown(socket.SHUT_WR)
            except (BrokenPipeError, ConnectionResetError):
                pass
            received = b""
            closed = False
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    chunk = connection.recv(65536)
                except TimeoutError:
                    break
                except ConnectionResetError:
                    closed = True
                    break
                if not chunk:
                    closed = True
                    break
                received += chunk
                if not closed and _complete(received):
                    connection.settimeout(0.3)
            return received, closed
        finally:
            connection.close()

    def send(self, raw: bytes, **kwargs: Any) -> list[Response]:
        return parse_responses(self.exchange(raw, **kwargs)[0])

    def one(self, raw: bytes, **kwargs: Any) -> Response:
        responses = self.send(raw, **kwargs)
        self.assertEqual(len(responses), 1, responses)
        return responses[0]

    def forwards(self) -> list[dict[str, Any]]:
        return self.daemon.list("c1")

    def assertNothingCreated(self, before: list[dict[str, Any]]) -> None:
        self.assertEqual(self.forwards(), before)

    # --- request smuggling

    def test_content_length_and_chunked(self) -> None:
        """Content-Length with Transfer-Encoding (either order) is 400; the body never runs."""
        before = self.forwards()
        smuggled = b"GET /api/containers/c1/port-forwards/smuggled HTTP/1.1\r\nHost: x\r\n" + AUTH + b"\r\n"
        body = b'{"container_port": 1}'
        chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        for framing in (
            b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n" % len(chunked),
            b"Transfer-Encoding: chunked\r\nContent-Length: %d\r\n" % len(chunked),
            b"Content-Length: 0\r\nTransfer-Encoding: chunked\r\n",
        ):
            with self.subTest(framing=framing):
                responses = self.send(
                    b"POST " + FORWARDS + b" HTTP/1.1\r\nHost: x\r\n" + AUTH + framing + b"\r\n"
                    + chunked + smuggled
                )
                self.assertEqual([r.status for r in responses], [400], responses)
        self.assertNothingCreated(before)

    def test_duplicate_content_length(self) -> None:
        """Two Content-Length headers, equal or not, or a list in one, are 400."""
        before = self.forwards()
        body = b'{"container_port": 2}'
        for lengths in (
            b"Content-Length: %d\r\nContent-Length: %d\r\n" % (len(body), len(body)),
            b"Content-Length: %d\r\nContent-Length: 5\r\n" % len(body),
            b"Content-Length: %d, %d\r\n" % (len(body), len(body)),
            b"Content-Length: +%d\r\n" % len(body),
            b"Content-Length: -1\r\n",
            b"Content-Length: 0x10\r\n",
        ):
            with self.subTest(lengths=lengths):
                response = self.one(
                    b"POST " + FORWARDS + b" HTTP/1.1\r\nHost: x\r\n" + AUTH + lengths + b"\r\n" + body
                )
                self.assertEqual(response.status, 400)
        self.assertNothingCreated(before)

    def test_obfuscated_transfer_encoding(self) -> None:
        """Transfer-Encoding values other than exactly chunked are 400."""
        before = self.forwards()
        body = b'{"container_port": 3}'
        chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        for encoding in (
            b"Transfer-Encoding: xchunked\r\n",
            b"Transfer-Encoding: chunked, identity\r\n",
            b"Transfer-Encoding: gzip, chunked\r\n",
            b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
            b"Transfer-Encoding : chunked\r\n",
            b"Transfer-Encoding:\x0bchunked\r\n",
        ):
            with self.subTest(encoding=encoding):
                response = self.one(
                    b"POST " + FORWARDS + b" HTTP/1.1\r\nHost: x\r\n" + AUTH + encoding
                    + b"Content-Length: %d\r\n\r\n" % len(chunked) + chunked
                )
                self.assertEqual(response.status, 400)
        self.assertNothingCreated(before)

    def test_whitespace_around_chunked_is_chunked(self) -> None:
        """` chunked` (optional whitespace) and a folded line mean chunked: decoded as such, once."""
        for index, encoding in enumerate(
            (b"Transfer-Encoding:  chunked \r\n", b"Transfer-Encoding:\r\n chunked\r\n")
        ):
            port = 40 + index
            body = b'{"container_port": %d}' % port
            responses = self.send(
                b"POST " + FORWARDS + b" HTTP/1.1\r\nHost: x\r\n" + AUTH + encoding + b"\r\n"
                + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
            )
            self.assertIn(len(responses), (1,), responses)
            if responses[0].status == 201:
                self.assertEqual(responses[0].json()["container_port"], port)
            else:
                self.assertEqual(responses[0].status, 400)

    def test_bad_chunk_framing(self) -> None:
        """Malformed chunk sizes are 400."""
        for chunks in (b"zz\r\n{}\r\n0\r\n\r\n", b"-1\r\n{}\r\n0\r\n\r\n", b"2\r\n{}XX0\r\n\r\n"):
            with self.subTest(chunks=chunks):
                responses = self.send(
                    b"POST " + FORWARDS + b" HTTP/1.1\r\nHost: x\r\n" + AUTH
                    + b"Transfer-Encoding: chunked\r\n\r\n" + chunks
                )
                self.assertEqual([r.status for r in responses], [400], responses)

    # --- header bytes and sizes

    def test_control_bytes_in_header_values(self) -> None:
        """NUL, a bare CR or a bare LF inside a header value is 400."""
        for value in (b"a\x00b", b"a\rb", b"Bearer alice-token\x00"):
            with self.subTest(value=value):
                response = self.one(b"GET " + FORWARDS + b" HTTP/1.1\r\nHost: x\r\nX-Bad: " + value
                                    + b"\r\n" + AUTH + b"\r\n")
                self.assertEqual(response.status, 400)
        # a bare LF splits nothing: it is not a line end, and the value is refused
        response = self.one(b"GET " + FORWARDS + b" HTTP/1.1\r\nHost: x\r\nX-Bad: a\nAuthorization: Bearer "
                            + TOKEN + b"\r\n\r\n")
        self.assertEqual(response.status, 400)

    def test_bad_header_names(self) -> None:
        """A header name with spaces or no colon is 400."""
        for line in (b"X Bad: 1", b"NoColon", b": empty"):
            with self.subTest(line=line):
                response = self.one(b"GET " + FORWARDS + b" HTTP/1.1\r\nHost: x\r\n" + line + b"\r\n"
                                    + AUTH + b"\r\n")
                self.assertEqual(response.status, 400)

    def test_oversized_request_line(self) -> None:
        """A request line over 16 KiB is 414 and the connection closes."""
        raw, closed = self.exchange(b"GET /api/" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(closed)
        self.assertEqual([r.status for r in parse_responses(raw)], [414])

    def test_oversized_header(self) -> None:
        """One header over 16 KiB is 431; headers over 16 KiB in total, or over 500, are 400."""
        raw, closed = self.exchange(b"GET " + FORWARDS + b" HTTP/1.1\r\nX-Big: " + b"b" * 20000 + b"\r\n\r\n")
        self.assertTrue(closed)
        self.assertEqual([r.status for r in parse_responses(raw)], [431])
        many = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 100) for i in range(200))
        raw, closed = self.exchange(b"GET " + FORWARDS + b" HTTP/1.1\r\n" + many + b"\r\n")
        self.assertTrue(closed)
        self.assertEqual([r.status for r in parse_responses(raw)], [400])
        count = b"".join(b"X%d: v\r\n" % i for i in range(600))
        raw, closed = self.exchange(b"GET " + FORWARDS + b" HTTP/1.1\r\n" + count + b"\r\n")
        self.assertTrue(closed)
        self.assertEqual([r.status for r in parse_responses(raw)], [400])

    def test_bad_request_lines(self) -> None:
        """Garbage request lines are 400."""
        for line in (b"GET", b"GET /api HTTP/1.1 extra", b"\x00\x01\x02", b"GET /api HTTP/9.9x"):
            with self.subTest(line=line):
                raw, closed = self.exchange(line + b"\r\nHost: x\r\n\r\n")
                statuses = [r.status for r in parse_responses(raw)]
                self.assertTrue(closed)
                self.assertTrue(statuses in ([400], [505]), statuses)

    # --- targets and paths

    def test_absolute_form_target(self) -> None:
        """``GET http://other/api/...`` is answered as a JSON 4xx, never another host's data."""
        for target in (b"http://other" + FORWARDS, b"http://other:80" + FORWARDS, b"*"):
            with self.subTest(target=target):
                response = self.one(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n" + AUTH + b"\r\n")
                if response.status == 200:  # served as the origin-form path: the same API
                    self.assertIsInstance(response.json(), list)
                else:
                    self.assertIn(response.status, (400, 404, 405), response)
                    if target != b"*":
                        self.assertEqual(response.json()["error"]["code"], response.status)

    def test_path_tricks(self) -> None:
        """Dot segments, encoded dots and slashes, doubled slashes: a JSON 404, never the API."""
        self.assertEqual(self.daemon.create("c1", 60)[0], 201)
        for target in (
            b"/p/x/../../api/containers/c1/port-forwards",
            b"/api/containers/x/../c1/port-forwards",
            b"/api/containers/%2e%2e/containers/c1/port-forwards",
            b"/x/%2e%2e/api/containers/c1/port-forwards",
            b"/api%2Fcontainers%2Fc1%2Fport-forwards",
            b"/api/containers/c1%2Fport-forwards",
            b"//api//containers//c1//port-forwards",
            b"/api/containers/c1/port-forwards/.",
            b"/API/containers/c1/port-forwards",
            b"/api/containers/c1/port-forwards%00",
        ):
            with self.subTest(target=target):
                response = self.one(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n" + AUTH + b"\r\n")
                self.assertIn(response.status, (400, 404), response)
                self.assertIn("error", response.json())

    def test_non_utf8_url(self) -> None:
        """A URL that is not UTF-8 is the JSON 400 Invalid request (401 without a token)."""
        raw = self.one(b"GET /api/containers/\xff/port-forwards HTTP/1.1\r\nHost: x\r\n" + AUTH + b"\r\n")
        self.assertEqual(raw.status, 400)  # not even a request target: Twisted refuses it
        for target in (b"/api/containers/%FF%FE/port-forwards", b"/api/containers/c1/port-forwards/%C3"):
            with self.subTest(target=target):
                response = self.one(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n" + AUTH + b"\r\n")
                self.assertEqual(response.status, 400)
                self.assertEqual(response.headers[b"content-type"], b"application/json")
                self.assertEqual(response.json()["error"]["message"], "Invalid request")
                response = self.one(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
                self.assertEqual(response.status, 401)

    # --- versions and pipelining

    def test_http_1_0(self) -> None:
        """HTTP/1.0 is served and the connection closes after the response."""
        raw, closed = self.exchange(b"GET " + FORWARDS + b" HTTP/1.0\r\n" + AUTH + b"\r\n", timeout=5)
        self.assertTrue(closed)
        (response,) = parse_responses(raw)
        self.assertEqual(response.status, 200)
        self.assertIsInstance(response.json(), list)
        body = b'{"container_port": 61}'
        raw, closed = self.exchange(b"POST " + FORWARDS + b" HTTP/1.0\r\n" + AUTH
                                    + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        self.assertTrue(closed)
        self.assertEqual([r.status for r in parse_responses(raw)], [201])

    def test_pipelined_requests_answered_in_order(self) -> None:
        """Several requests in one write are each answered, in order."""
        body = b'{"container_port": 62, "name": "pipelined"}'
        raw = (
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
            + b"POST " + FORWARDS + b" HTTP/1.1\r\nHost: x\r\n" + AUTH
            + b"Content-Length: %d\r\n\r\n" % len(body) + body
            + b"GET /api/nothing HTTP/1.1\r\nHost: x\r\n" + AUTH + b"\r\n"
            + b"POST " + FORWARDS + b" HTTP/1.1\r\nHost: x\r\n" + AUTH
            + b"Content-Length: %d\r\n\r\n" % len(body) + body
            + b"GET " + FORWARDS + b" HTTP/1.1\r\nHost: x\r\n" + AUTH + b"Connection: close\r\n\r\n"
        )
        responses = self.send(raw)
        self.assertEqual([r.status for r in responses], [200, 201, 404, 403, 200], responses)
        self.assertEqual(responses[1].json()["name"], "pipelined")
        self.assertIn(responses[1].json()["id"], [f["id"] for f in responses[4].json()])

    # --- bodies

    def test_huge_body_without_a_good_token_is_401(self) -> None:
        """
        The API answers 401 before anything else: a body too large from a
        client without a good token is 401 (with WWW-Authenticate), not 413.
        """
        for auth in (b"", b"Authorization: Bearer wrong-token\r\n"):
            raw, closed = self.exchange(
                b"POST " + FORWARDS + b" HTTP/1.1\r\nHost: x\r\n" + auth
                + b"Content-Length: %d\r\n\r\n" % (10 * 1024 * 1024), timeout=15
            )
            responses = parse_responses(raw)
            self.assertEqual([r.status for r in responses], [401], raw[:300])
            self.assertEqual(responses[0].json()["error"]["message"], "Unauthorized")
            self.assertIn(b"WWW-Authenticate: Bearer", raw)

    def test_huge_body_refused_early(self) -> None:
        """A 10 MiB POST is 413 (JSON); memory and temporary files do not grow."""
        rss_before = self.daemon.rss()
        before = self.forwards()
        size = 10 * 1024 * 1024
        started = time.monotonic()
        raw, closed = self.exchange(
            b"POST " + FORWARDS + b" HTTP/1.1\r\nHost: x\r\n" + AUTH
            + b"Content-Length: %d\r\n\r\n" % size + b"{" * size, timeout=15
        )
        responses = parse_responses(raw)
        self.assertEqual([r.status for r in responses], [413], raw[:300])
        self.assertEqual(responses[0].json()["error"]["message"], "Request too large")
        self.assertTrue(closed)
        self.assertLess(time.monotonic() - started, 10)
        # chunked, no length announced: refused as it grows past 64 KiB
        chunk = b"x" * 65536
        raw, closed = self.exchange(
            b"POST " + FORWARDS + b" HTTP/1.1\r\nHost: x\r\n" + AUTH + b"Transfer-Encoding: chunked\r\n\r\n"
            + (b"%x\r\n%s\r\n" % (len(chunk), chunk)) * 160 + b"0\r\n\r\n", timeout=15
        )
        self.assertEqual([r.status for r in parse_responses(raw)], [413])
        self.assertNothingCreated(before)
        self.assertLess(self.daemon.rss() - rss_before, 8 * 1024 * 1024)
        self.assertEqual(_deleted_files(self.daemon), 0)

    def test_announced_huge_body_not_sent(self) -> None:
        """A client that announces 10 GiB and waits gets its 413 at once."""
        raw, closed = self.exchange(
            b"POST " + FORWARDS + b" HTTP/1.1\r\nHost: x\r\n" + AUTH
            + b"Content-Length: 10737418240\r\nExpect: 100-continue\r\n\r\n", timeout=3
        )
        self.assertEqual([r.status for r in parse_responses(raw)], [413])

    def test_body_just_under_limit_is_read(self) -> None:
        """A 60 KiB body reaches the API (and is judged there: not JSON, 400)."""
        body = b" " * 60000 + b'{"container_port": 63}'
        response = self.one(b"POST " + FORWARDS + b" HTTP/1.1\r\nHost: x\r\n" + AUTH
                            + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        self.assertEqual(response.status, 201)


def _complete(data: bytes) -> bool:
    try:
        return bool(parse_responses(data))
    except (ValueError, IndexError):
        return False


def _deleted_files(daemon: Daemon) -> int:
    """:return: how many unlinked files (spooled bodies) the daemon holds open."""
    import os

    assert daemon.process is not None
    directory = f"/proc/{daemon.process.pid}/fd"
    count = 0
    for name in os.listdir(directory):
        try:
            if os.readlink(os.path.join(directory, name)).endswith("(deleted)"):
                count += 1
        except OSError:
            pass
    return count
