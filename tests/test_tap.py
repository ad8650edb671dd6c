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

    def test_a_worker_whose_endpoints_changed_stops_with_one_line(self) -> None:
        """
        A worker started again after the configuration file's endpoints were
        changed (the parent holds the sockets of the old ones: only a restart
        of rexecpf changes them) ends with one line naming it, instead of a
        traceback (an endpoint more) or serving the parent's socket as another
        endpoint (one changed).
        """
        import socket

        from rexecpf.workers import WorkerSockets

        directory = self.mktemp()
        os.makedirs(directory)
        inventory = os.path.join(directory, "containers.toml")
        with open(inventory, "w") as file:
            file.write('[[container]]\nid = "c1"\nowner = "alice"\naddress = "127.0.0.1"\n')
        old = "tcp:0:interface=127.0.0.1"
        for listen in ([old, "tcp:0:interface=127.0.0.1:backlog=9"], ["unix:" + os.path.join(directory, "s")]):
            config = parse_config(
                {
                    "server": {
                        "listen": listen,
                        "public_url": "http://127.0.0.1:1",
                        "state": os.path.join(directory, "state.sqlite3"),
                    },
                    "auth": {"users": {"alice": "alice-token"}},
                    "backend": {"kind": "static", "inventory": inventory},
                }
            )
            held = socket.socket()
            self.addCleanup(held.close)
            held.bind(("127.0.0.1", 0))
            held.listen()
            worker = WorkerSockets(0, (held.fileno(),), endpoints=(old,))
            with self.assertRaises(StartupError) as raised:
                build(config, reactor, worker=worker)
            self.assertIn("server.listen", str(raised.exception))

    def test_a_worker_whose_store_changed_stops_with_one_line(self) -> None:
        """
        A worker started again after ``[server] state`` (or ``[store] url``)
        was changed in the file stops with one line, instead of serving from
        another store than the other workers (which would not hear of its
        writes, nor it of theirs).
        """
        from rexecpf.tap import store_identity
        from rexecpf.workers import WorkerSockets

        directory = self.mktemp()
        os.makedirs(directory)
        inventory = os.path.join(directory, "containers.toml")
        with open(inventory, "w") as file:
            file.write('[[container]]\nid = "c1"\nowner = "alice"\naddress = "127.0.0.1"\n')

        def config(state: str) -> Any:
            return parse_config(
                {
                    "server": {
                        "listen": ["tcp:0:interface=127.0.0.1"],
                        "public_url": "http://127.0.0.1:1",
                        "state": os.path.join(directory, state),
                    },
                    "auth": {"users": {"alice": "alice-token"}},
                    "backend": {"kind": "static", "inventory": inventory},
                }
            )

        import socket

        held = socket.socket()
        self.addCleanup(held.close)
        held.bind(("127.0.0.1", 0))
        held.listen()
        inherited = os.dup(held.fileno())  # never adopted: the worker stops first
        self.addCleanup(os.close, inherited)
        worker = WorkerSockets(0, (inherited,), endpoints=("tcp:0:interface=127.0.0.1",),
                               store=store_identity(config("old.sqlite3")))
        with self.assertRaises(StartupError) as raised:
            build(config("new.sqlite3"), reactor, worker=worker)
        self.assertIn("server.state", str(raised.exception))
        self.assertFalse(os.path.exists(os.path.join(directory, "new.sqlite3")))
        self.assertNotEqual(store_identity(config("old.sqlite3")), "")
