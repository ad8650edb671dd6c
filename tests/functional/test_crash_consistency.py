"""
Crash consistency: ``kill -9`` at random moments while client threads create
and delete forwards, over and over.  After each restart the store holds
exactly what was acknowledged: a forward that got its 201 is there unless its
delete got a 204; a deleted one (204) is gone; an operation whose answer was
lost may or may not have happened; nothing else is there.
"""

from __future__ import annotations

import os
import random
import tempfile
import threading
import time
import unittest
from typing import Any

from tests.functional.daemon import Daemon

KILLS = int(os.environ.get("REXECPF_CRASH_KILLS", "25"))
CONTAINERS = ["c1", "c2", "c3", "c4"]


class Model:
    """What the clients were told, and what they were not."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        #: id -> forward object, for every acknowledged create not yet deleted
        self.live: dict[str, dict[str, Any]] = {}
        #: ids whose delete was acknowledged
        self.deleted: set[str] = set()
        #: (container, port) of creates whose answer was lost
        self.maybe_created: set[tuple[str, int]] = set()
        #: ids whose delete answer was lost (may or may not be there)
        self.maybe_deleted: dict[str, dict[str, Any]] = {}
        self.acknowledged = 0
        #: operations whose answer was lost to a kill (cumulative)
        self.lost = 0


class CrashConsistencyTests(unittest.TestCase):
    def test_kill_9_loop(self) -> None:
        """25 x kill -9 under load: after each restart the store matches the acknowledgements."""
        rng = random.Random(int(os.environ.get("REXECPF_CRASH_SEED", "7")))
        daemon = Daemon(
            tempfile.mkdtemp(prefix="rexecpf-crash-"),
            containers=[{"id": cid, "owner": "alice"} for cid in CONTAINERS],
            limits="forwards_per_container = 1000",
        )
        self.addCleanup(daemon.stop)
        model = Model()
        next_port = {cid: 1 for cid in CONTAINERS}
        started = time.monotonic()
        for round_ in range(KILLS):
            daemon.start()
            self.check(daemon, model, round_)
            stop = threading.Event()
            threads = [
                threading.Thread(target=self.client, args=(daemon, model, cid, next_port, stop, rng.random()))
                for cid in CONTAINERS
            ]
            for thread in threads:
                thread.start()
            time.sleep(rng.uniform(0.05, 0.8))
            daemon.kill()
            stop.set()
            for thread in threads:
                thread.join(timeout=60)
        daemon.start()
        self.check(daemon, model, KILLS)
        print(f"\ncrash consistency: {KILLS} kill -9 survived in {time.monotonic() - started:.0f} s, "
              f"{model.acknowledged} acknowledged operations, {len(model.live)} forwards at the end, "
              f"{model.lost} answers lost to a kill (either outcome allowed)")

    def client(self, daemon: Daemon, model: Model, cid: str, next_port: dict[str, int],
               stop: threading.Event, seed: float) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            with model.lock:
                mine = [fid for fid, f in model.live.items() if f["container_id"] == cid]
            if mine and (len(mine) > 30 or rng.random() < 0.4):
                fid = rng.choice(mine)
                with model.lock:
                    forward = model.live.pop(fid)
                try:
                    code, _, _ = daemon.request(
                        "DELETE", f"/api/containers/{cid}/port-forwards/{fid}", timeout=10
                    )
                except OSError:
                    with model.lock:
                        model.maybe_deleted[fid] = forward
                        model.lost += 1
                    return
                with model.lock:
                    assert code == 204, code
                    model.deleted.add(fid)
                    model.acknowledged += 1
            else:
                with model.lock:
                    port = next_port[cid]
                    next_port[cid] += 1
                try:
                    code, document = daemon.create(cid, port)
                except OSError:
                    with model.lock:
                        model.maybe_created.add((cid, port))
                        model.lost += 1
                    return
                with model.lock:
                    assert code == 201, (code, document)
                    model.live[document["id"]] = document
                    model.acknowledged += 1

    def check(self, daemon: Daemon, model: Model, round_: int) -> None:
        present = {f["id"]: f for cid in CONTAINERS for f in daemon.list(cid)}
        with model.lock:
            for fid, forward in model.live.items():
                self.assertEqual(present.get(fid), forward, f"round {round_}: acknowledged {fid} lost")
            for fid in model.deleted:
                self.assertNotIn(fid, present, f"round {round_}: deleted {fid} came back")
            for fid, forward in present.items():
                if fid in model.live:
                    continue
                if fid in model.maybe_deleted:
                    self.assertEqual(forward, model.maybe_deleted[fid])
                    continue
                key = (forward["container_id"], forward["container_port"])
                self.assertIn(key, model.maybe_created, f"round {round_}: unexpected {forward}")
            # Settle what is now known: lost creates that happened become live,
            # lost deletes resolve either way.
            for fid, forward in present.items():
                if fid not in model.live:
                    model.live[fid] = forward
                    model.maybe_created.discard((forward["container_id"], forward["container_port"]))
                    model.maybe_deleted.pop(fid, None)
            for fid in list(model.maybe_deleted):
                model.deleted.add(fid)
                del model.maybe_deleted[fid]
            model.maybe_created.clear()
        # the daemon answers the other way too: each live forward by id
        for fid, forward in list(present.items())[:5]:
            code, document, _ = daemon.request(
                "GET", f"/api/containers/{forward['container_id']}/port-forwards/{fid}"
            )
            self.assertEqual((code, document), (200, forward))
