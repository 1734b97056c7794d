"""Read CPU time and memory of a process tree from /proc.

Why /proc and not psutil: the harness must run on a bare CI box with only
the standard library, and the few fields we need are trivial to parse.
A forwarder may be several processes (socat forks one child per
connection on each side, netns_tcp_bridge forks a listener and a
connector, nsbridge may run workers), so every figure is summed over the
whole tree below the PIDs we started.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass

CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcStat:
    """The few /proc/PID/stat fields the harness needs."""

    pid: int
    ppid: int
    cpu_ticks: int  # utime + stime + cutime + cstime


def read_stat(pid: int) -> ProcStat | None:
    """Parse /proc/PID/stat; None if the process is gone.

    cutime/cstime are included so that CPU of children that already
    exited and were reaped (socat's per-connection forks) still counts.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("ascii", "replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'.
    rest = raw[raw.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state); field N is rest[N - 3].
    ppid = int(rest[1])
    utime, stime, cutime, cstime = (int(x) for x in rest[11:15])
    return ProcStat(pid, ppid, utime + stime + cutime + cstime)


def all_stats() -> dict[int, ProcStat]:
    """Snapshot every process on the box (needed to find descendants)."""
    stats: dict[int, ProcStat] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = read_stat(int(name))
            if st is not None:
                stats[st.pid] = st
    return stats


def tree(roots: Iterable[int], stats: dict[int, ProcStat] | None = None) -> list[ProcStat]:
    """Return the roots and all their live descendants."""
    stats = all_stats() if stats is None else stats
    children: dict[int, list[int]] = {}
    for st in stats.values():
        children.setdefault(st.ppid, []).append(st.pid)
    out: list[ProcStat] = []
    todo = [pid for pid in roots if pid in stats]
    seen: set[int] = set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        out.append(stats[pid])
        todo.extend(children.get(pid, []))
    return out


def cpu_seconds(roots: Iterable[int], *, descendants: bool = True) -> float:
    """User+system CPU seconds consumed so far by the tree (incl. reaped children), or
    by the roots alone: ``nsbridge run --bypass``'s command is its descendant, and
    under it the measured program itself runs below nsbridge."""
    if descendants:
        return sum(st.cpu_ticks for st in tree(roots)) / CLK_TCK
    own = (read_stat(pid) for pid in roots)
    return sum(st.cpu_ticks for st in own if st is not None) / CLK_TCK


def machine_cpu_seconds() -> float:
    """Busy CPU seconds of the whole machine so far (all CPUs, /proc/stat): what a
    transfer costs in total, whoever pays it (the kernel in the programs' own system
    calls, a relay, softirqs)."""
    return _cpu_jiffies()[0] / CLK_TCK


def _status_kib(pid: int, field: str, path: str = "status") -> int:
    """Read one 'Field:   N kB' line; 0 if the process vanished."""
    try:
        with open(f"/proc/{pid}/{path}") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


@dataclass(frozen=True)
class MemSample:
    """Memory of a process tree; RSS double-counts shared pages, PSS does not."""

    nprocs: int
    rss_mib: float
    pss_mib: float


def memory(roots: Iterable[int]) -> MemSample:
    """Sum VmRSS (what the brief asks for) and PSS (fair for forking forwarders).

    With socat's fork-per-connection model the RSS sum counts libc and the
    socat binary once per child, so PSS is recorded next to it.
    """
    procs = tree(roots)
    rss = sum(_status_kib(p.pid, "VmRSS") for p in procs)
    pss = sum(_status_kib(p.pid, "Pss", "smaps_rollup") for p in procs)
    return MemSample(len(procs), rss / 1024, pss / 1024)


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from the first line of /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already inside user/nice
    return total - idle, total


def busy_fraction(seconds: float = 1.0) -> float:
    """Share of all CPUs busy over a short window, before the harness does anything.

    Load average is useless for this: it decays over minutes, and a
    previous run with 20,000 socat processes keeps it in the hundreds.
    """
    busy0, total0 = _cpu_jiffies()
    time.sleep(seconds)
    busy1, total1 = _cpu_jiffies()
    return (busy1 - busy0) / max(total1 - total0, 1)
