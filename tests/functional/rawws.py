"""
Blocking, byte-exact tools for hostile-client tests against a real daemon
(:mod:`tests.functional.daemon`): a WebSocket client that writes frames by
hand (so it can break every rule of RFC 6455) and a threaded "container"
that records every connection and every byte it is sent.

Plain sockets and threads: no reactor in the test process, so what is
measured is the daemon alone.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import socketserver
import struct
import threading
import time
from typing import Any

__all__ = [
    "OP_BINARY",
    "OP_CLOSE",
    "OP_CONTINUATION",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "RawWebSocket",
    "RecordingServer",
    "frame",
    "wait_until",
]

OP_CONTINUATION, OP_TEXT, OP_BINARY = 0x0, 0x1, 0x2
OP_CLOSE, OP_PING, OP_PONG = 0x8, 0x9, 0xA

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def wait_until(condition: Any, timeout: float, message: str, interval: float = 0.02) -> None:
    """Poll ``condition()`` until it is true; fail with ``message`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} (after {timeout} s)")
        time.sleep(interval)


def frame(
    opcode: int,
    payload: bytes = b"",
    fin: bool = True,
    rsv: int = 0,
    mask: bool = True,
    length: int | None = None,
) -> bytes:
    """
    :param rsv: the three RSV bits (0-7), all zero in a valid frame.
    :param mask: clients must mask; ``False`` breaks that rule.
    :param length: the length to announce (default: the payload's), so a
        frame can claim more than it carries.
    :return: one WebSocket frame as it goes on the wire.
    """
    announced = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | (rsv & 7) << 4 | opcode & 0xF])
    mask_bit = 0x80 if mask else 0
    if announced < 126:
        head += bytes([mask_bit | announced])
    elif announced < 1 << 16:
        head += bytes([mask_bit | 126]) + struct.pack("!H", announced)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", announced)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + _xor(payload, key)


def _xor(payload: bytes, key: bytes) -> bytes:
    if not payload:
        return b""
    repeated = (key * (len(payload) // 4 + 1))[: len(payload)]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(len(payload), "big")


class RawWebSocket:
    """
    A client WebSocket on a plain socket.  :meth:`handshake` sends an opening
    handshake (any headers, any method); after a 101 the frame methods read
    and write frames byte for byte.
    """

    def __init__(self, port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
        self.port = port
        self.host = host
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buffer = b""
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.body = b""

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawWebSocket:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def handshake(
        self,
        path: str,
        token: str | None = "alice-token",
        method: str = "GET",
        key: str | None = None,
        version: str | None = "13",
        extra: dict[str, str] | None = None,
        omit: tuple[str, ...] = (),
    ) -> int:
        """
        Send an opening handshake and read the answer's head (and, when it is
        not a 101, its body up to Content-Length).

        :param key: ``Sec-WebSocket-Key`` (a fresh valid one by default).
        :param omit: lower-case names of the standard headers to leave out.
        :return: the status code.
        """
        key = key if key is not None else base64.b64encode(os.urandom(16)).decode()
        headers = {
            "host": f"{self.host}:{self.port}",
            "upgrade": "websocket",
            "connection": "Upgrade",
            "sec-websocket-key": key,
        }
        if version is not None:
            headers["sec-websocket-version"] = version
        if token is not None:
            headers["sec-websocket-protocol"] = f"Bearer, {token}"
        headers = {name: value for name, value in headers.items() if name not in omit}
        lines = [f"{method} {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in headers.items()]
        lines += [f"{k}: {v}" for k, v in (extra or {}).items()]
        self.send(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        head = self._read_until(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        self.status = int(status_line.split()[1])
        for line in header_lines:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        if self.status == 101:
            expected = base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()
            assert self.headers.get("sec-websocket-accept") == expected, self.headers
        else:
            self.body = self._read_exactly(int(self.headers.get("content-length", "0")))
        return self.status

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        self.buffer += chunk
        return bool(chunk)

    def _read_until(self, marker: bytes) -> bytes:
        while marker not in self.buffer:
            if not self._fill():
                raise ConnectionError(f"closed before {marker!r}: {self.buffer[:300]!r}")
        head, _, self.buffer = self.buffer.partition(marker)
        return head

    def _read_exactly(self, count: int) -> bytes:
        while len(self.buffer) < count:
            if not self._fill():
                raise ConnectionError(f"closed after {len(self.buffer)} of {count} bytes")
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data

    def send_frame(self, opcode: int, payload: bytes = b"", **kwargs: Any) -> None:
        self.send(frame(opcode, payload, **kwargs))

    def read_frame(self) -> tuple[int, bool, bytes]:
        """:return: (opcode, fin, payload) of the next frame from the server."""
        first, second = self._read_exactly(2)
        assert not second & 0x80, "a server must not mask its frames"
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", self._read_exactly(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", self._read_exactly(8))
        return first & 0xF, bool(first & 0x80), self._read_exactly(length)

    def read_data(self, count: int) -> bytes:
        """:return: ``count`` bytes of data-frame payload (controls other than close skipped)."""
        data = b""
        while len(data) < count:
            opcode, _, payload = self.read_frame()
            if opcode == OP_CLOSE:
                raise AssertionError(f"closed {self._close_of(payload)} after {len(data)} of {count} bytes")
            if opcode in (OP_BINARY, OP_TEXT, OP_CONTINUATION):
                data += payload
        return data

    @staticmethod
    def _close_of(payload: bytes) -> tuple[int | None, str]:
        if len(payload) < 2:
            return None, ""
        return struct.unpack("!H", payload[:2])[0], payload[2:].decode("utf-8", "replace")

    def read_close(self) -> tuple[int | None, str]:
        """
        Read frames up to the server's close frame (data before it is
        skipped); :return: its (code, reason).
        """
        while True:
            try:
                opcode, _, payload = self.read_frame()
            except (ConnectionError, OSError) as error:
                raise AssertionError(f"the connection ended without a close frame: {error}") from None
            if opcode == OP_CLOSE:
                return self._close_of(payload)

    def wait_closed(self, timeout: float = 10.0) -> bool:
        """:return: whether the server closed the TCP connection within ``timeout``."""
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(65536):
                pass
        except TimeoutError:
            return False
        except OSError:
            pass
        return True


class RecordingServer(socketserver.ThreadingTCPServer):
    """
    The "container port": accepts connections on 127.0.0.1, records every
    byte it is sent, counts the connections still open, and either echoes
    (``echo=True``) or answers the first HTTP request head of a connection
    with ``200`` and the body ``container``, then closes it.

    :ivar received: every byte received, all connections, in arrival order.
    :ivar accepted: how many connections were accepted.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, echo: bool = True) -> None:
        self.lock = threading.Lock()
        self.received = b""
        self.accepted = 0
        self.open = 0
        self.echo = echo
        server = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                with server.lock:
                    server.accepted += 1
                    server.open += 1
                try:
                    server._serve(self.request)
                except OSError:
                    pass
                finally:
                    with server.lock:
                        server.open -= 1

        super().__init__(("127.0.0.1", 0), Handler)
        self.port = self.server_address[1]
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()

    def _serve(self, connection: socket.socket) -> None:
        pending = b""
        while data := connection.recv(65536):
            with self.lock:
                self.received += data
            if self.echo:
                connection.sendall(data)
                continue
            pending += data
            if b"\r\n\r\n" in pending:
                # One answer per connection, then close: a proxy that kept a
                # connection open would show in open_connections().
                connection.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nContent-Type: text/plain\r\n"
                    b"Connection: close\r\n\r\ncontainer"
                )
                return

    def open_connections(self) -> int:
        with self.lock:
            return self.open

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
