# -*- test-case-name: tests.test_api -*-
"""
The REST API under ``/api`` (Klein).

Routes call :class:`ForwardService`; every failure is an :class:`APIError`
turned into a status and a JSON body by one handler.  Unknown paths and
methods go through the same handler (404 / 405 with ``Allow``), after the
token check, so an unauthenticated client learns nothing of the routes.
``/api/openapi.json`` is public: it describes the API and holds no data.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Coroutine
from typing import Any
from urllib.parse import quote, urlsplit

import attrs
from klein import Klein
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from rexecpf.auth import Authenticator, bearer_token
from rexecpf.domains import TXT_PREFIX, slug_label
from rexecpf.forwards import ForwardService
from rexecpf.http.errors import write_error, write_json
from rexecpf.model import (
    INTERNAL_ERROR,
    INVALID_REQUEST,
    METHOD_NOT_ALLOWED,
    NOT_FOUND,
    REQUEST_TOO_LARGE,
    APIError,
    PortForward,
    Principal,
)
from rexecpf.openapi import openapi_document

__all__ = ["API", "PublicURLs"]

#: A create request is a few dozen bytes; anything near this is not one.
MAX_BODY_BYTES = 64 * 1024


@attrs.frozen
class PublicURLs:
    """
    Builds the URLs handed to clients from ``public_url`` and ``proxy_domain``.
    """

    public_url: str
    proxy_domain: str = ""

    def host_url(self, host: str) -> str:
        """:return: the root URL of a host served by host routing: ``public_url``'s scheme and port."""
        parts = urlsplit(self.public_url)
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{host}{port}/"

    def forward_url(self, forward: PortForward) -> str:
        """
        :return: a forward's ``proxy_url``: its stable host
            ``{slug}--{owner}.{proxy_domain}`` when it has a slug (and there
            is a ``proxy_domain``), else :meth:`proxy_url`.
        """
        if forward.slug is not None and self.proxy_domain:
            return self.host_url(f"{slug_label(forward.slug, forward.owner)}.{self.proxy_domain}")
        return self.proxy_url(forward.id)

    def proxy_url(self, forward_id: str) -> str:
        """:return: ``{public_url}/p/{id}/``, or the forward's own origin."""
        if self.proxy_domain:
            parts = urlsplit(self.public_url)
            port = f":{parts.port}" if parts.port else ""
            label = forward_id.replace("_", "-")
            return f"{parts.scheme}://{label}.{self.proxy_domain}{port}/"
        return f"{self.public_url}/p/{forward_id}/"

    def websocket_url(self, forward_id: str) -> str:
        """:return: ``ws(s)://{public host}/ws/port-forward/{id}``."""
        parts = urlsplit(self.public_url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        return f"{scheme}://{parts.netloc}{parts.path}/ws/port-forward/{forward_id}"

    def forward_path(self, forward: PortForward) -> str:
        return (
            f"{urlsplit(self.public_url).path}/api/containers/"
            f"{quote(forward.container_id, safe='')}/port-forwards/{forward.id}"
        )

    def describe_domain(
        self, forward: PortForward, domain: str, token_for: Callable[[str, str], str | None]
    ) -> dict[str, Any]:
        """
        :param token_for: ``(user, domain) -> token``
            (:meth:`ForwardService.verification_token`).
        :return: the domain object of the API.
        """
        return {
            "domain": domain,
            "verified": domain in forward.verified_domains,
            "url": self.host_url(domain),
            "verification": {
                "type": "TXT",
                "name": TXT_PREFIX + domain,
                "value": token_for(forward.owner, domain) or "",
            },
        }

    def describe(
        self, forward: PortForward, token_for: Callable[[str, str], str | None] = lambda user, domain: None
    ) -> dict[str, Any]:
        """:return: the forward object of the API."""
        return {
            "id": forward.id,
            "container_id": forward.container_id,
            "container_port": forward.container_port,
            "local_port": forward.local_port,
            "name": forward.name,
            "proxy_url": self.forward_url(forward),
            "websocket_url": self.websocket_url(forward.id),
            "created_at": forward.created_at,
            "pass_preflight": forward.pass_preflight,
            "slug": forward.slug,
            "domains": [self.describe_domain(forward, domain, token_for) for domain in forward.domains],
        }


@attrs.frozen
class _Domain:
    """A route's answer: one domain of a forward."""

    forward: PortForward
    domain: str


@attrs.frozen
class _Domains:
    """A route's answer: every domain of a forward."""

    forward: PortForward


def shielded(work: Deferred[Any]) -> Deferred[Any]:
    """
    :return: a Deferred with ``work``'s result whose cancellation leaves
        ``work`` running (its late result is dropped).
    """
    outer: Deferred[Any] = Deferred()

    def forward(result: Any) -> None:
        if not outer.called:
            outer.callback(result)
        elif isinstance(result, Failure):
            pass  # the caller stopped listening; the failure was answered for

    work.addBoth(forward)
    return outer


class _StrictPaths(Resource):
    """
    Guards the Klein resource from URLs it would read ambiguously, answering
    (after the 401 check) with the API's JSON errors: a path that is not UTF-8
    after percent-decoding is 400 Invalid request (Klein would answer
    text/plain); an encoded slash (``%2F``) in a segment is 404 Not found
    (Klein would take it for a separator).
    """

    isLeaf = True

    def __init__(self, api: API, klein: IResource) -> None:
        super().__init__()
        self._api = api
        self._klein = klein

    def render(self, request: IRequest) -> Any:
        error: APIError | None = None
        try:
            for segment in (*request.prepath, *request.postpath):
                segment.decode("utf-8")
            request.getRequestHostname().decode("utf-8")
        except UnicodeDecodeError:
            error = INVALID_REQUEST("the URL is not UTF-8")
        else:
            if any(b"/" in segment for segment in request.postpath):
                error = NOT_FOUND("no such API path (an encoded slash is not a separator)")
        if error is None:
            return self._klein.render(request)
        try:
            self._api._principal(request)
        except APIError as unauthorized:
            return write_error(request, unauthorized)
        return write_error(request, error)


class API:
    """
    :param authenticator: tokens -> users.
    :param forwards: the forwards.
    :param urls: how forwards are addressed from outside.
    """

    app = Klein()
    _log = Logger()

    def __init__(self, authenticator: Authenticator, forwards: ForwardService, urls: PublicURLs):
        self.authenticator = authenticator
        self._forwards = forwards
        self._urls = urls

    def resource(self) -> Any:
        return _StrictPaths(self, self.app.resource())

    # --- plumbing

    def _principal(self, request: IRequest) -> Principal:
        return self.authenticator.require(bearer_token(request.getHeader(b"authorization")))

    def _body(self, request: IRequest) -> bytes:
        content = request.content
        content.seek(0, 2)
        size = content.tell()
        if size > MAX_BODY_BYTES:
            raise REQUEST_TOO_LARGE(f"a request body may be at most {MAX_BODY_BYTES} bytes")
        content.seek(0)
        data: bytes = content.read()
        return data

    async def _call(
        self,
        request: IRequest,
        container_id: str,
        forward_id: str | None,
        operation: Callable[[Principal], Coroutine[Any, Any, tuple[int, Any]]],
    ) -> bytes:
        """Authenticate, run, answer and log one API call."""
        user = "-"
        try:
            principal = self._principal(request)
            user = principal.name
            # The operation runs to its end even if the client goes away
            # (Klein cancels the route): a create that reached the store
            # must also reach the in-memory state.
            code, document = await shielded(ensureDeferred(operation(principal)))
        except APIError as error:
            self._log_call(request, user, container_id, forward_id, error.code, error.detail)
            raise
        if isinstance(document, PortForward):
            forward_id = document.id
        self._log_call(request, user, container_id, forward_id, code, "")
        if code == 204:
            request.setResponseCode(204)
            return b""
        if isinstance(document, (PortForward, list)):
            # (the tokens of the forwards' domains)
            await self._forwards.domain_key()
        token_for = self._forwards.verification_token
        if isinstance(document, PortForward):
            if code == 201:
                request.setHeader(b"location", self._urls.forward_path(document).encode("utf-8"))
            document = self._urls.describe(document, token_for)
        elif isinstance(document, list):
            document = [self._urls.describe(forward, token_for) for forward in document]
        elif isinstance(document, _Domain):
            if code == 201:
                path = self._urls.forward_path(document.forward) + "/domains/" + document.domain
                request.setHeader(b"location", path.encode("utf-8"))
            await self._forwards.domain_key()
            document = self._urls.describe_domain(document.forward, document.domain, token_for)
        elif isinstance(document, _Domains):
            await self._forwards.domain_key()
            forward = document.forward
            document = [self._urls.describe_domain(forward, domain, token_for) for domain in forward.domains]
        return write_json(request, code, document)

    def _log_call(
        self,
        request: IRequest,
        user: str,
        container_id: str,
        forward_id: str | None,
        status: int,
        detail: str,
    ) -> None:
        self._log.info(
            "api {method} user={user} container={container_id} forward={forward_id} "
            "status={status}{detail}",
            method=request.method.decode("ascii", "replace"),
            user=user,
            container_id=container_id,
            forward_id=forward_id or "-",
            status=status,
            detail=f" ({detail})" if detail else "",
        )

    # --- routes

    @app.route("/containers/<container_id>/port-forwards", methods=["GET", "POST"])
    async def forwards(self, request: IRequest, container_id: str) -> bytes:
        if request.method == b"POST":

            async def create(principal: Principal) -> tuple[int, Any]:
                body = self._body(request)
                return 201, await self._forwards.create(principal, container_id, body)

            return await self._call(request, container_id, None, create)

        async def list_(principal: Principal) -> tuple[int, Any]:
            return 200, await self._forwards.list(principal, container_id)

        return await self._call(request, container_id, None, list_)

    @app.route(
        "/containers/<container_id>/port-forwards/<forward_id>", methods=["GET", "DELETE"]
    )
    async def forward(self, request: IRequest, container_id: str, forward_id: str) -> bytes:
        if request.method == b"DELETE":

            async def delete(principal: Principal) -> tuple[int, Any]:
                await self._forwards.delete(principal, container_id, forward_id)
                return 204, None

            return await self._call(request, container_id, forward_id, delete)

        async def get(principal: Principal) -> tuple[int, Any]:
            return 200, await self._forwards.get(principal, container_id, forward_id)

        return await self._call(request, container_id, forward_id, get)

    @app.route("/containers/<container_id>/port-forwards/<forward_id>/domains", methods=["GET"])
    async def domains(self, request: IRequest, container_id: str, forward_id: str) -> bytes:
        async def list_(principal: Principal) -> tuple[int, Any]:
            return 200, _Domains(await self._forwards.get(principal, container_id, forward_id))

        return await self._call(request, container_id, forward_id, list_)

    @app.route(
        "/containers/<container_id>/port-forwards/<forward_id>/domains/<domain>",
        methods=["GET", "PUT", "DELETE"],
    )
    async def domain(self, request: IRequest, container_id: str, forward_id: str, domain: str) -> bytes:
        if request.method == b"PUT":

            async def put(principal: Principal) -> tuple[int, Any]:
                created, forward, name = await self._forwards.put_domain(
                    principal, container_id, forward_id, domain
                )
                return (201 if created else 200), _Domain(forward, name)

            return await self._call(request, container_id, forward_id, put)
        if request.method == b"DELETE":

            async def delete(principal: Principal) -> tuple[int, Any]:
                await self._forwards.delete_domain(principal, container_id, forward_id, domain)
                return 204, None

            return await self._call(request, container_id, forward_id, delete)

        async def get(principal: Principal) -> tuple[int, Any]:
            forward, name = await self._forwards.get_domain(principal, container_id, forward_id, domain)
            return 200, _Domain(forward, name)

        return await self._call(request, container_id, forward_id, get)

    @app.route("/openapi.json", methods=["GET"])
    def openapi(self, request: IRequest) -> bytes:
        return write_json(request, 200, openapi_document())

    # --- errors

    @app.handle_errors(APIError)
    def api_error(self, request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        assert isinstance(error, APIError)
        return write_error(request, error)

    @app.handle_errors(HTTPException)
    def routing_error(self, request: IRequest, failure: Failure) -> bytes:
        """No route or no method: 401 first, then 404 or 405 with ``Allow``."""
        try:
            self._principal(request)
        except APIError as unauthorized:
            return write_error(request, unauthorized)
        value = failure.value
        error: APIError
        if isinstance(value, MethodNotAllowed):
            allowed = ", ".join(sorted(value.valid_methods or ()))
            error = METHOD_NOT_ALLOWED(
                f"{request.method.decode('ascii', 'replace')} is not allowed here",
                headers={"Allow": allowed},
            )
        else:
            error = NOT_FOUND("no such API path")
        return write_error(request, error)

    @app.handle_errors(Exception)
    def unexpected_error(self, request: IRequest, failure: Failure) -> bytes:
        incident = secrets.token_hex(6)
        self._log.failure("unexpected error, incident {incident}", failure, incident=incident)
        return write_error(request, INTERNAL_ERROR(f"incident {incident}"))
