"""
The idle memory of one ``twistd -n rexecpf`` process, beside a baseline.

    PYTHONPATH=. python bench/idle_rss.py [--rounds 3] [--modules]

Starts, in turn and ``--rounds`` times each, three processes the way
``twistd -n`` starts them (``python -c "...twistd import run..."``, as
tests/functional/daemon.py does):

- baseline: ``twistd -n web`` serving one static file (the smallest Twisted
  web server);
- rexecpf with the demo configuration (``--demo``: static backend, SQLite);
- rexecpf with the Docker backend (``[backend] kind = "docker"``; the engine
  need not answer: the process starts either way).

Each is sampled once ``/healthz`` answers 200 and a second has passed:
``VmRSS``, ``RssAnon`` and ``RssFile`` of /proc/PID/status (the median of the
rounds), and the ratio to the baseline.  ``--modules`` also prints the
top-level packages each rexecpf process has loaded (read with ``py-spy``-free
means: a second, identical start with ``-X importtime``, summed per package).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
FIELDS = ("VmRSS", "RssAnon", "RssFile")

DOCKER_CONFIG = """
[server]
listen = ["tcp:{port}:interface=127.0.0.1"]
public_url = "http://127.0.0.1:{port}"
state = "{work}/docker-state.sqlite3"

[auth]
users = {{ alice = "alice-token" }}

[backend]
kind = "docker"
url = "unix:///var/run/docker.sock"
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def twistd(*args: str, python_options: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, *python_options, "-c", TWISTD, "-n", "--pidfile=", *args]


def variants(work: str) -> dict[str, tuple[list[str], int]]:
    """:return: name -> (twistd arguments, port) for the baseline and both configurations."""
    static = os.path.join(work, "www")
    os.makedirs(static, exist_ok=True)
    with open(os.path.join(static, "healthz"), "w") as file:
        file.write("ok\n")
    ports = {name: free_port() for name in ("baseline", "demo", "docker")}
    docker_config = os.path.join(work, "docker.toml")
    with open(docker_config, "w") as file:
        file.write(DOCKER_CONFIG.format(port=ports["docker"], work=work))
    return {
        "baseline": (["web", "--listen", f"tcp:{ports['baseline']}:interface=127.0.0.1", "--path", static], ports["baseline"]),
        "demo": (
            ["rexecpf", "--demo", "--listen", f"tcp:{ports['demo']}:interface=127.0.0.1",
             "--state", os.path.join(work, "demo-state.sqlite3")],
            ports["demo"],
        ),
        "docker": (["rexecpf", "--config", docker_config], ports["docker"]),
    }


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("NOTIFY_SOCKET", None)
    return env


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
            return bool(response.status == 200)
    except (OSError, urllib.error.HTTPError):
        return False


def status_fields(pid: int) -> dict[str, float]:
    """:return: FIELDS of /proc/PID/status in MiB."""
    values = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, rest = line.partition(":")
            if name in FIELDS:
                values[name] = int(rest.split()[0]) / 1024
    return values


def start(argv: list[str], port: int, work: str, log_name: str,
          stderr_path: str | None = None) -> subprocess.Popen[bytes]:
    log = open(os.path.join(work, log_name), "ab")
    stderr = open(stderr_path, "wb") if stderr_path else subprocess.STDOUT
    process = subprocess.Popen(argv, cwd=work, stdin=subprocess.DEVNULL, stdout=log, stderr=stderr,
                               env=environment())
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{argv} exited with {process.returncode}; see {work}/{log_name}")
        if healthy(port):
            return process
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"{argv} did not answer /healthz in 60 s; see {work}/{log_name}")


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def sample(argv: list[str], port: int, work: str, name: str) -> dict[str, float]:
    process = start(argv, port, work, f"{name}.log")
    try:
        time.sleep(1.0)  # let start-up's garbage go and the first timers run
        return status_fields(process.pid)
    finally:
        stop(process)


def import_summary(argv: list[str], port: int, work: str, name: str, top: int = 25) -> list[tuple[str, int, int]]:
    """
    :return: the ``top`` top-level packages by cumulative import time in a
        start of ``argv`` under ``-X importtime``: (package, microseconds,
        modules).
    """
    stderr_path = os.path.join(work, f"{name}.importtime")
    process = start([sys.executable, "-X", "importtime", *argv[1:]], port, work, f"{name}-importtime.log",
                    stderr_path=stderr_path)
    stop(process)
    totals: dict[str, list[int]] = {}
    with open(stderr_path) as file:
        for line in file:
            if not line.startswith("import time:") or "|" not in line:
                continue
            parts = [part.strip() for part in line[len("import time:"):].split("|")]
            if not parts[0].isdigit():
                continue
            package = parts[2].strip().split(".")[0]
            entry = totals.setdefault(package, [0, 0])
            entry[0] += int(parts[0])  # self time: summed, it does not count twice
            entry[1] += 1
    ranked = sorted(totals.items(), key=lambda item: -item[1][0])[:top]
    return [(package, micro, count) for package, (micro, count) in ranked]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modules", action="store_true", help="also print what each rexecpf start imports")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="idle-rss-") as work:
        runs = variants(work)
        results: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
        for _ in range(arguments.rounds):
            for name, (args, port) in runs.items():
                results[name].append(sample(twistd(*args), port, work, name))
        medians = {
            name: {field: statistics.median(run[field] for run in samples) for field in FIELDS}
            for name, samples in results.items()
        }
        base = medians["baseline"]
        print(f"idle resident memory, MiB (median of {arguments.rounds}); in brackets: the ratio to the baseline")
        print(f"{'process':<24}" + "".join(f"{field:>18}" for field in FIELDS))
        for name, values in medians.items():
            cells = []
            for field in FIELDS:
                cell = f"{values[field]:.1f}"
                if name != "baseline":
                    cell += f" ({values[field] / base[field]:.2f})"
                cells.append(f"{cell:>18}")
            label = {"baseline": "baseline (twistd web)", "demo": "rexecpf --demo",
                     "docker": "rexecpf docker backend"}[name]
            print(f"{label:<24}" + "".join(cells))
        if arguments.modules:
            for name in ("baseline", "demo", "docker"):
                args, port = runs[name]
                print(f"\n{name}: top-level packages by import time (self, summed), modules")
                for package, micro, count in import_summary(twistd(*args), port, work, name):
                    print(f"  {package:<28}{micro / 1000:>8.1f} ms{count:>6}")


if __name__ == "__main__":
    main()
