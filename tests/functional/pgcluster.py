"""
One private PostgreSQL cluster for the tests of a process (started on first
use, stopped at exit), and a fresh database in it for each test.

Under ``CI=true`` a missing or broken PostgreSQL is a failure; elsewhere the
tests that need it skip, saying why.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import tempfile
import unittest

import psycopg

from tests.functional.peers import PeerError, PostgresServer

__all__ = ["IN_CI", "fresh_database", "require_postgres", "shared_cluster"]

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

_cluster: PostgresServer | None = None
_failed: str | None = None


def require_postgres() -> None:
    """
    :raises SkipTest: outside CI when PostgreSQL is not installed.
    :raises AssertionError: under CI when it is not.
    """
    if PostgresServer.available():
        return
    reason = "needs PostgreSQL (initdb, pg_ctl, psql under /usr/lib/postgresql/*/bin)"
    if IN_CI:
        raise AssertionError(f"prerequisite missing in CI: {reason}")
    raise unittest.SkipTest(reason)


def shared_cluster() -> PostgresServer:
    """:return: the process's cluster, started on first use."""
    global _cluster, _failed
    require_postgres()
    if _failed is not None:
        raise AssertionError(f"the test PostgreSQL did not start: {_failed}")
    if _cluster is None:
        directory = tempfile.mkdtemp(prefix="rexecpf-pgtest-")
        atexit.register(shutil.rmtree, directory, True)
        try:
            _cluster = PostgresServer(directory)
        except PeerError as error:
            _failed = str(error)
            raise
        atexit.register(_cluster.stop)
    return _cluster


def fresh_database(test: unittest.TestCase, cluster: PostgresServer | None = None) -> str:
    """
    Create an empty database for ``test`` (dropped after it).

    :return: its URL.
    """
    cluster = cluster or shared_cluster()
    name = f"t_{secrets.token_hex(6)}"
    with psycopg.connect(cluster.url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")  # type: ignore[arg-type]

    def drop() -> None:
        with psycopg.connect(cluster.url, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")  # type: ignore[arg-type]

    test.addCleanup(drop)
    return f"postgresql://{cluster.user}@{cluster.host}:{cluster.port}/{name}"
