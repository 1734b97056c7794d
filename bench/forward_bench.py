#!/usr/bin/env python3
"""Side-by-side benchmark of TCP forwarders between network namespaces.

Compares nsbridge with the classic socat pair (and optionally another
forwarder such as netns_tcp_bridge) against the no-forwarder reference,
all in one run with repetitions interleaved, so that the ratios printed
are not skewed by the machine getting busier or quieter over time.

Run as root:  python3 bench/forward_bench.py [--quick] [--runs N]
                  [--json OUT.json] [--only ROW,ROW]
See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from nsbench import measure, procstat, report, sanity
from nsbench.forwarders import (
    CReference,
    CUringReference,
    Extra,
    Forwarder,
    Instance,
    Nsbridge,
    SocatPair,
)
from nsbench.procs import BenchError, Netns, ProcessRegistry, bench_main, raise_nofile
from nsbench.servers import HTTP_PORT, IDLE_PORT, IPERF_PORT, Servers, idle_count, start_servers

KINDS = ["iperf_fwd", "iperf_rev", "iperf_p4", "wrk_ka", "wrk_close", "wrk_lat", "idle"]
REQUIRED_TOOLS = ["ip", "iperf3", "wrk", "/usr/sbin/nginx"]
FD_HEADROOM = 200  # listeners, logs, epoll, pipes of a forwarder process
BUSY_SHARE = 0.15  # CPU share busy before the run above which figures are flagged noisy


@dataclass
class Config:
    """Durations and sizes; --quick shrinks them so CI finishes in ~1-2 minutes."""

    runs: int
    iperf_s: int
    wrk_s: int
    idle_conns: int
    quick: bool
    kinds: list[str]


@dataclass
class Row:
    """A forwarder row and its long-lived instances (iperf3 and HTTP upstreams)."""

    name: str
    fwd: Forwarder | None  # None for `direct`
    iperf: Instance | None = None
    http: Instance | None = None
    sanity: dict[str, Any] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line of the harness."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="CI mode: 1 run, iperf3 -t 1, wrk -d 1s, 1,000 idle connections",
    )
    p.add_argument("--runs", type=int, help="repetitions per measurement (default 3, quick 1)")
    p.add_argument("--json", metavar="OUT.json", help="write all raw samples and the summary here")
    p.add_argument(
        "--only",
        metavar="ROW,ROW",
        help="rows to run (direct,nsbridge,socat or the extra row's name)",
    )
    p.add_argument(
        "--measure",
        metavar="KIND,KIND",
        help=f"measurements to run, default all: {','.join(KINDS)}",
    )
    p.add_argument(
        "--idle-conns",
        type=int,
        help="idle connections for the RSS figure (default 10000, quick 1000)",
    )
    p.add_argument(
        "--nsbridge-target",
        choices=["connect-netns", "t"],
        default="connect-netns",
        help="pass B to nsbridge as '--connect-netns B' (default) or '-t /run/netns/B'",
    )
    p.add_argument(
        "--reference",
        action="store_true",
        help="add the c-epoll row: bench/reference/cforward.c, the same data path in C "
        "(built with gcc), to show what any user-space forwarder costs here, and the "
        "c-uring row: the same forwarder on io_uring (bench/reference/cforward_uring.c)",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="exit 1 if a row is unavailable, fails its data check or has failed samples",
    )
    p.add_argument(
        "--measure-broken",
        action="store_true",
        help="time rows even if they fail the data check (default: skip them)",
    )
    p.add_argument(
        "--keep-workdir", action="store_true", help="keep configs and logs for debugging"
    )
    return p.parse_args(argv)


def make_config(args: argparse.Namespace) -> Config:
    """Defaults from the brief, overridable per flag."""
    runs = args.runs if args.runs is not None else (1 if args.quick else 3)
    idle = args.idle_conns if args.idle_conns is not None else (1000 if args.quick else 10000)
    asked = {k.strip() for k in (args.measure or ",".join(KINDS)).split(",") if k.strip()}
    kinds = [k for k in KINDS if k in asked]  # canonical order, whatever the flag's order
    unknown = asked - set(KINDS)
    if unknown:
        raise BenchError(
            f"--measure: unknown {', '.join(sorted(unknown))}; known: {', '.join(KINDS)}"
        )
    if runs < 1 or idle < 1:
        raise BenchError("--runs and --idle-conns must be at least 1")
    seconds = 1 if args.quick else 5
    return Config(runs, seconds, seconds, idle, args.quick, kinds)


def make_rows(only: str | None, target_flag: str, reference: bool = False) -> list[Row]:
    """direct, nsbridge, socat, c-epoll and c-uring with --reference, then the
    NSBRIDGE_BENCH_EXTRA rows if set."""
    rows = [Row("direct", None), Row("nsbridge", Nsbridge(target_flag)), Row("socat", SocatPair())]
    if reference:
        rows.append(Row(CReference.name, CReference()))
        rows.append(Row(CUringReference.name, CUringReference()))
    # One extra row per line of NSBRIDGE_BENCH_EXTRA (A/B of several variants in one
    # run), named by the comma-separated NSBRIDGE_BENCH_EXTRA_NAME in order.
    templates = [t.strip() for t in os.environ.get("NSBRIDGE_BENCH_EXTRA", "").splitlines()]
    names = os.environ.get("NSBRIDGE_BENCH_EXTRA_NAME", "").split(",")
    for i, template in enumerate(t for t in templates if t):
        name = names[i].strip() if i < len(names) else ""
        extra = Extra(template, name or None)
        while extra.name in {r.name for r in rows}:
            extra.name += "-extra"
        rows.append(Row(extra.name, extra))
    if only:
        wanted = [w.strip() for w in only.split(",") if w.strip()]
        unknown = set(wanted) - {r.name for r in rows}
        if unknown:
            raise BenchError(
                f"--only: unknown row(s) {', '.join(sorted(unknown))}; "
                f"known: {', '.join(r.name for r in rows)}"
            )
        rows = [r for r in rows if r.name in wanted]
    return rows


def preflight() -> None:
    """Fail early and clearly instead of half-way through a run."""
    if os.geteuid() != 0:
        raise BenchError("must run as root (creates a network namespace)")
    missing = [t for t in REQUIRED_TOOLS if not shutil.which(t)]
    if missing:
        raise BenchError(
            f"missing tools: {', '.join(missing)} (apt-get install iperf3 wrk nginx-light iproute2)"
        )


def fit_idle_conns(wanted: int) -> tuple[int, int, str | None]:
    """Raise RLIMIT_NOFILE and cap the idle-connection count to what fits.

    A single-process forwarder holds two fds per connection (client and
    upstream leg).  If the hard limit cannot be raised (no
    CAP_SYS_RESOURCE, as in some containers) 10,000 connections would
    hit EMFILE instead of measuring memory, so the count is lowered and
    the table says so.  Returns (nofile, count, note or None).
    """
    soft, hard = raise_nofile()
    fits = (soft - FD_HEADROOM) // 2
    if wanted <= fits:
        return soft, wanted, None
    note = (
        f"note: idle connections capped at {fits} (asked {wanted}): RLIMIT_NOFILE is {soft}/{hard} "
        f"and cannot be raised here, and a forwarder process needs 2 fds per connection"
    )
    return soft, fits, note


def log(msg: str) -> None:
    """Progress goes to stderr so stdout holds only the table."""
    print(msg, file=sys.stderr, flush=True)


def setup_row(
    row: Row,
    reg: ProcessRegistry,
    ns: Netns,
    workdir: Path,
    unavailable: dict[str, str],
    measure_broken: bool = False,
) -> None:
    """Start the row's iperf3 and HTTP forwarders and check it moves bytes correctly.

    A row that fails the data check is not timed (unless measure_broken):
    the speed of a forwarder that loses or corrupts bytes means nothing,
    and one that hangs would cost a client timeout per measurement.
    """
    assert row.fwd is not None
    reason = row.fwd.unavailable_reason()
    if reason:
        unavailable[row.name] = reason
        log(f"{row.name}: {reason}; skipping the row")
        return
    try:
        row.iperf = row.fwd.start(reg, ns, IPERF_PORT, workdir)
        row.http = row.fwd.start(reg, ns, HTTP_PORT, workdir)
        echo = row.fwd.start(reg, ns, IDLE_PORT, workdir)
        try:
            row.sanity = sanity.check(row.http.port, echo.port)
        finally:
            for proc in echo.procs:
                reg.stop(proc)
    except BenchError as exc:
        unavailable[row.name] = f"failed to start: {str(exc).splitlines()[0][:100]}"
        log(f"{row.name}: {exc}")
        return
    status = "ok" if row.sanity["ok"] else "PROBLEMS: " + "; ".join(row.sanity["problems"])
    log(f"{row.name}: data check {status}")
    for note in row.sanity["notes"]:
        log(f"{row.name}: note: {note}")
    if not row.sanity["ok"] and not measure_broken:
        unavailable[row.name] = f"data check failed: {row.sanity['problems'][0][:100]}"
        for inst in (row.iperf, row.http):
            for proc in inst.procs if inst else []:
                reg.stop(proc)


def ensure_alive(row: Row, reg: ProcessRegistry, ns: Netns, workdir: Path) -> None:
    """Restart a forwarder that died, and record that it did (a crash is a finding)."""
    assert row.fwd is not None
    for attr, port in (("iperf", IPERF_PORT), ("http", HTTP_PORT)):
        inst: Instance | None = getattr(row, attr)
        if inst is not None and not all(p.alive() for p in inst.procs):
            dead = next(p for p in inst.procs if not p.alive())
            msg = (
                f"{row.name} {attr} forwarder exited with {dead.popen.returncode}; restarted. "
                f"log: {dead.log_tail(5)!r}"
            )
            row.events.append(msg)
            log("WARNING: " + msg)
            for proc in inst.procs:
                reg.stop(proc)
            setattr(row, attr, row.fwd.start(reg, ns, port, workdir))


def measure_one(
    kind: str,
    row: Row,
    cfg: Config,
    ns: Netns,
    servers: Servers,
    reg: ProcessRegistry,
    workdir: Path,
) -> measure.Sample:
    """One sample of one measurement kind for one row."""
    direct = row.fwd is None
    prefix = ns.exec_argv([]) if direct else []
    if not direct:
        ensure_alive(row, reg, ns, workdir)
    iperf_port = IPERF_PORT if direct else row.iperf.port  # type: ignore[union-attr]
    http_port = HTTP_PORT if direct else row.http.port  # type: ignore[union-attr]
    cpu_pids = [] if direct else row.iperf.pids  # type: ignore[union-attr]
    if kind == "iperf_fwd":
        return measure.iperf(prefix, iperf_port, cfg.iperf_s, cpu_pids=cpu_pids)
    if kind == "iperf_rev":
        return measure.iperf(prefix, iperf_port, cfg.iperf_s, reverse=True, cpu_pids=cpu_pids)
    if kind == "iperf_p4":
        return measure.iperf(prefix, iperf_port, cfg.iperf_s, streams=4, cpu_pids=cpu_pids)
    if kind == "wrk_ka":
        return measure.wrk(prefix, http_port, cfg.wrk_s, 16)
    if kind == "wrk_close":
        return measure.wrk(prefix, http_port, cfg.wrk_s, 16, close=True)
    if kind == "wrk_lat":
        return measure.wrk(prefix, http_port, cfg.wrk_s, 1)
    if kind == "idle":
        return measure_idle(row, cfg, ns, servers, reg, workdir)
    raise ValueError(kind)


def measure_idle(
    row: Row, cfg: Config, ns: Netns, servers: Servers, reg: ProcessRegistry, workdir: Path
) -> measure.Sample:
    """Idle-connection memory on a fresh forwarder instance (n/a for direct).

    Fresh so that memory kept from earlier load (allocator caches) does
    not count against the forwarder, and so the baseline is a cold start.
    """
    if row.fwd is None:
        return {"skipped": "n/a for direct"}
    inst = row.fwd.start(reg, ns, IDLE_PORT, workdir)
    try:
        return measure.idle_fill(inst.port, cfg.idle_conns, inst.pids, lambda: idle_count(servers))
    finally:
        for proc in inst.procs:
            reg.stop(proc)


def describe(kind: str, sample: measure.Sample) -> str:
    """Short progress text for one sample."""
    if "error" in sample:
        return f"FAILED: {sample['error'][:120]}"
    if "skipped" in sample:
        return sample["skipped"]
    if kind.startswith("iperf"):
        cpu = f", forwarder cpu {sample['cpu_s']:.2f}s" if "cpu_s" in sample else ""
        return f"{sample['gbps']:.2f} Gbit/s{cpu}"
    if kind == "idle":
        return (
            f"{sample['accepted']} conns in {sample['fill_s']:.1f}s, "
            f"rss {sample['rss_mib']:.1f} MiB, pss {sample['pss_mib']:.1f} MiB, "
            f"{sample['nprocs']} procs"
        )
    p50, p99 = sample.get("p50_us", 0), sample.get("p99_us", 0)
    return f"{sample['rps']:.0f} req/s, p50 {p50:.0f}us p99 {p99:.0f}us"


def run_all(
    cfg: Config, rows: list[Row], ns: Netns, servers: Servers, reg: ProcessRegistry, workdir: Path
) -> report.Results:
    """For each repetition and measurement, run every row back to back.

    Rows are rotated per repetition so that no forwarder always runs
    right after the same neighbour (caches, TIME_WAIT sockets, CPU boost).
    """
    results: report.Results = {r.name: {k: [] for k in KINDS} for r in rows}
    for rep in range(cfg.runs):
        order = rows[rep % len(rows) :] + rows[: rep % len(rows)] if rows else []
        for kind in cfg.kinds:
            for row in order:
                try:
                    sample = measure_one(kind, row, cfg, ns, servers, reg, workdir)
                except BenchError as exc:  # e.g. a forwarder that no longer starts
                    sample = {"error": str(exc)[:500]}
                sample.update(rep=rep, t=time.time())
                results[row.name][kind].append(sample)
                log(f"[{rep + 1}/{cfg.runs}] {kind:<9} {row.name:<10} {describe(kind, sample)}")
    return results


@dataclass
class RunInfo:
    """Facts about the run itself that belong next to the figures."""

    started: float = field(default_factory=time.time)
    elapsed: float = 0.0
    notes: list[str] = field(default_factory=list)
    busy_start: float = 0.0  # share of all CPUs busy in the second before setup
    load_start: tuple[float, float, float] = field(default_factory=os.getloadavg)
    load_end: tuple[float, float, float] = (0.0, 0.0, 0.0)


def bench(args: argparse.Namespace) -> int:
    """Set up, measure, tear down, report.  Returns the exit code."""
    cfg = make_config(args)
    preflight()
    rows = make_rows(args.only, args.nsbridge_target, args.reference)
    info = RunInfo()
    nofile, cfg.idle_conns, cap_note = fit_idle_conns(cfg.idle_conns)
    if cap_note:
        info.notes.append(cap_note)
    info.busy_start = procstat.busy_fraction(1.0)
    if info.busy_start > BUSY_SHARE:
        info.notes.append(
            f"note: {info.busy_start:.0%} of the {os.cpu_count()} CPUs were busy before the run "
            f"started; another workload competes for the cores, so expect noisy figures"
        )
    for note in info.notes:
        log(note)
    workdir = Path(tempfile.mkdtemp(prefix="nsb-bench-"))
    ns = Netns(f"nsb-bench-{secrets.token_hex(4)}")
    reg = ProcessRegistry(workdir)
    unavailable: dict[str, str] = {}
    try:
        ns.create()
        log(f"netns {ns.name}, workdir {workdir}, RLIMIT_NOFILE {nofile}")
        servers = start_servers(reg, ns, workdir)
        for row in rows:
            if row.fwd is not None:
                setup_row(row, reg, ns, workdir, unavailable, args.measure_broken)
        active = [r for r in rows if r.name not in unavailable]
        results = run_all(cfg, active, ns, servers, reg, workdir)
    finally:
        reg.stop_all()
        ns.delete()
        if not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    info.elapsed = time.time() - info.started
    info.load_end = os.getloadavg()
    return finish(args, cfg, rows, results, unavailable, info)


def finish(
    args: argparse.Namespace,
    cfg: Config,
    rows: list[Row],
    results: report.Results,
    unavailable: dict[str, str],
    info: RunInfo,
) -> int:
    """Print the table, write the JSON and compute the exit code."""
    summary = report.summarize(results)
    names = [r.name for r in rows]
    print(
        f"nsbridge forward benchmark: {cfg.runs} run(s), iperf3 -t {cfg.iperf_s}, "
        f"wrk -d {cfg.wrk_s}s, {cfg.idle_conns} idle conns, {os.cpu_count()} CPUs, "
        f"{info.elapsed:.0f}s total; median (ratios) [min-max, n]"
    )
    for note in info.notes:
        print(note)
    print()
    print(report.render(summary, unavailable, names, cfg.idle_conns, cfg.kinds), end="")
    for row in rows:
        if row.sanity and not row.sanity["ok"]:
            print(f"DATA CHECK FAILED for {row.name}: {'; '.join(row.sanity['problems'])}")
        for note in row.sanity.get("notes", []):
            print(f"note for {row.name}: {note}")
        for event in row.events:
            print(f"EVENT {event}")
    if args.json:
        write_json(Path(args.json), cfg, rows, results, unavailable, info, summary)
        print(f"\nraw samples: {args.json}")
    return 1 if args.strict and _has_failures(rows, results, unavailable) else 0


def write_json(
    path: Path,
    cfg: Config,
    rows: list[Row],
    results: report.Results,
    unavailable: dict[str, str],
    info: RunInfo,
    summary: dict[str, Any],
) -> None:
    """Everything needed to recompute or re-judge the table later."""
    doc = {
        "config": vars(cfg),
        "run": vars(info),
        "host": {
            "kernel": platform.release(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "env": {k: v for k, v in os.environ.items() if k.startswith("NSBRIDGE_")},
        "rows": [r.name for r in rows],
        "unavailable": unavailable,
        "sanity": {r.name: r.sanity for r in rows if r.sanity},
        "events": {r.name: r.events for r in rows if r.events},
        "summary": summary,
        "samples": results,
    }
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")


def _has_failures(rows: list[Row], results: report.Results, unavailable: dict[str, str]) -> bool:
    """Anything a CI gate should flag."""
    failed: Callable[[measure.Sample], bool] = lambda s: "error" in s  # noqa: E731
    return (
        bool(unavailable)
        or any(r.sanity and not r.sanity["ok"] for r in rows)
        or any(
            failed(s) for kinds in results.values() for samples in kinds.values() for s in samples
        )
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point: errors become one clear line and exit code 2."""
    args = parse_args(argv)
    return bench_main("forward_bench", lambda: bench(args))


if __name__ == "__main__":
    sys.exit(main())
