"""Single measurements: one iperf3 run, one wrk run, one idle-connection fill.

Each function returns a plain dict (one raw sample) so that the JSON
output keeps everything, errors included, and the report can compute
medians without knowing how a figure was obtained.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

from . import procstat

GIB8 = 8 * 1024**3

Sample = dict[str, Any]


def run_client(argv: Sequence[str], timeout: float) -> tuple[int, str, str]:
    """Run a client to completion; a hang becomes rc -9 instead of blocking the run."""
    try:
        res = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
        return res.returncode, res.stdout, res.stderr
    except subprocess.TimeoutExpired as exc:
        out = (
            exc.stdout.decode(errors="replace")
            if isinstance(exc.stdout, bytes)
            else (exc.stdout or "")
        )
        return -9, out, f"timed out after {timeout:.0f}s"


def run_iperf_json(
    argv: list[str],
    timeout: float,
    cpu_pids: Sequence[int] = (),
    settle: float = 0.0,
    cpu_descendants: bool = True,
) -> tuple[Sample, dict | None, float | None]:
    """Run an ``iperf3 -J`` client: (sample with argv/rc or error, its JSON or None, the
    CPU seconds ``cpu_pids`` (and their descendants unless told not to) used meanwhile
    or None; the sample has the whole machine's busy seconds as ``machine_cpu_s``).
    Shared by both benchmarks."""

    def cpu() -> float | None:
        if not cpu_pids:
            return None
        return procstat.cpu_seconds(cpu_pids, descendants=cpu_descendants)

    cpu0, machine0 = cpu(), procstat.machine_cpu_seconds()
    rc, out, err = run_client(argv, timeout)
    if cpu_pids and settle:
        time.sleep(settle)  # let per-connection children finish and be reaped (cutime)
    cpu1, machine1 = cpu(), procstat.machine_cpu_seconds()
    sample: Sample = {"argv": argv, "rc": rc, "machine_cpu_s": machine1 - machine0}
    try:
        data = json.loads(out)
    except json.JSONDecodeError:
        sample["error"] = (err.strip() or out.strip() or f"exit {rc}")[-300:]
        return sample, None, None
    if "error" in data or rc != 0:
        sample["error"] = str(data.get("error", err.strip() or f"exit {rc}"))[-300:]
        return sample, None, None
    cpu = cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None
    return sample, data, cpu


def iperf(
    prefix: Sequence[str],
    port: int,
    seconds: int,
    streams: int = 1,
    reverse: bool = False,
    cpu_pids: Sequence[int] = (),
    host: str = "127.0.0.1",
) -> Sample:
    """One iperf3 client run to ``host``; also the forwarder's CPU time over the run.

    Throughput is what the receiver got (end.sum_received), the honest
    figure when a forwarder buffers.  CPU is the delta of user+sys ticks
    of the forwarder's whole process tree.
    """
    argv = [
        *prefix,
        "iperf3",
        "-c",
        host,
        "-p",
        str(port),
        "-t",
        str(seconds),
        "-J",
        "--connect-timeout",
        "5000",
    ]
    if streams > 1:
        argv += ["-P", str(streams)]
    if reverse:
        argv.append("-R")
    sample, data, cpu = run_iperf_json(argv, seconds + 30, cpu_pids, settle=0.3)
    if data is None:
        return sample
    recv = data["end"]["sum_received"]
    sample["gbps"] = recv["bits_per_second"] / 1e9
    sample["bytes"] = recv["bytes"]
    sample["retransmits"] = data["end"].get("sum_sent", {}).get("retransmits")
    if cpu is not None:
        sample["cpu_s"] = cpu
        sample["cpu_s_per_8gib"] = cpu / recv["bytes"] * GIB8 if recv["bytes"] else None
    return sample


_UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}


def _to_us(text: str) -> float:
    """wrk prints durations like 87.00us, 1.23ms, 2.00s."""
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not m:
        raise ValueError(f"unparsable wrk duration {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> Sample:
    """Extract requests/s, latency percentiles and error counts from wrk output."""
    sample: Sample = {}
    m = re.search(r"Requests/sec:\s*([\d.]+)", out)
    if m:
        sample["rps"] = float(m.group(1))
    m = re.search(r"(\d+) requests in", out)
    if m:
        sample["requests"] = int(m.group(1))
    for pct, val in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)\s*$", out, re.M):
        sample[f"p{pct}_us"] = _to_us(val)
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        sample["socket_errors"] = dict(
            zip(("connect", "read", "write", "timeout"), (int(x) for x in m.groups()), strict=True)
        )
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        sample["non_2xx"] = int(m.group(1))
    return sample


def wrk(
    prefix: Sequence[str], port: int, seconds: int, connections: int, close: bool = False
) -> Sample:
    """One wrk run (-t1) against http://127.0.0.1:port/ with --latency."""
    argv = [*prefix, "wrk", "-t1", f"-c{connections}", "-d", f"{seconds}s", "--latency"]
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(f"http://127.0.0.1:{port}/")
    rc, out, err = run_client(argv, seconds + 30)
    sample: Sample = {"argv": argv, "rc": rc, **parse_wrk(out)}
    if rc != 0 or "rps" not in sample:
        sample["error"] = (err.strip() or out.strip() or f"exit {rc}")[-300:]
    elif sample.get("non_2xx"):
        sample["error"] = f"{sample['non_2xx']} non-2xx responses"
    return sample


def _open_paced(
    port: int, count: int, held: Callable[[], int], window: int, deadline: float
) -> tuple[list[socket.socket], int]:
    """Open `count` connections, never more than `window` ahead of the server.

    connect() returns as soon as the kernel completes the handshake, long
    before the forwarder accept()s; without end-to-end pacing a burst
    overflows the forwarder's listen backlog (socat's recipe uses 128)
    and the overflowing connections are silently lost.  Pacing on the
    count seen by the server measures memory, not backlog sizing.
    """
    socks: list[socket.socket] = []
    failures = 0
    for _ in range(count):
        while len(socks) - held() >= window and time.monotonic() < deadline:
            time.sleep(0.002)
        if time.monotonic() > deadline:
            break
        try:
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        except OSError:
            failures += 1
    return socks, failures


def idle_fill(
    port: int, count: int, rss_pids: Sequence[int], held: Callable[[], int], timeout: float = 120.0
) -> Sample:
    """Hold `count` idle connections through the forwarder and read its memory.

    Waits until the server in B reports all of them accepted (so the
    forwarder really has both legs of every connection open), samples
    the memory of the forwarder tree, then closes everything and waits
    for the server to see the closes.
    """
    time.sleep(0.5)  # a just-started forwarder may still be spawning workers
    base = procstat.memory(rss_pids)
    start = time.monotonic()
    socks, failures = _open_paced(port, count, held, 64, start + timeout)
    sample: Sample = {
        "count": count,
        "opened": len(socks),
        "connect_failures": failures,
        "baseline_rss_mib": base.rss_mib,
        "baseline_pss_mib": base.pss_mib,
    }
    try:
        deadline = start + timeout
        while held() < len(socks) and time.monotonic() < deadline:
            time.sleep(0.05)
        sample["accepted"] = held()
        sample["fill_s"] = time.monotonic() - start
        time.sleep(0.5)  # let lazily-allocated per-connection state settle
        mem = procstat.memory(rss_pids)
        sample.update(rss_mib=mem.rss_mib, pss_mib=mem.pss_mib, nprocs=mem.nprocs)
        if sample["accepted"] > 0:
            grow = (mem.rss_mib - base.rss_mib) * 1024 / sample["accepted"]
            sample["rss_kib_per_conn"] = grow
            sample["pss_kib_per_conn"] = (mem.pss_mib - base.pss_mib) * 1024 / sample["accepted"]
        if sample["accepted"] < count:
            sample["error"] = (
                f"only {sample['accepted']} of {count} connections reached the "
                f"server ({failures} connect failures)"
            )
    finally:
        for s in socks:
            s.close()
    drain_deadline = time.monotonic() + 60
    while held() > 0 and time.monotonic() < drain_deadline:
        time.sleep(0.05)
    sample["left_open_after_close"] = max(held(), 0)
    return sample
