"""The ``twistd rexecpf`` plugin; imports nothing heavy (``rexecpf.tap`` loads lazily)."""

from twisted.application.service import ServiceMaker

rexecpf = ServiceMaker(
    "rexecpf",
    "rexecpf.tap",
    "Container port forwarding: REST API, HTTP proxy and WebSocket tunnels.",
    "rexecpf",
)
