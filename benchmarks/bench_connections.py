"""What an idle or half-open connection costs the server, and that bounding them costs nothing.

For the record of issue 10 item 10 / issue 11 item 5 (header, body, keep-alive and handshake
timeouts, a connection bound per listener). Each memory case starts a fresh server process
(`runtime.serving.server.Serving`: one plain listener, one mTLS listener), warms it up with one request
on each, reads its RSS, opens N connections of one kind and reads the RSS again:

- pending_tls  TCP connections to the mTLS port that never send a ClientHello (a pending handshake);
- idle_tls     completed mTLS handshakes that then send nothing;
- idle_plain   TCP connections to the plain port that send nothing.

Then keep-alive requests per second (one request in flight on each of a few connections, a
separate load process) on each listener, to show the per-request path did not get slower.

`--root DIR` runs the server from another copy of the runtime (e.g. a snapshot of the code before
a change), `--save FILE` writes the figures, `--compare FILE` prints this run's ratios against a
saved one. It reports, it does not judge; the server's timeouts are set long (60 s) so nothing is
closed while it measures.

    python benchmarks/bench_connections.py [--connections 1000] [--seconds 3] [--root DIR]
        [--save FILE] [--compare FILE] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
if os.environ.get("BENCH_SERVER_ROOT") and "--serve" in sys.argv:
    sys.path.insert(0, os.environ["BENCH_SERVER_ROOT"])  # the server runs that copy's runtime

from benchmarks.common import SNI, free_port, stop, write_set  # noqa: E402

ENV = "development"
REQUEST = b"GET /ping HTTP/1.1\r\nhost: localhost\r\n\r\n"
LONG = "60"  # seconds: the server's timeouts while we measure (ignored by code without them)


# --- the server process ------------------------------------------------------------------------
async def _ping(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


def serve(spec: dict) -> None:
    import logging

    from runtime.certificates.tls_context import ReloadableServerContext, ServerFiles
    from runtime.serving.server import Listener, Serving

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    tls = ReloadableServerContext(ServerFiles.from_directory(Path(spec["dir"])))
    serving = Serving(
        [
            Listener("plain", "127.0.0.1", spec["plain"], _ping),
            Listener("mtls", "127.0.0.1", spec["tls"], _ping, tls),
        ]
    )
    asyncio.run(serving.run())


def server_environment(root: str | None) -> dict[str, str]:
    path = [p for p in (root, str(ROOT), os.environ.get("PYTHONPATH")) if p]
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(path),
        **({"BENCH_SERVER_ROOT": root} if root else {}),
        "HOKUSAI_MTLS_HEADER_TIMEOUT_SECONDS": LONG,
        "HOKUSAI_MTLS_BODY_IDLE_TIMEOUT_SECONDS": LONG,
        "HOKUSAI_MTLS_KEEPALIVE_TIMEOUT_SECONDS": LONG,
        "HOKUSAI_MTLS_HANDSHAKE_TIMEOUT_SECONDS": LONG,
        "HOKUSAI_MTLS_MAX_CONNECTIONS": "20000",
    }


def start_server(workdir: Path, files: dict, root: str | None) -> tuple[subprocess.Popen, dict]:
    ports = {"plain": free_port(), "tls": free_port()}
    spec = {"dir": str(files["server"]), **ports}
    err = (workdir / f"server-{time.monotonic_ns()}.stderr").open("w")
    process = subprocess.Popen(
        [sys.executable, __file__, "--serve", json.dumps(spec)],
        env=server_environment(root),
        stdout=subprocess.DEVNULL,
        stderr=err,
        cwd=root or ROOT,
    )
    deadline = time.monotonic() + 30
    for port in ports.values():
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"server exited {process.returncode}: {Path(err.name).read_text()[-2000:]}"
                )
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"port {port} not listening") from None
                time.sleep(0.05)
    return process, ports


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def client_context(files: dict) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(files["ca"]))
    context.load_cert_chain(str(files["client"]))
    return context


def one_request(port: int, context: ssl.SSLContext | None) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        sock = context.wrap_socket(raw, server_hostname=SNI) if context else raw
        sock.sendall(REQUEST)
        if not sock.recv(4096).startswith(b"HTTP/1.1 200"):
            raise RuntimeError("the warm-up request failed")


async def _open_tls(port: int, context: ssl.SSLContext, count: int) -> list:
    gate = asyncio.Semaphore(32)

    async def one():
        async with gate:
            return await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname=SNI)

    return await asyncio.gather(*(one() for _ in range(count)))


def memory_case(kind: str, workdir: Path, files: dict, count: int, root: str | None) -> dict:
    process, ports = start_server(workdir, files, root)
    context = client_context(files)
    held: list = []
    loop = asyncio.new_event_loop()
    try:
        for _ in range(3):  # warm up both listeners (imports, first handshake, allocator)
            one_request(ports["plain"], None)
            one_request(ports["tls"], context)
        time.sleep(0.5)
        before, fds_before = rss_kib(process.pid), open_fds(process.pid)
        started = time.monotonic()
        if kind == "idle_tls":
            held = loop.run_until_complete(_open_tls(ports["tls"], context, count))
        else:
            port = ports["tls"] if kind == "pending_tls" else ports["plain"]
            held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(count)]
        opened_s = time.monotonic() - started
        time.sleep(1.5)  # let the server accept and set up every connection
        after, fds_after = rss_kib(process.pid), open_fds(process.pid)
    finally:
        for item in held:
            if isinstance(item, tuple):
                item[1].transport.abort()
            else:
                item.close()
        loop.close()
        stop(process)
    return {
        "connections": count,
        "held_by_server": fds_after - fds_before,
        "rss_before_kib": before,
        "rss_after_kib": after,
        "kib_per_connection": (after - before) / count,
        "opened_s": round(opened_s, 2),
    }


# --- keep-alive requests per second --------------------------------------------------------------
def load(spec: dict) -> dict:
    context = None
    if spec.get("ca"):
        context = ssl.create_default_context(cafile=spec["ca"])
        context.load_cert_chain(spec["cert"])
    state = {"measuring": False, "stop": False, "requests": 0}

    async def connection() -> None:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", spec["port"], ssl=context, server_hostname=SNI if context else None
        )
        try:
            while not state["stop"]:
                writer.write(REQUEST)
                head = await reader.readuntil(b"\r\n\r\n")
                await reader.readexactly(int(re.search(rb"(?i)content-length:\s*(\d+)", head)[1]))
                if state["measuring"]:
                    state["requests"] += 1
        finally:
            writer.close()

    async def main() -> dict:
        tasks = [asyncio.create_task(connection()) for _ in range(spec["connections"])]
        await asyncio.sleep(0.5)
        started, cpu = time.perf_counter(), cpu_seconds(spec["server_pid"])
        state["measuring"] = True
        await asyncio.sleep(spec["seconds"])
        state["measuring"] = False
        elapsed, cpu = time.perf_counter() - started, cpu_seconds(spec["server_pid"]) - cpu
        state["stop"] = True
        await asyncio.gather(*tasks)
        return {"per_s": state["requests"] / elapsed, "server_cpu_us": 1e6 * cpu / max(1, state["requests"])}

    return asyncio.run(main())


def cpu_seconds(pid: int) -> float:
    """User + system CPU of process `pid` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


UPLOAD_BYTES = 256 * 1024 * 1024


def upload_mb_per_s(port: int, context: ssl.SSLContext, pid: int) -> tuple[float, float]:
    """One 256 MiB request body over mTLS, then a request on the same connection: MiB/s until it is
    answered, and the server's CPU milliseconds per MiB."""
    body = b"u" * (1024 * 1024)
    with socket.create_connection(("127.0.0.1", port), timeout=60) as raw:
        sock = context.wrap_socket(raw, server_hostname=SNI)
        started, cpu = time.perf_counter(), cpu_seconds(pid)
        sock.sendall(
            f"POST /ping HTTP/1.1\r\nhost: localhost\r\ncontent-length: {UPLOAD_BYTES}\r\n\r\n".encode()
        )
        for _ in range(UPLOAD_BYTES // len(body)):
            sock.sendall(body)
        sock.sendall(REQUEST)
        answered = b""
        while answered.count(b"HTTP/1.1 200") < 2:
            chunk = sock.recv(65536)
            if not chunk:
                raise RuntimeError("closed during the upload")
            answered += chunk
        mib = UPLOAD_BYTES / (1024 * 1024)
        return mib / (time.perf_counter() - started), 1000 * (cpu_seconds(pid) - cpu) / mib


def rps_case(workdir: Path, files: dict, seconds: float, repeat: int, roots: dict[str, str | None]) -> dict:
    """Keep-alive req/s and server CPU per request, for each server code in `roots`, rounds alternating."""
    servers = {label: start_server(workdir, files, root) for label, root in roots.items()}
    results = {label: {"plain": [], "tls": []} for label in roots}
    uploads: dict[str, list[float]] = {label: [] for label in roots}
    context = client_context(files)
    try:
        for round_ in range(repeat):
            for label in roots if round_ % 2 == 0 else reversed(list(roots)):
                process, ports = servers[label]
                uploads[label].append(upload_mb_per_s(ports["tls"], context, process.pid))
            order = [(label, kind) for label in roots for kind in ("plain", "tls")]
            for label, kind in order if round_ % 2 == 0 else reversed(order):
                process, ports = servers[label]
                spec = {"port": ports[kind], "seconds": seconds, "connections": 8, "server_pid": process.pid}
                if kind == "tls":
                    spec |= {"ca": str(files["ca"]), "cert": str(files["client"])}
                done = subprocess.run(
                    [sys.executable, __file__, "--load", json.dumps(spec)],
                    capture_output=True,
                    text=True,
                    timeout=seconds + 60,
                    check=True,
                )
                results[label][kind].append(json.loads(done.stdout))
    finally:
        for process, _ in servers.values():
            stop(process)
    return {
        label: {
            kind: {
                "per_s": statistics.median(r["per_s"] for r in rounds),
                "server_cpu_us": statistics.median(r["server_cpu_us"] for r in rounds),
                "rounds": rounds,
            }
            for kind, rounds in kinds.items()
        }
        | {
            "upload_tls": {
                "mib_per_s": statistics.median(u[0] for u in uploads[label]),
                "server_cpu_ms_per_mib": statistics.median(u[1] for u in uploads[label]),
                "rounds": uploads[label],
            }
        }
        for label, kinds in results.items()
    }


def run(args: argparse.Namespace) -> dict:
    from runtime import names
    from runtime.certificates.certset import CertificateSet

    certificates = CertificateSet.issue(ENV, server_sans=(SNI,), identities=(names.SERVER, names.API))
    with tempfile.TemporaryDirectory(prefix="bench-connections-") as tmp:
        workdir = Path(tmp)
        files = write_set(workdir, certificates)
        memory = {}
        if args.only in (None, "memory"):
            memory = {
                kind: memory_case(kind, workdir, files, args.connections, args.root)
                for kind in ("pending_tls", "idle_tls", "idle_plain")
            }
        rps = {}
        if args.only in (None, "rps"):
            roots = {"this": args.root} | ({"other": args.ab} if args.ab else {})
            rps = rps_case(workdir, files, args.seconds, args.repeat, roots)
    return {"root": args.root or str(ROOT), "ab": args.ab, "memory": memory, "rps": rps}


def report(result: dict, baseline: dict | None) -> str:
    lines = [f"server code: {result['root']}"]
    for kind, row in result["memory"].items():
        line = (
            f"{kind:<12} {row['connections']} open, {row['held_by_server']} held by the server: "
            f"RSS {row['rss_before_kib'] / 1024:.1f} -> {row['rss_after_kib'] / 1024:.1f} MiB, "
            f"{row['kib_per_connection']:.1f} KiB per connection"
        )
        if baseline and kind in baseline["memory"]:
            old = baseline["memory"][kind]["kib_per_connection"]
            line += f" (before {old:.1f} KiB; after/before {row['kib_per_connection'] / old:.2f})"
        lines.append(line)
    rps = result["rps"]
    for kind, row in rps.get("this", {}).items():
        if kind == "upload_tls":
            line = (
                f"upload over mTLS {row['mib_per_s']:.0f} MiB/s, server {row['server_cpu_ms_per_mib']:.2f} ms"
                " CPU per MiB (256 MiB body)"
            )
            other = rps.get("other", {}).get(kind)
            if other:
                line += (
                    f" (other code {other['mib_per_s']:.0f} MiB/s, {other['server_cpu_ms_per_mib']:.2f} ms;"
                    f" MiB/s this/other {row['mib_per_s'] / other['mib_per_s']:.2f},"
                    f" CPU per MiB this/other {row['server_cpu_ms_per_mib'] / other['server_cpu_ms_per_mib']:.2f})"
                )
            lines.append(line)
            continue
        line = f"keep-alive {kind:<5} {row['per_s']:.0f} req/s, server {row['server_cpu_us']:.0f} us CPU per request"
        other = rps.get("other", {}).get(kind) or (baseline or {}).get("rps", {}).get("this", {}).get(kind)
        if other:
            line += (
                f" (other code {other['per_s']:.0f} req/s, {other['server_cpu_us']:.0f} us;"
                f" req/s this/other {row['per_s'] / other['per_s']:.2f},"
                f" CPU per request this/other {row['server_cpu_us'] / other['server_cpu_us']:.2f})"
            )
        lines.append(line)
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=3)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", choices=["memory", "rps"], help="one half of the bench")
    parser.add_argument(
        "--ab", help="also run the rps rounds against this copy of the code, alternating (ratios this/other)"
    )
    parser.add_argument(
        "--root", help="run the server from this copy of the code (a directory holding runtime/)"
    )
    parser.add_argument("--save", help="write this run's figures to FILE")
    parser.add_argument("--compare", help="a file written by --save: print after/before ratios")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--load", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(json.loads(args.serve))
        return 0
    if args.load:
        print(json.dumps(load(json.loads(args.load))))
        return 0
    result = run(args)
    if args.save:
        Path(args.save).write_text(json.dumps(result, indent=2))
    baseline = json.loads(Path(args.compare).read_text()) if args.compare else None
    print(json.dumps(result, indent=2) if args.json else report(result, baseline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
