# -*- test-case-name: tests.test_ask -*-
"""
``GET /tls/ask?domain=NAME``: whether a forward claims a host name, for a TLS
terminator in front of rexecpf that gets certificates on demand (Caddy's
``on_demand_tls { ask ... }``, which takes 200 as "yes" and anything else as
"no"; Traefik or a script the same way).

Caddy calls it without credentials, so it is cheap and bounded: it reads
memory (or whatever the injected ``claimed`` reads, never writing), at most
:data:`MAX_IN_FLIGHT` answers wait at once (more are 503), and one that
takes over :data:`ASK_TIMEOUT_SECONDS` is 503.  It is served on its own
listener (``[tls] ask_listen``), meant for loopback or the terminator's
private network only.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource

from rexecpf.http.errors import write_error, write_json
from rexecpf.model import INVALID_REQUEST, METHOD_NOT_ALLOWED, NOT_FOUND, ErrorKind

__all__ = ["AskResource"]

DOMAIN_NOT_CLAIMED = ErrorKind(404, "Domain not claimed")
ASK_UNAVAILABLE = ErrorKind(503, "Service unavailable")

#: Answers waiting for ``claimed`` at once; more are 503 at once.
MAX_IN_FLIGHT = 32
#: An answer ``claimed`` has not given by then is 503.
ASK_TIMEOUT_SECONDS = 5.0

_LABEL = re.compile(r"[a-z0-9]([a-z0-9\-]{0,61}[a-z0-9])?\Z")


def host_name(value: bytes) -> str | None:
    """:return: ``value`` as a lower-case DNS host name (no trailing dot), or ``None`` if it is not one."""
    try:
        text = value.decode("ascii").lower()
    except UnicodeDecodeError:
        return None
    text = text[:-1] if text.endswith(".") else text
    if not text or len(text) > 253 or not all(_LABEL.match(label) for label in text.split(".")):
        return None
    return text


class AskResource(Resource):
    """
    The root of the ask listener: ``/tls/ask`` answers, anything else is 404.

    :param claimed: ``claimed(domain)`` fires with whether a live forward
        claims ``domain`` (lower case, no trailing dot); it must not write.
    :param clock: for the timeout.
    """

    isLeaf = True
    _log = Logger()

    def __init__(self, claimed: Callable[[str], Deferred[bool]], clock: IReactorTime) -> None:
        super().__init__()
        self._claimed = claimed
        self._clock = clock
        self.in_flight = 0

    def render(self, request: IRequest) -> Any:
        if request.path != b"/tls/ask":
            return write_error(request, NOT_FOUND("no such path (see /tls/ask?domain=NAME)"))
        if request.method not in (b"GET", b"HEAD"):
            return write_error(request, METHOD_NOT_ALLOWED(
                "use GET /tls/ask?domain=NAME", headers={"Allow": "GET, HEAD"}))
        values = (request.args or {}).get(b"domain", [])
        if len(values) != 1:
            return write_error(request, INVALID_REQUEST("give one domain: /tls/ask?domain=NAME"))
        domain = host_name(values[0])
        if domain is None:
            return write_error(request, INVALID_REQUEST("domain is not a DNS host name"))
        if self.in_flight >= MAX_IN_FLIGHT:
            return write_error(request, ASK_UNAVAILABLE("too many questions at once; ask again"))
        try:
            answer = self._claimed(domain)
        except Exception:
            self._log.failure("ask: {domain}", domain=domain)
            return write_error(request, ASK_UNAVAILABLE("cannot tell now"))
        self.in_flight += 1
        answer.addTimeout(ASK_TIMEOUT_SECONDS, self._clock)
        finished: Deferred[None] = request.notifyFinish()  # type: ignore[attr-defined]
        finished.addErrback(lambda _: None)  # a client gone before the answer is no error

        def answered(is_claimed: bool) -> None:
            if finished.called:
                return
            if is_claimed:
                request.write(write_json(request, 200, {"domain": domain, "claimed": True}))
            else:
                request.write(write_error(request, DOMAIN_NOT_CLAIMED(f"no live forward claims {domain}")))
            request.finish()

        def failed(failure: Failure) -> None:
            if failure.check(TimeoutError):
                self._log.warn("ask: no answer for {domain} in {seconds}s", domain=domain,
                               seconds=ASK_TIMEOUT_SECONDS)
            else:
                self._log.failure("ask: {domain}", failure, domain=domain)
            if not finished.called:
                request.write(write_error(request, ASK_UNAVAILABLE("cannot tell now")))
                request.finish()

        def done(result: object) -> object:
            self.in_flight -= 1
            return result

        answer.addBoth(done).addCallbacks(answered, failed).addErrback(
            lambda failure: self._log.failure("ask: answering {domain}", failure, domain=domain)
        )
        return server.NOT_DONE_YET
