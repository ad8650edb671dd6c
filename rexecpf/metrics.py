# -*- test-case-name: tests.test_metrics -*-
"""
Metrics in the Prometheus text format, in a private registry, served only on
``[server] metrics_listen`` (never on the public port).

Gauges are read when scraped (forwards, live connections by kind, reconcile
runs); counters move through hooks the other parts call:
:meth:`Metrics.relay_ended` (tunnels, listener connections, proxied
upgrades), :meth:`Metrics.proxy_response`, and the backend wrapper
:class:`CountingBackend` for backend errors.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from twisted.internet.defer import Deferred
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from zope.interface import implementer

from rexecpf.backends import IContainerBackend, StoppedCallback
from rexecpf.forwards import ForwardService
from rexecpf.model import Container
from rexecpf.relay import RelayStats

__all__ = ["CountingBackend", "Metrics", "MetricsResource"]

#: The kinds of live connection always reported (0 when none is open).
KINDS = ("tunnel", "listener", "proxy")


class _ForwardsCollector(Collector):
    """Reads the :class:`ForwardService` at scrape time."""

    def __init__(self, forwards: ForwardService) -> None:
        self._forwards = forwards

    def collect(self) -> Iterator[Any]:
        yield GaugeMetricFamily("rexecpf_forwards", "Port forwards that exist.",
                                value=len(self._forwards.forwards()))
        counts = self._forwards.live_counts()
        live = GaugeMetricFamily("rexecpf_live_connections",
                                 "Connections open on behalf of a forward, by kind.", labels=["kind"])
        for kind in sorted(set(KINDS) | set(counts)):
            live.add_metric([kind], counts.get(kind, 0))
        yield live
        yield GaugeMetricFamily("rexecpf_open_tunnels", "WebSocket tunnels open.",
                                value=counts.get("tunnel", 0))
        yield GaugeMetricFamily("rexecpf_listener_connections", "local_port connections open.",
                                value=counts.get("listener", 0))
        yield CounterMetricFamily("rexecpf_reconcile_runs", "Reconciliations of the stored forwards.",
                                  value=self._forwards.reconcile_runs)

    def describe(self) -> Iterator[Any]:
        return iter(())


class Metrics:
    """
    The metrics of one rexecpf.

    :ivar registry: the private :class:`CollectorRegistry`.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._bytes = Counter(
            "rexecpf_relayed_bytes", "Bytes relayed, by kind and direction "
            "(upstream: client to container; downstream: container to client).",
            ["kind", "direction"], registry=self.registry,
        )
        self._throttled = Counter(
            "rexecpf_throttled_seconds", "Seconds a reading side was paused by the throttle.",
            ["kind", "direction"], registry=self.registry,
        )
        self._relays = Counter("rexecpf_relays", "Relays ended, by kind.", ["kind"], registry=self.registry)
        self._proxy = Counter("rexecpf_proxy_requests", "Proxied HTTP requests, by status code.",
                              ["code"], registry=self.registry)
        self._backend_errors = Counter("rexecpf_backend_errors", "Backend calls that failed.",
                                       registry=self.registry)

    def observe_forwards(self, forwards: ForwardService) -> None:
        """Report the forwards, live connections, reconcile runs and ended relays of ``forwards``."""
        self.registry.register(_ForwardsCollector(forwards))
        forwards.relay_observers.append(self.relay_ended)

    def relay_ended(self, kind: str, stats: RelayStats) -> None:
        """
        Count what a relay did, once it ended.  The relay's ``a`` end is the
        client, ``b`` the container.

        :param kind: ``"tunnel"``, ``"listener"`` or ``"upgrade"``.
        """
        self._relays.labels(kind).inc()
        self._bytes.labels(kind, "upstream").inc(stats.bytes_a_to_b)
        self._bytes.labels(kind, "downstream").inc(stats.bytes_b_to_a)
        self._throttled.labels(kind, "upstream").inc(stats.throttled_a_to_b)
        self._throttled.labels(kind, "downstream").inc(stats.throttled_b_to_a)

    def proxy_response(self, code: int) -> None:
        """Count one proxied request answered with ``code`` (by the container or the proxy)."""
        self._proxy.labels(str(code)).inc()

    def backend_error(self) -> None:
        """Count one backend call that failed."""
        self._backend_errors.inc()

    def render(self) -> bytes:
        """:return: the text exposition of every metric."""
        return generate_latest(self.registry)


class MetricsResource(Resource):
    """The root of the metrics site: ``/metrics`` only."""

    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self._metrics = metrics

    def render_GET(self, request: IRequest) -> bytes:
        if request.path != b"/metrics":
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"not found: see /metrics\n"
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return self._metrics.render()


@implementer(IContainerBackend)
class CountingBackend:
    """An :class:`IContainerBackend` that counts the failures of another."""

    def __init__(self, backend: IContainerBackend, metrics: Metrics) -> None:
        self._backend = backend
        self._metrics = metrics

    def _count(self, deferred: Deferred[Any]) -> Deferred[Any]:
        def failed(failure: Any) -> Any:
            self._metrics.backend_error()
            return failure

        return deferred.addErrback(failed)

    def inspect(self, container_id: str) -> Deferred[Container | None]:
        return self._count(self._backend.inspect(container_id))

    def check(self) -> Deferred[None]:
        return self._count(self._backend.check())

    def subscribe(self, callback: StoppedCallback) -> None:
        self._backend.subscribe(callback)
