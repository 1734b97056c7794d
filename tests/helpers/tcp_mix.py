"""The soak tests' TCP scenario: a mix of sha256-checked echoes, half-closes from either
side, downloads to fast and slow readers, aborts from either side and idle connections,
each client naming its scenario in a one-line header the server obeys.

The server runs as its own asyncio process (``python3 tcp_mix.py serve``: it prints its
port) so that it has its own GIL and core time; the clients (``run_mix``) run wherever
the test puts them: in the test process for a forward, inside a sandbox for
``nsbridge run``.  Standard library only.
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
from collections import Counter

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
# (tests/stress/test_usernet_soak.py) runs these clients inside a sandbox and points them at the
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


if __name__ == "__main__" and sys.argv[1:] == ["serve"]:
    asyncio.run(_server_main())
