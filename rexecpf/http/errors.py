# -*- test-case-name: tests.test_web -*-
"""
The one way rexecpf answers an error, whoever answers it (the API, the
site, the proxy, the tunnel's handshake): the JSON body
``{"error": {"code": N, "message": "...", "detail": "..."}}`` of an
:class:`rexecpf.model.APIError`, or for a browser on the proxy a short
HTML page.
"""

from __future__ import annotations

import html
import json
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.web import http, server
from twisted.web.http_headers import Headers
from twisted.web.iweb import IRequest

from rexecpf.http._twisted import request_disconnected
from rexecpf.model import APIError

__all__ = ["abort_client", "error_body", "error_response", "finish_with_error", "wants_html", "write_error", "write_json"]

#: Reason phrases Twisted does not know (it would send "Unknown Status").
_REASONS = {429: b"Too Many Requests"}

_ERROR_PAGE = (
    "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{code} {message}</title></head>"
    "<body><h1>{code} {message}</h1><p>{detail}</p><p><small>rexecpf</small></p></body></html>\n"
)


def write_json(request: IRequest, code: int, document: Any) -> bytes:
    """Set the status and JSON headers; :return: the body."""
    request.setResponseCode(code, _REASONS.get(code))
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"x-content-type-options", b"nosniff")
    return json.dumps(document).encode("utf-8") + b"\n"


def write_error(request: IRequest, error: APIError) -> bytes:
    """Set status, headers and :return: the JSON body of ``error``."""
    for name, value in error.headers.items():
        request.setHeader(name.encode("ascii"), value.encode("ascii"))
    return write_json(request, error.code, error.body())


def error_response(error: APIError) -> bytes:
    """
    :return: ``error`` as a whole HTTP/1.1 response (JSON) that says the
        connection closes: for answers written straight to a transport,
        where no ``Request`` can answer (a request still being read, a
        refused WebSocket handshake).
    """
    body = json.dumps(error.body()).encode("utf-8") + b"\n"
    extra = b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in error.headers.items())
    return (
        b"HTTP/1.1 %d %s\r\n" % (error.code, error.message.encode())
        + extra
        + b"Content-Type: application/json\r\nCache-Control: no-store\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )


def wants_html(request: IRequest) -> bool:
    """:return: whether the client is a browser (its ``Accept`` names text/html)."""
    accept = b",".join(request.requestHeaders.getRawHeaders(b"accept", []))
    return b"text/html" in accept.lower()


def error_body(request: IRequest, error: APIError) -> bytes:
    """
    Set the status and headers of an error the proxy (or the site, before
    routing) makes.

    :return: the body: a short HTML page for browsers, JSON otherwise.
    """
    for name, value in error.headers.items():
        request.setHeader(name.encode("ascii"), value.encode("ascii"))
    if not wants_html(request):
        return write_json(request, error.code, error.body())
    request.setResponseCode(error.code)
    request.setHeader(b"content-type", b"text/html; charset=utf-8")
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"x-content-type-options", b"nosniff")
    return _ERROR_PAGE.format(
        code=error.code, message=html.escape(error.message), detail=html.escape(error.detail)
    ).encode("utf-8")


def finish_with_error(request: Any, error: APIError) -> bool:
    """
    Answer ``error`` if nothing was sent yet; else abort the connection.

    :return: whether ``error`` was the answer.
    """
    if request_disconnected(request) or request.finished:
        return False
    if request.startedWriting:
        abort_client(request)
        return False
    request.responseHeaders = Headers()
    request.setHeader(b"server", server.version)
    request.setHeader(b"date", http.datetimeToString())
    request.write(error_body(request, error))
    request.finish()
    return True


#: Seconds a broken response may take to flush before its connection is aborted.
BROKEN_FLUSH_SECONDS = 30.0


def abort_client(request: Any, clock: IReactorTime | None = None) -> None:
    """
    End the client connection without finishing the response, so that it
    cannot look complete (a short body, or no terminating chunk).

    :param clock: when given, what was already written is flushed first (for
        at most :data:`BROKEN_FLUSH_SECONDS`); otherwise the connection is
        dropped at once.
    """
    channel = getattr(request, "channel", None)
    transport = getattr(channel, "transport", None)
    if transport is None:
        return
    abort = getattr(transport, "abortConnection", None)
    if clock is None or abort is None:
        (abort or transport.loseConnection)()
        return
    transport.loseConnection()

    def too_slow() -> None:
        if getattr(transport, "connected", False):
            abort()

    call = clock.callLater(BROKEN_FLUSH_SECONDS, too_slow)
    request.notifyFinish().addBoth(lambda _: call.cancel() if call.active() else None)
