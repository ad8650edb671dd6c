# -*- test-case-name: tests.test_proxy -*-
"""
The HTTP reverse proxy: ``/p/{id}/...`` and, with ``[server] proxy_domain``,
``pf-xxxx.{proxy_domain}``.

What it does, against the twelve faults of ``twisted.web.proxy``:

- HTTP/1.1 over kept-alive connections to the container (a small pool per
  address and port, made through endpoints: IPv6 bracketed, no
  ``connectTCP``); the response head is read by the proxy itself and the
  body decoded by its framing (Content-Length, chunked, or until close):
  ``twisted.web.client.Agent``'s per-request machinery was most of a
  proxied request's cost;
- the response body streams with back-pressure: the backend transport is the
  request's streaming producer, so a slow client stops the container's reads;
- the request body streams too: the request is processed as soon as its
  head is complete, and the body goes to the container as it arrives, framed
  as the client sent it (Content-Length or chunked), as the container
  connection's producer: a container that does not read pauses the client
  (:class:`rexecpf.web.RequestBodyStream`; over the limit it is refused with
  413 while it arrives, see :class:`rexecpf.web.LimitedRequest`);
- hop-by-hop headers go both ways (plus every name ``Connection`` lists),
  every value of a repeated header is kept, ``Host`` is the client's, and
  ``X-Forwarded-For/-Proto/-Host/-Prefix`` are added;
- 502 when the container does not answer, 504 when no response headers come
  within ``response_timeout``; a backend that dies mid-body aborts the client
  connection (a short or unterminated response, never a complete-looking one);
- a client that goes away stops the backend;
- an ``Upgrade`` request is sent over a connection of its own; a 101 takes the client
  connection over from the ``HTTPChannel`` and splices both with
  :class:`rexecpf.relay.Relay`;
- rexecpf's own credentials never reach the container: its session cookie,
  every ``Authorization`` value holding a rexecpf token (of any user, in any
  scheme, case or spacing: :func:`rexecpf.proxy.sessions.carries_token`), and a ``token`` query
  parameter that is a rexecpf token (consumed: cookie and redirect); an
  app's own ``Authorization`` values and ``token`` parameter pass;
- a request authenticated by the session cookie that is unsafe or an upgrade
  is refused (403) from an ``Origin`` other than the forward's own
  (:func:`rexecpf.proxy.sessions.check_origin`);
- a CORS preflight without credentials is answered 204 with no CORS
  permission, or passed to the container if its forward says so
  (``pass_preflight``; :meth:`ProxyService._preflight`).

The package:

- :mod:`rexecpf.proxy.parser`: the strict, I/O-free HTTP/1.1 response parser;
- :mod:`rexecpf.proxy.pool`: connections to container ports, kept alive in a pool;
- :mod:`rexecpf.proxy.exchange`: one request, as a state machine with one close path;
- :mod:`rexecpf.proxy.headers`: hop-by-hop, the request head, response headers, ``Location``;
- :mod:`rexecpf.proxy.sessions`: the session cookie, ``?token=``, credentials, ``Origin``;
- :mod:`rexecpf.proxy.resource`: :class:`ProxyService`, :class:`ProxyResource`, :class:`HostRouter`.
"""

from rexecpf.proxy.resource import HostRouter, ProxyResource, ProxyService
from rexecpf.proxy.sessions import SESSION_COOKIE, SessionCookies

__all__ = [
    "SESSION_COOKIE",
    "HostRouter",
    "ProxyResource",
    "ProxyService",
    "SessionCookies",
]
