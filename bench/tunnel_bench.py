"""
Tunnel benchmark: rexecpf beside its baselines, in one run.

    python bench/tunnel_bench.py [--mib 256] [--rounds 5] [--parallel-mib 40] [--idle 1000]

Everything runs on 127.0.0.1 in separate processes:

- the "container": an asyncio server (``_container``) with a sink (reads
  ``SIZE`` bytes, answers ``OK``), a source (writes ``SIZE`` bytes, closes) and
  an idle port;
- the bridges: rexecpf (``twistd rexecpf``, unlimited rate for the single
  tunnel runs, the default 10 MiB/s for the parallel run), websockify, and
  websocat (``ws-l: -> tcp:``);
- the load client (``_client``): raw sockets, 64 KiB binary messages, an
  all-zero mask (valid, and free for the client: the server still unmasks),
  so its CPU is not the bottleneck.

Printed: upload and download MiB/s through each bridge and raw TCP, the
median of ``--rounds`` rounds in which the bridges take turns, with ratios
to raw TCP and rexecpf / websockify, and the CPU seconds each bridge spent
(the machine's load moves the rates; it moves the CPU seconds much less);
10 parallel tunnels at 10 MiB/s each; rexecpf's RSS growth while a reader
stalls for 10 s; rexecpf's RSS per idle tunnel with N open.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import resource
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PY = sys.executable
BIN = os.path.dirname(PY)
TOKEN = "bench-token"
MIB = 1024 * 1024
CHUNK = 64 * 1024


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def cpu_seconds(pid: int) -> float:
    """:return: CPU seconds of ``pid`` and of its children it has reaped."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    # utime, stime, cutime, cstime (fields 14-17 of proc(5)).
    return sum(int(tick) for tick in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def bridge_cpu(pid: int, spec: dict) -> tuple[dict, float]:
    """
    Run a client through the bridge ``pid`` (websockify serves each
    connection in a child it reaps once the connection ends).

    :return: the client's result and the bridge's CPU seconds meanwhile.
    """
    before = cpu_seconds(pid)
    out = run_client(spec)
    after = cpu_seconds(pid)
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        time.sleep(0.1)
        settled, after = after, cpu_seconds(pid)
        if settled == after:
            break
    return out, after - before


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


# --- the container ------------------------------------------------------------


def container_main(sink_port: int, source_port: int, idle_port: int, size: int) -> None:
    raise_nofile()
    payload = os.urandom(CHUNK) * 4

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        left = size
        while left > 0:
            data = await reader.read(min(left, 1 << 20))
            if not data:
                break
            left -= len(data)
        writer.write(b"OK")
        await writer.drain()
        writer.close()

    async def source(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        left = size
        while left > 0:
            chunk = payload[: min(left, len(payload))]
            writer.write(chunk)
            left -= len(chunk)
            await writer.drain()
        writer.close()

    async def idle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    async def serve() -> None:
        await asyncio.start_server(sink, "127.0.0.1", sink_port, limit=1 << 20)
        await asyncio.start_server(source, "127.0.0.1", source_port)
        await asyncio.start_server(idle, "127.0.0.1", idle_port, backlog=2048)
        await asyncio.Event().wait()

    asyncio.run(serve())


# --- the load client ------------------------------------------------------------


class _Socket(socket.socket):
    leftover = b""


def ws_connect(port: int, path: str, protocols: str | None) -> Any:
    sock = _Socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.connect(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    key = base64.b64encode(os.urandom(16)).decode()
    head = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
    )
    if protocols:
        head += f"Sec-WebSocket-Protocol: {protocols}\r\n"
    sock.sendall((head + "\r\n").encode())
    response = b""
    while b"\r\n\r\n" not in response:
        data = sock.recv(4096)
        if not data:
            raise SystemExit(f"handshake to {port}{path}: connection closed")
        response += data
    status = response.split(b"\r\n", 1)[0]
    if b" 101 " not in status:
        raise SystemExit(f"handshake to {port}{path}: {status!r}")
    sock.leftover = response.split(b"\r\n\r\n", 1)[1]
    return sock


class FrameReader:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray(getattr(sock, "leftover", b""))
        self.view = memoryview(bytearray(1 << 20))

    def _fill(self, n: int) -> None:
        while len(self.buffer) < n:
            got = self.sock.recv_into(self.view)
            if not got:
                raise EOFError
            self.buffer += self.view[:got]

    def frame(self) -> tuple[int, int]:
        """:return: (opcode, payload length); the payload is read and dropped."""
        self._fill(2)
        opcode = self.buffer[0] & 0x0F
        length = self.buffer[1] & 0x7F
        offset = 2
        if length == 126:
            self._fill(4)
            length = struct.unpack("!H", self.buffer[2:4])[0]
            offset = 4
        elif length == 127:
            self._fill(10)
            length = struct.unpack("!Q", self.buffer[2:10])[0]
            offset = 10
        del self.buffer[:offset]
        # Drop the payload without keeping it.
        if len(self.buffer) >= length:
            del self.buffer[:length]
        else:
            left = length - len(self.buffer)
            self.buffer.clear()
            while left > 0:
                got = self.sock.recv_into(self.view, min(left, len(self.view)))
                if not got:
                    raise EOFError
                left -= got
        return opcode, length


def frame_header(length: int, opcode: int = 2) -> bytes:
    if length < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
    elif length < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
    return head + b"\x00\x00\x00\x00"  # the all-zero mask


def client_upload(port: int, path: str, protocols: str | None, size: int, raw: bool) -> float:
    payload = os.urandom(CHUNK)
    if raw:
        sock = socket.create_connection(("127.0.0.1", port))
    else:
        sock = ws_connect(port, path, protocols)
    message = payload if raw else frame_header(CHUNK) + payload
    start = time.perf_counter()
    left = size
    while left > 0:
        sock.sendall(message)
        left -= CHUNK
    if raw:
        data = sock.recv(16)
        assert data.startswith(b"OK"), data
    else:
        reader = FrameReader(sock)
        got = 0
        while got < 2:
            opcode, length = reader.frame()
            got += length
    elapsed = time.perf_counter() - start
    sock.close()
    return size / MIB / elapsed


def client_download(port: int, path: str, protocols: str | None, size: int, raw: bool) -> float:
    if raw:
        sock = socket.create_connection(("127.0.0.1", port))
        view = memoryview(bytearray(1 << 20))
        start = time.perf_counter()
        got = 0
        while True:
            n = sock.recv_into(view)
            if not n:
                break
            got += n
    else:
        sock = ws_connect(port, path, protocols)
        reader = FrameReader(sock)
        start = time.perf_counter()
        got = 0
        while got < size:
            opcode, length = reader.frame()
            if opcode == 8:
                break
            got += length
    elapsed = time.perf_counter() - start
    sock.close()
    assert got == size, (got, size)
    return size / MIB / elapsed


def client_main(spec: dict) -> None:
    raise_nofile()
    kind = spec["kind"]
    out: dict = {}
    if kind in ("upload", "download"):
        run = client_upload if kind == "upload" else client_download
        out["mib_s"] = run(spec["port"], spec["path"], spec.get("protocols"), spec["size"], spec["raw"])
    elif kind == "parallel":
        results: list[float] = []
        start = time.perf_counter()

        def one(path: str) -> None:
            results.append(client_download(spec["port"], path, spec["protocols"], spec["size"], False))

        threads = [threading.Thread(target=one, args=(p,)) for p in spec["paths"]]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out["each"] = results
        out["total_mib_s"] = len(results) * spec["size"] / MIB / (time.perf_counter() - start)
    elif kind == "stall":
        sock = ws_connect(spec["port"], spec["path"], spec["protocols"])
        reader = FrameReader(sock)
        got = 0
        while got < MIB:
            got += reader.frame()[1]
        print(json.dumps({"stalling": True}), flush=True)
        sys.stdin.readline()  # the parent measures, then tells us to go on
        while got < spec["size"]:
            opcode, length = reader.frame()
            if opcode == 8:
                break
            got += length
        out["received"] = got
    elif kind == "idle":
        socks = [ws_connect(spec["port"], spec["path"], spec["protocols"]) for _ in range(spec["count"])]
        print(json.dumps({"open": len(socks)}), flush=True)
        sys.stdin.readline()
        for sock in socks:
            sock.close()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out["client_cpu_s"] = usage.ru_utime + usage.ru_stime
    print(json.dumps(out), flush=True)


# --- the orchestra --------------------------------------------------------------


def spawn(argv: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)


def run_client(spec: dict) -> dict:
    started = time.perf_counter()
    result = subprocess.run(
        [PY, __file__, "_client", json.dumps(spec)], capture_output=True, text=True, timeout=900
    )
    if result.returncode:
        raise SystemExit(f"client failed: {result.stderr.strip()[-500:]}")
    out = json.loads(result.stdout.strip().splitlines()[-1])
    out["wall_s"] = time.perf_counter() - started
    return out


class Rexecpf:
    def __init__(
        self, directory: str, rate: int, container_ports: list[int], workers: int = 1, metrics_port: int = 0,
        twistd_options: tuple[str, ...] = (),
    ) -> None:
        """
        :param workers: ``--workers`` (1: one process, no ``--workers``).
        :param metrics_port: serve ``metrics_listen`` there (0: none).
        :param twistd_options: more twistd options, before ``rexecpf``.
        """
        self.port = free_port()
        self.directory = directory
        inventory = os.path.join(directory, "containers.toml")
        with open(inventory, "w") as f:
            f.write('[[container]]\nid = "bench"\nowner = "bench"\naddress = "127.0.0.1"\nstate = "running"\n')
        config = os.path.join(directory, f"rexecpf-{rate}.toml")
        with open(config, "w") as f:
            f.write(
                f'[server]\nlisten = ["tcp:{self.port}:interface=127.0.0.1:backlog=2048"]\n'
                f'public_url = "http://127.0.0.1:{self.port}"\nstate = "state-{rate}.sqlite3"\n'
                + (f'metrics_listen = "tcp:{metrics_port}:interface=127.0.0.1"\n' if metrics_port else "")
                + f'[auth]\nusers = {{ bench = "{TOKEN}" }}\n'
                f'[backend]\nkind = "static"\ninventory = "containers.toml"\n'
                f"[limits]\ntunnel_bytes_per_second = {rate}\nforwards_per_container = 50\n"
            )
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = spawn(
            [PY, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
             "-l", os.path.join(directory, f"rexecpf-{rate}.log"), *twistd_options, "rexecpf", "--config", config]
            + (["--workers", str(workers)] if workers > 1 else []),
            env=env, cwd=directory, preexec_fn=raise_nofile,
        )
        wait_port(self.port)
        self.forwards = {port: self.create(port) for port in container_ports}

    def create(self, container_port: int) -> str:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/api/containers/bench/port-forwards",
            data=json.dumps({"container_port": container_port}).encode(),
            headers={"Authorization": f"Bearer {TOKEN}"},
            method="POST",
        )
        with urllib.request.urlopen(request) as response:
            return json.load(response)["id"]

    def path(self, container_port: int) -> str:
        return f"/ws/port-forward/{self.forwards[container_port]}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=256, help="MiB per single-tunnel run (default 256)")
    parser.add_argument("--parallel-mib", type=int, default=40, help="MiB per tunnel in the parallel run")
    parser.add_argument("--idle", type=int, default=1000, help="idle tunnels to open")
    parser.add_argument("--stall-seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=5, help="single-tunnel rounds (median; default 5)")
    args = parser.parse_args()
    raise_nofile()
    size = args.mib * MIB
    directory = tempfile.mkdtemp(prefix="rexecpf-bench-")
    sink, source, idle = free_port(), free_port(), free_port()
    procs: list[subprocess.Popen] = []
    try:
        procs.append(spawn([PY, __file__, "_container", str(sink), str(source), str(idle), str(size)], preexec_fn=raise_nofile))
        for port in (sink, source, idle):
            wait_port(port)
        fast = Rexecpf(directory, 1 << 40, [sink, source, idle])
        procs.append(fast.proc)
        bridges: dict[str, tuple[int, str, str | None, int, int]] = {}
        #: bridge -> (pid serving uploads, pid serving downloads)
        pids: dict[str, tuple[int, int]] = {}
        protocols = f"Bearer, {TOKEN}"
        bridges["rexecpf"] = (fast.port, "", protocols, 0, 0)
        pids["rexecpf"] = (fast.proc.pid, fast.proc.pid)
        websockify = os.path.join(BIN, "websockify")
        if os.path.exists(websockify):
            wsk_up, wsk_down = free_port(), free_port()
            procs.append(spawn([websockify, f"127.0.0.1:{wsk_up}", f"127.0.0.1:{sink}"]))
            procs.append(spawn([websockify, f"127.0.0.1:{wsk_down}", f"127.0.0.1:{source}"]))
            pids["websockify"] = (procs[-2].pid, procs[-1].pid)
            wait_port(wsk_up), wait_port(wsk_down)
            bridges["websockify"] = (0, "/", "binary", wsk_up, wsk_down)
        websocat = shutil.which("websocat") or os.path.join(BIN, "websocat")
        if os.path.exists(websocat):
            wsc_up, wsc_down = free_port(), free_port()
            procs.append(spawn([websocat, "-b", "-E", f"ws-l:127.0.0.1:{wsc_up}", f"tcp:127.0.0.1:{sink}"]))
            procs.append(spawn([websocat, "-b", "-E", f"ws-l:127.0.0.1:{wsc_down}", f"tcp:127.0.0.1:{source}"]))
            pids["websocat"] = (procs[-2].pid, procs[-1].pid)
            wait_port(wsc_up), wait_port(wsc_down)
            bridges["websocat"] = (0, "/", None, wsc_up, wsc_down)

        print(
            f"one tunnel, {args.mib} MiB each way, 64 KiB messages: median of {args.rounds} rounds,"
            " the bridges taking turns (MiB/s; ratio to raw TCP; bridge CPU seconds)"
        )
        specs: dict[str, tuple[dict, dict]] = {}
        for name, (port, _, protos, up_port, down_port) in bridges.items():
            if name == "rexecpf":
                up_spec = {"port": port, "path": fast.path(sink)}
                down_spec = {"port": port, "path": fast.path(source)}
            else:
                up_spec = {"port": up_port, "path": "/"}
                down_spec = {"port": down_port, "path": "/"}
            common = {"size": size, "raw": False, "protocols": protos}
            specs[name] = ({"kind": "upload", **common, **up_spec}, {"kind": "download", **common, **down_spec})
        #: name -> [(upload MiB/s, download MiB/s, upload CPU s, download CPU s)] a round
        rounds: dict[str, list[tuple[float, float, float, float]]] = {"raw TCP": []}
        rounds.update((name, []) for name in bridges)
        for _ in range(args.rounds):
            raw_up = run_client({"kind": "upload", "port": sink, "path": "", "size": size, "raw": True})
            raw_down = run_client({"kind": "download", "port": source, "path": "", "size": size, "raw": True})
            rounds["raw TCP"].append((raw_up["mib_s"], raw_down["mib_s"], 0.0, 0.0))
            for name, (up_spec, down_spec) in specs.items():
                up_pid, down_pid = pids[name]
                up, up_cpu = bridge_cpu(up_pid, up_spec)
                down, down_cpu = bridge_cpu(down_pid, down_spec)
                rounds[name].append((up["mib_s"], down["mib_s"], up_cpu, down_cpu))
        median = {name: [statistics.median(column) for column in zip(*runs, strict=True)] for name, runs in rounds.items()}
        raw_up_m, raw_down_m = median["raw TCP"][:2]
        print(f"  {'raw TCP':12s} upload {raw_up_m:8.1f}           download {raw_down_m:8.1f}")
        for name in bridges:
            up_m, down_m, up_cpu_m, down_cpu_m = median[name]
            spread_up = ", ".join(f"{run[0]:.0f}" for run in rounds[name])
            spread_down = ", ".join(f"{run[1]:.0f}" for run in rounds[name])
            print(
                f"  {name:12s} upload {up_m:8.1f} ({up_m / raw_up_m:.2f})"
                f"    download {down_m:8.1f} ({down_m / raw_down_m:.2f})"
                f"    bridge CPU {up_cpu_m:.2f}s/{down_cpu_m:.2f}s"
                f"    rounds: up {spread_up}; down {spread_down}"
            )
        if "websockify" in bridges:
            print(
                "  rexecpf / websockify: upload "
                f"{median['rexecpf'][0] / median['websockify'][0]:.2f}, download "
                f"{median['rexecpf'][1] / median['websockify'][1]:.2f}"
            )
        fast.stop()
        procs.remove(fast.proc)

        limited = Rexecpf(directory, 10 * MIB, [source, idle])
        procs.append(limited.proc)
        psize = args.parallel_mib * MIB
        # A source per tunnel: restart the container with the smaller size.
        pcontainer = spawn([PY, __file__, "_container", str(free_port()), str(pport := free_port()), str(free_port()), str(psize)], preexec_fn=raise_nofile)
        procs.append(pcontainer)
        wait_port(pport)
        ids = [limited.create(pport)]
        out = run_client({
            "kind": "parallel", "port": limited.port, "protocols": protocols, "size": psize,
            "paths": [f"/ws/port-forward/{ids[0]}"] * 10,
        })
        each = ", ".join(f"{x:.1f}" for x in sorted(out["each"]))
        print(f"10 parallel tunnels at 10 MiB/s each, {args.parallel_mib} MiB each: "
              f"total {out['total_mib_s']:.1f} MiB/s (each: {each})")

        # Stalled reader: a download that stops reading after 1 MiB.
        stall_source = spawn([PY, __file__, "_container", str(free_port()), str(sport := free_port()), str(free_port()), str(512 * MIB)], preexec_fn=raise_nofile)
        procs.append(stall_source)
        wait_port(sport)
        sid = limited.create(sport)
        before = rss_kib(limited.proc.pid)
        client = subprocess.Popen(
            [PY, __file__, "_client", json.dumps({"kind": "stall", "port": limited.port, "path": f"/ws/port-forward/{sid}", "protocols": protocols, "size": 512 * MIB})],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        client.stdout.readline()
        time.sleep(args.stall_seconds)
        during = rss_kib(limited.proc.pid)
        client.kill()
        client.wait()
        print(f"reader stalled {args.stall_seconds:.0f}s: rexecpf RSS {before / 1024:.1f} -> {during / 1024:.1f} MiB "
              f"(growth {(during - before) / 1024:.1f} MiB)")

        time.sleep(1)
        before = rss_kib(limited.proc.pid)
        client = subprocess.Popen(
            [PY, __file__, "_client", json.dumps({"kind": "idle", "port": limited.port, "path": limited.path(idle), "protocols": protocols, "count": args.idle})],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        client.stdout.readline()
        time.sleep(1)
        during = rss_kib(limited.proc.pid)
        client.stdin.write("\n")
        client.stdin.flush()
        client.wait(60)
        print(f"{args.idle} idle tunnels: rexecpf RSS {before / 1024:.1f} -> {during / 1024:.1f} MiB, "
              f"{(during - before) / args.idle:.1f} KiB per tunnel")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_container":
        container_main(*map(int, sys.argv[2:6]))
    elif len(sys.argv) > 1 and sys.argv[1] == "_client":
        client_main(json.loads(sys.argv[2]))
    else:
        main()
