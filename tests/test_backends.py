"""The static backend: inventory file, polling on a Clock, stopped containers."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from rexecpf.backends import IContainerBackend
from rexecpf.backends.static import StaticBackend, read_inventory
from rexecpf.testing import FakeBackend


class StaticBackendTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = Path(tempfile.mkdtemp()) / "containers.toml"
        self.write('[[container]]\nid = "c1"\nowner = "alice"\n[[container]]\nid = "c2"\nowner = "bob"\naddress = "10.0.0.2"\n')
        self.clock = Clock()
        self.backend = StaticBackend(self.clock, str(self.path), read_inventory(str(self.path)))
        self.stopped: list[str] = []
        self.backend.subscribe(self.stopped.append)
        self.backend.startService()
        self.addCleanup(self.backend.stopService)

    def write(self, text: str) -> None:
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(text)
        os.replace(temporary, self.path)

    def test_interface(self) -> None:
        """Both backends provide IContainerBackend."""
        verifyObject(IContainerBackend, self.backend)
        verifyObject(IContainerBackend, FakeBackend())

    def test_inspect(self) -> None:
        """Entries become containers; defaults are 127.0.0.1 and running."""
        c1 = self.successResultOf(self.backend.inspect("c1"))
        self.assertEqual((c1.owner, c1.address, c1.running), ("alice", "127.0.0.1", True))
        self.assertEqual(self.successResultOf(self.backend.inspect("c2")).address, "10.0.0.2")
        self.assertIsNone(self.successResultOf(self.backend.inspect("c3")))

    def test_stop_seen_within_two_seconds(self) -> None:
        """A container marked stopped is announced within 2 s of the change (Clock)."""
        self.write('[[container]]\nid = "c1"\nowner = "alice"\nstate = "exited"\n[[container]]\nid = "c2"\nowner = "bob"\n')
        self.clock.advance(1.0)
        self.assertEqual(self.stopped, ["c1"])
        self.assertFalse(self.successResultOf(self.backend.inspect("c1")).running)

    def test_removed_entry_is_stopped(self) -> None:
        """An entry that disappears is announced as stopped."""
        self.write('[[container]]\nid = "c2"\nowner = "bob"\n')
        self.clock.advance(0.5)
        self.assertEqual(self.stopped, ["c1"])

    def test_broken_file_keeps_old_inventory(self) -> None:
        """A file that does not parse is ignored (logged) and the last good one stays."""
        self.write("[[container]\nbroken")
        self.clock.advance(1.0)
        self.assertEqual(self.stopped, [])
        self.assertTrue(self.successResultOf(self.backend.inspect("c1")).running)
        self.flushLoggedErrors()
