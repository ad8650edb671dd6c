"""
The idle memory of one ``twistd -n rexecpf`` process, beside a baseline.

    PYTHONPATH=. python bench/idle_rss.py [--rounds 3] [--modules]

Starts, in turn and ``--rounds`` times each, four processes the way
``twistd -n`` starts them (``python -c "...twistd import run..."``, as
tests/functional/daemon.py does):

- the baseline: ``twistd -n web`` serving one static file (the smallest
  Twisted web server; its reactor imports pyOpenSSL);
- the same with pyOpenSSL unimportable, as rexecpf leaves it out when no
  endpoint uses TLS: the floor of any ``twistd`` web server without TLS;
- rexecpf with the demo configuration (``--demo``: static backend, SQLite);
- rexecpf with the Docker backend (``[backend] kind = "docker"``; the engine
  need not answer: the process starts either way).

Each is sampled once ``/healthz`` answers 200 and a second has passed:
``VmRSS``, ``RssAnon`` and ``RssFile`` of /proc/PID/status (the median of the
rounds), and the ratio to the baseline.  ``--modules`` also prints what each
package rexecpf imports adds (a fresh Python importing them one after another
and reading its own /proc/self/status after each).
"""

from __future__ import annotations

import argparse
import json
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
#: The same, with pyOpenSSL unimportable (as rexecpf.tap.leave_out_tls makes it).
TWISTD_NO_TLS = "import sys; sys.modules['OpenSSL'] = None; " + TWISTD.partition("; ")[2]
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


def twistd(*args: str, program: str = TWISTD) -> list[str]:
    return [sys.executable, "-c", program, "-n", "--pidfile=", *args]


#: name -> its label in the table; the first is the baseline of the ratios.
LABELS = {
    "baseline": "baseline (twistd web)",
    "baseline-no-tls": "twistd web, no pyOpenSSL",
    "demo": "rexecpf --demo",
    "docker": "rexecpf, Docker backend",
}


def variants(work: str) -> dict[str, tuple[list[str], int]]:
    """:return: name -> (argv, port) for the baselines and both configurations."""
    static = os.path.join(work, "www")
    os.makedirs(static, exist_ok=True)
    with open(os.path.join(static, "healthz"), "w") as file:
        file.write("ok\n")
    ports = {name: free_port() for name in LABELS}
    docker_config = os.path.join(work, "docker.toml")
    with open(docker_config, "w") as file:
        file.write(DOCKER_CONFIG.format(port=ports["docker"], work=work))

    def web(port: int) -> list[str]:
        return ["web", "--listen", f"tcp:{port}:interface=127.0.0.1", "--path", static]

    return {
        "baseline": (twistd(*web(ports["baseline"])), ports["baseline"]),
        "baseline-no-tls": (twistd(*web(ports["baseline-no-tls"]), program=TWISTD_NO_TLS), ports["baseline-no-tls"]),
        "demo": (
            twistd("rexecpf", "--demo", "--listen", f"tcp:{ports['demo']}:interface=127.0.0.1",
                   "--state", os.path.join(work, "demo-state.sqlite3")),
            ports["demo"],
        ),
        "docker": (twistd("rexecpf", "--config", docker_config), ports["docker"]),
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


#: What a rexecpf process imports, in an order that charges each package
#: for what it alone brings.
BREAKDOWN = (
    ("python itself", ()),
    ("twisted core and twistd", ("twisted.scripts.twistd", "twisted.application.app")),
    ("the reactor (no TLS)", ("twisted.internet.reactor",)),
    ("twisted.web.server", ("twisted.web.server", "twisted.internet.endpoints")),
    ("werkzeug and klein", ("werkzeug.routing", "klein")),
    ("cffi and pycparser (autobahn.nvx)", ("cffi.cparser",)),
    ("click and cbor2 (autobahn.util, .wamp)", ("click", "cbor2")),
    ("autobahn's own, txaio", ("rexecpf.http._twisted",)),
    ("prometheus_client", ("prometheus_client",)),
    ("sqlite3, adbapi", ("sqlite3", "twisted.enterprise.adbapi")),
    ("rexecpf's own modules", ("rexecpf.tap", "rexecpf.api", "rexecpf.tunnel", "rexecpf.proxy", "rexecpf.web",
                               "rexecpf.ops", "rexecpf.metrics", "rexecpf.listeners")),
    ("docker SDK (Docker backend only)", ("docker",)),
)

BREAKDOWN_SCRIPT = """
import importlib, json, sys
sys.modules["OpenSSL"] = None  # as rexecpf.tap.leave_out_tls does
def rss():
    with open("/proc/self/status") as status:
        return {line.split(":")[0]: int(line.split()[1]) / 1024 for line in status
                if line.split(":")[0] in ("VmRSS", "RssAnon", "RssFile")}
steps = []
for label, modules in json.loads(sys.argv[1]):
    for module in modules:
        importlib.import_module(module)
    steps.append((label, rss()))
print(json.dumps(steps))
"""


def breakdown() -> list[tuple[str, dict[str, float]]]:
    """:return: (label, the MiB its imports added) for :data:`BREAKDOWN`, in a fresh Python."""
    output = subprocess.run(
        [sys.executable, "-c", BREAKDOWN_SCRIPT, json.dumps(BREAKDOWN)],
        env=environment(), check=True, capture_output=True, text=True,
    ).stdout
    steps = json.loads(output.splitlines()[-1])
    added = []
    previous = {field: 0.0 for field in FIELDS}
    for label, values in steps:
        added.append((label, {field: values[field] - previous[field] for field in FIELDS}))
        previous = values
    return added


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modules", action="store_true", help="also print the MiB each imported package adds")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="idle-rss-") as work:
        runs = variants(work)
        results: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
        for _ in range(arguments.rounds):
            for name, (argv, port) in runs.items():
                results[name].append(sample(argv, port, work, name))
        medians = {
            name: {field: statistics.median(run[field] for run in samples) for field in FIELDS}
            for name, samples in results.items()
        }
        base = medians["baseline"]
        print(f"idle resident memory, MiB (median of {arguments.rounds}); in brackets: the ratio to the baseline")
        print(f"{'process':<26}" + "".join(f"{field:>16}" for field in FIELDS))
        for name, values in medians.items():
            cells = []
            for field in FIELDS:
                cell = f"{values[field]:.1f}"
                if name != "baseline":
                    cell += f" ({values[field] / base[field]:.2f})"
                cells.append(f"{cell:>16}")
            print(f"{LABELS[name]:<26}" + "".join(cells))
        if arguments.modules:
            print("\nwhat the imports add, MiB (a fresh Python importing them in this order, pyOpenSSL left out)")
            print(f"{'imports':<40}" + "".join(f"{field:>10}" for field in FIELDS))
            total = {field: 0.0 for field in FIELDS}
            for label, values in breakdown():
                print(f"{label:<40}" + "".join(f"{values[field]:>10.1f}" for field in FIELDS))
                total = {field: total[field] + values[field] for field in FIELDS}
            print(f"{'total':<40}" + "".join(f"{total[field]:>10.1f}" for field in FIELDS))


if __name__ == "__main__":
    main()
