"""
HTTP/1.1 responses as the proxy reads them from a container, strictly
(RFC 9112) and without I/O: the head (:class:`HeadReader`) and the body's
framing (:class:`LengthDecoder`, :class:`ChunkedDecoder`,
:class:`UntilCloseDecoder`).

A container is not trusted: anything that two parsers could read two ways is
refused (:class:`ProtocolError`) rather than repaired, and nothing buffers
without bound.  What the proxy sends on is made again from the parsed
values, never copied from the container's bytes.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable

__all__ = [
    "MAX_FIELDS",
    "MAX_HEAD_BYTES",
    "MAX_INTERIM",
    "ChunkedDecoder",
    "Fields",
    "Framing",
    "HeadReader",
    "LengthDecoder",
    "ProtocolError",
    "ResponseHead",
    "UntilCloseDecoder",
]

#: Bytes of response head accepted, the interim heads before it included.
MAX_HEAD_BYTES = 64 * 1024

#: Fields accepted in one head (and in a chunked body's trailers).
MAX_FIELDS = 256

#: Interim (1xx) responses accepted before the final one.
MAX_INTERIM = 10

#: Longest chunk-size line (with its extensions) of a chunked body.
MAX_CHUNK_LINE = 4096

#: Bytes of trailer fields accepted after a chunked body.
MAX_TRAILER_BYTES = 64 * 1024

#: A head's fields: lower-case name -> (the name as first sent, every value in order).
Fields = dict[bytes, tuple[bytes, list[bytes]]]


class ProtocolError(ValueError):
    """
    What the container sent is not an HTTP/1.1 response the proxy accepts.
    The message names the fault, never the container's bytes (it may reach
    the client).
    """


_TCHAR = rb"!#$%&'*+\-.^_`|~0-9A-Za-z"

#: status-line (RFC 9112 4): HTTP/1.0 or 1.1, a code of 100-599, a reason of
#: HTAB, SP, VCHAR and obs-text (its leading SP may be left out with it).
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([1-5][0-9][0-9])(?: ([\t\x20-\x7e\x80-\xff]*))?\Z")

#: field-line (RFC 9112 5): a token, no space before the colon, a value of
#: HTAB, SP, VCHAR and obs-text (no CR, LF, NUL or other control).  A line
#: starting with SP or HTAB (obs-fold) is no token, so it is refused.
_FIELD_LINE = re.compile(rb"([" + _TCHAR + rb"]+):([\t\x20-\x7e\x80-\xff]*)\Z")

#: field-lines, each with its CRLF (the same grammar, in one match).
_FIELD_LINES = re.compile(rb"(?:[" + _TCHAR + rb"]+:[\t\x20-\x7e\x80-\xff]*\r\n)*\Z")

_DIGITS = re.compile(rb"[0-9]{1,18}\Z")
_TOKEN = re.compile(rb"[" + _TCHAR + rb"]+\Z")
_OWS = b" \t"

#: chunk-size [ chunk-ext ] (RFC 9112 7.1.1): hex digits only, at most 16;
#: extensions are names with optional token or quoted-string values.
_CHUNK_SIZE_LINE = re.compile(
    rb"([0-9A-Fa-f]{1,16})"
    rb"(?:[\t ]*;[\t ]*[" + _TCHAR + rb"]+"
    rb"(?:[\t ]*=[\t ]*(?:[" + _TCHAR + rb"]+|\"(?:[\t\x20\x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t\x20-\x7e\x80-\xff])*\"))?)*"
    rb"\Z"
)


class Framing(enum.Enum):
    """How a response body ends (RFC 9112 6.3)."""

    #: no body (a response to HEAD; 1xx, 204, 304)
    NONE = "none"
    #: ``Content-Length`` bytes
    LENGTH = "length"
    #: chunked, the final transfer coding
    CHUNKED = "chunked"
    #: when the connection closes
    UNTIL_CLOSE = "until close"


def _list_elements(values: list[bytes]) -> list[bytes]:
    """:return: the non-empty elements of comma-separated field values, without their OWS."""
    return [element.strip(_OWS) for value in values for element in value.split(b",") if element.strip(_OWS)]


class ResponseHead:
    """
    A final (or 101) response head, its framing fields checked.

    :ivar version: ``b"HTTP/1.1"`` or ``b"HTTP/1.0"``.
    :ivar code: the status code (100-599).
    :ivar reason: the reason phrase (HTAB, SP, VCHAR, obs-text only).
    :ivar fields: every field (:data:`Fields`), values without surrounding
        whitespace.
    :ivar content_length: the length ``Content-Length`` gives (equal values
        only), ``None`` when there is none or ``Transfer-Encoding`` overrides it.
    :ivar transfer_codings: the lower-case codings of ``Transfer-Encoding``, in order.
    :ivar length_overridden: whether ``Content-Length`` came with
        ``Transfer-Encoding`` (a smuggling attempt or a broken server: its
        connection is not used again).
    """

    __slots__ = ("code", "content_length", "fields", "length_overridden", "reason", "transfer_codings", "version")

    def __init__(self, version: bytes, code: int, reason: bytes, fields: Fields) -> None:
        self.version = version
        self.code = code
        self.reason = reason
        self.fields = fields
        self.transfer_codings = self._codings()
        self.length_overridden = False
        self.content_length: int | None = None
        if b"content-length" in fields:
            if self.transfer_codings:
                self.length_overridden = True
            else:
                self.content_length = self._length()

    def values(self, lower_name: bytes) -> list[bytes]:
        """:return: every value of a field (``[]`` when absent)."""
        field = self.fields.get(lower_name)
        return field[1] if field is not None else []

    def _length(self) -> int:
        values = self.values(b"content-length")
        if len(values) == 1 and _DIGITS.match(values[0]):
            return int(values[0])  # the common case
        lengths = set()
        for element in (e.strip(_OWS) for value in self.values(b"content-length") for e in value.split(b",")):
            if not _DIGITS.match(element):
                raise ProtocolError("bad Content-Length")
            lengths.add(int(element))
        if len(lengths) != 1:
            raise ProtocolError("Content-Length values differ")
        return lengths.pop()

    def _codings(self) -> tuple[bytes, ...]:
        values = self.values(b"transfer-encoding")
        if not values:
            return ()
        codings = []
        for element in _list_elements(values):
            coding, parameters, _ = element.partition(b";")
            coding = coding.rstrip(_OWS).lower()
            if not _TOKEN.match(coding):
                raise ProtocolError("bad Transfer-Encoding")
            if coding == b"chunked" and (parameters or b"chunked" in codings):
                raise ProtocolError("chunked applied more than once, or with parameters")
            codings.append(coding)
        if not codings:
            raise ProtocolError("empty Transfer-Encoding")
        return tuple(codings)

    def framing(self, method: bytes) -> Framing:
        """:return: how the body of this response to a ``method`` request ends."""
        if method == b"HEAD" or self.code < 200 or self.code in (204, 304):
            return Framing.NONE
        if self.transfer_codings:
            return Framing.CHUNKED if self.transfer_codings[-1] == b"chunked" else Framing.UNTIL_CLOSE
        if self.content_length is not None:
            return Framing.LENGTH
        return Framing.UNTIL_CLOSE

    def persistent(self, method: bytes) -> bool:
        """:return: whether the connection may carry another request once this response is read."""
        if self.version != b"HTTP/1.1" or self.length_overridden:
            return False
        if b"close" in {token.lower() for token in _list_elements(self.values(b"connection"))}:
            return False
        return self.framing(method) is not Framing.UNTIL_CLOSE


class HeadReader:
    """
    Reads one response head from the bytes a connection delivers: interim
    (1xx) heads are skipped (:attr:`interim` counts them), the final head, or
    a 101, ends it.  Lines end in CRLF only; each line is checked as soon as
    it is complete, and the limits hold on every :meth:`feed`.

    :param max_bytes: bytes of head accepted, interim heads included.
    :param max_fields: fields accepted in one head.
    :param max_interim: interim heads accepted.
    """

    def __init__(self, max_bytes: int = MAX_HEAD_BYTES, max_fields: int = MAX_FIELDS, max_interim: int = MAX_INTERIM) -> None:
        self._max_bytes = max_bytes
        self._max_fields = max_fields
        self._max_interim = max_interim
        self._buffer = bytearray()
        #: where the current line starts
        self._line = 0
        #: where the search for its CRLF resumes
        self._scan = 0
        self._status: tuple[bytes, int, bytes] | None = None
        self._fields: Fields = {}
        self._field_count = 0
        #: bytes fed so far
        self.received = 0
        #: interim heads skipped so far
        self.interim = 0
        #: the bytes after the final head, once it is read
        self.rest = b""

    def feed(self, data: bytes) -> ResponseHead | None:
        """
        :return: the final head once it is complete (then :attr:`rest` holds
            what followed it), ``None`` while more is needed.
        :raises ProtocolError: for anything that is not a response head we accept.
        """
        if not self.received:
            self.received = len(data)
            head = self._whole_heads(data)
            if head is not None:
                return head
        else:
            self.received += len(data)
        buffer = self._buffer
        buffer += data
        while True:
            # (a line end past the limit is not looked for)
            eol = buffer.find(b"\r\n", self._scan, self._max_bytes)
            if eol < 0:
                self._partial_line()
                return None
            line = bytes(buffer[self._line:eol])
            self._line = self._scan = eol + 2
            if line:
                self._add(line)
                continue
            head = self._end_of_head()
            if head is not None:
                self.rest = bytes(buffer[self._line:])
                self._buffer = bytearray()
                return head

    def _whole_heads(self, data: bytes) -> ResponseHead | None:
        """
        The common case, faster: the first read holds whole heads.

        :return: the final head, or ``None`` when ``data`` does not hold it
            (then it is read line by line, from the start).
        """
        position = 0
        while True:
            end = data.find(b"\r\n\r\n", position, self._max_bytes)
            if end < 0:
                self.interim = 0
                return None
            # (an empty first line, a bare CR or LF, fail these matches)
            eol = data.find(b"\r\n", position, end + 2)
            match = _STATUS_LINE.match(data, position, eol)
            if match is None:
                raise ProtocolError("bad status line")
            if eol < end and _FIELD_LINES.match(data, eol + 2, end + 2) is None:
                raise ProtocolError("bad field line")
            lines = data[eol + 2:end].split(b"\r\n") if eol < end else []
            if len(lines) > self._max_fields:
                raise ProtocolError(f"more than {self._max_fields} fields in the response head")
            fields: Fields = {}
            for line in lines:
                name, _, value = line.partition(b":")
                lower = name.lower()
                field = fields.get(lower)
                if field is None:
                    fields[lower] = (name, [value.strip(_OWS)])
                else:
                    field[1].append(value.strip(_OWS))
            position = end + 4
            minor, code, reason = match.groups()
            if code[0] == 49 and code != b"101":  # 1xx
                self.interim += 1
                if self.interim > self._max_interim:
                    raise ProtocolError(f"more than {self._max_interim} interim responses")
                continue
            self.rest = data[position:]
            return ResponseHead(b"HTTP/1.1" if minor == b"1" else b"HTTP/1.0", int(code), reason or b"", fields)

    def _partial_line(self) -> None:
        """No CRLF yet: what came of the line so far must be able to end in one."""
        buffer = self._buffer
        end = len(buffer)
        if end > self._max_bytes:
            raise ProtocolError(f"the response head is over {self._max_bytes} bytes")
        if buffer.find(b"\n", self._scan) >= 0:
            raise ProtocolError("a bare LF in the response head")
        if buffer.find(b"\r", self._scan, end - 1) >= 0:
            raise ProtocolError("a bare CR in the response head")
        self._scan = max(self._line, end - 1)

    def _add(self, line: bytes) -> None:
        if self._status is None:
            match = _STATUS_LINE.match(line)
            if match is None:
                raise ProtocolError("bad status line")
            minor, code, reason = match.groups()
            self._status = (b"HTTP/1.1" if minor == b"1" else b"HTTP/1.0", int(code), reason or b"")
            return
        match = _FIELD_LINE.match(line)
        if match is None:
            raise ProtocolError("bad field line")
        self._field_count += 1
        if self._field_count > self._max_fields:
            raise ProtocolError(f"more than {self._max_fields} fields in the response head")
        name, value = match.groups()
        value = value.strip(_OWS)
        lower = name.lower()
        field = self._fields.get(lower)
        if field is None:
            self._fields[lower] = (name, [value])
        else:
            field[1].append(value)

    def _end_of_head(self) -> ResponseHead | None:
        """The empty line: :return: the head, or ``None`` after an interim one."""
        if self._status is None:
            raise ProtocolError("an empty line instead of a status line")
        version, code, reason = self._status
        fields = self._fields
        self._status, self._fields, self._field_count = None, {}, 0
        if 100 <= code < 200 and code != 101:
            self.interim += 1
            if self.interim > self._max_interim:
                raise ProtocolError(f"more than {self._max_interim} interim responses")
            return None
        return ResponseHead(version, code, reason, fields)


# --- bodies --------------------------------------------------------------------------


class LengthDecoder:
    """
    A body of a known length.

    :param length: its length.
    :param data: called with each piece of the body.
    :param end: called once it is whole, with the bytes after it.
    """

    def __init__(self, length: int, data: Callable[[bytes], None], end: Callable[[bytes], None]) -> None:
        self._remaining = length
        self._data = data
        self._end = end

    def dataReceived(self, data: bytes) -> None:
        remaining = self._remaining
        if len(data) < remaining:
            self._remaining -= len(data)
            self._data(data)
            return
        self._remaining = 0
        if len(data) == remaining:
            self._data(data)
            self._end(b"")
        else:
            self._data(data[:remaining])
            self._end(data[remaining:])


class UntilCloseDecoder:
    """A body that ends when the connection closes."""

    def __init__(self, data: Callable[[bytes], None]) -> None:
        self.dataReceived = data


_SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)


class ChunkedDecoder:
    """
    A chunked body (RFC 9112 7.1): chunk-size lines of hex digits (with
    well-formed extensions, ignored), CRLF after each chunk's data, trailer
    fields checked, bounded and dropped.

    :param data: called with each piece of the body.
    :param end: called once it is whole, with the bytes after it.
    :raises ProtocolError: from :meth:`dataReceived`, for bad framing.
    """

    def __init__(self, data: Callable[[bytes], None], end: Callable[[bytes], None]) -> None:
        self._data = data
        self._end = end
        self._state = _SIZE
        self._remaining = 0
        #: an incomplete line (or the CRLF after a chunk's data)
        self._pending = bytearray()
        #: where the search for the pending line's CRLF resumes
        self._scan = 0
        self._trailer_bytes = 0
        self._trailer_fields = 0

    def dataReceived(self, data: bytes) -> None:
        pending = self._pending
        if pending:
            # Only ever a line begun (or the CR after a chunk's data).
            pending += data
            if self._state == _DATA_END:
                self._pending = bytearray()
                data = bytes(pending)
            else:
                limit = self._line_limit()
                eol = pending.find(b"\r\n", self._scan, limit)
                if eol < 0:
                    if len(pending) > limit:
                        raise ProtocolError("a chunk-size line or the trailers are too long")
                    self._scan = len(pending) - 1
                    return
                self._pending, self._scan = bytearray(), 0
                data = bytes(pending[eol + 2:])
                if self._line(bytes(pending[:eol])):
                    self._end(data)
                    return
        position, size = 0, len(data)
        while position < size:
            state = self._state
            if state == _DATA:
                take = min(self._remaining, size - position)
                self._data(data if take == size else data[position:position + take])
                position += take
                self._remaining -= take
                if not self._remaining:
                    self._state = _DATA_END
            elif state == _DATA_END:
                if data[position:position + 2] == b"\r\n":
                    position += 2
                    self._state = _SIZE
                elif data[position:] == b"\r":
                    self._pending += b"\r"
                    return
                else:
                    raise ProtocolError("no CRLF after the chunk data")
            elif state == _DONE:
                raise ProtocolError("bytes after the end of a chunked body")
            else:
                limit = self._line_limit()
                eol = data.find(b"\r\n", position, position + limit)
                if eol < 0:
                    if size - position > limit:
                        raise ProtocolError("a chunk-size line or the trailers are too long")
                    self._pending += data[position:]
                    self._scan = max(0, size - position - 1)
                    return
                line = data[position:eol]
                position = eol + 2
                if self._line(line):
                    self._end(data[position:])
                    return

    def _line_limit(self) -> int:
        """:return: how long the line being read may be, its CRLF included."""
        if self._state == _SIZE:
            return MAX_CHUNK_LINE
        return MAX_TRAILER_BYTES - self._trailer_bytes

    def _line(self, line: bytes) -> bool:
        """:return: whether ``line`` ended the body."""
        if self._state == _SIZE:
            self._size_line(line)
        elif line:
            self._trailer_line(line)
        else:
            self._state = _DONE
            return True
        return False

    def _size_line(self, line: bytes) -> None:
        match = _CHUNK_SIZE_LINE.match(line)
        if match is None:
            raise ProtocolError("bad chunk-size line")
        self._remaining = int(match.group(1), 16)
        self._state = _DATA if self._remaining else _TRAILER

    def _trailer_line(self, line: bytes) -> None:
        self._trailer_bytes += len(line) + 2
        self._trailer_fields += 1
        if _FIELD_LINE.match(line) is None:
            raise ProtocolError("bad trailer field")
        if self._trailer_fields > MAX_FIELDS:
            raise ProtocolError("too many trailer fields")
