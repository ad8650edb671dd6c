"""
pytest only (trial has no use for it): a thread pool that a test left
started would keep the interpreter from exiting once every test has run
(Twisted's pool threads are not daemon threads), and CI would wait for its
time limit with nothing to show.  After pytest-twisted has stopped the
reactor, which closes every pool still registered with it, any pool left
running is stopped here and named on stderr.
"""

from __future__ import annotations

import gc
import sys
from typing import Any

import pytest
from twisted.python.threadpool import ThreadPool


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: Any) -> None:
    leftover = [pool for pool in gc.get_objects() if isinstance(pool, ThreadPool) and pool.started]
    for pool in leftover:
        print(f"conftest: a test left thread pool {pool.name or id(pool)} running: stopping it", file=sys.stderr)
        pool.stop()
