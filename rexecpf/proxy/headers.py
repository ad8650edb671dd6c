# -*- test-case-name: tests.test_proxy -*-
"""
The headers of a proxied exchange: hop-by-hop headers dropped both ways
(plus every name ``Connection`` lists), every value of a repeated header
kept, ``Host`` the client's, ``X-Forwarded-For/-Proto/-Host/-Prefix``
added; rexecpf's credentials never reach the container; ``Location`` put
under the forward's prefix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from twisted.web.http_headers import Headers
from twisted.web.iweb import IRequest

from rexecpf.model import Container
from rexecpf.proxy.sessions import carries_token, without_session_cookie

__all__ = ["HOP_BY_HOP", "Fields", "authority", "request_head", "response_headers", "rewrite_location"]

#: Hop-by-hop headers (RFC 9110 7.6.1, and the ones ``_newclient`` manages),
#: lower case.  Names listed in ``Connection`` are removed as well.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)

#: Request headers the proxy sets itself (the client's values are dropped).
_OWN_REQUEST_HEADERS = frozenset(
    {b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-prefix", b"content-length", b"expect"}
)

def connection_names(headers: Headers) -> set[bytes]:
    """:return: the (lower-case) names a ``Connection`` header lists."""
    return comma_tokens(headers.getRawHeaders(b"connection", []))


def comma_tokens(values: Iterable[bytes]) -> set[bytes]:
    """:return: the lower-case tokens of comma-separated header values."""
    names = set()
    for value in values:
        for token in value.split(b","):
            token = token.strip().lower()
            if token:
                names.add(token)
    return names


#: A response head's fields: lower-case name -> (the name as first sent, every value in order).
Fields = dict[bytes, tuple[bytes, list[bytes]]]


def field_values(fields: Fields, lower_name: bytes) -> list[bytes]:
    """:return: every value of a field (``[]`` when absent)."""
    field = fields.get(lower_name)
    return field[1] if field is not None else []


def client_ip(request: IRequest) -> bytes:
    address = request.getClientAddress()
    host = getattr(address, "host", None)
    return host.encode("ascii") if host else b"unknown"


def authority(container: Container, port: int) -> bytes:
    address = container.address or ""
    if ":" in address and not address.startswith("["):
        address = f"[{address}]"
    return f"{address}:{port}".encode("ascii")


def rewrite_location(value: bytes, prefix: bytes) -> bytes:
    """``/login`` -> ``{prefix}/login``; relative, scheme-relative and absolute URLs unchanged."""
    if value.startswith(b"/") and not value.startswith(b"//"):
        if value == prefix or value.startswith(prefix + b"/"):
            return value  # the application already honours X-Forwarded-Prefix
        return prefix + value
    return value


def request_head(
    request: Any,
    target: bytes,
    prefix: bytes,
    upgrade: bool,
    default_host: bytes,
    content_length: int | None,
    chunked: bool = False,
    *,
    is_token: Callable[[str], bool],
    behind_https: bool = False,
) -> bytes:
    """
    :param target: the path and query for the container.
    :param default_host: the ``Host`` when the client sent none (HTTP/1.0).
    :param content_length: the length of the body sent, if any.
    :param chunked: whether the body is sent chunked (its length unknown).
    :param is_token: whether a string is a rexecpf token
        (:meth:`rexecpf.auth.Authenticator.is_token`).
    :param behind_https: whether ``public_url`` is ``https`` (the client used
        https whatever the request says).
    :return: the request head for the container: end-to-end headers only
        (every value, in order), rexecpf's credentials removed (its
        cookie, and every ``Authorization`` value that holds a rexecpf
        token, of any user: :func:`rexecpf.proxy.sessions.carries_token`; other values, the
        app's own credentials, pass), ``X-Forwarded-*`` added.
    """
    incoming: Headers = request.requestHeaders
    drop = _OWN_REQUEST_HEADERS | connection_names(incoming)
    lines = [request.method + b" " + target + b" HTTP/1.1"]
    forwarded_for: list[bytes] = []
    host: bytes | None = None
    for name, values in incoming.getAllRawHeaders():
        lower = name.lower()
        if lower in HOP_BY_HOP or lower in drop:
            continue
        if lower == b"authorization":
            values = [value for value in values if not carries_token(value, is_token)]
        elif lower == b"cookie":
            values = without_session_cookie(list(values))
        elif lower == b"x-forwarded-for":
            forwarded_for = list(values)
            continue  # appended to below
        elif lower == b"host" and values:
            host = values[0]
        lines.extend(name + b": " + value for value in values)
    if upgrade:
        lines.append(b"Connection: upgrade")
        lines.extend(b"Upgrade: " + value for value in incoming.getRawHeaders(b"upgrade", []))
    forwarded_for.append(client_ip(request))
    lines.append(b"X-Forwarded-For: " + b", ".join(forwarded_for))
    # behind a TLS front end, the https of public_url is what the client used
    secure = behind_https or request.isSecure()
    lines.append(b"X-Forwarded-Proto: https" if secure else b"X-Forwarded-Proto: http")
    if host is None:
        lines.append(b"Host: " + default_host)
    else:
        lines.append(b"X-Forwarded-Host: " + host)
    if prefix:
        lines.append(b"X-Forwarded-Prefix: " + prefix)
    if content_length is not None:
        lines.append(b"Content-Length: %d" % content_length)
    elif chunked:
        lines.append(b"Transfer-Encoding: chunked")
    lines.append(b"\r\n")
    return b"\r\n".join(lines)

def response_headers(
    request: Any,
    fields: Fields,
    prefix: bytes,
    keep: Iterable[bytes] = (),
    also_drop: Iterable[bytes] = (),
) -> None:
    """
    Copy the container's end-to-end response fields onto ``request``.

    :param keep: hop-by-hop names kept all the same.
    :param also_drop: end-to-end names dropped all the same.
    """
    out: Headers = request.responseHeaders
    out.removeHeader(b"server")
    keep_set = set(keep)
    drop = HOP_BY_HOP | comma_tokens(field_values(fields, b"connection")) | set(also_drop)
    for lower, (name, values) in fields.items():
        if lower in keep_set:
            out.setRawHeaders(name, values)
            continue
        if lower in drop:
            continue
        if lower == b"location" and prefix:
            values = [rewrite_location(value, prefix) for value in values]
        out.setRawHeaders(name, values)


