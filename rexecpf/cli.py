# -*- test-case-name: tests.functional.test_cli -*-
"""
The ``rexecpf`` command.

::

    rexecpf forward create CONTAINER PORT [--name N] [--local-port P] [--pass-preflight]
                                          [--domain D]... [--slug S]
    rexecpf forward list CONTAINER
    rexecpf forward delete CONTAINER FORWARD_ID
    rexecpf domain add CONTAINER FORWARD_ID DOMAIN     (again: re-check its TXT record)
    rexecpf domain list CONTAINER FORWARD_ID
    rexecpf domain remove CONTAINER FORWARD_ID DOMAIN
    rexecpf tunnel FORWARD_ID_OR_WEBSOCKET_URL [--listen [HOST:]PORT | --stdio]

``--url`` / ``REXECPF_URL`` (default ``http://127.0.0.1:8080``) and
``--token`` / ``REXECPF_TOKEN``, before or after the subcommand.  ``tunnel``
without a mode carries stdin/stdout when stdin is not a terminal, else
listens on a free local port.

Output: ``forward create`` and ``forward list`` print a table (``ID PORT
LOCAL NAME CREATED``, one forward a line); with ``--json`` they print the API's
JSON instead.  ``forward delete`` prints ``deleted FORWARD_ID``.  ``domain
add`` and ``domain list`` print ``DOMAIN VERIFIED TXT-NAME TXT-VALUE``, one
domain a line (the TXT record to make, until it is verified); ``domain
remove`` prints ``removed DOMAIN``.

``tunnel --stdio`` carries stdin/stdout over one WebSocket (an ssh
``ProxyCommand``); end of stdin closes the tunnel.  ``tunnel --listen``
listens (on 127.0.0.1 unless a host is given) and carries each accepted
connection over its own WebSocket, like ``kubectl port-forward``; it prints
``Forwarding from HOST:PORT -> FORWARD`` once listening and runs until
interrupted.  Both send a ping every 30 s, so the server's idle timeout does
not fire while a connection is open, and both have flow control each way.

Every failure is one line on stderr, ``rexecpf: error: ...``, and exit
status 1 (2 for a usage error).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote, urlsplit

from twisted.internet import task
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import HostnameEndpoint, TCP4ServerEndpoint, TCP6ServerEndpoint, wrapClientTLS
from twisted.internet.error import ConnectError, ConnectionRefusedError, DNSLookupError
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure

from rexecpf.ends import TCPEnd
from rexecpf.http._twisted import WebSocketClientFactory, WebSocketClientProtocol
from rexecpf.relay import Relay, RelayStats
from rexecpf.wsend import WebSocketEndMixin, protocol_options

__all__ = ["main"]

DEFAULT_URL = "http://127.0.0.1:8080"
PING_SECONDS = 30.0


class CLIError(Exception):
    """A failure to report as one line."""


# --- HTTP (forward commands) ---------------------------------------------


def _api_error(code: int, body: bytes) -> CLIError:
    try:
        error = json.loads(body)["error"]
        text = f"{error['code']} {error['message']}"
        if error.get("detail"):
            text += f": {error['detail']}"
    except (ValueError, KeyError, TypeError):
        text = f"HTTP {code}"
    return CLIError(text)


async def _request(reactor: Any, args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    import treq
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool

    client = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
    url = args.url.rstrip("/") + path
    headers: dict[bytes | str, bytes | str] = {}
    if args.token:
        headers["Authorization"] = f"Bearer {args.token}"
    data = json.dumps(body).encode() if body is not None else None
    if data is not None:
        headers["Content-Type"] = "application/json"
    try:
        response = await client.request(method, url, data=data, headers=headers, timeout=30)
        content = await treq.content(response)
    except (ConnectError, DNSLookupError) as error:
        raise CLIError(f"cannot reach {args.url}: {_describe(error)}") from None
    except Exception as error:  # noqa: BLE001 - any transport failure is one line
        raise CLIError(f"request to {args.url} failed: {_describe(error)}") from None
    if response.code >= 400:
        raise _api_error(response.code, content)
    if not content:
        return None
    return json.loads(content)


def _describe(error: BaseException) -> str:
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    text = str(error).strip() or error.__class__.__name__
    return text.splitlines()[0]


def _table(forwards: list[dict[str, Any]]) -> str:
    rows = [("ID", "PORT", "LOCAL", "NAME", "CREATED")]
    for f in forwards:
        rows.append(
            (
                f["id"],
                str(f["container_port"]),
                str(f.get("local_port", "")),
                f.get("name") or "-",
                f.get("created_at", ""),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def _check_forwards(forwards: Any, url: str) -> None:
    """:raises CLIError: unless ``forwards`` is a list of forward objects (is ``url`` rexecpf?)."""
    if not isinstance(forwards, list) or not all(
        isinstance(f, dict) and isinstance(f.get("id"), str) and "container_port" in f for f in forwards
    ):
        raise CLIError(f"the answer of {url} is not port forwards: is it a rexecpf server?")


async def _forward(reactor: Any, args: argparse.Namespace) -> int:
    container = quote(args.container, safe="")
    base = f"/api/containers/{container}/port-forwards"
    if args.action == "create":
        body: dict[str, Any] = {"container_port": args.port}
        if args.name is not None:
            body["name"] = args.name
        if args.local_port is not None:
            body["local_port"] = args.local_port
        if args.pass_preflight:
            body["pass_preflight"] = True
        if args.domain:
            body["domains"] = args.domain
        if args.slug is not None:
            body["slug"] = args.slug
        forward = await _request(reactor, args, "POST", base, body)
        _check_forwards([forward], args.url)
        print(json.dumps(forward, indent=2) if args.json else _table([forward]))
    elif args.action == "list":
        forwards = await _request(reactor, args, "GET", base)
        _check_forwards(forwards, args.url)
        print(json.dumps(forwards, indent=2) if args.json else _table(forwards))
    else:
        await _request(reactor, args, "DELETE", f"{base}/{quote(args.forward_id, safe='')}")
        print(f"deleted {args.forward_id}")
    return 0


def _domain_table(domains: list[dict[str, Any]]) -> str:
    rows = [("DOMAIN", "VERIFIED", "TXT-NAME", "TXT-VALUE")]
    for d in domains:
        verification = d.get("verification") or {}
        rows.append(
            (d["domain"], "yes" if d.get("verified") else "no", verification.get("name", ""), verification.get("value", ""))
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    )


async def _domain(reactor: Any, args: argparse.Namespace) -> int:
    container = quote(args.container, safe="")
    base = f"/api/containers/{container}/port-forwards/{quote(args.forward_id, safe='')}/domains"
    if args.action == "list":
        domains = await _request(reactor, args, "GET", base)
    elif args.action == "add":
        domains = [await _request(reactor, args, "PUT", f"{base}/{quote(args.domain, safe='')}")]
    else:
        await _request(reactor, args, "DELETE", f"{base}/{quote(args.domain, safe='')}")
        print(f"removed {args.domain}")
        return 0
    if not isinstance(domains, list) or not all(isinstance(d, dict) and "domain" in d for d in domains):
        raise CLIError(f"the answer of {args.url} is not domains: is it a rexecpf server?")
    print(json.dumps(domains if args.action == "list" else domains[0], indent=2) if args.json else _domain_table(domains))
    return 0


# --- tunnel ----------------------------------------------------------------


class TunnelClientProtocol(WebSocketEndMixin, WebSocketClientProtocol):
    """
    The client's WebSocket: the server end of a local relay.  Its
    ``factory`` is a :class:`TunnelClientFactory` (typed ``Any`` by
    :class:`WebSocketEndMixin`: Twisted's ``Factory[P]`` cannot name the
    protocol of Autobahn's factories, which are not generic).
    """

    def __init__(self) -> None:
        super().__init__()
        self.remote_close: tuple[int | None, str | None] | None = None

    def onOpen(self) -> None:
        if not self.factory.opened.called:
            self.factory.opened.callback(self)

    def onCloseFrame(self, code: int | None, reasonRaw: bytes | None) -> Any:
        if self.remote_close is None and not self.closedByMe:
            reason = reasonRaw.decode("utf-8", "replace") if reasonRaw else None
            self.remote_close = (code, reason)
        return super().onCloseFrame(code, reasonRaw)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.factory.opened.called:
            self.factory.opened.errback(Failure(CLIError(_handshake_error(self, reason))))
        super().onClose(wasClean, code, reason)


def _handshake_error(protocol: Any, reason: str | None) -> str:
    import re

    text = protocol.wasNotCleanReason or reason or "connection lost"
    match = re.search(r"upgrade failed \[(\d+)\]: ?(.*)", text)
    if match:
        code, phrase = match.group(1), match.group(2).strip()
        hints = {
            "401": "the token is not valid (give --token or REXECPF_TOKEN)",
            "404": "no such port forward (or it is not yours)",
            "409": "the container is not running",
            "502": "the container port does not accept connections",
        }
        line = f"{code} {phrase}".strip()
        return f"{line}: {hints[code]}" if code in hints else line
    return f"the tunnel failed: {text}"


class TunnelClientFactory(WebSocketClientFactory):
    protocol = TunnelClientProtocol

    def __init__(self, url: str, token: str | None, reactor: Any) -> None:
        protocols = ["Bearer", token] if token else []
        super().__init__(url, protocols=protocols, reactor=reactor)
        options = protocol_options()
        options.pop("perMessageCompressionAccept", None)
        self.setProtocolOptions(
            **options, autoPingInterval=PING_SECONDS, autoPingTimeout=PING_SECONDS
        )
        self.opened: Deferred[TunnelClientProtocol] = Deferred()


def websocket_url(target: str, base_url: str) -> str:
    """
    :param target: a forward id or a ``ws(s)://`` URL.
    :param base_url: the rexecpf URL (``http(s)://``).
    :return: the WebSocket URL of the tunnel.
    """
    if target.startswith(("ws://", "wss://")):
        return target
    if target.startswith(("http://", "https://")):
        return "ws" + target[4:]
    parts = urlsplit(base_url)
    scheme = "wss" if parts.scheme == "https" else "ws"
    return f"{scheme}://{parts.netloc}{parts.path.rstrip('/')}/ws/port-forward/{quote(target, safe='')}"


async def open_websocket(reactor: Any, url: str, token: str | None) -> TunnelClientProtocol:
    """
    Open one tunnel WebSocket.

    :return: the open protocol.
    :raises CLIError: on any failure, one line.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise CLIError(f"not a WebSocket URL: {url}")
    secure = parts.scheme == "wss"
    port = parts.port or (443 if secure else 80)
    endpoint: Any = HostnameEndpoint(reactor, parts.hostname, port, timeout=30)
    if secure:
        from twisted.internet.ssl import optionsForClientTLS

        endpoint = wrapClientTLS(optionsForClientTLS(parts.hostname), endpoint)
    factory = TunnelClientFactory(url, token, reactor)
    try:
        await endpoint.connect(factory)
    except Exception as error:  # noqa: BLE001
        raise CLIError(f"cannot reach {parts.netloc}: {_describe(error)}") from None
    factory.opened.addTimeout(60, reactor)
    return await factory.opened


def _splice(reactor: Any, local: TCPEnd, ws: TunnelClientProtocol, on_end: Any) -> Relay:
    relay = Relay(reactor, local, ws, on_end=on_end)
    local.attach(relay)
    ws.attach_relay(relay)
    relay.start()
    return relay


def _end_message(ws: TunnelClientProtocol) -> str | None:
    """:return: why the server closed, when it was not a normal close."""
    if ws.remote_close is not None:
        code, reason = ws.remote_close
        if code not in (None, 1000):
            return f"tunnel closed by the server: {code} {reason or ''}".rstrip()
        return None
    if ws.closedByMe:
        return None
    return f"connection lost: {ws.wasNotCleanReason or 'the server went away'}"


async def _tunnel_stdio(reactor: Any, url: str, token: str | None) -> int:
    from twisted.internet.stdio import StandardIO

    local = TCPEnd()
    StandardIO(local, reactor=reactor)  # reading paused until the relay starts
    ws = await open_websocket(reactor, url, token)
    done: Deferred[RelayStats] = Deferred()
    _splice(reactor, local, ws, done.callback)
    await done
    message = _end_message(ws)
    if message:
        raise CLIError(message)
    return 0


class _Accepted(TCPEnd):
    """
    One connection accepted by ``--listen``: gets its own WebSocket.

    :param options: ``reactor``, ``url`` and ``token`` of the tunnel.
    """

    def __init__(self, options: argparse.Namespace) -> None:
        super().__init__()
        self.options = options

    def connectionMade(self) -> None:
        super().connectionMade()
        options = self.options
        ensureDeferred(open_websocket(options.reactor, options.url, options.token)).addCallbacks(
            self._opened, self._failed
        )

    def _opened(self, ws: TunnelClientProtocol) -> None:
        if self._pending_lost is not None:
            ws.sendClose(1000)
            return
        _splice(self.options.reactor, self, ws, lambda stats: self._ended(ws))

    def _ended(self, ws: TunnelClientProtocol) -> None:
        message = _end_message(ws)
        if message:
            print(f"rexecpf: {message}", file=sys.stderr, flush=True)

    def _failed(self, failure: Failure) -> None:
        print(f"rexecpf: error: {failure.getErrorMessage()}", file=sys.stderr, flush=True)
        self.abort()


async def _tunnel_listen(reactor: Any, url: str, token: str | None, listen: str, target: str) -> int:
    host, _, port_text = listen.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        port = int(port_text)
        if not 0 <= port <= 65535:
            raise ValueError
    except ValueError:
        raise CLIError(f"--listen: not a port: {listen!r}") from None
    server = TCP6ServerEndpoint if ":" in host else TCP4ServerEndpoint
    options = argparse.Namespace(reactor=reactor, url=url, token=token)
    factory = Factory.forProtocol(functools.partial(_Accepted, options))
    try:
        listening = await server(reactor, port, interface=host).listen(factory)
    except Exception as error:  # noqa: BLE001
        raise CLIError(f"cannot listen on {host}:{port}: {_describe(error)}") from None
    bound = listening.getHost()
    print(f"Forwarding from {bound.host}:{bound.port} -> {target}", flush=True)
    forever: Deferred[None] = Deferred()
    await forever
    return 0


async def _tunnel(reactor: Any, args: argparse.Namespace) -> int:
    url = websocket_url(args.target, args.url)
    stdio = args.stdio
    if not stdio and args.listen is None:
        # No mode given: stdin/stdout when they are not a terminal (an ssh
        # ProxyCommand, a pipe), else a local port the system picks.
        stdio = not sys.stdin.isatty()
    if stdio:
        return await _tunnel_stdio(reactor, url, args.token)
    return await _tunnel_listen(reactor, url, args.token, args.listen or "127.0.0.1:0", args.target)


# --- main --------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """Usage errors are one line too (``rexecpf: error: ...``, status 2)."""

    def error(self, message: str) -> Any:
        self.exit(2, f"rexecpf: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    # --url and --token are taken before or after the subcommand: a
    # subcommand's copy only overrides when given (SUPPRESS).
    common = _Parser(add_help=False)
    common.add_argument(
        "--url", default=argparse.SUPPRESS, help=f"the rexecpf server (REXECPF_URL; default {DEFAULT_URL})"
    )
    common.add_argument("--token", default=argparse.SUPPRESS, help="bearer token (REXECPF_TOKEN)")
    parser = _Parser(
        prog="rexecpf",
        description="Create port forwards to containers and tunnel to them.",
        parents=[common],
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    forward = commands.add_parser("forward", help="create, list and delete port forwards")
    actions = forward.add_subparsers(dest="action", required=True, parser_class=_Parser)
    create = actions.add_parser("create", help="forward a container port", parents=[common])
    create.add_argument("container")
    create.add_argument("port", type=int)
    create.add_argument("--name")
    create.add_argument("--local-port", type=int)
    create.add_argument(
        "--pass-preflight",
        action="store_true",
        help="pass CORS preflights to the container (without credentials) instead of answering them",
    )
    create.add_argument(
        "--domain", action="append", metavar="DOMAIN", help="a custom domain (repeatable)"
    )
    create.add_argument("--slug", help="a stable name: the host {slug}--{user}.{proxy_domain}")
    create.add_argument("--json", action="store_true", help="print JSON")
    listing = actions.add_parser("list", help="list a container's forwards", parents=[common])
    listing.add_argument("container")
    listing.add_argument("--json", action="store_true", help="print JSON")
    delete = actions.add_parser("delete", help="delete a forward", parents=[common])
    delete.add_argument("container")
    delete.add_argument("forward_id")

    domain = commands.add_parser("domain", help="add, list and remove a forward's custom domains")
    domain_actions = domain.add_subparsers(dest="action", required=True, parser_class=_Parser)
    for name, text in (
        ("add", "give a forward a custom domain (again: re-check its TXT record)"),
        ("list", "list a forward's custom domains"),
        ("remove", "take a custom domain from a forward"),
    ):
        action = domain_actions.add_parser(name, help=text, parents=[common])
        action.add_argument("container")
        action.add_argument("forward_id")
        if name != "list":
            action.add_argument("domain")
        if name != "remove":
            action.add_argument("--json", action="store_true", help="print JSON")

    tunnel = commands.add_parser(
        "tunnel",
        help="carry a local stream over a forward's WebSocket",
        description="Without --listen or --stdio: --stdio when stdin is not a terminal, else a free local port.",
        parents=[common],
    )
    tunnel.add_argument("target", metavar="FORWARD_ID_OR_WEBSOCKET_URL")
    mode = tunnel.add_mutually_exclusive_group()
    mode.add_argument("--listen", metavar="[HOST:]PORT", help="listen locally; one WebSocket per connection")
    mode.add_argument("--stdio", action="store_true", help="carry stdin/stdout (ssh ProxyCommand)")
    return parser


async def _run(reactor: Any, args: argparse.Namespace) -> None:
    try:
        if not args.token:
            raise CLIError("no token: give --token or set REXECPF_TOKEN")
        if args.command == "forward":
            status = await _forward(reactor, args)
        elif args.command == "domain":
            status = await _domain(reactor, args)
        else:
            status = await _tunnel(reactor, args)
    except CLIError as error:
        print(f"rexecpf: error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    except Exception as error:  # noqa: BLE001 - a bug or a strange server: still one line
        print(f"rexecpf: error: unexpected {error.__class__.__name__}: {_describe(error)}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    if status:
        raise SystemExit(status)


def main(argv: Sequence[str] | None = None) -> None:
    """The ``rexecpf`` console script."""
    args = _parser().parse_args(argv)
    # Not parser defaults: the parsers share these two options, and a default
    # would let a subcommand overwrite what was given before it.
    if not hasattr(args, "url"):
        args.url = os.environ.get("REXECPF_URL") or DEFAULT_URL
    if not hasattr(args, "token"):
        args.token = os.environ.get("REXECPF_TOKEN")
    task.react(lambda reactor: ensureDeferred(_run(reactor, args)))


if __name__ == "__main__":
    main()
