"""
A real ``twistd rexecpf`` process for functional tests, driven over real
sockets with blocking clients (no reactor needed in the test).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from tests.functional.peers import free_port

__all__ = ["Daemon", "http_request", "twistd_argv"]

REPO = Path(__file__).resolve().parents[2]


def twistd_argv(*args: str, twistd: tuple[str, ...] = ()) -> list[str]:
    """:return: the argv that runs ``twistd -n --pidfile= TWISTD rexecpf ARGS``."""
    return [
        sys.executable,
        "-c",
        "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
        "-n",
        "--pidfile=",
        *twistd,
        "rexecpf",
        *args,
    ]


def subprocess_env() -> dict[str, str]:
    """The environment for a daemon: this checkout first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("NOTIFY_SOCKET", None)
    return env


def http_request(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    token: str | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
    host: str = "127.0.0.1",
) -> tuple[int, Any, dict[str, str]]:
    """
    One request to host:port.

    :return: (status, JSON document or raw bytes or None, lower-cased headers)
    """
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    all_headers = dict(headers or {})
    if token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    if body is not None and not isinstance(body, bytes):
        body = json.dumps(body).encode()
    try:
        connection.request(method, path, body=body, headers=all_headers)
        response = connection.getresponse()
        raw = response.read()
        response_headers = {k.lower(): v for k, v in response.getheaders()}
    finally:
        connection.close()
    document: Any = raw or None
    if raw and response_headers.get("content-type", "").startswith("application/json"):
        document = json.loads(raw)
    return response.status, document, response_headers


class Daemon:
    """
    A ``twistd rexecpf`` subprocess with its own config, inventory and state.

    :param directory: where config, inventory, state and logs go.
    :param users: the ``[auth] users`` table.
    :param containers: inventory entries (dicts with id, owner, address, state).
    :param extra: more TOML appended to the config.
    :param host: the loopback address it listens on (a node of several:
        127.0.0.2, 127.0.0.3...).
    :param state: the SQLite state file (several daemons may share one).
    :param inventory: the static inventory file (several daemons may share
        one); by default ``containers.toml`` in ``directory``, written from
        ``containers`` (a given one is written only when ``containers`` is).
    :param backend: the ``[backend]`` table's body (and its subtables, e.g.
        ``[[backend.engines]]``); by default the static inventory.
    """

    def __init__(
        self,
        directory: str | Path,
        users: dict[str, str] | None = None,
        admins: tuple[str, ...] = (),
        containers: list[dict[str, str]] | None = None,
        extra: str = "",
        limits: str = "",
        host: str = "127.0.0.1",
        state: str = "state.sqlite3",
        inventory: str | Path | None = None,
        listen: tuple[str, ...] = (),
        server: str = "",
        auth: str = "",
        backend: str = "",
    ) -> None:
        self.directory = Path(directory)
        self.host = host
        self.port = free_port(host)
        self.users = users or {"alice": "alice-token", "bob": "bob-token"}
        self.inventory = Path(inventory) if inventory is not None else self.directory / "containers.toml"
        if inventory is None or containers is not None:
            self.write_inventory(containers or [{"id": "c1", "owner": "alice"}])
        users_toml = ", ".join(f'{name} = "{token}"' for name, token in self.users.items())
        admins_toml = ", ".join(f'"{name}"' for name in admins)
        backend = backend or f'kind = "static"\ninventory = "{self.inventory}"'
        listen_toml = ", ".join(f'"{endpoint}"' for endpoint in (f"tcp:{self.port}:interface={host}", *listen))
        self.config = self.directory / "rexecpf.toml"
        self.config.write_text(
            textwrap.dedent(
                f"""
                [server]
                listen = [{listen_toml}]
                public_url = "http://{host}:{self.port}"
                state = "{state}"
                {server}

                [auth]
                users = {{ {users_toml} }}
                admins = [{admins_toml}]
                {auth}

                [backend]
                {backend}

                [limits]
                {limits}
                """
            )
            + extra
        )
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.directory / "twistd.log"
        self._log = None

    def write_inventory(self, containers: list[dict[str, str]]) -> None:
        """Rewrite the inventory atomically (rename), as an operator's tool would."""
        lines = []
        for container in containers:
            lines.append("[[container]]")
            for key in ("id", "owner", "address", "state"):
                value = container.get(key, {"address": "127.0.0.1", "state": "running"}.get(key))
                if value is not None:
                    lines.append(f'{key} = "{value}"')
            lines.append("")
        temporary = self.inventory.with_suffix(".tmp")
        temporary.write_text("\n".join(lines))
        os.replace(temporary, self.inventory)

    def start(self, timeout: float = 30.0, args: tuple[str, ...] = (), twistd: tuple[str, ...] = ()) -> Daemon:
        """
        Start twistd (with more ``rexecpf`` options ``args``, more twistd
        options ``twistd``) and wait until /healthz answers 200.
        """
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            twistd_argv("--config", str(self.config), *args, twistd=twistd),
            cwd=self.directory,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=subprocess_env(),
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"rexecpf exited with {self.process.returncode}: {self.log()}")
            try:
                if http_request(self.port, "GET", "/healthz", timeout=2, host=self.host)[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"rexecpf did not answer in {timeout}s: {self.log()}")

    def rss(self) -> int:
        """:return: the process's resident set size in bytes (``VmRSS`` of /proc/PID/status)."""
        assert self.process is not None
        with open(f"/proc/{self.process.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError(f"no VmRSS for {self.process.pid}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def kill(self, sig: int = signal.SIGKILL) -> int:
        """Send ``sig`` and wait for the process to end; :return: its status."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        status = self.process.wait(timeout=30)
        if self._log is not None:
            self._log.close()
            self._log = None
        return status

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill(signal.SIGTERM)

    def request(self, method: str, path: str, body: Any = None, user: str | None = "alice",
                **kwargs: Any) -> tuple[int, Any, dict[str, str]]:
        token = self.users[user] if user else None
        return http_request(self.port, method, path, body, token=token, host=self.host, **kwargs)

    def create(self, container: str, port: int, user: str = "alice", **extra: Any) -> tuple[int, Any]:
        code, document, _ = self.request(
            "POST", f"/api/containers/{container}/port-forwards",
            {"container_port": port, **extra}, user=user,
        )
        return code, document

    def list(self, container: str, user: str = "alice") -> list[dict[str, Any]]:
        code, document, _ = self.request("GET", f"/api/containers/{container}/port-forwards", user=user)
        assert code == 200, (code, document)
        return list(document)
