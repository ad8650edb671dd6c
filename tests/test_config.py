"""Configuration: the whole format, defaults, and one clear line per mistake."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from rexecpf.config import Config, ConfigError, load_config, parse_config


class ConfigTests(SynchronousTestCase):
    def error(self, data: dict) -> str:
        with self.assertRaises(ConfigError) as caught:
            parse_config(data)
        text = str(caught.exception)
        self.assertNotIn("\n", text)
        return text

    def test_defaults(self) -> None:
        """An empty file means every default of the contract."""
        config = parse_config({})
        self.assertEqual(config, Config())
        self.assertEqual(config.server.listen, ("tcp:8080:interface=127.0.0.1",))
        self.assertEqual(config.server.public_url, "http://127.0.0.1:8080")
        self.assertEqual(config.limits.forwards_per_container, 10)
        self.assertEqual(config.limits.proxy_body_bytes, 104857600)
        self.assertEqual(config.limits.tunnel_bytes_per_second, 10485760)
        self.assertEqual(config.limits.tunnel_idle_seconds, 300)
        self.assertEqual(config.limits.local_ports, (20000, 29999))
        self.assertEqual((config.limits.tunnels_per_user, config.limits.connections_per_user), (256, 1024))
        self.assertEqual(config.backend.owner_label, "rexecpf.owner")

    def test_per_user_caps(self) -> None:
        """The per-user caps take integers >= 0 (0: no cap)."""
        limits = parse_config({"limits": {"tunnels_per_user": 0, "connections_per_user": 3}}).limits
        self.assertEqual((limits.tunnels_per_user, limits.connections_per_user), (0, 3))

    def test_full_file(self) -> None:
        """Every section and key of the contract is read."""
        config = parse_config(
            {
                "server": {"listen": ["tcp:9000", "systemd:domain=INET:index=0"],
                           "public_url": "https://pf.example.com/", "state": "/var/lib/x.db",
                           "proxy_domain": "Preview.Example.com"},
                "auth": {"users": {"alice": "alice-token", "bob": "sha256:" + "AB" * 32},
                         "admins": ["bob"]},
                "backend": {"kind": "docker", "url": "unix:///run/docker.sock", "network": "n",
                            "owner_label": "o"},
                "limits": {"forwards_per_container": 3, "local_ports": "100 - 200",
                           "local_interface": "::1", "tunnel_idle_seconds": 2.5},
            }
        )
        self.assertEqual(config.server.public_url, "https://pf.example.com")
        self.assertEqual(config.server.proxy_domain, "preview.example.com")
        self.assertEqual(config.auth.users["bob"], "sha256:" + "ab" * 32)
        self.assertEqual(config.limits.local_ports, (100, 200))
        self.assertEqual(config.limits.tunnel_idle_seconds, 2.5)

    def test_errors_name_the_key(self) -> None:
        """Unknown sections and keys, wrong types and impossible values name the key."""
        cases = [
            ({"servr": {}}, "servr"),
            ({"server": {"listn": []}}, "server.listn"),
            ({"server": {"listen": "tcp:80"}}, "server.listen"),
            ({"server": {"public_url": "ftp://x"}}, "server.public_url"),
            ({"limits": {"forwards_per_container": True}}, "limits.forwards_per_container"),
            ({"limits": {"forwards_per_container": 0}}, "limits.forwards_per_container"),
            ({"limits": {"local_ports": "3000-2000"}}, "limits.local_ports"),
            ({"limits": {"local_interface": "localhost"}}, "limits.local_interface"),
            ({"limits": {"tunnel_idle_seconds": -1}}, "limits.tunnel_idle_seconds"),
            ({"limits": {"tunnels_per_user": -1}}, "limits.tunnels_per_user"),
            ({"limits": {"connections_per_user": 1.5}}, "limits.connections_per_user"),
            ({"backend": {"kind": "k8s"}}, "backend.kind"),
            ({"auth": {"users": {"alice": 5}}}, "auth.users.alice"),
            ({"auth": {"users": {"alice": "has space"}}}, "auth.users.alice"),
            ({"auth": {"users": {"alice": "sha256:abc"}}}, "auth.users.alice"),
            ({"auth": {"users": {"alice": "alice-token"}, "admins": ["carol"]}}, "auth.admins"),
        ]
        for data, key in cases:
            with self.subTest(key=key):
                self.assertTrue(self.error(data).startswith(key + ":"), self.error(data))

    def test_token_never_echoed(self) -> None:
        """A bad token is refused without printing it."""
        self.assertNotIn("s3cr3t/x", self.error({"auth": {"users": {"a": "s3cr3t/x"}}}))

    def test_store_url(self) -> None:
        """
        [store] url: empty means SQLite; a postgresql:// URL (one host or
        several) is kept as written; another scheme or a URL that does not
        parse is one line naming the key, with the password masked.
        """
        self.assertEqual(parse_config({}).store.url, "")
        self.assertEqual(parse_config({"store": {"url": " "}}).store.url, "")
        for url in (
            "postgresql://rexecpf:pw@db.example:5432/rexecpf?sslmode=require",
            "postgres://db1:5432,db2:5433/rexecpf",
            "postgresql:///rexecpf?host=/run/postgresql",
            "postgresql://[::1]:5432/x",
        ):
            with self.subTest(url=url):
                self.assertEqual(parse_config({"store": {"url": url}}).store.url, url)
        for url in (
            "mysql://u:s3cret@h/db",
            "postgresql://u:s3cret@h:port/db",
            "postgresql://u:s3cret@[::1/db",
            "postgresql://u:s3cret@h:99999/db",
            "s3cret",
        ):
            with self.subTest(url=url):
                message = self.error({"store": {"url": url}})
                self.assertTrue(message.startswith("store.url: "), message)
                self.assertNotIn("s3cret", message)
        self.assertTrue(self.error({"store": {"url": 5}}).startswith("store.url: must be a string"))
        self.assertTrue(self.error({"store": {"uri": ""}}).startswith("store.uri: unknown key"))

    def test_store_feed_timings(self) -> None:
        """[store] resync_seconds and cut_off_grace_seconds: positive numbers, named when wrong."""
        store = parse_config({}).store
        self.assertEqual((store.resync_seconds, store.cut_off_grace_seconds), (30.0, 10.0))
        store = parse_config({"store": {"resync_seconds": 5, "cut_off_grace_seconds": 0.5}}).store
        self.assertEqual((store.resync_seconds, store.cut_off_grace_seconds), (5.0, 0.5))
        for key in ("resync_seconds", "cut_off_grace_seconds"):
            for bad in (0, -1, "30", True, float("inf")):
                message = self.error({"store": {key: bad}})
                self.assertTrue(message.startswith(f"store.{key}: must be a number of seconds"), message)

    def test_mask_url_password(self) -> None:
        """The password of a store URL never reaches a log line: user part and parameter."""
        from rexecpf.config import mask_url_password

        self.assertEqual(
            mask_url_password("postgresql://u:s3cret@h:5432/db?sslmode=require&password=s3cret"),
            "postgresql://u:***@h:5432/db?sslmode=require&password=***",
        )
        self.assertEqual(mask_url_password("postgresql://u@h/db"), "postgresql://u@h/db")
        self.assertEqual(mask_url_password("postgresql://h/db"), "postgresql://h/db")

    def test_relative_paths_follow_the_file(self) -> None:
        """Relative state and inventory paths are taken from the file's directory."""
        directory = Path(tempfile.mkdtemp())
        (directory / "r.toml").write_text('[server]\nstate = "s.db"\n[backend]\ninventory = "i.toml"\n')
        config = load_config(directory / "r.toml")
        self.assertEqual(config.server.state, str(directory.resolve() / "s.db"))
        self.assertEqual(config.backend.inventory, str(directory.resolve() / "i.toml"))

    def test_bad_toml(self) -> None:
        """A file that is not TOML is one line naming the file."""
        path = Path(tempfile.mkdtemp()) / "r.toml"
        path.write_bytes(b"[server\n")
        with self.assertRaises(ConfigError) as caught:
            load_config(path)
        self.assertIn(str(path), str(caught.exception))

    @settings(max_examples=300, deadline=None)
    @given(
        st.dictionaries(
            st.sampled_from(["server", "store", "auth", "backend", "limits", "other"]),
            st.dictionaries(
                st.text(max_size=25),
                st.recursive(
                    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=6,
                ),
                max_size=4,
            ),
            max_size=4,
        )
    )
    def test_any_input(self, data: dict) -> None:
        """Any document gives a Config or one ConfigError line, never another exception."""
        try:
            parse_config({k: {kk: v for kk, v in d.items() if v is not None} for k, d in data.items()})
        except ConfigError as error:
            self.assertNotIn("\n", str(error))


class PublicURLFollowsListenTests(SynchronousTestCase):
    """``--listen`` without ``--public-url`` moves a default public_url along."""

    def overridden(self, config: Any, *argv: str) -> Any:
        from rexecpf.tap import Options, apply_overrides

        options = Options()
        options.parseOptions(["--demo", *argv])
        return apply_overrides(config, options).server.public_url

    def test_follows_tcp_listen(self) -> None:
        from rexecpf.config import demo_config

        config = demo_config()
        self.assertEqual(self.overridden(config, "--listen", "tcp:9000"), "http://127.0.0.1:9000")
        self.assertEqual(
            self.overridden(config, "--listen", "tcp:port=9001:interface=127.0.0.2"), "http://127.0.0.2:9001"
        )
        self.assertEqual(self.overridden(config, "--listen", r"tcp6:9002:interface=\:\:1"), "http://[::1]:9002")

    def test_explicit_or_unknown_kept(self) -> None:
        from rexecpf.config import demo_config

        config = demo_config()
        self.assertEqual(
            self.overridden(config, "--listen", "tcp:9000", "--public-url", "https://x.example"), "https://x.example"
        )
        self.assertEqual(self.overridden(config, "--listen", "unix:/tmp/s"), config.server.public_url)
        custom = attrs.evolve(config, server=attrs.evolve(config.server, public_url="https://rexec.example"))
        self.assertEqual(self.overridden(custom, "--listen", "tcp:9000"), "https://rexec.example")
