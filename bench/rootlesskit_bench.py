#!/usr/bin/env python3
"""Side-by-side benchmark of slirp4netns-compatible helpers under rootlesskit: the real
slirp4netns vs nsbridge-slirp4netns.

rootlesskit runs as an unprivileged user (made for the run, with subordinate ids) inside
a "host" namespace that reaches an "outside" namespace (iperf3 server) through a veth,
with each helper as ``--slirp4netns-binary`` at MTU 1500 and 65520, locked down as
dockerd-rootless.sh has it (``--slirp4netns-sandbox=auto --slirp4netns-seccomp=auto``);
iperf3 runs in rootlesskit's child namespace (nsenter) towards the outside and back (-R).
Time to ready is the helper started the way rootlesskit starts it (``BIN --mtu M -r 3
PID tap0``, tap0 made beforehand) until its ready-fd byte, once plain and once with
``--enable-sandbox --enable-seccomp`` (what podman passes when ``--help`` lists them).

Run as root:  python3 bench/rootlesskit_bench.py [--quick] [--runs N] [--json OUT.json]
                  [--only ROW,ROW]
See bench/README.md ("rootlesskit_bench.py").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
# The tests' rootlesskit helpers: the user with subordinate ids, /dev/net/tun's mode and
# how ours is found and run (the checkout's entry point), one definition for both.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from nsbench.measure import Sample, run_iperf_json
from nsbench.procs import BenchError, Netns, bench_main, run_checked
from nsbench.report import spread

from helpers.rootlesskit import (
    HELPERS,
    HelperNotFound,
    RootlessUser,
    helper_binary,
    rootless_user,
    tun_open_to_users,
    user_processes,
)

ROWS = HELPERS  # slirp4netns (the reference) and nsbridge
REF = "slirp4netns"
MTUS = [1500, 65520]
HOST_V4, OUTSIDE_V4 = "198.51.100.1", "198.51.100.2"
IPERF_PORT = 5201
REQUIRED_TOOLS = ["ip", "iperf3", "nsenter", "unshare", "rootlesskit", "newuidmap", "setpriv"]


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    higher_better: bool
    fmt: str = "{:.2f}"


METRICS = [
    *(
        Metric(f"{kind}_{mtu}", f"TCP {arrow} Gbit/s, MTU {mtu} (iperf3 1 stream{rev})", True)
        for mtu in MTUS
        for kind, arrow, rev in (("out", "child->host", ""), ("in", "host->child", ", -R"))
    ),
    Metric("ready_ms", "time to ready ms (start to ready-fd byte, MTU 65520)", False, "{:.1f}"),
    Metric(
        "ready_locked_ms",
        "time to ready ms, with --enable-sandbox --enable-seccomp",
        False,
        "{:.1f}",
    ),
]
# What each time-to-ready metric adds to the helper's command line: podman and
# dockerd-rootless.sh pass the lock-down flags whenever the helper's --help lists them.
READY_FLAGS = {"ready_ms": [], "ready_locked_ms": ["--enable-sandbox", "--enable-seccomp"]}


@dataclass
class Config:
    runs: int
    tcp_s: int
    ready_count: int


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CI mode: 1 run, 1 s per measurement")
    p.add_argument("--runs", type=int, help="repetitions (default 3, quick 1)")
    p.add_argument("--json", metavar="OUT.json", help="write raw samples and the summary")
    p.add_argument("--only", metavar="ROW,ROW", help=f"rows to run: {','.join(ROWS)}")
    return p.parse_args(argv)


def make_config(args: argparse.Namespace) -> Config:
    runs = args.runs if args.runs is not None else (1 if args.quick else 3)
    if runs < 1:
        raise BenchError("--runs must be at least 1")
    return Config(runs, 1, 5) if args.quick else Config(runs, 5, 10)


# ---------------------------------------------------------------- namespaces


@contextlib.contextmanager
def host_and_outside() -> Iterator[tuple[Netns, Netns, subprocess.Popen]]:
    """The host namespace, the outside one behind a veth, and iperf3 -s outside."""
    tag = secrets.token_hex(4)
    host, outside = Netns(f"nsb-rkbench-{tag}"), Netns(f"nsb-rkout-{tag}")
    server: subprocess.Popen | None = None
    try:
        host.create()
        outside.create()
        run_checked(
            [
                "ip",
                "-n",
                host.name,
                "link",
                "add",
                "o0",
                "type",
                "veth",
                "peer",
                "name",
                "o1",
                "netns",
                outside.name,
            ]
        )
        for ns, dev, address in ((host, "o0", HOST_V4), (outside, "o1", OUTSIDE_V4)):
            run_checked(["ip", "-n", ns.name, "addr", "add", f"{address}/24", "dev", dev])
            run_checked(["ip", "-n", ns.name, "link", "set", dev, "up"])
        server = subprocess.Popen(
            outside.exec_argv(["iperf3", "-s", "-p", str(IPERF_PORT)]),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while f":{IPERF_PORT}" not in run_checked(outside.exec_argv(["ss", "-Hltn"])):
            if time.monotonic() > deadline:
                raise BenchError("iperf3 -s did not start in the outside namespace")
            time.sleep(0.05)
        yield host, outside, server
    finally:
        if server is not None:
            server.kill()
            server.wait(timeout=10)
        outside.delete()
        host.delete()


def _as_user(user: RootlessUser, host: Netns, argv: list[str]) -> list[str]:
    return host.exec_argv(user.argv(*argv))


# ---------------------------------------------------------------- measurements


def _child_pid(state: Path, proc: subprocess.Popen, timeout: float = 20) -> int:
    """rootlesskit's child (whose namespaces iperf3 enters), once it has a default route
    (the helper is ready and rootlesskit configured tap0)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else ""
            raise BenchError(f"rootlesskit exited ({proc.returncode}): {err.strip()[-300:]}")
        with contextlib.suppress(OSError, ValueError):
            pid = int((state / "child_pid").read_text())
            route = subprocess.run(
                [
                    "nsenter",
                    "-t",
                    str(pid),
                    "-U",
                    "-n",
                    "--preserve-credentials",
                    "ip",
                    "-4",
                    "route",
                    "show",
                    "default",
                ],
                capture_output=True,
                text=True,
            ).stdout
            if route.strip():
                return pid
        time.sleep(0.05)
    raise BenchError("rootlesskit's child never got a default route")


def throughput(
    user: RootlessUser, host: Netns, binary: str, mtu: int, cfg: Config
) -> dict[str, Sample]:
    """iperf3 child->outside and back through one rootlesskit with helper ``binary``."""
    state = user.tmpdir / f"state-{secrets.token_hex(4)}"
    state.mkdir()
    os.chown(state, user.uid, user.gid)
    proc = subprocess.Popen(
        _as_user(
            user,
            host,
            [
                "rootlesskit",
                "--net=slirp4netns",
                f"--slirp4netns-binary={binary}",
                "--copy-up=/etc",
                "--disable-host-loopback",
                # dockerd-rootless.sh's defaults: lock the helper down when it can.
                "--slirp4netns-sandbox=auto",
                "--slirp4netns-seccomp=auto",
                f"--mtu={mtu}",
                f"--state-dir={state}",
                "sleep",
                "86399",
            ],
        ),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    out: dict[str, Sample] = {}
    try:
        child = _child_pid(state, proc)
        prefix = ["nsenter", "-t", str(child), "-U", "-n", "--preserve-credentials"]
        for kind, extra in (("out", []), ("in", ["-R"])):
            argv = [
                *prefix,
                "iperf3",
                "-c",
                OUTSIDE_V4,
                "-p",
                str(IPERF_PORT),
                "-t",
                str(cfg.tcp_s),
                "-J",
                "--connect-timeout",
                "5000",
                *extra,
            ]
            sample, data, _cpu = run_iperf_json(argv, cfg.tcp_s + 30)
            if data is not None:
                recv = data["end"]["sum_received"]
                sample["gbps"] = recv["bits_per_second"] / 1e9
                sample["bytes"] = recv["bytes"]
            out[f"{kind}_{mtu}"] = sample
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        shutil.rmtree(state, ignore_errors=True)
    return out


def time_to_ready(
    user: RootlessUser, host: Netns, binary: str, flags: list[str] | None = None
) -> Sample:
    """The helper started as rootlesskit starts it (plus ``flags``), timed to its
    ready-fd byte."""
    holder = subprocess.Popen(
        _as_user(
            user,
            host,
            [
                "unshare",
                "-Urn",
                "sh",
                "-c",
                "ip tuntap add name tap0 mode tap && ip link set tap0 up && "
                "echo ok && exec sleep 86399",
            ],
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    helper: subprocess.Popen | None = None
    read_end, write_end = os.pipe()
    try:
        if holder.stdout is None or holder.stdout.readline().strip() != "ok":
            err = holder.stderr.read() if holder.stderr else ""
            raise BenchError(f"could not make tap0: {err.strip()}")
        target = holder.pid
        # ip netns exec, setpriv, env and unshare exec one another: holder.pid is the
        # process in the namespace (the shell, then sleep).
        started = time.perf_counter()
        helper = subprocess.Popen(
            _as_user(
                user,
                host,
                [
                    binary,
                    "--mtu",
                    "65520",
                    "-r",
                    "3",
                    "--disable-host-loopback",
                    *(flags or []),
                    str(target),
                    "tap0",
                ],
            ),
            # As rootlesskit's ExtraFiles: the pipe's write end is the helper's fd 3 (dup2
            # clears close-on-exec there; every other fd of ours is close-on-exec).
            close_fds=False,
            preexec_fn=lambda: os.dup2(write_end, 3),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        os.close(write_end)
        write_end = -1
        ready, _, _ = select.select([read_end], [], [], 20)
        elapsed = time.perf_counter() - started
        byte = os.read(read_end, 1) if ready else b""
        if byte != b"1":
            err = helper.stderr.read() if helper.stderr and helper.poll() is not None else ""
            return {"error": f"no ready byte ({byte!r}) {str(err).strip()[-200:]}"}
        return {"ms": elapsed * 1000}
    finally:
        for proc in (helper, holder):
            if proc is not None:
                proc.kill()
                proc.wait(timeout=10)
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


# ---------------------------------------------------------------- summary and table


def summarize(results: dict[str, list[dict[str, Sample]]]) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    for m in METRICS:
        per: dict[str, Any] = {}
        for row, reps in results.items():
            field = "ms" if m.key in READY_FLAGS else "gbps"
            key = m.key
            vals = [s[field] for rep in reps for s in rep.get(key, []) if field in s]
            errors = [s["error"] for rep in reps for s in rep.get(key, []) if "error" in s]
            per[row] = spread(vals, errors)
        summary[m.key] = per
    return summary


def render(summary: dict[str, dict[str, Any]], rows: list[str], unavailable: dict[str, str]) -> str:
    lines: list[str] = []
    width = max(len(r) for r in rows)
    for m in METRICS:
        lines.append(f"{m.label}  ({'higher' if m.higher_better else 'lower'} is better)")
        for row in rows:
            st = summary[m.key].get(row)
            if row in unavailable:
                cell = unavailable[row]
            elif not st or st["median"] is None:
                cell = f"failed: {st['errors'][0][:90]}" if st and st["errors"] else "no data"
            else:
                ref = summary[m.key].get(REF, {}).get("median")
                ratio = f" ({st['median'] / ref:.2f}x {REF})" if ref and row != REF else ""
                text = m.fmt.format(st["median"]) + ratio
                cell = (
                    f"{text:<30} [{m.fmt.format(st['min'])}-{m.fmt.format(st['max'])}, n={st['n']}]"
                )
                if st["errors"]:
                    cell += f"  {len(st['errors'])} failed: {st['errors'][0][:50]}"
            lines.append(f"  {row:<{width}}  {cell}")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def bench(args: argparse.Namespace) -> int:
    cfg = make_config(args)
    rows = list(ROWS)
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        bad = set(wanted) - set(ROWS)
        if bad:
            raise BenchError(f"--only: unknown {', '.join(sorted(bad))}; known {','.join(ROWS)}")
        rows = [r for r in ROWS if r in wanted]
    if os.geteuid() != 0:
        raise BenchError("must run as root (creates network namespaces and a user)")
    missing = [t for t in REQUIRED_TOOLS if not shutil.which(t)]
    if missing:
        raise BenchError(
            f"missing tools: {', '.join(missing)} (apt-get install rootlesskit "
            "uidmap iperf3 iproute2 util-linux)"
        )
    started = time.time()
    unavailable: dict[str, str] = {}
    results: dict[str, list[dict[str, Sample]]] = {r: [] for r in rows}
    with tun_open_to_users(), rootless_user() as user, host_and_outside() as (host, _o, _s):
        binaries: dict[str, str] = {}
        for row in rows:
            try:
                binaries[row] = helper_binary(row, user)
            except HelperNotFound as exc:
                # The first clause ("nsbridge-slirp4netns not found"); the why is logged.
                unavailable[row] = f"unavailable ({str(exc).split(':')[0]})"
                log(f"{row}: {exc}")
        try:
            for rep in range(cfg.runs):
                active = [r for r in rows if r not in unavailable]
                k = rep % max(len(active), 1)
                for row in active[k:] + active[:k]:
                    one: dict[str, Any] = {key: [] for key in READY_FLAGS}
                    for mtu in MTUS:
                        for key, sample in throughput(user, host, binaries[row], mtu, cfg).items():
                            one[key] = [sample]
                            log(
                                f"run {rep + 1} {row} {key}: "
                                f"{sample.get('gbps', sample.get('error'))}"
                            )
                    results[row].append(one)
                # Time to ready, the helpers and the flag sets interleaved sample by sample.
                for _ in range(cfg.ready_count):
                    for key, flags in READY_FLAGS.items():
                        for row in active:
                            results[row][-1][key].append(
                                time_to_ready(user, host, binaries[row], flags)
                            )
        finally:
            for pid in user_processes(user.uid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    summary = summarize(results)
    print(
        f"rootlesskit_bench: {cfg.runs} run(s), iperf3 -t {cfg.tcp_s}, "
        f"{cfg.ready_count} ready samples per run; medians [min-max, n]; ratios vs {REF}\n"
    )
    print(render(summary, rows, unavailable))
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "config": cfg.__dict__,
                    "rows": rows,
                    "unavailable": unavailable,
                    "run": {"started": started, "elapsed": time.time() - started},
                    "summary": summary,
                    "samples": results,
                },
                indent=1,
                default=str,
            )
        )
    log(f"done in {time.time() - started:.0f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: errors become one clear line and exit code 2."""
    args = parse_args(argv)
    return bench_main("rootlesskit_bench", lambda: bench(args))


if __name__ == "__main__":
    sys.exit(main())
