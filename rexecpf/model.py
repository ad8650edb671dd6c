# -*- test-case-name: tests.test_api -*-
"""
The domain: containers, forwards, principals, and the one error type.

Every failure a client can see is an :class:`APIError` built from one of the
named kinds below; ``web``/``api`` turn it into the HTTP status and the JSON
body ``{"error": {"code": N, "message": "...", "detail": "..."}}``.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import attrs

__all__ = [
    "APIError",
    "CloseReason",
    "Container",
    "ErrorKind",
    "PortForward",
    "Principal",
    "new_forward_id",
]


class CloseReason(StrEnum):
    """
    Why rexecpf closes a live connection (a tunnel, a listener's connection,
    a proxied request or upgrade): the text the peer is told where its
    protocol can say it (a WebSocket close reason, an error detail) and that
    the relay's end-of-connection log line gives.  Each is a ``str``.
    """

    #: the forward was deleted
    DELETED = "forward deleted"
    #: the forward's container stopped or went away
    CONTAINER_STOPPED = "container stopped"
    #: rexecpf is stopping
    GOING_AWAY = "going away"
    #: the user's token was revoked
    TOKEN_REVOKED = "token revoked"
    #: the user may no longer use the container (admin right removed, the
    #: container given to someone else)
    ACCESS_REVOKED = "access revoked"
    #: no data flowed either way for the relay's idle time
    IDLE = "idle timeout"
    #: the other side closed cleanly
    PEER_CLOSED = "peer closed"
    #: the other side's connection was lost
    PEER_LOST = "peer connection lost"
    #: the container port could not be reached
    CONNECT_FAILED = "connect failed"


@attrs.frozen
class ErrorKind:
    """A kind of failure: its HTTP status and its fixed message."""

    code: int
    message: str

    def __call__(self, detail: str = "", headers: Mapping[str, str] | None = None) -> APIError:
        """
        :return: an :class:`APIError` of this kind, ready to raise.
        """
        return APIError(self, detail, dict(headers or {}))


class APIError(Exception):
    """A failure with an HTTP status, a message, and a detail for humans."""

    def __init__(self, kind: ErrorKind, detail: str = "", headers: dict[str, str] | None = None):
        super().__init__(kind.code, kind.message, detail)
        self.kind = kind
        self.detail = detail
        self.headers = headers or {}

    @property
    def code(self) -> int:
        return self.kind.code

    @property
    def message(self) -> str:
        return self.kind.message

    def body(self) -> dict[str, Any]:
        """:return: the JSON error document."""
        return {"error": {"code": self.code, "message": self.message, "detail": self.detail}}


UNAUTHORIZED = ErrorKind(401, "Unauthorized")
FORBIDDEN = ErrorKind(403, "Forbidden")
CONTAINER_NOT_FOUND = ErrorKind(404, "Container not found")
INVALID_REQUEST = ErrorKind(400, "Invalid request")
INVALID_PORT = ErrorKind(400, "Invalid port")
CONTAINER_NOT_RUNNING = ErrorKind(409, "Container not running")
PORT_ALREADY_FORWARDED = ErrorKind(403, "Port already forwarded")
PORT_NOT_ALLOWED = ErrorKind(403, "Port not allowed")
LIMIT_EXCEEDED = ErrorKind(429, "Limit exceeded")
LOCAL_PORT_UNAVAILABLE = ErrorKind(409, "Local port unavailable")
INVALID_DOMAIN = ErrorKind(400, "Invalid domain")
DOMAINS_NOT_ALLOWED = ErrorKind(403, "Custom domains not allowed")
DOMAIN_CLAIMED = ErrorKind(409, "Domain already claimed")
TOO_MANY_DOMAINS = ErrorKind(429, "Too many domains")
DOMAIN_NOT_FOUND = ErrorKind(404, "Domain not found")
INVALID_SLUG = ErrorKind(400, "Invalid slug")
SLUG_TAKEN = ErrorKind(409, "Slug already in use")
FORWARD_NOT_FOUND = ErrorKind(404, "Port forward not found")
METHOD_NOT_ALLOWED = ErrorKind(405, "Method not allowed")
NOT_FOUND = ErrorKind(404, "Not found")
REQUEST_TOO_LARGE = ErrorKind(413, "Request too large")
BACKEND_UNAVAILABLE = ErrorKind(503, "Backend unavailable")
STORE_UNAVAILABLE = ErrorKind(503, "Store unavailable")
BAD_GATEWAY = ErrorKind(502, "Bad gateway")
GATEWAY_TIMEOUT = ErrorKind(504, "Gateway timeout")
INTERNAL_ERROR = ErrorKind(500, "Internal error")


@attrs.frozen
class Principal:
    """An authenticated user."""

    name: str
    admin: bool = False

    def may_use(self, container: Container) -> bool:
        """:return: whether this user may see and act on ``container``."""
        return self.admin or (container.owner is not None and container.owner == self.name)


@attrs.frozen
class Container:
    """What a backend knows of a container."""

    id: str
    owner: str | None
    address: str | None
    running: bool
    #: why it is not running (or not reachable), for the error detail
    detail: str = ""


def _names(values: Iterable[str]) -> tuple[str, ...]:
    """A list (as JSON gives it: the change feed) kept as a tuple."""
    return tuple(values)


@attrs.frozen
class PortForward:
    """A stored forward."""

    id: str
    container_id: str
    container_port: int
    local_port: int
    name: str | None
    #: milliseconds since the epoch
    created_ms: int
    #: who created it (for logs); access is decided by container ownership
    owner: str = ""
    #: whether the proxy passes CORS preflights (``OPTIONS``, no credentials)
    #: to the container rather than answering them itself
    pass_preflight: bool = False
    #: a stable name: the host ``{slug}--{owner}.{proxy_domain}`` (unique per owner)
    slug: str | None = None
    #: custom domains, in the order they were added (lowercase, no trailing dot)
    domains: tuple[str, ...] = attrs.field(default=(), converter=_names)
    #: those of :attr:`domains` whose ownership is proven (routed, and
    #: claimed: no other forward may have them)
    verified_domains: tuple[str, ...] = attrs.field(default=(), converter=_names)

    @property
    def created_at(self) -> str:
        """:return: ISO 8601 UTC with milliseconds, e.g. 2026-11-28T10:00:00.123Z"""
        moment = datetime.fromtimestamp(self.created_ms / 1000, tz=UTC)
        return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{self.created_ms % 1000:03d}Z"


_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


def new_forward_id() -> str:
    """
    :return: ``pf_`` and 24 random lowercase letters and digits (124 bits):
        unguessable, and with ``-`` for ``_`` a valid DNS label.
    """
    return "pf_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))
