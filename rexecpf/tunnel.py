# -*- test-case-name: tests.test_tunnel -*-
"""
``/ws/port-forward/{id}``: a WebSocket carrying a TCP stream to a container port.

The opening handshake does all the checking before it answers 101:

1. authentication: subprotocols ``['Bearer', TOKEN]`` (``Bearer`` is
   selected), the ``Authorization: Bearer`` header, or the hosted product's
   ``rexec.token.TOKEN`` subprotocol (``rexec.v1`` is selected when offered);
   failing: 401 with ``WWW-Authenticate: Bearer``;
2. the forward: :meth:`ForwardService.reach` (404 unknown or not yours, 409
   container not running);
3. the user's cap on open tunnels, ``tunnels_per_user`` (429; the tunnel
   counts from here on, while its handshake goes on);
4. the TCP connection to ``container.address:forward.container_port`` (502
   when it is refused or times out).

Only then the 101 goes out and a :class:`rexecpf.relay.Relay` joins the two.
While it is open the server pings the client every third of
``tunnel_idle_seconds`` (not while the client's socket is full); a pong counts
as activity, so a browser (which cannot send pings, but answers them) keeps
an idle tunnel open, and a client that does not answer meets the idle timeout.
A failed handshake answers a JSON error body, as the API does.

After :class:`autobahn.twisted.resource.WebSocketResource` takes the
transport over from ``twisted.web``, the transport still has the
``HTTPChannel`` registered as its producer; :class:`TunnelProtocol`
unregisters it at once (STYLE.md 2.3), so the relay's own producers get the
transport's pause and resume signals.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.error import ConnectError, TimeoutError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource

from rexecpf.auth import Authenticator, bearer_token
from rexecpf.config import LimitsConfig
from rexecpf.endpoints import container_endpoint
from rexecpf.ends import TCPEnd
from rexecpf.forwards import ForwardService
from rexecpf.http._twisted import WebSocketResource, WebSocketServerFactory, WebSocketServerProtocol
from rexecpf.http.errors import error_response, write_error
from rexecpf.model import (
    BAD_GATEWAY,
    FORWARD_NOT_FOUND,
    INTERNAL_ERROR,
    INVALID_REQUEST,
    METHOD_NOT_ALLOWED,
    NOT_FOUND,
    APIError,
    ErrorKind,
)
from rexecpf.relay import CLOSE_GOING_AWAY, CONNECT_TIMEOUT, Relay, RelayStats
from rexecpf.web import release_from_http_channel
from rexecpf.wsend import WebSocketEndMixin, protocol_options

__all__ = [
    "TunnelFactory",
    "TunnelProtocol",
    "TunnelResource",
    "choose_credentials",
]

#: The server pings an open tunnel this many times per ``tunnel_idle_seconds``.
PINGS_PER_IDLE_TIMEOUT = 3

BEARER = "Bearer"
HOSTED_PREFIX = "rexec.token."
HOSTED_PROTOCOL = "rexec.v1"

_UPGRADE_REQUIRED = ErrorKind(426, "Upgrade required")

#: ``(address, port) -> endpoint``: how the tunnel reaches a container port.
EndpointFactory = Callable[[str, int], IStreamClientEndpoint]


def choose_credentials(
    protocols: list[str], authorization: str | None
) -> tuple[str | None, str | None]:
    """
    Find the token in a handshake and the subprotocol to answer with.

    :param protocols: the offered subprotocols, in order.
    :param authorization: the ``Authorization`` header, if any.
    :return: ``(token, selected subprotocol)``; the token is ``None`` when
        none was presented.
    """
    for index, offered in enumerate(protocols):
        if offered == BEARER and index + 1 < len(protocols):
            return protocols[index + 1], BEARER
    for offered in protocols:
        if offered.startswith(HOSTED_PREFIX) and len(offered) > len(HOSTED_PREFIX):
            selected = HOSTED_PROTOCOL if HOSTED_PROTOCOL in protocols else None
            return offered[len(HOSTED_PREFIX):], selected
    token = bearer_token(authorization.encode("latin-1") if authorization else None)
    # With the header, select nothing unless the client asked for rexec.v1.
    return token, HOSTED_PROTOCOL if HOSTED_PROTOCOL in protocols else None


class _Tracked:
    """What :meth:`ForwardService.track` holds for one tunnel."""

    def __init__(self, protocol: TunnelProtocol) -> None:
        self._protocol = protocol

    def shutdown(self, reason: str) -> None:
        self._protocol.shutdown(reason)


class TunnelProtocol(WebSocketEndMixin, WebSocketServerProtocol):
    """
    One tunnel: the handshake, then one end of a relay.  Its ``factory`` is
    a :class:`TunnelFactory` (typed ``Any`` by :class:`WebSocketEndMixin`:
    Twisted's ``Factory[P]`` cannot name the protocol of Autobahn's
    factories, which are not generic).
    """

    _log = Logger()

    def __init__(self) -> None:
        super().__init__()
        self.relay: Relay | None = None
        self.backend: TCPEnd | None = None
        self.forward_id: str | None = None
        #: the user the tunnel was opened for
        self.user: str | None = None
        self._deny: APIError | None = None
        self._connecting: Deferred[Any] | None = None
        self._untrack: Callable[[], None] | None = None
        self._gone = False
        self._ping_call: Any = None

    def connectionMade(self) -> None:
        # WebSocketResource took the transport over from twisted.web; the
        # relay registers its own producer later.
        release_from_http_channel(self.transport)
        super().connectionMade()

    # -- handshake -------------------------------------------------------

    def onConnect(self, request: ConnectionRequest) -> Deferred[str | None]:  # type: ignore[override]
        # Autobahn waits for a Deferred returned here (its annotation leaves
        # that out): the handshake answers once the container port is reached.
        return self._handshake(request)

    @inlineCallbacks
    def _handshake(self, request: ConnectionRequest) -> Any:
        # Nothing may be read from the client until the relay runs.
        self.transport.pauseProducing()
        try:
            forward_id = _forward_id(request.path)
            token, selected = choose_credentials(
                list(request.protocols), request.headers.get("authorization")
            )
            principal = self.factory.authenticator.require(token)
            self.user = principal.name
            if forward_id is None:
                raise FORWARD_NOT_FOUND("no port forward here")
            forward, container = yield self.factory.forwards.reach(principal, forward_id)
            self.forward_id = forward.id
            # Counted from here on, so that handshakes in flight count too.
            self.factory.forwards.admit(forward.id, "tunnel", principal.name)
            self._untrack = self.factory.forwards.track(
                forward.id, _Tracked(self), user=principal.name, kind="tunnel"
            )
            endpoint = self.factory.endpoint(container.address, forward.container_port)
            self._connecting = endpoint.connect(Factory.forProtocol(TCPEnd))
            self._connecting.addTimeout(CONNECT_TIMEOUT, self.factory.clock)
            try:
                self.backend = yield self._connecting
            except (CancelledError, DeferredTimeoutError):
                # addTimeout turns its cancellation into a TimeoutError.
                if self._gone:
                    raise CancelledError() from None
                raise BAD_GATEWAY(
                    f"container port {forward.container_port} did not answer"
                ) from None
            except (ConnectError, TimeoutError, OSError) as error:
                raise BAD_GATEWAY(
                    f"cannot connect to container port {forward.container_port}: "
                    f"{error.__class__.__name__}"
                ) from None
            finally:
                self._connecting = None
            if self._gone:
                self.backend.abort()
                raise CancelledError()
        except APIError as error:
            self._deny = error
            raise ConnectionDeny(error.code, error.message) from None
        except CancelledError:
            raise ConnectionDeny(499, "Client gone") from None
        except Exception:
            self._log.failure("tunnel handshake failed")
            self._deny = INTERNAL_ERROR("see the server log")
            raise ConnectionDeny(500, "Internal error") from None
        self._log.info(
            "tunnel {forward_id} to {container_id}:{port} for {user}",
            forward_id=forward.id,
            container_id=forward.container_id,
            port=forward.container_port,
            user=principal.name,
        )
        return selected

    def failHandshake(self, reason: str, code: int = 400, responseHeaders: Any = None) -> None:
        """Answer a refused handshake with the API's JSON error body."""
        # Autobahn's own refusals (bad key or version, not GET) get a JSON body too.
        error = self._deny or (METHOD_NOT_ALLOWED(reason, {"Allow": "GET"}) if code == 405
                               else INVALID_REQUEST(reason, dict(responseHeaders or ())))
        self.wasNotCleanReason = reason
        self.sendData(error_response(error))
        self.dropConnection(abort=False)

    # -- open ------------------------------------------------------------

    def onOpen(self) -> None:
        backend = self.backend
        assert backend is not None and self.forward_id is not None
        limits = self.factory.limits
        relay = Relay(
            self.factory.clock,
            self,
            backend,
            on_end=self._ended,
            rate_a_to_b=limits.tunnel_bytes_per_second,
            rate_b_to_a=limits.tunnel_bytes_per_second,
            idle_seconds=limits.tunnel_idle_seconds,
        )
        self.attach_relay(relay)
        backend.attach(relay)
        relay.start()
        self._schedule_ping()

    def _schedule_ping(self) -> None:
        self._ping_call = self.factory.clock.callLater(
            self.factory.limits.tunnel_idle_seconds / PINGS_PER_IDLE_TIMEOUT, self._ping
        )

    def _ping(self) -> None:
        # A browser cannot send pings but answers ours: its pong is activity,
        # so a tunnel with no traffic stays open while the page is there.
        # The ping itself is not activity: a peer that does not answer still
        # meets the idle timeout.
        self._ping_call = None
        relay = self.relay
        if relay is None or relay.closing or self.state != WebSocketProtocol.STATE_OPEN:
            return
        if not relay.write_blocked(self):
            self.sendPing()
        self._schedule_ping()

    def _stop_pinging(self) -> None:
        if self._ping_call is not None and self._ping_call.active():
            self._ping_call.cancel()
        self._ping_call = None

    def shutdown(self, reason: str) -> None:
        """The forward was deleted, its container stopped, or we stop: 1001."""
        if self.relay is not None:
            self.relay.close(CLOSE_GOING_AWAY, reason)
        else:
            self.abort()

    def _ended(self, stats: RelayStats) -> None:
        self._stop_pinging()
        self._stop_tracking()
        assert self.forward_id is not None
        self.factory.forwards.relay_ended("tunnel", self.forward_id, self.user, stats)

    def _stop_tracking(self) -> None:
        if self._untrack is not None:
            self._untrack()
            self._untrack = None

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._gone = True
        self._stop_pinging()
        if self.relay is None:
            # The handshake failed or the client left: no relay will end.
            self._stop_tracking()
        if self._connecting is not None:
            self._connecting.cancel()
        elif self.relay is None and self.backend is not None:
            self.backend.abort()
        super().connectionLost(reason)


def _forward_id(path: str) -> str | None:
    parts = path.strip("/").split("/")
    if len(parts) == 3 and parts[0] == "ws" and parts[1] == "port-forward" and parts[2]:
        return parts[2]
    return None


class TunnelFactory(WebSocketServerFactory):
    """
    :param clock: the reactor (time, and the relay's timers).
    :param authenticator: tokens to users.
    :param forwards: where forwards are resolved and tunnels tracked.
    :param limits: ``[limits]`` (rate and idle timeout).
    :param endpoint: ``(address, port) -> IStreamClientEndpoint``; by
        default :func:`rexecpf.endpoints.container_endpoint` on ``clock``
        (which refuses the daemon's own sockets).
    """

    protocol = TunnelProtocol

    def __init__(
        self,
        clock: Any,
        authenticator: Authenticator,
        forwards: ForwardService,
        limits: LimitsConfig,
        endpoint: EndpointFactory | None = None,
        url: str | None = None,
    ) -> None:
        super().__init__(url, reactor=clock, server="rexecpf")
        self.clock = clock
        self.authenticator = authenticator
        self.forwards = forwards
        self.limits = limits
        self.endpoint: EndpointFactory = endpoint or (
            lambda host, port: container_endpoint(clock, host, port, forwards.refuse_own_socket, CONNECT_TIMEOUT)
        )
        self.setProtocolOptions(**protocol_options())


class TunnelResource(Resource):
    """
    ``/ws/``: ``port-forward/{id}`` is a WebSocket tunnel; anything else,
    or a request that is not a WebSocket upgrade, is a JSON 404 / 426.
    """

    isLeaf = True

    def __init__(self, factory: TunnelFactory) -> None:
        super().__init__()
        self.factory = factory
        self._websocket = WebSocketResource(factory)

    def render(self, request: IRequest) -> Any:
        path = [segment for segment in request.postpath]
        if len(path) != 2 or path[0] != b"port-forward" or not path[1]:
            return write_error(request, NOT_FOUND("no such path"))
        upgrade = (request.getHeader(b"upgrade") or b"").lower()
        if upgrade != b"websocket":
            request.setHeader(b"upgrade", b"websocket")
            request.setHeader(b"connection", b"Upgrade")
            error = APIError(
                _UPGRADE_REQUIRED, "open this URL with a WebSocket client (rexecpf tunnel)"
            )
            return write_error(request, error)
        return self._websocket.render(request)
