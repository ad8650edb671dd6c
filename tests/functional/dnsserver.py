"""
A real DNS server for tests: :mod:`twisted.names.server` on a free loopback
UDP port, answering from records the test puts in memory (TXT only; every
other name or type is NXDOMAIN).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.names import common, dns, server
from twisted.names.error import DomainError

__all__ = ["TXTZone", "start_dns_server"]


class TXTZone(common.ResolverBase):
    """An in-memory authority: name -> TXT values."""

    def __init__(self) -> None:
        super().__init__()
        self.records: dict[str, list[str]] = {}
        #: every name asked for, in order
        self.asked: list[str] = []

    def set_txt(self, name: str, *values: str) -> None:
        self.records[name.lower().rstrip(".")] = list(values)

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> Deferred[Any]:
        text = name.decode("ascii").lower().rstrip(".")
        self.asked.append(text)
        values = self.records.get(text)
        if type != dns.TXT or not values:
            return fail(DomainError(name))
        answers = [
            dns.RRHeader(name=name, type=dns.TXT, ttl=1, payload=dns.Record_TXT(value.encode(), ttl=1), auth=True)
            for value in values
        ]
        return succeed((answers, [], []))


def start_dns_server(zone: TXTZone) -> Any:
    """
    :return: the listening UDP port (``getHost().port``; ``stopListening()``
        it when done) of a DNS server answering from ``zone``.
    """
    factory = server.DNSServerFactory(authorities=[zone])
    factory.noisy = False
    return reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
