# -*- test-case-name: tests.test_api -*-
"""
The root of the public site: ``/api`` (REST), ``/p/`` (HTTP proxy),
``/ws/`` (tunnels) and ``/healthz``; anything else is a JSON 404.

The :class:`RexecSite` never writes a request's query string to the access
log (a browser's first visit carries ``?token=``), never shows tracebacks, and
identifies itself only as ``rexecpf``.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource

from rexecpf.api import write_error, write_json
from rexecpf.backends import IContainerBackend
from rexecpf.model import NOT_FOUND, APIError
from rexecpf.store import IForwardStore

__all__ = ["Health", "RexecSite", "Root"]


class NotFoundResource(Resource):
    isLeaf = True

    def render(self, request: IRequest) -> bytes:
        return write_error(request, NOT_FOUND("no such path"))


class Health(Resource):
    """``/healthz``: 200 when the store and the backend answer, else 503."""

    isLeaf = True
    _log = Logger()

    def __init__(self, store: IForwardStore, backend: IContainerBackend) -> None:
        super().__init__()
        self._store = store
        self._backend = backend

    def render_GET(self, request: IRequest) -> Any:
        if request.postpath not in ([], [b""]):
            return write_error(request, NOT_FOUND("no such path"))
        checks = [self._store.check(), self._backend.check()]

        def healthy(_: object) -> None:
            request.write(write_json(request, 200, {"status": "ok"}))
            request.finish()

        def unhealthy(failure: Failure) -> None:
            error = failure.value
            if isinstance(error, Exception) and hasattr(error, "subFailure"):
                error = error.subFailure.value
            detail = error.detail if isinstance(error, APIError) else "internal error"
            if not isinstance(error, APIError):
                self._log.failure("health check failed", failure)
            request.write(write_json(request, 503, {"status": "unavailable", "detail": detail}))
            request.finish()

        finished: Deferred[None] = request.notifyFinish()  # type: ignore[attr-defined]
        gatherResults(checks, consumeErrors=True).addCallbacks(healthy, unhealthy).addErrback(
            lambda failure: None if finished.called else self._log.failure("healthz", failure)
        )
        return server.NOT_DONE_YET


class Root(Resource):
    """
    :param api: the Klein resource for ``/api``.
    :param health: ``/healthz``.
    :param proxy: ``/p/`` (may be ``None`` until mounted).
    :param tunnel: ``/ws/`` (may be ``None`` until mounted).
    :param host_router: a resource that serves requests whose Host names a
        forward under ``proxy_domain`` (or ``None``).
    """

    def __init__(
        self,
        api: IResource,
        health: IResource,
        proxy: IResource | None = None,
        tunnel: IResource | None = None,
        host_router: Any = None,
    ) -> None:
        super().__init__()
        self._children: dict[bytes, IResource] = {b"api": api, b"healthz": health}
        if proxy is not None:
            self._children[b"p"] = proxy
        if tunnel is not None:
            self._children[b"ws"] = tunnel
        self._host_router = host_router
        self._not_found = NotFoundResource()

    def getChildWithDefault(self, path: bytes, request: IRequest) -> IResource:
        if self._host_router is not None:
            routed = self._host_router.route(request)
            if routed is not None:
                return routed  # type: ignore[no-any-return]
        return self._children.get(path, self._not_found)

    def render(self, request: IRequest) -> bytes:
        return write_error(request, NOT_FOUND("see /api/openapi.json"))


class RexecSite(server.Site):
    """A Site that logs without query strings and shows no tracebacks."""

    displayTracebacks = False

    def __init__(self, resource: IResource, **kwargs: Any) -> None:
        super().__init__(resource, **kwargs)
        self.displayTracebacks = False

    def log(self, request: Any) -> None:
        # The query string may hold a token (?token=...): log the path only.
        path = request.uri.split(b"?", 1)[0][:2048].decode("ascii", "replace")
        self._access_log.info(
            "{client} {method} {path} {code} {length}",
            client=request.getClientAddress().host
            if hasattr(request.getClientAddress(), "host")
            else "-",
            method=request.method.decode("ascii", "replace")[:16],
            path=path,
            code=request.code,
            length=request.sentLength,
        )

    _access_log = Logger(namespace="rexecpf.access")


server.version = b"rexecpf"  # no Twisted version in the Server header
