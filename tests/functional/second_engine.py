"""
A second Docker engine for the tests of a process: a private ``dockerd``
started on first use and torn down at exit (also by
``.ci/system-teardown.sh`` should the process die first).

It has its own ``--data-root``, ``--exec-root``, socket and ``--pidfile``
under :data:`ROOT`, and its own bridge :data:`BRIDGE` (172.31.0.1/24, made
here with ``ip link``), with ``--iptables=false --ip-forward=false
--ip-masq=false`` like the CI's first engine: the host reaches its containers
at their IPs over the bridge, nothing else is touched.  ``--live-restore``
keeps its containers running while it is stopped, as an engine that
restarts or loses its connection does in production, so a test can take the
engine away and find the containers again.  The test image is
copied into it from the first engine (``docker save | docker load``: offline).
Creating a bridge and running dockerd need root (CI runs as root).

Under ``CI=true`` an engine that cannot be started is a test failure;
elsewhere the tests that need it skip, saying why.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import time
import unittest
from collections.abc import Mapping, Sequence
from pathlib import Path

from tests import _docker

__all__ = ["BRIDGE", "BRIDGE_ADDRESS", "IN_CI", "ROOT", "SecondEngine", "second_engine", "skip_reason"]

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
#: Everything of the engine lives here (removed at teardown).
ROOT = Path(os.environ.get("REXECPF_TEST_DOCKERD2_ROOT", "/tmp/rexecpf-dockerd2"))
#: Its bridge and the bridge's address; other values (with another ROOT, one
#: that does not begin with the other run's: strays are found by substring)
#: let two test runs on one machine each have a second engine of their own.
BRIDGE = os.environ.get("REXECPF_TEST_DOCKERD2_BRIDGE", "rexecpf-br2")
BRIDGE_ADDRESS = os.environ.get("REXECPF_TEST_DOCKERD2_ADDRESS", "172.31.0.1/24")

_engine: SecondEngine | None = None
_failed: str | None = None


def skip_reason() -> str | None:
    """
    :return: why the second engine cannot run here, or None.  Under CI only
        a missing first engine skips (as every Docker test does): anything
        else is left to fail in :func:`second_engine`.
    """
    first = _docker.skip_reason()
    if first is not None or IN_CI:
        return first
    if os.geteuid() != 0:
        return "a second dockerd and its bridge need root"
    for program in ("dockerd", "ip"):
        if shutil.which(program) is None:
            return f"{program} is not installed"
    return None


def second_engine() -> SecondEngine:
    """
    :return: the process's second engine, running (started on first use,
        started again if a test stopped it).
    :raises SkipTest: outside CI when it cannot be started.
    :raises AssertionError: under CI when it cannot.
    """
    global _engine, _failed
    if _failed is None:
        try:
            if _engine is None:
                _engine = SecondEngine(ROOT)
                atexit.register(_engine.teardown)
            _engine.start()
        except (OSError, RuntimeError, subprocess.SubprocessError) as error:
            _failed = f"{type(error).__name__}: {error}"
    if _failed is not None:
        message = f"the second Docker engine did not start: {_failed}"
        if IN_CI:
            raise AssertionError(message)
        raise unittest.SkipTest(message)
    assert _engine is not None
    return _engine


def _run(argv: Sequence[str], timeout: float = 60, stdin: bytes | None = None) -> str:
    done = subprocess.run(list(argv), input=stdin, capture_output=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.decode(errors='replace').strip()[-500:]}"
        )
    return done.stdout.decode(errors="replace").strip()


class SecondEngine:
    """A private dockerd on its own bridge; see the module's docstring."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.socket = root / "docker.sock"
        self.url = f"unix://{self.socket}"
        self.pidfile = root / "docker.pid"
        self.log_path = root / "dockerd.log"
        self.process: subprocess.Popen[bytes] | None = None

    # --- the docker CLI, pointed at this engine

    def docker(self, *args: str, timeout: float = 60) -> str:
        """:return: stdout of ``docker -H URL ARGS``; :raises RuntimeError: when it fails."""
        return _run(["docker", "-H", self.url, *args], timeout=timeout)

    def answers(self) -> bool:
        try:
            self.docker("info", "--format", "{{.ServerVersion}}", timeout=15)
        except (RuntimeError, subprocess.TimeoutExpired):
            return False
        return True

    def run_container(
        self,
        command: Sequence[str],
        owner: str | None = None,
        name: str | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> str:
        """``docker run -d --init --label rexecpf.test=1 ...`` here; :return: the full id."""
        return self.docker(*_docker.run_argv(command, owner, name, labels)).splitlines()[-1]

    def remove_quietly(self, container_id: str) -> None:
        """``docker rm -f`` here, ignoring a container that is gone or an engine that is down."""
        try:
            self.docker("rm", "-f", container_id, timeout=60)
        except (RuntimeError, subprocess.TimeoutExpired):
            pass

    def container_ip(self, container_id: str, timeout: float = 10) -> str:
        """:return: the container's IP address on this engine's bridge (waits for one)."""
        return _docker.container_ip(container_id, timeout, docker=self.docker)

    # --- lifecycle

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Start the engine unless it runs; wait until it answers and has the test image."""
        if self.running and self.answers():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        self._bridge()
        self._stop_leftover()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    "dockerd",
                    "--data-root", str(self.root / "data"),
                    "--exec-root", str(self.root / "exec"),
                    "--pidfile", str(self.pidfile),
                    "-H", self.url,
                    "--bridge", BRIDGE,
                    "--iptables=false", "--ip-forward=false", "--ip-masq=false", "--live-restore",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while not self.answers():
            if self.process.poll() is not None:
                raise RuntimeError(f"dockerd exited ({self.process.returncode}):\n{self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"dockerd did not answer within 60 s:\n{self.log()}")
            time.sleep(0.2)
        try:
            self.docker("image", "inspect", _docker.IMAGE, timeout=15)
        except RuntimeError:
            image = subprocess.run(
                ["docker", "save", _docker.IMAGE], capture_output=True, timeout=120, check=True
            ).stdout
            _run(["docker", "-H", self.url, "load"], timeout=120, stdin=image)

    def stop(self) -> None:
        """Stop the engine (SIGTERM, then SIGKILL after 30 s); its containers stop with it."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)

    def teardown(self) -> None:
        """Remove its containers, stop the engine, remove its bridge and every file of it (at exit)."""
        if self.running:
            # (with --live-restore they would outlive the engine)
            _run_quietly(["sh", "-c", f"docker -H {self.url} ps -aq | xargs -r docker -H {self.url} rm -f"])
        self.stop()
        self._stop_leftover()
        _kill_strays(self.root)
        _run_quietly(["ip", "link", "delete", BRIDGE])
        for line in reversed(Path("/proc/mounts").read_text().splitlines()):
            mountpoint = line.split()[1]
            if mountpoint.startswith(f"{self.root}/"):
                _run_quietly(["umount", "-l", mountpoint])
        shutil.rmtree(self.root, ignore_errors=True)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def _bridge(self) -> None:
        """Make the bridge (kept across restarts of the engine), with its address, up."""
        if subprocess.run(["ip", "link", "show", BRIDGE], capture_output=True).returncode != 0:
            _run(["ip", "link", "add", BRIDGE, "type", "bridge"])
        if BRIDGE_ADDRESS.split("/")[0] not in _run(["ip", "-4", "addr", "show", "dev", BRIDGE]):
            _run(["ip", "addr", "add", BRIDGE_ADDRESS, "dev", BRIDGE])
        _run(["ip", "link", "set", BRIDGE, "up"])

    def _stop_leftover(self) -> None:
        """A dockerd of an earlier run that died without its teardown holds the root: stop it."""
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return
        if self.process is not None and pid == self.process.pid:
            return
        try:
            if b"dockerd" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                return
            os.kill(pid, signal.SIGTERM)
        except OSError:
            return
        deadline = time.monotonic() + 30
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)


def _kill_strays(root: Path) -> None:
    """SIGKILL every process whose command line names ``root`` (a container's shim, its containerd)."""
    mine = str(root).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if mine in (entry / "cmdline").read_bytes():
                os.kill(int(entry.name), signal.SIGKILL)
        except OSError:
            pass


def _alive(pid: int) -> bool:
    """:return: whether ``pid`` runs (a zombie, which another parent must reap, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (OSError, IndexError):
        return False


def _run_quietly(argv: Sequence[str]) -> None:
    subprocess.run(list(argv), capture_output=True, timeout=60)
