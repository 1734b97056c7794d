"""Soak tests: many connections of every kind through one forward, then proof that the
forwarder is back where it started (fds, memory) and that nothing was corrupted or lost.

Why a soak and not just the unit-sized tests in test_relay.py: leaks (fds, pipes, pooled
sockets, per-session state) and rare races (a reset racing a half-close, a slow reader
racing a flush) only show up after tens of thousands of sessions of mixed kinds.

The servers run as a separate asyncio process inside the namespace (``python3
tests/test_stress.py serve``) so that they have their own GIL and core time; the clients
run in the test process.  Each client names its scenario in a one-line header.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

if __name__ != "__main__":
    from conftest import Forwarder, open_fds, process_tree, stats_by_name, wait_until

pytestmark = pytest.mark.stress

LINGER_RESET = struct.pack("ii", 1, 0)
# Content both sides can produce without sending it: a fixed pseudo-random 1 MiB block.
BASE = random.Random(20260101).randbytes(1 << 20)


def pattern(seed: int, size: int) -> bytes:
    """``size`` bytes of deterministic content for ``seed`` (rotations of BASE)."""
    start = seed % len(BASE)
    out = bytearray(BASE[start:])
    while len(out) < size:
        out += BASE
    return bytes(out[:size])


# ---- the server (runs in the namespace as its own process) ---------------------------


async def _serve_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     counts: Counter) -> None:
    """One connection: the header ``MODE SIZE SEED\\n`` says what the client tests."""
    sock = writer.get_extra_info("socket")
    try:
        header = (await reader.readline()).split()
        mode, size, seed = header[0].decode(), int(header[1]), int(header[2])
        if mode == "echo":  # echo until EOF, then half-close back
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
            writer.write_eof()
        elif mode == "chalf":  # client half-closes first; we answer after its EOF
            h = hashlib.sha256()
            n = 0
            while data := await reader.read(1 << 16):
                h.update(data)
                n += len(data)
            writer.write(f"{n} {h.hexdigest()}\n".encode())
            await writer.drain()
        elif mode == "shalf":  # we greet and half-close; the client keeps sending after EOF
            writer.write(pattern(seed, size))
            writer.write_eof()
            await writer.drain()
            h = hashlib.sha256()
            while data := await reader.read(1 << 16):
                h.update(data)
            ok = h.digest() == hashlib.sha256(pattern(seed + 1, size)).digest()
            counts["shalf_ok" if ok else "shalf_bad"] += 1
        elif mode in ("big", "slow"):  # a download the client checks by sha256
            view = memoryview(pattern(seed, size))
            for i in range(0, size, 1 << 18):
                writer.write(view[i:i + (1 << 18)])
                await writer.drain()
            writer.write_eof()
            await reader.read()
        elif mode == "cabort":  # the client aborts after our "ok": we must see a reset
            writer.write(b"ok\n")
            await writer.drain()
            try:
                while await reader.read(1 << 16):
                    pass
                counts["cabort_eof"] += 1
            except ConnectionResetError:
                counts["cabort_reset"] += 1
            return
        elif mode == "sabort":  # we abort: the client must see a reset
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            writer.transport.abort()
            counts["sabort_sent"] += 1
            return
        elif mode == "idle":  # hold the connection; answer the client's late line
            writer.write(b"ok\n")
            await writer.drain()
            line = await reader.readline()
            writer.write(line)
            await writer.drain()
            await reader.read()
        elif mode == "stats":
            writer.write(json.dumps(counts).encode())
            await writer.drain()
        await writer.drain()
    except (ConnectionError, OSError, ValueError, IndexError) as exc:
        counts["server_error " + type(exc).__name__] += 1
    finally:
        writer.close()


async def _server_main() -> None:
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    counts: Counter = Counter()
    server = await asyncio.start_server(lambda r, w: _serve_one(r, w, counts),
                                        "127.0.0.1", 0, backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


def start_server(netns: str) -> tuple[int, subprocess.Popen]:
    """The scenario server as its own process in ``netns``; returns (port, process)."""
    proc = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, __file__, "serve"],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return int(proc.stdout.readline()), proc


# ---- the clients ---------------------------------------------------------------------


class Tally:
    """What the clients saw: successes, failures by reason, resets expected and seen."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.failures: list[str] = []

    def fail(self, what: str) -> None:
        self.counts["failed"] += 1
        if len(self.failures) < 20:
            self.failures.append(what)


# Where the clients dial: the forward's listener here.  The usernet soak
# (test_usernet_soak.py) runs these clients inside a sandbox and points them at the
# server's own address instead.
SERVER_HOST = "127.0.0.1"


async def _open(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(SERVER_HOST, port, limit=1 << 20)


async def _read_all(reader: asyncio.StreamReader) -> bytes:
    chunks = []
    while data := await reader.read(1 << 16):
        chunks.append(data)
    return b"".join(chunks)


async def c_echo(port: int, i: int, tally: Tally, size: int) -> None:
    """Full transfer both ways checked by sha256; the client half-closes."""
    reader, writer = await _open(port)
    payload = os.urandom(size)
    writer.write(f"echo {size} {i}\n".encode() + payload)
    writer.write_eof()
    got = await _read_all(reader)
    writer.close()
    if hashlib.sha256(got).digest() == hashlib.sha256(payload).digest():
        tally.counts["echo_ok"] += 1
    else:
        tally.counts["corrupt"] += 1
        tally.fail(f"echo {i}: {len(got)} of {size} bytes, digest differs")


async def c_chalf(port: int, i: int, tally: Tally, size: int) -> None:
    """Client half-close: the server replies only after it saw our EOF."""
    reader, writer = await _open(port)
    payload = pattern(i, size)
    writer.write(f"chalf {size} {i}\n".encode() + payload)
    writer.write_eof()
    got = await _read_all(reader)
    writer.close()
    if got == f"{size} {hashlib.sha256(payload).hexdigest()}\n".encode():
        tally.counts["chalf_ok"] += 1
    else:
        tally.counts["corrupt"] += 1
        tally.fail(f"chalf {i}: {got[:100]!r}")


async def c_shalf(port: int, i: int, tally: Tally, size: int) -> None:
    """Server half-close: we read to its EOF, then still send (checked by the server)."""
    reader, writer = await _open(port)
    writer.write(f"shalf {size} {i}\n".encode())
    got = await _read_all(reader)
    writer.write(pattern(i + 1, size))
    writer.write_eof()
    await writer.drain()
    await reader.read()
    writer.close()
    if got == pattern(i, size):
        tally.counts["shalf_sent"] += 1
    else:
        tally.counts["corrupt"] += 1
        tally.fail(f"shalf {i}: greeting of {len(got)} bytes differs")


async def c_download(port: int, i: int, tally: Tally, size: int, slow: bool) -> None:
    """A download checked by sha256; ``slow`` reads 16 KiB every 5 ms (backpressure)."""
    reader, writer = await _open(port)
    writer.write(f"{'slow' if slow else 'big'} {size} {i}\n".encode())
    h = hashlib.sha256()
    n = 0
    while data := await reader.read(16384 if slow else 1 << 20):
        h.update(data)
        n += len(data)
        if slow:
            await asyncio.sleep(0.005)
    writer.write_eof()
    writer.close()
    if n == size and h.digest() == hashlib.sha256(pattern(i, size)).digest():
        tally.counts["slow_ok" if slow else "big_ok"] += 1
    else:
        tally.counts["corrupt"] += 1
        tally.fail(f"download {i}: {n} of {size} bytes or digest differs")


async def c_cabort(port: int, i: int, tally: Tally) -> None:
    """Client abort (SO_LINGER 0) once the server is there: the server must see a reset."""
    reader, writer = await _open(port)
    writer.write(f"cabort 0 {i}\n".encode() + b"x" * 1000)
    if await reader.readline() != b"ok\n":
        tally.fail(f"cabort {i}: no ok")
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                               LINGER_RESET)
    writer.transport.abort()
    tally.counts["cabort_sent"] += 1


async def c_sabort(port: int, i: int, tally: Tally) -> None:
    """Server abort: we must see ConnectionResetError, not a clean EOF."""
    reader, writer = await _open(port)
    writer.write(f"sabort 0 {i}\n".encode())
    try:
        await _read_all(reader)
        tally.counts["sabort_eof"] += 1
    except ConnectionResetError:
        tally.counts["sabort_reset"] += 1
    writer.close()


async def c_idle(port: int, i: int, tally: Tally, hold: float) -> None:
    """An idle connection held open for ``hold`` s, then used once."""
    reader, writer = await _open(port)
    writer.write(f"idle 0 {i}\n".encode())
    ok = await reader.readline() == b"ok\n"
    await asyncio.sleep(hold)
    line = f"still here {i}\n".encode()
    writer.write(line)
    ok = ok and await reader.readline() == line
    writer.write_eof()
    await reader.read()
    writer.close()
    if ok:
        tally.counts["idle_ok"] += 1
    else:
        tally.fail(f"idle {i}: answer differs")


def plan(total: int) -> list[tuple[str, int]]:
    """The mix, shuffled: (kind, size).  Proportions per 1,000 connections, plus a few
    multi-MiB downloads and transfers whatever the total."""
    rng = random.Random(7)
    mix = {"echo": 500, "chalf": 150, "shalf": 100, "cabort": 80, "sabort": 80,
           "slow": 5, "idle": 5}
    kinds: list[tuple[str, int]] = []
    for kind, per_mille in mix.items():
        for _ in range(total * per_mille // 1000):
            size = {"echo": rng.randint(4 << 10, 64 << 10),
                    "chalf": rng.randint(4 << 10, 64 << 10),
                    "shalf": rng.randint(4 << 10, 16 << 10),
                    "slow": 256 << 10}.get(kind, 0)
            kinds.append((kind, size))
    kinds += [("big", 4 << 20)] * 6 + [("echo", 3 << 20)] * 4
    kinds += [("echo", 16 << 10)] * (total - len(kinds))
    rng.shuffle(kinds)
    return kinds[:total]


async def run_mix(port: int, total: int, concurrency: int = 500) -> Tally:
    """Run ``total`` connections of the mix with at most ``concurrency`` at a time."""
    tally = Tally()
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int, kind: str, size: int) -> None:
        async with sem:
            try:
                if kind == "echo":
                    await c_echo(port, i, tally, size)
                elif kind == "chalf":
                    await c_chalf(port, i, tally, size)
                elif kind == "shalf":
                    await c_shalf(port, i, tally, size)
                elif kind in ("big", "slow"):
                    await c_download(port, i, tally, size, kind == "slow")
                elif kind == "cabort":
                    await c_cabort(port, i, tally)
                elif kind == "sabort":
                    await c_sabort(port, i, tally)
                elif kind == "idle":
                    await c_idle(port, i, tally, hold=2.0 + (i % 5))
            except (OSError, asyncio.IncompleteReadError) as exc:
                tally.fail(f"{kind} {i}: {exc!r}")

    await asyncio.gather(*(one(i, kind, size) for i, (kind, size) in enumerate(plan(total))))
    return tally


# ---- measurements --------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    """VmRSS summed over the process tree (supervisor and workers), in KiB."""
    total = 0
    for p in process_tree(pid):
        with open(f"/proc/{p}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def server_counts(port: int) -> Counter:
    """The scenario server's own counters, fetched through the forward."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"stats 0 0\n")
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
    return Counter(json.loads(b"".join(chunks)))


def quiet(fwd: Forwarder, control: Path) -> None:
    """Wait until the forwarder has no open session left (workers report every 0.5 s)."""
    def idle() -> bool:
        stats = stats_by_name(control)
        return all(row["active"] == 0 for row in stats.values())

    wait_until(idle, timeout=30, what="no active sessions")
    time.sleep(1.0)  # one more report period: closes are reported with the counters


# Measured here (2 cores, shared): ~1,000-1,300 connections/s of this mix end to end, so
# the full 100,000 take ~80-100 s and fit the 3-minute budget; NSBRIDGE_SOAK overrides.
SOAK_TOTAL = int(os.environ.get("NSBRIDGE_SOAK", "100000"))


def test_tcp_soak(netns: str, forwarder, tmp_path: Path) -> None:
    """SOAK_TOTAL connections (default 100,000) of the mix through one forward (default
    workers), 500 at a time: no corrupt byte, every reset seen as a reset, fds back to the
    warmed-up start and RSS within 8 MiB of it."""
    port, server = start_server(netns)
    control = tmp_path / "ctl.sock"
    try:
        fwd = forwarder("forward", "-l", "127.0.0.1:0", "--connect-netns", netns,
                        "-c", f"127.0.0.1:{port}", "--control", str(control), "-v",
                        "--connect-timeout", "10")
        # warm-up: every worker meets every kind (pools, pipes, allocator arenas)
        warm = asyncio.run(run_mix(fwd.port, 2000, concurrency=500))
        assert warm.counts["failed"] == 0, warm.failures
        quiet(fwd, control)
        fds_before, rss_before = open_fds(fwd.proc.pid), rss_kib(fwd.proc.pid)
        before_server = server_counts(fwd.port)

        started = time.monotonic()
        tally = asyncio.run(run_mix(fwd.port, SOAK_TOTAL))
        elapsed = time.monotonic() - started
        quiet(fwd, control)
        # a cancelled connect timer stays in the loop's heap (small, callback dropped)
        # until its deadline: measure once the last ones expired
        time.sleep(10.5)
        fds_after, rss_after = open_fds(fwd.proc.pid), rss_kib(fwd.proc.pid)
        seen = server_counts(fwd.port) - before_server
        print(f"\n{SOAK_TOTAL} connections in {elapsed:.1f}s "
              f"({SOAK_TOTAL / elapsed:.0f}/s); fds {fds_before}->{fds_after}, "
              f"RSS {rss_before}->{rss_after} KiB; client {dict(tally.counts)}; "
              f"server {dict(seen)}")
        expected = Counter(kind for kind, _ in plan(SOAK_TOTAL))
        c = tally.counts
        assert c["failed"] == 0, tally.failures
        assert c["corrupt"] == 0, tally.failures
        assert c["echo_ok"] == expected["echo"]
        assert c["chalf_ok"] == expected["chalf"]
        assert c["big_ok"] == expected["big"] and c["slow_ok"] == expected["slow"]
        assert c["idle_ok"] == expected["idle"]
        assert c["shalf_sent"] == seen["shalf_ok"] == expected["shalf"], seen
        # resets: expected vs seen, each way
        assert seen["cabort_reset"] == expected["cabort"], seen
        assert seen["sabort_sent"] == c["sabort_reset"] == expected["sabort"], (c, seen)
        assert not [k for k in seen if k.startswith("server_error")], seen
        assert fds_after <= fds_before
        assert rss_after <= rss_before + 8 * 1024
        assert fwd.proc.poll() is None
        assert fwd.stop() == 0
        assert "Traceback" not in fwd.log()
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_udp_soak(netns: str, forwarder, udp_server) -> None:
    """3,000 UDP flows (distinct client sockets), 3 DNS-like queries each, at most 100
    outstanding (a modest rate): every query gets exactly its own answer, none lost."""
    def answer(query: bytes) -> bytes:
        return query[:2] + b"\x81\x80" + query[2:][::-1]  # id, "response" flags, body

    server = udp_server(netns, answer)
    fwd = forwarder("forward", "-v", "udp:127.0.0.1:0",
                    f"udp:127.0.0.1:{server.port},netns={netns}")
    flows, per_flow = 3000, 3

    async def run() -> Counter:
        loop = asyncio.get_running_loop()
        sem = asyncio.Semaphore(100)
        counts: Counter = Counter()

        async def flow(i: int) -> None:
            async with sem:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                    sock.setblocking(False)
                    sock.connect(("127.0.0.1", fwd.port))
                    for q in range(per_flow):
                        qid = struct.pack("!H", (i * per_flow + q) & 0xFFFF)
                        query = qid + b"\x01\x00" + f"flow{i}.q{q}.example.".encode()
                        await loop.sock_sendall(sock, query)
                        try:
                            reply = await asyncio.wait_for(loop.sock_recv(sock, 2048), 5)
                        except TimeoutError:
                            counts["lost"] += 1
                            continue
                        counts["ok" if reply == answer(query) else "wrong"] += 1

        await asyncio.gather(*(flow(i) for i in range(flows)))
        return counts

    counts = asyncio.run(run())
    assert counts == Counter(ok=flows * per_flow), counts
    assert fwd.proc.poll() is None
    assert fwd.stop() == 0


if __name__ == "__main__" and sys.argv[1:] == ["serve"]:
    asyncio.run(_server_main())
