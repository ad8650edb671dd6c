"""rexecpf: reach the TCP ports of your containers over HTTP, WebSocket and local ports."""

__version__ = "0.1.0"
