"""
What a ``twistd rexecpf`` process imports: only what its configuration uses.

Each test starts a fresh Python that does what ``twistd -n rexecpf ...``
does up to the reactor's start (parse the options, call the plugin's
``makeService``) and reports ``sys.modules``, so that an import that would
bring back the Docker SDK, pyOpenSSL or psycopg to a process that does not
need them fails here rather than as a few more MiB in bench/idle_rss.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import attrs
from twisted.trial.unittest import SynchronousTestCase

import twisted
from rexecpf.config import Config, parse_config
from rexecpf.tap import needs_tls

REPO = Path(__file__).resolve().parents[1]

#: Run like ``twistd -n --pidfile= rexecpf ARGS`` up to the reactor's start.
STARTER = textwrap.dedent(
    """
    import json, sys
    from twisted.scripts.twistd import ServerOptions

    report = {}
    options = ServerOptions()
    options.parseOptions(["-n", "--pidfile=", "rexecpf", *sys.argv[2:]])
    report["after_options"] = sorted(sys.modules)
    options.loadedPlugins[options.subCommand].makeService(options.subOptions)
    report["after_service"] = sorted(sys.modules)
    from twisted.internet import reactor
    from twisted.internet.interfaces import IReactorSSL
    report["reactor_ssl"] = IReactorSSL.providedBy(reactor)
    with open(sys.argv[1], "w") as file:
        json.dump(report, file)
    """
)

#: Never in a serving process, whatever its configuration.
NEVER = ("hypothesis", "pytest", "treq", "twisted.trial.unittest")
#: Only with a TLS endpoint.
TLS = ("OpenSSL", "service_identity", "twisted.internet.ssl", "twisted.protocols.tls")
#: Never: autobahn's WAMP sessions, which ``autobahn.twisted``'s package
#: ``__init__`` imports (rexecpf.http._twisted skips it), and with them
#: ``cryptography``.
WAMP = ("autobahn.twisted.wamp", "autobahn.wamp.auth", "cryptography")


def start_like_twistd(directory: str, *args: str) -> dict[str, Any]:
    """:return: the report of :data:`STARTER` run with ``args`` in ``directory``."""
    report_path = os.path.join(directory, "modules.json")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("NOTIFY_SOCKET", None)
    result = subprocess.run(
        [sys.executable, "-c", STARTER, report_path, *args],
        cwd=directory,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=120,
    )
    if result.returncode != 0:
        raise AssertionError(f"start failed ({result.returncode}): {result.stderr.decode(errors='replace')}")
    with open(report_path) as file:
        report: dict[str, Any] = json.load(file)
    return report


def write_config(directory: str, backend: str, listen: str = "tcp:0:interface=127.0.0.1") -> str:
    path = os.path.join(directory, "rexecpf.toml")
    Path(path).write_text(
        textwrap.dedent(
            f"""
            [server]
            listen = ['{listen}']
            state = "{directory}/state.sqlite3"

            [auth]
            users = {{ alice = "alice-token" }}

            {backend}
            """
        )
    )
    return path


class ImportTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="rexecpf-imports-")

    def assertLoaded(self, modules: list[str], names: tuple[str, ...], loaded: bool) -> None:
        present = [name for name in names if name in modules]
        self.assertEqual(present, list(names) if loaded else [])

    def test_options_import_nothing_heavy(self) -> None:
        """
        Reading the options (which imports rexecpf.tap) imports neither the
        reactor nor the endpoints, klein or autobahn: the decision to leave
        TLS out is taken after the configuration is read, before any of them.
        """
        report = start_like_twistd(self.directory, "--demo", "--listen", "tcp:0:interface=127.0.0.1")
        self.assertLoaded(
            report["after_options"],
            ("twisted.internet.reactor", "twisted.internet.endpoints", "klein", "autobahn", *TLS),
            loaded=False,
        )

    def test_demo(self) -> None:
        """The demo (static backend, SQLite, one tcp: endpoint): no TLS, no Docker SDK, no psycopg."""
        report = start_like_twistd(
            self.directory, "--demo", "--listen", "tcp:0:interface=127.0.0.1", "--state", "state.sqlite3"
        )
        modules = report["after_service"]
        self.assertLoaded(modules, ("rexecpf.api", "rexecpf.tunnel", "klein", "autobahn"), loaded=True)
        self.assertLoaded(modules, (*TLS, *WAMP, "docker", "requests", "psycopg", *NEVER), loaded=False)
        # Custom domains are checked in DNS, but only once somebody claims one.
        self.assertLoaded(modules, ("twisted.names",), loaded=False)
        self.assertFalse(report["reactor_ssl"])

    def test_docker_backend(self) -> None:
        """The Docker backend loads the Docker SDK, and still neither TLS nor psycopg."""
        config = write_config(self.directory, '[backend]\nkind = "docker"')
        report = start_like_twistd(self.directory, "--config", config)
        modules = report["after_service"]
        self.assertLoaded(modules, ("docker",), loaded=True)
        self.assertLoaded(modules, (*TLS, *WAMP, "psycopg", *NEVER), loaded=False)

    def test_tls_endpoint(self) -> None:
        """An ssl: endpoint gets the TLS stack (and a reactor that provides IReactorSSL)."""
        pem = os.path.join(os.path.dirname(twisted.__file__), "test", "server.pem")
        Path(self.directory, "containers.toml").write_text('[[container]]\nid = "c1"\nowner = "alice"\n')
        config = write_config(
            self.directory, "", listen=f"ssl:0:interface=127.0.0.1:privateKey={pem}:certKey={pem}"
        )
        report = start_like_twistd(self.directory, "--config", config)
        self.assertLoaded(report["after_service"], ("OpenSSL", "twisted.internet.ssl"), loaded=True)
        self.assertLoaded(report["after_service"], ("docker", "psycopg", *NEVER), loaded=False)
        self.assertTrue(report["reactor_ssl"])


class NeedsTLSTests(SynchronousTestCase):
    def config(self, *listen: str, metrics: str = "") -> Config:
        config = parse_config({})
        return attrs.evolve(config, server=attrs.evolve(config.server, listen=listen, metrics_listen=metrics))

    def test_plain_kinds(self) -> None:
        """tcp:, tcp6:, unix: and systemd: endpoints (in any case) need no TLS."""
        config = self.config("tcp:8080", "TCP6:8080:interface=\\:\\:1", "unix:/run/r.sock", "systemd:domain=INET:index=0")
        self.assertFalse(needs_tls(config))

    def test_ssl_listen(self) -> None:
        self.assertTrue(needs_tls(self.config("tcp:8080", "ssl:8443:privateKey=k.pem")))

    def test_ssl_metrics(self) -> None:
        self.assertTrue(needs_tls(self.config("tcp:8080", metrics="ssl:9443:privateKey=k.pem")))

    def test_other_kinds(self) -> None:
        """An endpoint kind a plugin adds may need TLS: it is kept."""
        self.assertTrue(needs_tls(self.config("onion:443")))
