"""Soak tests: many connections of every kind through one forward, then proof that the
forwarder is back where it started (fds, memory) and that nothing was corrupted or lost.

Why a soak and not just the unit-sized tests in tests/forward/test_relay.py: leaks (fds,
pipes, pooled sockets, per-session state) and rare races (a reset racing a half-close, a
slow reader racing a flush) only show up after tens of thousands of sessions of mixed kinds.

The scenario (helpers/tcp_mix.py): its servers run as a separate asyncio process inside
the namespace (``python3 tests/helpers/tcp_mix.py serve``) so that they have their own
GIL and core time; the clients run in the test process.  Each client names its scenario
in a one-line header.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import time
from collections import Counter
from pathlib import Path

import pytest

from helpers.control import stats_by_name
from helpers.processes import Forwarder, open_fds, process_tree
from helpers.tcp_mix import plan, run_mix, start_server
from helpers.waiting import wait_until
from nsbridge.net.factory import POOL_BATCH

pytestmark = pytest.mark.stress

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
        # Each worker's socket factory makes target sockets POOL_BATCH at a time, so its
        # spare sockets float between 0 and POOL_BATCH - 1 (the native core's pool draws
        # them in bursts, not one per connection): that much per worker is not a leak.
        # A leak of one fd per thousand connections would still show a hundred times over.
        workers = len(process_tree(fwd.proc.pid)) - 1
        assert fds_after <= fds_before + workers * (POOL_BATCH - 1), (fds_before, fds_after)
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

