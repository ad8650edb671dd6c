"""
rexecpf.tls: the certificate directory (names, loading, reloading), the
``ssl:`` endpoint string it reads, the ``[tls]`` keys, and the reload hook.
Handshakes over real sockets are in tests/functional/test_tls.py.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from rexecpf.config import ConfigError, parse_config
from rexecpf.ops import Reloader
from rexecpf.tls import CertificateDirectory, CertificateError, host_of_file, parse_ssl_description
from tests.functional.testca import TestCA, common_name


def served(context: SSL.Context | None) -> str | None:
    """:return: the common name of the certificate a context serves."""
    if context is None:
        return None
    connection = SSL.Connection(context, None)
    certificate = connection.get_certificate()
    assert certificate is not None
    return common_name(certificate.to_cryptography().public_bytes(Encoding.DER))


class LogCapture:
    def __init__(self, case: TestCase) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        case.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def errors(self) -> list[str]:
        return [formatEvent(e) for e in self.events if e.get("log_level") == LogLevel.error]


class HostOfFileTests(TestCase):
    def test_names(self) -> None:
        self.assertEqual(host_of_file("app.example.com.pem"), "app.example.com")
        self.assertEqual(host_of_file("App.Example.com.pem"), "app.example.com")
        self.assertEqual(host_of_file("_wildcard.example.com.pem"), "*.example.com")
        self.assertIsNone(host_of_file("app.example.com.key"))
        self.assertIsNone(host_of_file("README"))
        for bad in ("a..b.pem", "_wildcard.com.pem", "-a.example.pem", "a_b.example.pem", ".pem"):
            self.assertRaises(CertificateError, host_of_file, bad)


class CertificateDirectoryTests(TestCase):
    def setUp(self) -> None:
        self.ca = TestCA(self.mktemp())
        self.path = Path(self.mktemp())
        self.path.mkdir()
        self.log = LogCapture(self)

    def test_lookup(self) -> None:
        """A host's own file, else the wildcard one label up, else None (the endpoint's own)."""
        self.ca.write(self.path / "app.example.com.pem", "app.example.com")
        self.ca.write(self.path / "_wildcard.example.com.pem", "*.example.com")
        self.ca.write(self.path / "other.example.org.pem", "other.example.org", separate_key=True)
        directory = CertificateDirectory(self.path)
        self.assertEqual(directory.load(), (3, 0))
        self.assertEqual(directory.hosts(), ["*.example.com", "app.example.com", "other.example.org"])
        self.assertEqual(served(directory.context_for(b"app.example.com")), "app.example.com")
        self.assertEqual(served(directory.context_for(b"APP.example.com.")), "app.example.com")
        self.assertEqual(served(directory.context_for(b"x.example.com")), "*.example.com")
        self.assertEqual(served(directory.context_for(b"other.example.org")), "other.example.org")
        self.assertIsNone(directory.context_for(b"y.x.example.com"))
        self.assertIsNone(directory.context_for(b"example.com"))
        self.assertIsNone(directory.context_for(b"unknown.example.net"))
        self.assertIsNone(directory.context_for(None))

    def test_bad_files(self) -> None:
        """
        Each bad file is one error line naming it, and is not served; the
        good ones are: no certificate, no key, a key of another certificate,
        a certificate for another name, a file named after no host.
        """
        self.ca.write(self.path / "good.example.com.pem", "good.example.com")
        (self.path / "junk.example.com.pem").write_text("not PEM")
        (self.path / "nokey.example.com.pem").write_bytes(self.ca.issue("nokey.example.com")[0])
        _, other_key = self.ca.issue("x.example.com")
        (self.path / "mismatch.example.com.pem").write_bytes(self.ca.issue("mismatch.example.com")[0] + other_key)
        self.ca.write(self.path / "wrong.example.com.pem", "right.example.com")
        self.ca.write(self.path / "not_a_host.pem", "x.example.com")
        directory = CertificateDirectory(self.path)
        self.assertEqual(directory.load(), (1, 5))
        self.assertEqual(directory.hosts(), ["good.example.com"])
        errors = self.log.errors()
        self.assertEqual(len(errors), 5, errors)
        for name, why in (
            ("junk.example.com.pem", "no PEM certificate"),
            ("nokey.example.com.pem", "no usable PEM private key"),
            ("mismatch.example.com.pem", "the key does not match"),
            ("wrong.example.com.pem", "does not name wrong.example.com"),
            ("not_a_host.pem", "not a host name"),
        ):
            [line] = [line for line in errors if f"/{name}:" in line]
            self.assertIn(why, line)
            self.assertIn("not served", line)

    def test_reload(self) -> None:
        """
        A reload serves new and changed files, drops removed ones, and keeps
        what a file that turned bad served before; unchanged files are not
        read again.
        """
        self.ca.write(self.path / "app.example.com.pem", "app.example.com")
        self.ca.write(self.path / "old.example.com.pem", "old.example.com")
        directory = CertificateDirectory(self.path)
        directory.load()
        app_before = directory.context_for(b"app.example.com")

        self.ca.write(self.path / "new.example.com.pem", "new.example.com")
        os.unlink(self.path / "old.example.com.pem")
        self.assertEqual(directory.load(), (2, 0))
        self.assertEqual(directory.hosts(), ["app.example.com", "new.example.com"])
        self.assertIs(directory.context_for(b"app.example.com"), app_before)  # not read again

        (self.path / "app.example.com.pem").write_text("broken")
        self.assertEqual(directory.load(), (2, 1))
        self.assertIs(directory.context_for(b"app.example.com"), app_before)
        [line] = self.log.errors()
        self.assertIn("app.example.com.pem", line)
        self.assertIn("the certificate loaded before stays", line)

        chain = self.ca.write(self.path / "app.example.com.pem", "app.example.com", "www.app.example.com")
        self.assertEqual(directory.load(), (2, 0))
        changed = directory.context_for(b"app.example.com")
        self.assertIsNot(changed, app_before)
        certificate = SSL.Connection(changed, None).get_certificate()
        self.assertIn(certificate.to_cryptography().public_bytes(Encoding.PEM), chain)

    def test_unreadable_directory(self) -> None:
        """A directory gone away: logged, and what was served stays."""
        self.ca.write(self.path / "app.example.com.pem", "app.example.com")
        directory = CertificateDirectory(self.path)
        directory.load()
        os.unlink(self.path / "app.example.com.pem")
        os.rmdir(self.path)
        self.assertEqual(directory.load(), (1, 1))
        self.assertEqual(directory.hosts(), ["app.example.com"])
        self.assertIn("cannot read the certificate directory", self.log.errors()[0])


class SSLDescriptionTests(TestCase):
    def test_parse(self) -> None:
        self.assertEqual(
            parse_ssl_description("ssl:8443:interface=127.0.0.1:privateKey=/a\\:b.pem:backlog=511"),
            {"port": "8443", "interface": "127.0.0.1", "privateKey": "/a:b.pem", "backlog": "511"},
        )
        self.assertEqual(
            parse_ssl_description("ssl:port=443:interface=\\:\\:1:certKey=c.pem"),
            {"port": "443", "interface": "::1", "certKey": "c.pem"},
        )
        self.assertEqual(parse_ssl_description("ssl:443:key.pem"), {"port": "443", "privateKey": "key.pem"})

    def test_bad(self) -> None:
        for bad in (
            "tcp:443",
            "ssl:https",
            "ssl:443:nonsense=1",
            "ssl:443:port=444",
            "ssl:443:sslmethod=TLSv1_2_METHOD",
            "ssl:443:backlog=many",
            "ssl:" + ":".join(["x"] * 9),
        ):
            self.assertRaises(ValueError, parse_ssl_description, bad)


class ConfigTests(TestCase):
    def test_defaults(self) -> None:
        config = parse_config({})
        self.assertEqual((config.tls.certificates, config.tls.ask_listen), ("", ""))

    def test_keys(self) -> None:
        """``certificates`` is taken from the config file's directory; ``ask_listen`` as given."""
        config = parse_config(
            {
                "server": {"listen": ["ssl:8443:privateKey=own.pem"]},
                "tls": {"certificates": "certs", "ask_listen": "tcp:8081:interface=127.0.0.1"},
            },
            base_dir=Path("/etc/rexecpf"),
        )
        self.assertEqual(config.tls.certificates, "/etc/rexecpf/certs")
        self.assertEqual(config.tls.ask_listen, "tcp:8081:interface=127.0.0.1")

    def test_errors_name_the_key(self) -> None:
        cases = [
            ({"tls": {"certificates": "certs"}}, "tls.certificates: no ssl: endpoint"),
            ({"tls": {"certificates": 1}}, "tls.certificates: must be a string"),
            ({"tls": {"ask_listen": ["tcp:1"]}}, "tls.ask_listen: must be a string"),
            ({"tls": {"sni": True}}, "tls.sni: unknown key"),
        ]
        for data, message in cases:
            with self.assertRaises(ConfigError) as raised:
                parse_config(data)
            self.assertIn(message, str(raised.exception))


class ReloadHookTests(TestCase):
    def test_also_runs_and_never_raises(self) -> None:
        """Every hook runs on reload (even with no file to re-read); one that raises is logged."""
        calls: list[str] = []

        def broken() -> None:
            calls.append("broken")
            raise RuntimeError("boom")

        reloader = Reloader(Clock(), None, None, None, None, None, also=[broken, lambda: calls.append("next")])  # type: ignore[arg-type]
        self.assertFalse(reloader.reload())
        self.assertEqual(calls, ["broken", "next"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
