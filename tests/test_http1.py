"""The proxy's strict HTTP/1.1 response parser (:mod:`rexecpf.proxy.parser`), without I/O."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from rexecpf.proxy.parser import (
    MAX_CHUNK_LINE,
    MAX_FIELDS,
    MAX_HEAD_BYTES,
    MAX_INTERIM,
    ChunkedDecoder,
    Framing,
    HeadReader,
    LengthDecoder,
    ProtocolError,
    ResponseHead,
)


def read(data: bytes) -> ResponseHead | None:
    """:return: the head ``data`` holds (in one piece), ``None`` if incomplete."""
    return HeadReader().feed(data)


def read_split(data: bytes, at: int) -> tuple[ResponseHead | None, bytes]:
    """:return: the head and what followed it, ``data`` fed in two pieces split at ``at``."""
    reader = HeadReader()
    head = reader.feed(data[:at])
    if head is not None:
        return head, reader.rest + data[at:]
    return reader.feed(data[at:]), reader.rest


#: (head bytes, version, code, reason, fields as (lower name, values) pairs)
VALID = [
    (b"HTTP/1.1 200 OK\r\n\r\n", b"HTTP/1.1", 200, b"OK", []),
    (b"HTTP/1.0 404 Not Found\r\n\r\n", b"HTTP/1.0", 404, b"Not Found", []),
    (b"HTTP/1.1 204 \r\n\r\n", b"HTTP/1.1", 204, b"", []),
    (b"HTTP/1.1 200\r\n\r\n", b"HTTP/1.1", 200, b"", []),
    (b"HTTP/1.1 599 x\r\n\r\n", b"HTTP/1.1", 599, b"x", []),
    (b"HTTP/1.1 200 caf\xc3\xa9\tok  \r\n\r\n", b"HTTP/1.1", 200, b"caf\xc3\xa9\tok  ", []),
    (b"HTTP/1.1 200 OK\r\nX-A: 1\r\nx-a: 2\r\n\r\n", b"HTTP/1.1", 200, b"OK", [(b"x-a", [b"1", b"2"])]),
    (b"HTTP/1.1 200 OK\r\nX-Empty:\r\n\r\n", b"HTTP/1.1", 200, b"OK", [(b"x-empty", [b""])]),
    (b"HTTP/1.1 200 OK\r\nX-A: \t a \t b \t\r\n\r\n", b"HTTP/1.1", 200, b"OK", [(b"x-a", [b"a \t b"])]),
    (b"HTTP/1.1 200 OK\r\nX-Obs: \x80\xff\r\n\r\n", b"HTTP/1.1", 200, b"OK", [(b"x-obs", [b"\x80\xff"])]),
    (b"HTTP/1.1 200 OK\r\n!#$%&'*+-.^_`|~09aZ:v\r\n\r\n", b"HTTP/1.1", 200, b"OK", [(b"!#$%&'*+-.^_`|~09az", [b"v"])]),
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\n", b"HTTP/1.1", 200, b"OK", []),
    (b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 201 C\r\n\r\n", b"HTTP/1.1", 201, b"C", []),
    (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n", b"HTTP/1.1", 101, b"Switching Protocols", [(b"upgrade", [b"websocket"])]),
]

#: heads refused: each with why, and whether that shows before the head's
#: empty line (else it is a framing field, checked once the head is whole)
INVALID = [
    (b"HTTP/1.1 200 OK\nContent-Length: 0\n\nHTTP/1.1 200 SMUGGLED", "bare LF ends nothing", True),
    (b"HTTP/1.1 200 OK\r\nX-A: 1\nX-B: 2\r\n\r\n", "bare LF inside a line", True),
    (b"HTTP/1.1 200 OK\rX-A: 1\r\n\r\n", "bare CR in the status line", True),
    (b"HTTP/1.1 200 OK\r\nX-A: a\rb\r\n\r\n", "bare CR in a value", True),
    (b"HTTP/1.1 +20 OK\r\n\r\n", "sign in the status", True),
    (b"HTTP/1.1 2000 OK\r\n\r\n", "four digits", True),
    (b"HTTP/1.1 20 OK\r\n\r\n", "two digits", True),
    (b"HTTP/1.1 099 OK\r\n\r\n", "below 100", True),
    (b"HTTP/1.1 600 OK\r\n\r\n", "above 599", True),
    (b"HTTP/1.1 2_0 OK\r\n\r\n", "underscore", True),
    (b"HTTP/1.1  200 OK\r\n\r\n", "two spaces", True),
    (b"HTTP/2 200 OK\r\n\r\n", "HTTP/2", True),
    (b"HTTP/1.2 200 OK\r\n\r\n", "HTTP/1.2", True),
    (b"http/1.1 200 OK\r\n\r\n", "lower-case version", True),
    (b"ICY 200 OK\r\n\r\n", "not HTTP", True),
    (b"\r\nHTTP/1.1 200 OK\r\n\r\n", "an empty line first", True),
    (b"HTTP/1.1 200 O\x00K\r\n\r\n", "NUL in the reason", True),
    (b"HTTP/1.1 200 O\x7fK\r\n\r\n", "DEL in the reason", True),
    (b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\n\r\n", "NUL in a value", True),
    (b"HTTP/1.1 200 OK\r\nX-A: a\x01b\r\n\r\n", "CTL in a value", True),
    (b"HTTP/1.1 200 OK\r\nX-A: a\x7f\r\n\r\n", "DEL in a value", True),
    (b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\n\r\n", "obs-fold with SP", True),
    (b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\tfolded\r\n\r\n", "obs-fold with HTAB", True),
    (b"HTTP/1.1 200 OK\r\nX-A : 1\r\n\r\n", "space before the colon", True),
    (b"HTTP/1.1 200 OK\r\nX-A\t: 1\r\n\r\n", "tab before the colon", True),
    (b"HTTP/1.1 200 OK\r\nX(A): 1\r\n\r\n", "not a token", True),
    (b"HTTP/1.1 200 OK\r\nX\xc3\xa9: 1\r\n\r\n", "non-ASCII name", True),
    (b"HTTP/1.1 200 OK\r\n: 1\r\n\r\n", "empty name", True),
    (b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n", "no colon", True),
    (b"HTTP/1.1 200 OK\r\nContent-Length: +10\r\n\r\n", "CL with +", False),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1_0\r\n\r\n", "CL with _", False),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "negative CL", False),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1 0\r\n\r\n", "CL with an inner space", False),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 0x10\r\n\r\n", "hex CL", False),
    (b"HTTP/1.1 200 OK\r\nContent-Length: \r\n\r\n", "empty CL", False),
    (b"HTTP/1.1 200 OK\r\nContent-Length: ,\r\n\r\n", "CL of commas", False),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1234567890123456789\r\n\r\n", "CL of 19 digits", False),
    (b"HTTP/1.1 200 OK\r\nContent-Length: \xd9\xa1\r\n\r\n", "non-ASCII digit", False),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n", "differing CLs", False),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2, 3\r\n\r\n", "differing CL list", False),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", "chunked twice", False),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked;x=1\r\n\r\n", "chunked with parameters", False),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: ,\r\n\r\n", "empty TE", False),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: ch\"unked\r\n\r\n", "TE not a token", False),
    (b"HTTP/1.1 100 Continue\r\n\r\n" * (MAX_INTERIM + 1), "too many interim answers", False),
    (b"HTTP/1.1 200 OK\r\n" + b"X-A: 1\r\n" * (MAX_FIELDS + 1), "too many fields, before the end", True),
    (b"HTTP/1.1 200 OK\r\nX-A: " + b"a" * MAX_HEAD_BYTES, "a line over the limit", True),
    (b"HTTP/1.1 200 OK\r\n" + (b"X-A: " + b"a" * 1000 + b"\r\n") * 70, "lines over the limit", True),
]


class HeadTests(SynchronousTestCase):
    def test_valid(self) -> None:
        """Valid heads: version, status, reason and fields as sent (values without OWS)."""
        for data, version, code, reason, fields in VALID:
            head = read(data + b"rest")
            assert head is not None, data
            self.assertEqual((head.version, head.code, head.reason), (version, code, reason), data)
            self.assertEqual([(lower, values) for lower, (_, values) in head.fields.items()], fields, data)

    def test_invalid(self) -> None:
        """Each of these is refused: ProtocolError, never a head."""
        for data, why, _ in INVALID:
            with self.assertRaises(ProtocolError, msg=why):
                read(data)

    def test_refused_before_the_end(self) -> None:
        """Heads with no final empty line yet are refused as soon as the fault is there, on every feed."""
        for data, why, early in INVALID:
            if not early:
                continue
            data = data.rsplit(b"\r\n\r\n", 1)[0]
            reader = HeadReader()
            with self.assertRaises(ProtocolError, msg=why):
                for byte in range(len(data)):
                    reader.feed(data[byte:byte + 1])
                reader.feed(b"\r\n")

    def test_first_read_and_later_reads_agree(self) -> None:
        """
        Heads whole in the first read (the fast path) and heads that come in
        pieces (line by line) are accepted and refused alike.
        """
        for data, *_ in VALID + INVALID:
            outcomes = []
            for pieces in ([data], [data[:1], data[1:]], [data[: len(data) // 2], data[len(data) // 2 :]]):
                reader = HeadReader()
                try:
                    for piece in pieces:
                        head = reader.feed(piece)
                        if head is not None:
                            break
                except ProtocolError:
                    outcomes.append(None)
                    continue
                assert head is not None, data
                outcomes.append((head.version, head.code, head.reason, head.fields, reader.interim, reader.rest))
            self.assertEqual(outcomes[1:], outcomes[:1] * 2, data)

    def test_field_name_case_kept(self) -> None:
        """The first spelling of a name is kept, and every value of a repeated field."""
        head = read(b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nset-cookie: b=2\r\n\r\n")
        assert head is not None
        self.assertEqual(head.fields[b"set-cookie"], (b"Set-Cookie", [b"a=1", b"b=2"]))

    def test_split_at_every_byte(self) -> None:
        """Fed in two pieces split anywhere, a head reads the same, and what follows it is kept."""
        data = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 4\r\nX-A: b\r\n\r\nbody"
        for at in range(len(data) + 1):
            head, rest = read_split(data, at)
            assert head is not None, at
            self.assertEqual((head.code, head.content_length, rest), (200, 4, b"body"), at)

    def test_bare_lf_split_at_every_byte(self) -> None:
        """The splitting response is refused however it arrives."""
        data = b"HTTP/1.1 200 OK\nContent-Length: 0\n\nHTTP/1.1 200 SMUGGLED\r\n\r\n"
        for at in range(len(data) + 1):
            with self.assertRaises(ProtocolError, msg=at):
                read_split(data, at)

    def test_byte_at_a_time(self) -> None:
        """One byte per feed: complete exactly at the last byte of the empty line."""
        data = b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\n"
        reader = HeadReader()
        for byte in range(len(data) - 1):
            self.assertIsNone(reader.feed(data[byte:byte + 1]))
        self.assertIsNotNone(reader.feed(data[-1:]))
        self.assertEqual(reader.received, len(data))

    def test_many_interim_in_one_read(self) -> None:
        """600 interim answers in one read: refused (a loop with a cap, not recursion)."""
        with self.assertRaises(ProtocolError):
            read(b"HTTP/1.1 100 Continue\r\n\r\n" * 600 + b"HTTP/1.1 200 OK\r\n\r\n")
        reader = HeadReader()
        self.assertIsNotNone(reader.feed(b"HTTP/1.1 100 Continue\r\n\r\n" * MAX_INTERIM + b"HTTP/1.1 200 OK\r\n\r\n"))
        self.assertEqual(reader.interim, MAX_INTERIM)

    def test_limit_includes_interim(self) -> None:
        """The byte limit holds for all the heads read together, and on each feed."""
        reader = HeadReader(max_bytes=100)
        reader.feed(b"HTTP/1.1 100 Continue\r\nX-A: " + b"a" * 40 + b"\r\n\r\n")
        with self.assertRaises(ProtocolError):
            reader.feed(b"HTTP/1.1 200 OK\r\nX-B: " + b"b" * 40)

    def test_endless_head_bounded(self) -> None:
        """A head that grows without end is refused once over the limit; the reader holds no more than it."""
        reader = HeadReader()
        reader.feed(b"HTTP/1.1 200 OK\r\n")
        with self.assertRaises(ProtocolError):
            for _ in range(MAX_HEAD_BYTES):
                reader.feed(b"X-A: 1\r\n")
        self.assertLessEqual(len(reader._buffer), MAX_HEAD_BYTES + 8)

    @given(st.binary(max_size=300))
    def test_fuzz(self, data: bytes) -> None:
        """Any bytes: a head, None or ProtocolError, and a head holds no CR or LF anywhere."""
        try:
            head = read(b"HTTP/1.1 200 OK\r\n" + data)
        except ProtocolError:
            return
        if head is not None:
            for name, values in head.fields.values():
                for part in [name, head.reason, *values]:
                    self.assertNotIn(b"\r", part)
                    self.assertNotIn(b"\n", part)
                    self.assertNotIn(b"\x00", part)


def head_of(fields: bytes, code: int = 200, version: bytes = b"HTTP/1.1") -> ResponseHead:
    head = read(version + b" %d X\r\n" % code + fields + b"\r\n")
    assert head is not None
    return head


class FramingTests(SynchronousTestCase):
    def test_table(self) -> None:
        """How each response's body ends, and whether its connection may carry another request."""
        table = [
            # fields, code, method, framing, length, persistent
            (b"Content-Length: 10\r\n", 200, b"GET", Framing.LENGTH, 10, True),
            (b"Content-Length: 10, 10\r\nContent-Length: 10\r\n", 200, b"GET", Framing.LENGTH, 10, True),
            (b"Content-Length: 010\r\n", 200, b"GET", Framing.LENGTH, 10, True),
            (b"Content-Length: 0\r\n", 200, b"GET", Framing.LENGTH, 0, True),
            (b"", 200, b"GET", Framing.UNTIL_CLOSE, None, False),
            (b"Transfer-Encoding: chunked\r\n", 200, b"GET", Framing.CHUNKED, None, True),
            (b"Transfer-Encoding: Chunked\r\n", 200, b"GET", Framing.CHUNKED, None, True),
            (b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n", 200, b"GET", Framing.CHUNKED, None, True),
            (b"Transfer-Encoding: gzip, chunked\r\n", 200, b"GET", Framing.CHUNKED, None, True),
            (b"Transfer-Encoding: chunked, gzip\r\n", 200, b"GET", Framing.UNTIL_CLOSE, None, False),
            (b"Transfer-Encoding: gzip\r\n", 200, b"GET", Framing.UNTIL_CLOSE, None, False),
            (b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n", 200, b"GET", Framing.CHUNKED, None, False),
            (b"Transfer-Encoding: chunked\r\nContent-Length: +3\r\n", 200, b"GET", Framing.CHUNKED, None, False),
            (b"Content-Length: 10\r\n", 200, b"HEAD", Framing.NONE, 10, True),
            (b"", 204, b"GET", Framing.NONE, None, True),
            (b"Content-Length: 10\r\n", 304, b"GET", Framing.NONE, 10, True),
            (b"Content-Length: 10\r\nConnection: keep-alive, Close\r\n", 200, b"GET", Framing.LENGTH, 10, False),
        ]
        for fields, code, method, framing, length, persistent in table:
            head = head_of(fields, code)
            self.assertEqual(
                (head.framing(method), head.content_length, head.persistent(method)),
                (framing, length, persistent),
                (fields, code, method),
            )

    def test_http10_not_persistent(self) -> None:
        self.assertFalse(head_of(b"Content-Length: 1\r\n", version=b"HTTP/1.0").persistent(b"GET"))

    def test_transfer_codings(self) -> None:
        self.assertEqual(head_of(b"Transfer-Encoding: GZIP ;q=1, ,chunked\r\n").transfer_codings, (b"gzip", b"chunked"))


class Body:
    """Collects what a decoder gives."""

    def __init__(self) -> None:
        self.data = b""
        self.rest: bytes | None = None

    def received(self, data: bytes) -> None:
        self.data += data

    def ended(self, rest: bytes) -> None:
        self.rest = rest


def dechunk(data: bytes, pieces: list[int] | None = None) -> Body:
    """:return: what a :class:`ChunkedDecoder` made of ``data``, fed in pieces of the given sizes (else at once)."""
    body = Body()
    decoder = ChunkedDecoder(body.received, body.ended)
    position = 0
    for size in [*(pieces or []), len(data)]:
        piece = data[position:position + size]
        position += size
        if body.rest is not None:
            body.rest += piece  # (its owner feeds it no more)
        elif piece:
            decoder.dataReceived(piece)
    return body


class ChunkedTests(SynchronousTestCase):
    GOOD = b"5\r\nhello\r\na;name=value;x=\"q \\\" s\" ; y\r\n, world!!!\r\n0\r\nX-T: 1\r\n\r\nnext"

    def test_valid(self) -> None:
        """Data, extensions (ignored) and trailers (dropped); the bytes after the end are handed back."""
        body = dechunk(self.GOOD)
        self.assertEqual((body.data, body.rest), (b"hello, world!!!", b"next"))
        body = dechunk(b"A\r\n0123456789\r\n00\r\n\r\n")
        self.assertEqual((body.data, body.rest), (b"0123456789", b""))

    def test_split_at_every_byte(self) -> None:
        for at in range(len(self.GOOD) + 1):
            body = dechunk(self.GOOD, [at])
            self.assertEqual((body.data, body.rest), (b"hello, world!!!", b"next"), at)

    def test_byte_at_a_time(self) -> None:
        body = dechunk(self.GOOD, [1] * len(self.GOOD))
        self.assertEqual((body.data, body.rest), (b"hello, world!!!", b"next"))

    def test_invalid(self) -> None:
        """Each of these is refused."""
        for data, why in [
            (b"0x10\r\n", "0x prefix"),
            (b"+5\r\nhello\r\n", "sign"),
            (b"-5\r\n", "negative"),
            (b" 5\r\n", "leading space"),
            (b"5 \r\nhello\r\n", "trailing space without extension"),
            (b"\r\n", "empty size"),
            (b"1;\r\nx\r\n", "empty extension"),
            (b"1; junk junk\r\nx\r\n", "junk extension"),
            (b"1;a=\"open\r\nx\r\n", "open quoted string"),
            (b"1;a=b\x00\r\nx\r\n", "NUL in extension"),
            (b"1" * 17 + b"\r\n", "huge size"),
            (b"5\nhello\r\n", "bare LF after the size"),
            (b"5\r\nhelloXY0\r\n\r\n", "no CRLF after the data"),
            (b"5\r\nhello\n0\r\n\r\n", "bare LF after the data"),
            (b"5\r\nhello\r0\r\n\r\n", "bare CR after the data"),
            (b"0\r\nX-T : 1\r\n\r\n", "bad trailer"),
            (b"0\r\n folded\r\n\r\n", "folded trailer"),
            (b"f" * (MAX_CHUNK_LINE + 1), "endless size line"),
            (b"0\r\n" + b"X-T: 1\r\n" * (MAX_FIELDS + 1), "too many trailers"),
            (b"0\r\nX-T: " + b"a" * (64 * 1024), "endless trailers"),
        ]:
            with self.assertRaises(ProtocolError, msg=why):
                dechunk(data)
            with self.assertRaises(ProtocolError, msg=why):
                dechunk(data, [1] * len(data))

    def test_large_data_not_copied_per_byte(self) -> None:
        """A large chunk goes on in the pieces it arrives in."""
        data = b"100000\r\n" + b"x" * 0x100000 + b"\r\n0\r\n\r\n"
        pieces: list[int] = []
        decoder = ChunkedDecoder(lambda piece: pieces.append(len(piece)), lambda rest: None)
        for start in range(0, len(data), 65536):
            decoder.dataReceived(data[start:start + 65536])
        self.assertEqual(sum(pieces), 0x100000)
        self.assertLessEqual(len(pieces), 18)

    @given(st.binary(max_size=64), st.lists(st.integers(1, 8), max_size=20))
    def test_fuzz(self, data: bytes, pieces: list[int]) -> None:
        """Any bytes in any pieces: data or ProtocolError, never another exception."""
        try:
            dechunk(data, pieces)
        except ProtocolError:
            pass


class LengthTests(SynchronousTestCase):
    def test_pieces_and_rest(self) -> None:
        body = Body()
        decoder = LengthDecoder(5, body.received, body.ended)
        decoder.dataReceived(b"he")
        self.assertIsNone(body.rest)
        decoder.dataReceived(b"lloEXTRA")
        self.assertEqual((body.data, body.rest), (b"hello", b"EXTRA"))

    def test_exact(self) -> None:
        body = Body()
        LengthDecoder(2, body.received, body.ended).dataReceived(b"hi")
        self.assertEqual((body.data, body.rest), (b"hi", b""))
