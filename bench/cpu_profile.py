#!/usr/bin/env python3
"""Where a forwarder's CPU per byte goes: nsbridge's native core against c-epoll.

Why: issue 19's last bulk target is "CPU per 8 GiB <= c-epoll's"; forward_bench.py gives
the totals, this script the reasons.  For each forwarder, in one namespace with iperf3 on
its loopback (as forward_bench.py), it measures

* the process tree's CPU while no traffic flows (supervisors, timers),
* per direction, one `iperf3 -t T` run: the tree's CPU per 8 GiB, and `perf stat` of the
  workers: system calls by name per GiB, task-clock, context switches,
* with --record, `perf record -g` of the workers during one upstream run, summarised by
  binary (kernel, libpython, the core...) and top symbols.

Run as root from the repository root, on a quiet machine (hold the bench lock):

    sudo python3 bench/cpu_profile.py --runs 3 [--record] [--extra NAME='ENV=V cmd ...']
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GIB8 = 8 << 30
SYSCALLS = [
    "splice",
    "read",
    "write",
    "epoll_wait",
    "epoll_ctl",
    "recvfrom",
    "sendto",
    "futex",
    "clock_gettime",
    "fcntl",
    "pipe2",
    "close",
    "accept4",
]


def sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, **kw)


def tree(pid: int) -> list[int]:
    """pid and its descendants, from /proc."""
    out = [pid]
    for p in out:
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                out += [int(x) for x in (task / "children").read_text().split()]
            except OSError:
                pass
    return out


def cpu_s(pids: list[int]) -> float:
    total = 0
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"nothing listens on {port}")


def iperf(port: int, seconds: int, reverse: bool) -> int:
    argv = ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-J"]
    done = sh(argv + (["-R"] if reverse else []), capture_output=True, text=True)
    return int(json.loads(done.stdout)["end"]["sum_received"]["bytes"])


def perf_stat(pids: list[int], out: Path) -> subprocess.Popen:
    events = ["task-clock", "context-switches"] + [f"syscalls:sys_enter_{s}" for s in SYSCALLS]
    argv = ["perf", "stat", "-x,", "-o", str(out), "-e", ",".join(events)]
    return subprocess.Popen([*argv, "-p", ",".join(map(str, pids))])


def parse_stat(path: Path) -> dict[str, float]:
    result = {}
    for line in path.read_text().splitlines():
        parts = line.split(",")
        if len(parts) > 2 and parts[0] and not line.startswith("#"):
            try:
                result[parts[2].replace("syscalls:sys_enter_", "")] = float(parts[0])
            except ValueError:
                pass
    return result


def _perf_report(data: Path, sort: str) -> str:
    """``perf report --stdio`` of ``data`` by ``sort`` keys (self time only)."""
    return subprocess.run(
        ["perf", "report", "-i", str(data), "--no-children", "--sort", sort, "--stdio"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout


def summarise_record(data: Path) -> dict[str, object]:
    """Share of samples by binary, and the top symbols."""
    dsos = re.findall(r"^\s+([\d.]+)%\s+(\S+)", _perf_report(data, "dso"), re.M)
    syms = re.findall(r"^\s+([\d.]+)%\s+\[.\]\s+(\S+)", _perf_report(data, "sym"), re.M)
    user = re.findall(
        r"^\s+([\d.]+)%\s+(\S+)\s+\[\.\]\s+(\S+)", _perf_report(data, "dso,sym"), re.M
    )
    return {"dso": dsos[:8], "sym": syms[:15], "user": user[:15]}


def summary(results: dict[str, dict]) -> None:
    """Medians [min-max] per row and direction, and the system calls per GiB."""
    for name, row in results.items():
        print(f"{name}: idle {row['idle_cpu_ms_per_s']:.2f} ms CPU/s")
        for direction in ("up", "down"):
            samples = row[direction]
            for key in ("gbit_s", "cpu_s_per_8gib"):
                vals = sorted(x[key] for x in samples)
                print(
                    f"  {direction} {key}: {statistics.median(vals):.3f} "
                    f"[{vals[0]:.3f}-{vals[-1]:.3f}]"
                )
            keys = samples[0]["per_gib"]
            per = {k: statistics.median(x["per_gib"][k] for x in samples) for k in keys}
            print(f"  {direction} per GiB:", {k: v for k, v in per.items() if v})
        if "profile_up" in row:
            print("  samples by binary:", row["profile_up"]["dso"])
            print("  top symbols:", row["profile_up"]["sym"][:10])
            print("  top user-space symbols:", row["profile_up"]["user"][:12])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--seconds", type=int, default=5)
    p.add_argument("--record", action="store_true", help="perf record -g one upstream run")
    p.add_argument("--extra", action="append", default=[], help="NAME=command with {listen}")
    p.add_argument("--json")
    args = p.parse_args()

    ns = f"nsb-prof-{secrets.token_hex(3)}"
    work = Path(tempfile.mkdtemp(prefix="nsb-prof-"))
    started: list[subprocess.Popen] = []
    results: dict[str, dict] = {}
    try:
        sh(["ip", "netns", "add", ns])
        sh(["ip", "-n", ns, "link", "set", "lo", "up"])
        srv = subprocess.Popen(
            ["ip", "netns", "exec", ns, "iperf3", "-s", "-B", "127.0.0.1", "-p", "5201"],
            stdout=subprocess.DEVNULL,
        )
        started.append(srv)
        sh(["gcc", "-O2", "-o", str(work / "cforward"), str(REPO / "bench/reference/cforward.c")])
        rows = {
            "nsbridge": "python3 -m nsbridge forward -l {listen} "
            f"--connect-netns {ns} -c 127.0.0.1:5201",
            "c-epoll": f"{work / 'cforward'} {{listen}} /run/netns/{ns} 127.0.0.1:5201 2",
        }
        for item in args.extra:
            name, _, cmd = item.partition("=")
            rows[name] = cmd.replace("{netns}", ns)
        time.sleep(0.5)
        procs: dict[str, tuple[subprocess.Popen, int, list[int], list[int]]] = {}
        for i, (name, template) in enumerate(rows.items()):
            port = 24100 + i
            words = shlex.split(template.format(listen=f"127.0.0.1:{port}"))
            env = dict(os.environ)
            while "=" in words[0]:
                k, _, v = words.pop(0).partition("=")
                env[k] = v
            proc = subprocess.Popen(words, cwd=REPO, env=env)
            started.append(proc)
            wait_port(port)
            time.sleep(1.0)
            pids = tree(proc.pid)
            procs[name] = (proc, port, pids, pids[1:] or pids)
            results[name] = {"up": [], "down": []}
        for name, (_, _, pids, _) in procs.items():
            c0 = cpu_s(pids)
            time.sleep(5)
            results[name]["idle_cpu_ms_per_s"] = (cpu_s(pids) - c0) / 5 * 1000
        # Interleaved: every run measures each row in turn (rotated), so a drift of the
        # machine hits all rows alike.
        names = list(procs)
        for r in range(args.runs):
            order = names[r % len(names) :] + names[: r % len(names)]
            for direction, reverse in (("up", False), ("down", True)):
                for name in order:
                    _, port, pids, workers = procs[name]
                    out = work / f"{name}-{direction}-{r}.stat"
                    stat = perf_stat(workers, out)
                    time.sleep(0.2)
                    c0 = cpu_s(pids)
                    nbytes = iperf(port, args.seconds, reverse)
                    c1 = cpu_s(pids)
                    stat.send_signal(signal.SIGINT)
                    stat.wait()
                    counts = parse_stat(out)
                    gib = nbytes / (1 << 30)
                    results[name][direction].append(
                        {
                            "gbit_s": nbytes * 8 / args.seconds / 1e9,
                            "cpu_s_per_8gib": (c1 - c0) * GIB8 / nbytes,
                            "per_gib": {k: round(v / gib, 1) for k, v in counts.items()},
                        }
                    )
        if args.record:
            for name, (_, port, _, workers) in procs.items():
                data = work / f"{name}.perf"
                rec = subprocess.Popen(
                    ["perf", "record", "-g", "-o", str(data), "-p", ",".join(map(str, workers))],
                    stderr=subprocess.DEVNULL,
                )
                time.sleep(0.3)
                iperf(port, args.seconds, False)
                rec.send_signal(signal.SIGINT)
                rec.wait()
                results[name]["profile_up"] = summarise_record(data)
        summary(results)
    finally:
        for proc in started:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
        subprocess.run(["ip", "netns", "del", ns], check=False)
        subprocess.run(["rm", "-rf", str(work)], check=False)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
