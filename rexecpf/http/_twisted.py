"""
The only module that touches Twisted's and Autobahn's private names.
"""

from __future__ import annotations

from typing import Any

__all__ = ["request_disconnected"]


def request_disconnected(request: Any) -> bool:
    """:return: whether the client of ``request`` went away (``Request._disconnected``)."""
    return bool(request._disconnected)
