# -*- test-case-name: tests.test_backends -*-
"""
Container backends: where rexecpf learns whether a container exists, who owns
it, whether it runs, and where its ports are reached.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred
from zope.interface import Interface

from rexecpf.model import Container

__all__ = ["IContainerBackend", "StoppedCallback"]

#: Called with a container id when that container stopped or disappeared.
StoppedCallback = Callable[[str], object]


class IContainerBackend(Interface):
    """A source of containers."""

    def inspect(container_id: str) -> Deferred[Container | None]:
        """
        :return: fires with the container, or ``None`` when there is none of
            that id; fails with ``APIError`` 503 (Backend unavailable) when
            the backend cannot answer, or (several Docker engines) with 404
            Container not found, saying why, for a name that names
            containers on two engines.
        """

    def subscribe(callback: StoppedCallback) -> None:
        """Call ``callback(container_id)`` whenever a container stops or disappears."""

    def check() -> Deferred[None]:
        """
        :return: fires when the backend answers (for ``/healthz``); fails
            with ``APIError`` 503 when it does not.
        """
