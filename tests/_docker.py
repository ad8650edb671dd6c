"""
Blocking helpers around the ``docker`` CLI for tests that use a real engine.

Every container started here has ``--init`` and the label ``rexecpf.test=1``
(so ``.ci/system-teardown.sh`` removes leftovers), and is force-removed by
the test's cleanup.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence

IMAGE = "rexecpf-busybox:latest"
TEST_LABEL = "rexecpf.test"
OWNER_LABEL = "rexecpf.owner"

_answers: bool | None = None


def docker(*args: str, timeout: float = 60) -> str:
    """:return: stdout of ``docker ARGS``; :raises RuntimeError: when it fails."""
    done = subprocess.run(
        ["docker", *args], stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"docker {' '.join(args)}: exit {done.returncode}: "
            f"{done.stderr.decode(errors='replace').strip()}"
        )
    return done.stdout.decode().strip()


def engine_answers() -> bool:
    """:return: whether ``docker info`` answers now."""
    if shutil.which("docker") is None:
        return False
    try:
        docker("info", "--format", "{{.ServerVersion}}", timeout=15)
    except (RuntimeError, subprocess.TimeoutExpired):
        return False
    return True


def skip_reason() -> str | None:
    """:return: why real-Docker tests cannot run here, or None when they can (cached)."""
    global _answers
    if _answers is None:
        _answers = engine_answers()
        if _answers:
            try:
                docker("image", "inspect", IMAGE, timeout=15)
            except (RuntimeError, subprocess.TimeoutExpired):
                _answers = False
                return f"the image {IMAGE} is missing (run .ci/system-setup.sh)"
    return None if _answers else "no Docker engine answers (docker info fails)"


def run_container(
    command: Sequence[str],
    owner: str | None = None,
    name: str | None = None,
    labels: Mapping[str, str] | None = None,
    extra: Sequence[str] = (),
) -> str:
    """``docker run -d --init --label rexecpf.test=1 ...``; :return: the full id."""
    return docker(*run_argv(command, owner, name, labels, extra)).splitlines()[-1]


def run_argv(
    command: Sequence[str],
    owner: str | None = None,
    name: str | None = None,
    labels: Mapping[str, str] | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """:return: the arguments of ``docker run`` for a test container (any engine)."""
    argv = ["run", "-d", "--init", "--label", f"{TEST_LABEL}=1"]
    if owner is not None:
        argv += ["--label", f"{OWNER_LABEL}={owner}"]
    for key, value in (labels or {}).items():
        argv += ["--label", f"{key}={value}"]
    if name is not None:
        argv += ["--name", name]
    return [*argv, *extra, IMAGE, *command]


def remove_quietly(container_id: str) -> None:
    """``docker rm -f``, ignoring a container that is already gone or an engine that is down."""
    try:
        docker("rm", "-f", container_id, timeout=60)
    except (RuntimeError, subprocess.TimeoutExpired):
        pass


def container_ip(container_id: str, timeout: float = 10, docker: Callable[..., str] = docker) -> str:
    """:return: the container's first IP address (waits for one), from ``docker`` (another engine's)."""
    deadline = time.monotonic() + timeout
    while True:
        ips = docker(
            "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}", container_id
        ).split()
        if ips:
            return ips[0]
        if time.monotonic() > deadline:
            raise RuntimeError(f"container {container_id} has no IP address")
        time.sleep(0.1)


HTTPD = ["sh", "-c", "mkdir -p /www && echo hello > /www/index.html && exec httpd -f -p 8000 -h /www"]
SLEEPER = ["sleep", "600"]
