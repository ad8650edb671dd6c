"""
Metrics: a private registry read with the Prometheus text parser; gauges
follow the ForwardService, counters move through the hooks.
"""

from __future__ import annotations

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from rexecpf.config import LimitsConfig
from rexecpf.forwards import ForwardService
from rexecpf.metrics import CountingBackend, Metrics, MetricsResource
from rexecpf.model import Principal
from rexecpf.relay import RelayStats
from rexecpf.testing import FakeBackend, MemoryForwardStore
from tests.test_live import Live


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """:return: (sample name, sorted labels) -> value, parsed from the text format."""
    text = metrics.render().decode("utf-8")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


class MetricsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.backend = FakeBackend()
        self.backend.add("c1", "alice")
        self.metrics = Metrics()
        self.counted = CountingBackend(self.backend, self.metrics)
        self.forwards = ForwardService(self.clock, MemoryForwardStore(), self.counted, LimitsConfig(),
                                       port_probe=lambda interface, port: True)
        self.metrics.observe_forwards(self.forwards)
        self.forwards.startService()

    def test_forwards_and_live_connections(self) -> None:
        """The gauges count forwards, and live connections by kind, at scrape time."""
        alice = Principal(name="alice", admin=False)
        for port in (80, 81):
            self.successResultOf(self.forwards.create(alice, "c1", b'{"container_port": %d}' % port))
        self.forwards.track("pf_a", Live(), kind="tunnel")
        self.forwards.track("pf_a", Live(), kind="listener")
        self.forwards.track("pf_a", Live(), kind="listener")
        values = samples(self.metrics)
        self.assertEqual(values[("rexecpf_forwards", ())], 2)
        self.assertEqual(values[("rexecpf_open_tunnels", ())], 1)
        self.assertEqual(values[("rexecpf_listener_connections", ())], 2)
        self.assertEqual(values[("rexecpf_live_connections", (("kind", "proxy"),))], 0)
        self.assertEqual(values[("rexecpf_reconcile_runs_total", ())], 1)

    def test_relay_bytes(self) -> None:
        """relay_ended adds the bytes each way and the throttled seconds of a relay."""
        stats = RelayStats(100, 2000, 3.0, 1000, "peer closed", throttled_a_to_b=0.5)
        self.metrics.relay_ended("tunnel", stats)
        self.metrics.relay_ended("tunnel", stats)
        values = samples(self.metrics)
        up = (("direction", "upstream"), ("kind", "tunnel"))
        down = (("direction", "downstream"), ("kind", "tunnel"))
        self.assertEqual(values[("rexecpf_relayed_bytes_total", up)], 200)
        self.assertEqual(values[("rexecpf_relayed_bytes_total", down)], 4000)
        self.assertEqual(values[("rexecpf_throttled_seconds_total", up)], 1.0)
        self.assertEqual(values[("rexecpf_relays_total", (("kind", "tunnel"),))], 2)

    def test_proxy_and_backend_errors(self) -> None:
        """Proxied requests are counted by status; failed backend calls are counted."""
        self.metrics.proxy_response(200)
        self.metrics.proxy_response(502)
        self.metrics.proxy_response(200)
        self.backend.available = False
        self.failureResultOf(self.counted.inspect("c1"))
        values = samples(self.metrics)
        self.assertEqual(values[("rexecpf_proxy_requests_total", (("code", "200"),))], 2)
        self.assertEqual(values[("rexecpf_proxy_requests_total", (("code", "502"),))], 1)
        self.assertEqual(values[("rexecpf_backend_errors_total", ())], 1)

    def test_private_registry(self) -> None:
        """Nothing is registered in prometheus_client's global registry."""
        names = {family.name for family in REGISTRY.collect()}
        self.assertNotIn("rexecpf_forwards", names)
        self.assertNotIn("rexecpf_relayed_bytes", names)

    def test_resource(self) -> None:
        """/metrics is the text format; any other path of the metrics site is 404."""
        resource = MetricsResource(self.metrics)
        request = DummyRequest([b"metrics"])
        request.path = b"/metrics"
        body = resource.render_GET(request)
        self.assertIn(b"rexecpf_forwards 0.0", body)
        self.assertTrue(request.responseHeaders.getRawHeaders(b"content-type")[0].startswith(b"text/plain"))
        other = DummyRequest([b""])
        other.path = b"/"
        resource.render_GET(other)
        self.assertEqual(other.responseCode, 404)
