"""
``twistd rexecpf --workers N``: one worker beside two, and their baselines, in one run.

    PYTHONPATH=. python bench/workers_bench.py [--duration 10] [--rounds 3] [--tunnels 4] [--mib 128] [--quick]

Everything on 127.0.0.1; two rexecpf instances run side by side for the whole
run, ``twistd -n rexecpf`` (one process, no ``--workers``) and ``twistd -n
rexecpf --workers 2``, each with ``metrics_listen`` and no tunnel rate limit:

- proxy: one nginx (bench/proxy_bench.py) serves a 1 KiB file; ``wrk -t2
  -c50 --latency`` fetches it directly, through each rexecpf (``/p/{id}/``,
  bearer token) and through a plain ``ReverseProxyResource``
  (bench/rpr_baseline.py): requests/s, p50, p99;
- tunnels: ``--tunnels`` WebSocket tunnels at once, each moving ``--mib`` MiB
  up (then, again at once, down) in 64 KiB messages between one client
  process (a thread per tunnel) and bench/tunnel_bench.py's container, through
  each rexecpf, through websocat (one process per direction, as in
  tunnel_bench.py) and as raw TCP: the aggregate MiB/s (every tunnel's bytes
  over the time until the last one ends).  Each tunnel is its own connection,
  so ``SO_REUSEPORT`` spreads them over the workers by a hash of the client's
  port: the split each worker got (from ``rexecpf_relays_total{worker}``) is
  printed, since 3/1 or 4/0 caps what two workers can do.

Each round runs every target once, in an order that rotates from round to
round (the machine is shared: its load moves from minute to minute); the
median of ``--rounds`` rounds is printed with the ratios 2 workers / 1 worker
and 2 workers / ReverseProxyResource, beside the issue's targets; with each
figure, the cores each party used (CPU seconds over the run's seconds: on 2
cores, what the server may take is what the load client and the backend
leave), the ceiling this puts on 2 workers / 1 worker (the cores over what
all parties used with one worker: the client and the backend need more as the
rate grows), and the CPU seconds the parent of the two workers spent (it is
not in the data path).
The access log is dropped (twistd ``--logger`` gets a publisher with no
observers), as bench/proxy_bench.py drops it: the bench measures the proxy,
not the log.  ``--quick``: 2 s of wrk, 16 MiB tunnels, one round.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import proxy_bench  # noqa: E402
import tunnel_bench  # noqa: E402

MIB = tunnel_bench.MIB
PY = sys.executable
AUTH = [f"Authorization: Bearer {tunnel_bench.TOKEN}"]
PROTOCOLS = f"Bearer, {tunnel_bench.TOKEN}"
#: A log observer factory for twistd ``--logger``: a publisher with no observers drops every event.
DROP_LOGS = "--logger=twisted.logger.LogPublisher"
#: No tunnel rate limit (as tunnel_bench.py's single-tunnel runs).
UNLIMITED = 1 << 40


# --- the tunnels' client (a subprocess: its threads do not share the bench's GIL) ----------


def tunnels_main(spec: dict) -> None:
    """Run ``len(spec["paths"])`` transfers at once; print the aggregate MiB/s."""
    tunnel_bench.raise_nofile()
    run = tunnel_bench.client_upload if spec["kind"] == "upload" else tunnel_bench.client_download
    errors: list[BaseException] = []

    def one(path: str) -> None:
        try:
            run(spec["port"], path, spec["protocols"], spec["size"], spec["raw"])
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=one, args=(path,)) for path in spec["paths"]]
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    if errors:
        raise SystemExit(f"{len(errors)} tunnel(s) failed: {errors[0]!r}")
    cpu = cpu_after.ru_utime + cpu_after.ru_stime - cpu_before.ru_utime - cpu_before.ru_stime
    print(json.dumps({"seconds": elapsed, "mib_s": len(threads) * spec["size"] / MIB / elapsed, "cpu": cpu}), flush=True)


def run_tunnels(spec: dict) -> dict[str, float]:
    """
    :return: the aggregate ``mib_s``, the ``seconds`` the transfers took and
        the client's ``cpu`` seconds meanwhile (its start-up left out).
    """
    result = subprocess.run([PY, __file__, "_tunnels", json.dumps(spec)], capture_output=True, text=True, timeout=600)
    if result.returncode:
        raise SystemExit(f"tunnel client failed: {result.stderr.strip()[-500:]}")
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


# --- rexecpf ---------------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as listing:
        return [int(child) for child in listing.read().split()]


class CpuMeter:
    """
    The cores some processes use from now on: CPU seconds over wall seconds,
    each group of pids apart, and "client": this process's children that
    ended meanwhile (wrk, the tunnels' client).
    """

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self.start = time.monotonic()
        self.before = self._seconds()
        self.wall = 0.0

    def _seconds(self) -> dict[str, float]:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        seconds = {"client": usage.ru_utime + usage.ru_stime}
        seconds.update((name, sum(tunnel_bench.cpu_seconds(pid) for pid in pids)) for name, pids in self.groups.items())
        return seconds

    def cores(self, wall: float | None = None) -> dict[str, float]:
        """:param wall: the seconds to divide by (default: since this meter started)."""
        after = self._seconds()
        self.wall = wall or time.monotonic() - self.start
        return {name: (after[name] - self.before[name]) / self.wall for name in after}


class Instance:
    """One ``twistd rexecpf [--workers N]`` with forwards to nginx, the sink and the source."""

    def __init__(self, directory: str, workers: int, nginx_port: int, sink: int, source: int) -> None:
        os.makedirs(directory)
        self.workers = workers
        self.metrics_port = tunnel_bench.free_port()
        self.rexecpf = tunnel_bench.Rexecpf(
            directory, UNLIMITED, [nginx_port, sink, source], workers, self.metrics_port, (DROP_LOGS,)
        )
        self.pid = self.rexecpf.proc.pid
        self.port = self.rexecpf.port
        self.proxy_url = f"http://127.0.0.1:{self.port}/p/{self.rexecpf.forwards[nginx_port]}/"
        self.up_path = self.rexecpf.path(sink)
        self.down_path = self.rexecpf.path(source)

    def worker_pids(self) -> list[int]:
        """:return: the workers' pids (with one process: itself)."""
        return [self.pid] if self.workers == 1 else children(self.pid)

    def per_worker(self, metric: str) -> dict[str, float]:
        """:return: worker -> the sum of ``metric``'s samples there ("0" with one process)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as response:
            text = response.read().decode()
        totals: dict[str, float] = {}
        for match in re.finditer(rf"^{metric}\{{([^}}]*)\}} (\S+)$", text, re.MULTILINE):
            worker = re.search(r'worker="(\d+)"', match.group(1))
            key = worker.group(1) if worker else "0"
            totals[key] = totals.get(key, 0.0) + float(match.group(2))
        return totals

    def stop(self) -> None:
        self.rexecpf.stop()


def split(before: dict[str, float], after: dict[str, float], workers: int) -> str:
    """:return: how many of something each worker got, "3/1"."""
    return "/".join(f"{after.get(str(w), 0) - before.get(str(w), 0):.0f}" for w in range(workers))


# --- the bench -------------------------------------------------------------------------------


def ceiling(one_worker: list[dict[str, float]], roles: list[str]) -> float:
    """
    :return: the most 2 workers could do, as a multiple of 1 worker, on this
        machine's cores: every party's CPU per request (or byte) as with 1
        worker, and all the cores busy.  The load client and the backend run
        here too: their share grows with the rate.
    """
    return (os.cpu_count() or 1) / sum(median_of(one_worker, role) for role in roles)


def rotated(names: list[str], turn: int) -> list[str]:
    turn %= len(names)
    return names[turn:] + names[:turn]


def median_of(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=10, help="seconds of each wrk run (default 10)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (median; default 3)")
    parser.add_argument("--tunnels", type=int, default=4, help="tunnels at once (default 4)")
    parser.add_argument("--mib", type=int, default=128, help="MiB each tunnel moves each way (default 128)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 s of wrk, 16 MiB, one round")
    options = parser.parse_args()
    if options.quick:
        options.duration, options.mib, options.rounds = 2, 16, 1
    tunnel_bench.raise_nofile()
    size = options.mib * MIB
    work = tempfile.mkdtemp(prefix="rexecpf-workers-bench-")
    os.chmod(work, 0o755)  # nginx workers may run as another user
    os.makedirs(os.path.join(work, "nginx"))
    processes: list[subprocess.Popen] = []
    instances: list[Instance] = []
    try:
        nginx, nginx_port = proxy_bench.start_nginx(os.path.join(work, "nginx"))
        processes.append(nginx)
        sink, source, idle = (tunnel_bench.free_port() for _ in range(3))
        processes.append(tunnel_bench.spawn(
            [PY, tunnel_bench.__file__, "_container", str(sink), str(source), str(idle), str(size)],
            preexec_fn=tunnel_bench.raise_nofile,
        ))
        tunnel_bench.wait_port(sink), tunnel_bench.wait_port(source)
        one = Instance(os.path.join(work, "one"), 1, nginx_port, sink, source)
        instances.append(one)
        two = Instance(os.path.join(work, "two"), 2, nginx_port, sink, source)
        instances.append(two)
        rpr, rpr_port = proxy_bench.start_rpr(nginx_port, os.path.join(work, "rpr-stderr.log"))
        processes.append(rpr)
        websocat = shutil.which("websocat") or os.path.join(tunnel_bench.BIN, "websocat")
        wsc_up, wsc_down = tunnel_bench.free_port(), tunnel_bench.free_port()
        websocat_pids: list[int] = []
        if os.path.exists(websocat):
            for port, target in ((wsc_up, sink), (wsc_down, source)):
                processes.append(tunnel_bench.spawn([websocat, "-b", "-E", f"ws-l:127.0.0.1:{port}", f"tcp:127.0.0.1:{target}"]))
                websocat_pids.append(processes[-1].pid)
                tunnel_bench.wait_port(port)
        else:
            print("websocat not found: no tunnel baseline", flush=True)

        nginx_pids = [nginx.pid, *children(nginx.pid)]
        container_pids = [processes[1].pid]
        #: name -> (URL, headers, the proxy's pids)
        proxies: dict[str, tuple[str, list[str], list[int]]] = {
            "direct (nginx)": (f"http://127.0.0.1:{nginx_port}/1k", [], []),
            "rexecpf 1 worker": (one.proxy_url + "1k", AUTH, one.worker_pids()),
            "rexecpf 2 workers": (two.proxy_url + "1k", AUTH, two.worker_pids()),
            "ReverseProxyResource": (f"http://127.0.0.1:{rpr_port}/1k", [], [rpr.pid]),
        }
        n = options.tunnels
        #: name -> (upload spec, download spec, the bridge's pids, the rexecpf instance)
        tunnels: dict[str, tuple[dict, dict, list[int], Instance | None]] = {
            "raw TCP": ({"port": sink, "paths": [""] * n}, {"port": source, "paths": [""] * n}, [], None),
            "rexecpf 1 worker": ({"port": one.port, "paths": [one.up_path] * n},
                                 {"port": one.port, "paths": [one.down_path] * n}, one.worker_pids(), one),
            "rexecpf 2 workers": ({"port": two.port, "paths": [two.up_path] * n},
                                  {"port": two.port, "paths": [two.down_path] * n}, two.worker_pids(), two),
        }
        if websocat_pids:
            tunnels["websocat"] = ({"port": wsc_up, "paths": ["/"] * n}, {"port": wsc_down, "paths": ["/"] * n},
                                   websocat_pids, None)
        for url, headers, _ in proxies.values():
            proxy_bench.wrk(url, 1 if options.quick else 2, headers)  # warm up (and every forward is known everywhere)

        proxy_runs: dict[str, list[dict[str, float]]] = {name: [] for name in proxies}
        tunnel_runs: dict[str, list[dict[str, float]]] = {name: [] for name in tunnels}
        splits: dict[str, list[str]] = {"proxy": [], "up": [], "down": []}
        parent_cpu = 0.0
        for turn in range(options.rounds):
            print(f"round {turn + 1} of {options.rounds}", flush=True)
            for name in rotated(list(proxies), turn):
                url, headers, pids = proxies[name]
                before_requests = two.per_worker("rexecpf_proxy_requests_total") if name.endswith("2 workers") else {}
                meter = CpuMeter({"proxy": pids, "nginx": nginx_pids, "parent": [two.pid]})
                result = proxy_bench.wrk(url, options.duration, headers)
                cores = meter.cores()
                parent_cpu += cores.pop("parent") * meter.wall
                result.update(cores)
                if name.endswith("2 workers"):
                    splits["proxy"].append(split(before_requests, two.per_worker("rexecpf_proxy_requests_total"), 2))
                proxy_runs[name].append(result)
                print(f"  {name:22} {result['rps']:9.0f} req/s  p50 {result['p50']:6.2f} ms  p99 {result['p99']:6.2f} ms"
                      f"  cores: proxy {cores['proxy']:.2f}, nginx {cores['nginx']:.2f}, wrk {cores['client']:.2f}"
                      + (f"  requests per worker {splits['proxy'][-1]}" if name.endswith("2 workers") else ""), flush=True)
            for name in rotated(list(tunnels), turn):
                up_spec, down_spec, pids, instance = tunnels[name]
                result = {}
                for direction, spec in (("up", up_spec), ("down", down_spec)):
                    before = instance.per_worker("rexecpf_relays_total") if instance else {}
                    meter = CpuMeter({"bridge": pids, "container": container_pids})
                    transfer = run_tunnels(
                        {"kind": "upload" if direction == "up" else "download", "size": size,
                         "protocols": PROTOCOLS if instance else None, "raw": name == "raw TCP", **spec}
                    )
                    result[direction] = transfer["mib_s"]
                    cores = meter.cores(transfer["seconds"])
                    cores["client"] = transfer["cpu"] / transfer["seconds"]
                    result.update((f"{role} {direction}", value) for role, value in cores.items())
                    if instance is two:
                        # a tunnel's relay ends when its transfer does: at most a moment after
                        deadline = time.monotonic() + 5
                        while time.monotonic() < deadline:
                            after = two.per_worker("rexecpf_relays_total")
                            if sum(after.values()) - sum(before.values()) >= n:
                                break
                            time.sleep(0.1)
                        splits[direction].append(split(before, after, 2))
                tunnel_runs[name].append(result)
                print(f"  {name:22} {n} tunnels: up {result['up']:7.1f} MiB/s  down {result['down']:7.1f} MiB/s"
                      f"  cores up/down: bridge {result['bridge up']:.2f}/{result['bridge down']:.2f},"
                      f" container {result['container up']:.2f}/{result['container down']:.2f},"
                      f" client {result['client up']:.2f}/{result['client down']:.2f}"
                      + (f"  tunnels per worker up {splits['up'][-1]}, down {splits['down'][-1]}" if instance is two else ""),
                      flush=True)

        print()
        print(f"proxy: wrk -t2 -c50 -d{options.duration}s, 1 KiB from nginx; median of {options.rounds} round(s)")
        print(f"  {'':22} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8}   cores: proxy, nginx, wrk")
        for name, runs in proxy_runs.items():
            print(f"  {name:22} {median_of(runs, 'rps'):9.0f} {median_of(runs, 'p50'):8.2f} {median_of(runs, 'p99'):8.2f}"
                  f"   {median_of(runs, 'proxy'):.2f}, {median_of(runs, 'nginx'):.2f}, {median_of(runs, 'client'):.2f}")
        one_r, two_r = proxy_runs["rexecpf 1 worker"], proxy_runs["rexecpf 2 workers"]
        rpr_r = proxy_runs["ReverseProxyResource"]
        print(f"  2 workers / 1 worker     req/s {median_of(two_r, 'rps') / median_of(one_r, 'rps'):.2f}x"
              f"  p99 {median_of(two_r, 'p99') / median_of(one_r, 'p99'):.2f}x")
        print(f"  ceiling of 2 workers / 1 worker here: {ceiling(one_r, ['proxy', 'nginx', 'client']):.2f}x")
        print(f"  2 workers / RPR          req/s {median_of(two_r, 'rps') / median_of(rpr_r, 'rps'):.2f}x"
              f"  p99 {median_of(two_r, 'p99') / median_of(rpr_r, 'p99'):.2f}x")
        print(f"  2 workers: {median_of(two_r, 'rps'):.0f} req/s (target >= 10,000), "
              f"p99 {median_of(two_r, 'p99'):.2f} ms (target < 10); requests per worker: {', '.join(splits['proxy'])}")
        print(f"  the parent of the 2 workers: {parent_cpu:.2f} CPU s over {options.rounds * options.duration} s of wrk")
        print()
        print(f"tunnels: {n} at once, {options.mib} MiB each way each, 64 KiB messages; aggregate MiB/s,"
              f" median of {options.rounds} round(s)")
        print(f"  {'':22} {'up':>8} {'down':>8}   cores up/down: bridge, container, client")
        for name, runs in tunnel_runs.items():
            print(f"  {name:22} {median_of(runs, 'up'):8.1f} {median_of(runs, 'down'):8.1f}   "
                  + ", ".join(f"{median_of(runs, role + ' up'):.2f}/{median_of(runs, role + ' down'):.2f}"
                              for role in ("bridge", "container", "client")))
        one_t, two_t = tunnel_runs["rexecpf 1 worker"], tunnel_runs["rexecpf 2 workers"]
        print(f"  2 workers / 1 worker     up {median_of(two_t, 'up') / median_of(one_t, 'up'):.2f}x"
              f"  down {median_of(two_t, 'down') / median_of(one_t, 'down'):.2f}x  (target >= 1.6x)")
        print("  ceiling of 2 workers / 1 worker here: "
              + "  ".join(f"{direction} {ceiling(one_t, [f'{role} {direction}' for role in ('bridge', 'container', 'client')]):.2f}x"
                          for direction in ("up", "down")))
        if "websocat" in tunnel_runs:
            wsc_t = tunnel_runs["websocat"]
            print(f"  2 workers / websocat     up {median_of(two_t, 'up') / median_of(wsc_t, 'up'):.2f}x"
                  f"  down {median_of(two_t, 'down') / median_of(wsc_t, 'down'):.2f}x")
        print(f"  tunnels per worker (2 workers): up {', '.join(splits['up'])}; down {', '.join(splits['down'])}")
    finally:
        for instance in instances:
            instance.stop()
        for process in reversed(processes):
            proxy_bench.stop(process)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_tunnels":
        tunnels_main(json.loads(sys.argv[2]))
    else:
        main()
