"""
rexecpf's HTTP proxy beside its baselines, in one run, against one nginx.

    PYTHONPATH=. python bench/proxy_bench.py [--duration 10] [--profile]

- nginx on 127.0.0.1 (generated config) serves a 1 KiB and a 100 MiB file;
- ``wrk --latency`` with 50 keep-alive connections fetches the 1 KiB file
  directly, through rexecpf (``/p/{id}/``) and through a plain
  ``twisted.web.proxy.ReverseProxyResource`` (bench/rpr_baseline.py):
  requests/s, p50, p99;
- curl downloads the 100 MiB file through each, three times: the median MiB/s
  (one download lasts a fraction of a second: a single one is mostly noise);
- curl downloads it at 25 MiB/s while each proxy's RSS is sampled: peak MiB.

Ratios are printed at the end.  ``--profile`` also runs rexecpf under
cProfile during a wrk run and prints where the time goes.
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TOKEN = "bench-token"
MiB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def start_nginx(work: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    os.chmod(work, 0o755)  # nginx workers may run as another user
    docroot = os.path.join(work, "www")
    os.makedirs(docroot)
    with open(os.path.join(docroot, "1k"), "wb") as file:
        file.write(os.urandom(1024))
    os.chmod(os.path.join(docroot, "1k"), 0o644)
    with open(os.path.join(docroot, "100m"), "wb") as file:
        file.writelines(os.urandom(MiB) for _ in range(100))
    os.chmod(os.path.join(docroot, "100m"), 0o644)
    config = os.path.join(work, "nginx.conf")
    with open(config, "w") as file:
        file.write(
            f"""
daemon off;
worker_processes 2;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {docroot};
    }}
}}
"""
        )
    process = subprocess.Popen(["nginx", "-c", config, "-p", work], stderr=subprocess.DEVNULL)
    wait_port(port)
    return process, port


def start_rexecpf(work: str, backend_port: int, profile: str | None = None) -> tuple[subprocess.Popen[bytes], int, str]:
    port = free_port()
    with open(os.path.join(work, "containers.toml"), "w") as file:
        file.write('[[container]]\nid = "bench"\nowner = "bench"\naddress = "127.0.0.1"\nstate = "running"\n')
    config = os.path.join(work, "rexecpf.toml")
    state = os.path.join(work, f"state-{port}.sqlite3")
    with open(config, "w") as file:
        file.write(
            f"""
[server]
listen = ["tcp:{port}:interface=127.0.0.1"]
public_url = "http://127.0.0.1:{port}"
state = "{state}"
[auth]
users = {{ bench = "{TOKEN}" }}
[backend]
kind = "static"
inventory = "{work}/containers.toml"
[limits]
proxy_body_bytes = {200 * MiB}
local_ports = "40000-40999"
"""
        )
    env = dict(os.environ, PYTHONPATH=ROOT)
    args = [sys.executable, os.path.join(HERE, "run_rexecpf.py"), config] + ([profile] if profile else [])
    process = subprocess.Popen(args, env=env)
    wait_port(port)
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/containers/bench/port-forwards",
        data=json.dumps({"container_port": backend_port}).encode(),
        headers={"Authorization": f"Bearer {TOKEN}"},
        method="POST",
    )
    for _ in range(50):
        try:
            with urllib.request.urlopen(request) as response:
                proxy_url = json.load(response)["proxy_url"]
                break
        except OSError:
            time.sleep(0.1)
    else:
        raise RuntimeError("cannot create the forward")
    return process, port, proxy_url


def start_rpr(backend_port: int, log: str) -> tuple[subprocess.Popen[bytes], int]:
    """:param log: where its stderr goes (its unhandled errors are counted, not printed)."""
    port = free_port()
    with open(log, "wb") as errors:
        process = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "rpr_baseline.py"), str(port), str(backend_port)], stderr=errors
        )
    wait_port(port)
    return process, port


def _ms(text: str) -> float:
    match = re.match(r"([\d.]+)(us|ms|s)", text)
    assert match, text
    value, unit = float(match.group(1)), match.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


def wrk(url: str, duration: int, headers: list[str]) -> dict[str, float]:
    command = ["wrk", "-t2", "-c50", f"-d{duration}s", "--latency", "--timeout", "10s"]
    for header in headers:
        command += ["-H", header]
    output = subprocess.run(command + [url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", output, re.MULTILINE).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", output, re.MULTILINE).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if errors:
        raise RuntimeError(f"{url}: {errors.group(1)} error responses")
    return {"rps": rps, "p50": p50, "p99": p99}


def download(url: str, headers: list[str], rate: str | None = None) -> float:
    """:return: MiB/s of one download of ``url``."""
    command = ["curl", "-sS", "-o", "/dev/null", "-w", "%{speed_download} %{size_download} %{http_code}"]
    for header in headers:
        command += ["-H", header]
    if rate:
        command += ["--limit-rate", rate]
    speed, size, code = subprocess.run(command + [url], capture_output=True, text=True, check=True).stdout.split()
    if code != "200" or int(size) != 100 * MiB:
        raise RuntimeError(f"{url}: HTTP {code}, {size} bytes")
    return float(speed) / MiB


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as file:
        for line in file:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def peak_rss_during(pid: int, action: object) -> tuple[float, float]:
    """:return: (RSS before, peak RSS) of ``pid`` while ``action()`` runs."""
    before = rss_mib(pid)
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_mib(pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        action()  # type: ignore[operator]
    finally:
        done.set()
        sampler.join()
    return before, peak[0]


def stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=10, help="seconds of each wrk run")
    parser.add_argument("--profile", action="store_true", help="also profile rexecpf under cProfile")
    options = parser.parse_args()
    auth = [f"Authorization: Bearer {TOKEN}"]
    with tempfile.TemporaryDirectory() as work:
        nginx, nginx_port = start_nginx(work)
        processes = [nginx]
        try:
            rex, _, proxy_url = start_rexecpf(work, nginx_port)
            processes.append(rex)
            rpr_log = os.path.join(work, "rpr-stderr.log")
            rpr, rpr_port = start_rpr(nginx_port, rpr_log)
            processes.append(rpr)
            targets = {
                "direct": (f"http://127.0.0.1:{nginx_port}/", [], None),
                "rexecpf": (proxy_url, auth, rex.pid),
                "ReverseProxyResource": (f"http://127.0.0.1:{rpr_port}/", [], rpr.pid),
            }
            results: dict[str, dict[str, float]] = {}
            for name, (base, headers, pid) in targets.items():
                wrk(base + "1k", 2, headers)  # warm up
                result = wrk(base + "1k", options.duration, headers)
                result["download"] = statistics.median(download(base + "100m", headers) for _ in range(3))
                if pid is not None:
                    before, peak = peak_rss_during(
                        pid, lambda base=base, headers=headers: download(base + "100m", headers, "25M")
                    )
                    result["rss_before"], result["rss_peak"] = before, peak
                results[name] = result
                print(
                    f"{name:22} {result['rps']:9.0f} req/s  p50 {result['p50']:7.2f} ms  "
                    f"p99 {result['p99']:7.2f} ms  100 MiB at {result['download']:7.1f} MiB/s"
                    + (
                        f"  RSS {result['rss_before']:.1f} -> peak {result['rss_peak']:.1f} MiB at 25 MiB/s"
                        if pid is not None
                        else ""
                    ),
                    flush=True,
                )
            rex_r, rpr_r, direct = results["rexecpf"], results["ReverseProxyResource"], results["direct"]
            print()
            print(f"rexecpf / ReverseProxyResource req/s:      {rex_r['rps'] / rpr_r['rps']:.2f}x  (target >= 1.5x)")
            print(f"rexecpf / ReverseProxyResource p99:        {rex_r['p99'] / rpr_r['p99']:.2f}x  (target < 1)")
            print(f"rexecpf / ReverseProxyResource download:   {rex_r['download'] / rpr_r['download']:.2f}x  (target >= 1)")
            print(f"rexecpf / direct req/s:                    {rex_r['rps'] / direct['rps']:.3f}x")
            print(f"rexecpf peak RSS, slow 100 MiB download:   {rex_r['rss_peak']:.1f} MiB  "
                  f"(target < ReverseProxyResource's)")
            print(f"ReverseProxyResource peak RSS, same:       {rpr_r['rss_peak']:.1f} MiB")
            with open(rpr_log, "rb") as errors:
                unhandled = errors.read().count(b"Unhandled Error")
            # its weakness 8 (STYLE.md 3): finish() after the client went away, when wrk stops
            print(f"ReverseProxyResource unhandled errors:     {unhandled}")
            if options.profile:
                profile_out = os.path.join(tempfile.gettempdir(), "rexecpf-bench.prof")
                prof, _, prof_url = start_rexecpf(work, nginx_port, profile_out)
                try:
                    wrk(prof_url + "1k", options.duration, auth)
                finally:
                    stop(prof)
                print("\nrexecpf under cProfile (wrk, 1 KiB), top 30 by own time:")
                pstats.Stats(profile_out).sort_stats("tottime").print_stats(30)
        finally:
            for process in reversed(processes):
                stop(process)


if __name__ == "__main__":
    main()
