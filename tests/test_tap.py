"""``rexecpf.tap.build``: a start-up error leaves nothing running behind it."""

from __future__ import annotations

import os
import threading
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from rexecpf.config import parse_config
from rexecpf.tap import StartupError, build


def pool_threads() -> set[threading.Thread]:
    """:return: the live threads of Twisted thread pools (adbapi's among them)."""
    return {thread for thread in threading.enumerate() if thread.name.startswith("PoolThread-")}


class BuildFailureTests(TestCase):
    @inlineCallbacks
    def test_a_bad_endpoint_closes_the_store(self) -> Any:
        """
        An endpoint that cannot be parsed is a StartupError raised after the
        store and its change feed were opened: in a running reactor (tests,
        a worker) their pools already have threads, which are not daemon
        threads, so they must be stopped or the process never exits (a CI
        run once hung at exit this way, after the tests had all run).
        """
        directory = self.mktemp()
        os.makedirs(directory)
        inventory = os.path.join(directory, "containers.toml")
        with open(inventory, "w") as file:
            file.write('[[container]]\nid = "c1"\nowner = "alice"\naddress = "127.0.0.1"\n')
        config = parse_config(
            {
                "server": {
                    "listen": ["tcp:0:interface=127.0.0.1", "no-such-endpoint:1"],
                    "public_url": "http://127.0.0.1:1",
                    "state": os.path.join(directory, "state.sqlite3"),
                },
                "auth": {"users": {"alice": "alice-token"}},
                "backend": {"kind": "static", "inventory": inventory},
            }
        )
        yield deferLater(reactor, 0, lambda: None)
        before = pool_threads()
        self.assertTrue(reactor.running)  # so that the pools start at once
        with self.assertRaises(StartupError) as raised:
            build(config, reactor)
        self.assertIn("server.listen", str(raised.exception))
        self.assertEqual(pool_threads() - before, set())
