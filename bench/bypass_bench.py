#!/usr/bin/env python3
"""Socket switching (``nsbridge run --bypass``) against the fast path and direct.

In a "host" namespace of its own (d0: 192.0.2.1/24, an iperf3 server there), iperf3
runs as the command of ``nsbridge run --bypass`` (its TCP sockets become host sockets),
as the command of plain ``nsbridge run`` (the nftables fast path: two kernel
connections spliced), and straight in the host namespace (direct, the ceiling): one
stream out, one stream in (-R), four streams out.  The command must be the program the
filter was installed for (a process entered into the namespace from outside would not
be filtered), so each measurement starts its own ``nsbridge run``; iperf3 times only
its transfer.  Rows and metrics are interleaved, the row order rotated per run.

Run as root:  python3 bench/bypass_bench.py [--quick] [--runs N] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from nsbench.measure import Sample, iperf
from nsbench.procs import BenchError, Netns, bench_main, run_checked, try_connect
from nsbench.report import spread

REPO = Path(__file__).resolve().parent.parent
HOST_IP = "192.0.2.1"
PORT = 5201
ROWS = ["direct", "nsbridge-bypass", "nsbridge"]
METRICS = {  # key: (label, streams, reverse)
    "out": ("TCP namespace->host Gbit/s (1 stream)", 1, False),
    "in": ("TCP host->namespace Gbit/s (1 stream, -R)", 1, True),
    "out_p4": ("TCP namespace->host Gbit/s (-P 4)", 4, False),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CI mode: 1 run, iperf3 -t 1")
    p.add_argument("--runs", type=int, help="repetitions (default 3, quick 1)")
    p.add_argument("--json", metavar="OUT.json", help="write raw samples and the summary")
    return p.parse_args(argv)


def prefix(row: str, host: Netns) -> list[str]:
    """What runs iperf3 for ``row``: in the host namespace, or as nsbridge run's command.
    The server is on the host namespace's own address, which host access (off) closes:
    exactly it is allowed, so the host-address check is still measured."""
    if row == "direct":
        return host.exec_argv([])
    # The checkout's nsbridge, whichever Python runs the benchmark.
    argv = [
        "env",
        f"PYTHONPATH={REPO}",
        sys.executable,
        "-m",
        "nsbridge",
        "run",
        f"--allow={HOST_IP}",
    ]
    if row == "nsbridge-bypass":
        argv.append("--bypass")
    return host.exec_argv([*argv, "--"])


def bench(args: argparse.Namespace) -> int:
    runs = args.runs if args.runs is not None else (1 if args.quick else 3)
    if runs < 1:
        raise BenchError("--runs must be at least 1")
    seconds = 1 if args.quick else 5
    host = Netns(f"nsb-bpbench-{secrets.token_hex(4)}")
    server: subprocess.Popen | None = None
    started = time.time()
    results: dict[str, dict[str, list[Sample]]] = {r: {m: [] for m in METRICS} for r in ROWS}
    try:
        host.create()
        run_checked(
            ["ip", "-n", host.name, "link", "add", "d0", "type", "veth", "peer", "name", "d1"]
        )
        run_checked(["ip", "-n", host.name, "addr", "add", f"{HOST_IP}/24", "dev", "d0"])
        for dev in ("d0", "d1"):
            run_checked(["ip", "-n", host.name, "link", "set", dev, "up"])
        server = subprocess.Popen(
            host.exec_argv(["iperf3", "-s", "-p", str(PORT)]),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not try_connect(PORT, host.path):
            if time.monotonic() > deadline:
                raise BenchError("iperf3 -s did not start in the host namespace")
            time.sleep(0.1)
        for rep in range(runs):
            order = ROWS[rep % len(ROWS) :] + ROWS[: rep % len(ROWS)]
            for key, (_label, streams, reverse) in METRICS.items():
                for row in order:
                    sample = _measure(row, host, seconds, streams, reverse)
                    sample.update(rep=rep, t=time.time())
                    results[row][key].append(sample)
                    shown = (
                        f"{sample['gbps']:.2f} Gbit/s"
                        if "gbps" in sample
                        else f"FAILED: {str(sample.get('error'))[:120]}"
                    )
                    print(
                        f"[{rep + 1}/{runs}] {row:<16} {key:<7} {shown}",
                        file=sys.stderr,
                        flush=True,
                    )
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=10)
        host.delete()
    summary = {
        key: {
            row: spread(
                [s["gbps"] for s in results[row][key] if "gbps" in s],
                [str(s["error"]) for s in results[row][key] if "error" in s],
            )
            for row in ROWS
        }
        for key in METRICS
    }
    print(f"bypass_bench: {runs} run(s), iperf3 -t {seconds}; medians [min-max, n]\n")
    print(render(summary))
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "runs": runs,
                    "seconds": seconds,
                    "elapsed": time.time() - started,
                    "summary": summary,
                    "samples": results,
                },
                indent=1,
                default=str,
            )
        )
    return 0


def _measure(row: str, host: Netns, seconds: int, streams: int, reverse: bool) -> Sample:
    return iperf(prefix(row, host), PORT, seconds, streams=streams, reverse=reverse, host=HOST_IP)


def render(summary: dict[str, dict[str, dict[str, Any]]]) -> str:
    lines = []
    for key, (label, _streams, _reverse) in METRICS.items():
        lines.append(f"{label}  (higher is better)")
        direct = summary[key]["direct"]["median"]
        fast = summary[key]["nsbridge"]["median"]
        for row in ROWS:
            st = summary[key][row]
            if st["median"] is None:
                lines.append(f"  {row:<16} failed: {(st['errors'] or ['no data'])[0][:90]}")
                continue
            ratios = []
            if direct and row != "direct":
                ratios.append(f"{st['median'] / direct:.2f}x direct")
            if fast and row == "nsbridge-bypass":
                ratios.append(f"{st['median'] / fast:.2f}x fast path")
            text = f"{st['median']:.2f}" + (f" ({', '.join(ratios)})" if ratios else "")
            lines.append(f"  {row:<16} {text:<40} [{st['min']:.2f}-{st['max']:.2f}, n={st['n']}]")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return bench_main("bypass_bench", lambda: bench(args))


if __name__ == "__main__":
    sys.exit(main())
