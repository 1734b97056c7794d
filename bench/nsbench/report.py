"""Turn raw samples into medians, spreads, ratios and a printed table.

Why medians with min-max: loopback benchmarks on a 2-core box are noisy
(one background task steals a core), so the median of a few interleaved
repetitions is the robust figure and the spread shows how much to trust
it.  Ratios are against `socat` (what users replace) and `direct` (the
physical limit, no forwarder at all).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .measure import GIB8, Sample

Results = dict[str, dict[str, list[Sample]]]  # row -> measurement kind -> samples


@dataclass(frozen=True)
class Metric:
    """One figure of the table: which measurement it comes from and how."""

    key: str
    label: str
    higher_better: bool
    kind: str  # measurement kind whose samples feed it (and whose errors it shows)
    field: str  # sample field; "" for derived metrics (see VALUE_FUNCS)
    fmt: str = "{:.2f}"
    direct: bool = True  # False: not meaningful without a forwarder

    def values(self, row: dict[str, list[Sample]]) -> list[float]:
        """One value per error-free sample (or per repetition for derived metrics)."""
        if self.key in VALUE_FUNCS:
            return VALUE_FUNCS[self.key](row)
        samples = row.get(self.kind, [])
        return [
            s[self.field] for s in samples if "error" not in s and s.get(self.field) is not None
        ]


def _cpu_per_8gib(row: dict[str, list[Sample]]) -> list[float]:
    """Forwarder CPU s per 8 GiB over both single-stream runs of each repetition."""
    out = []
    fwd, rev = row.get("iperf_fwd", []), row.get("iperf_rev", [])
    for a, b in zip(fwd, rev, strict=False):
        good = [
            s for s in (a, b) if "error" not in s and s.get("cpu_s") is not None and s.get("bytes")
        ]
        if good:
            out.append(sum(s["cpu_s"] for s in good) / sum(s["bytes"] for s in good) * GIB8)
    return out


VALUE_FUNCS: dict[str, Callable[[dict[str, list[Sample]]], list[float]]] = {
    "cpu": _cpu_per_8gib,
}

METRICS: list[Metric] = [
    Metric("iperf_fwd", "iperf3 1 stream c->s Gbit/s", True, "iperf_fwd", "gbps"),
    Metric("iperf_rev", "iperf3 1 stream s->c (-R) Gbit/s", True, "iperf_rev", "gbps"),
    Metric("iperf_p4", "iperf3 4 streams (-P 4) Gbit/s", True, "iperf_p4", "gbps"),
    Metric(
        "cpu",
        "forwarder CPU s per 8 GiB (1 stream, both directions)",
        False,
        "iperf_fwd",
        "",
        direct=False,
    ),
    Metric("wrk_ka", "wrk keep-alive req/s (c16)", True, "wrk_ka", "rps", "{:.0f}"),
    Metric("wrk_close", "wrk Connection: close req/s (c16)", True, "wrk_close", "rps", "{:.0f}"),
    Metric("lat_p50", "latency p50 us (wrk c1)", False, "wrk_lat", "p50_us", "{:.0f}"),
    Metric("lat_p99", "latency p99 us (wrk c1)", False, "wrk_lat", "p99_us", "{:.0f}"),
    Metric(
        "rss", "RSS MiB with N idle conns (VmRSS sum)", False, "idle", "rss_mib", "{:.1f}", False
    ),
    Metric("pss", "PSS MiB with N idle conns", False, "idle", "pss_mib", "{:.1f}", False),
    Metric(
        "kib_conn",
        "PSS growth KiB per idle conn",
        False,
        "idle",
        "pss_kib_per_conn",
        "{:.1f}",
        False,
    ),
]


def spread(vals: list[float], errors: list[str]) -> dict[str, Any]:
    """One row's figures for one metric: the samples, their median and range, the errors
    (the shape every benchmark's JSON summary uses)."""
    return {
        "values": vals,
        "n": len(vals),
        "errors": errors,
        "median": statistics.median(vals) if vals else None,
        "min": min(vals) if vals else None,
        "max": max(vals) if vals else None,
    }


def summarize(results: Results) -> dict[str, dict[str, dict[str, Any]]]:
    """metric -> row -> {median, min, max, n, values, errors}."""
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for metric in METRICS:
        per_row: dict[str, dict[str, Any]] = {}
        for row, kinds in results.items():
            vals = metric.values(kinds)
            samples = kinds.get(metric.kind, [])
            errors = [s["error"] for s in samples if "error" in s]
            per_row[row] = spread(vals, errors)
        summary[metric.key] = per_row
    return summary


def _ratio(value: float | None, ref: dict[str, Any] | None, name: str) -> str | None:
    """'1.62x socat' or None if either side is missing."""
    if value is None or ref is None or not ref.get("median"):
        return None
    ratio = value / ref["median"]
    digits = 0 if ratio >= 100 else 1 if ratio >= 10 else 2 if ratio >= 0.1 else 3
    return f"{ratio:.{digits}f}x {name}"


def render(
    summary: dict[str, dict[str, dict[str, Any]]],
    unavailable: dict[str, str],
    rows: list[str],
    idle_conns: int,
    kinds: list[str],
) -> str:
    """The human table: one block per metric, one line per forwarder row."""
    lines: list[str] = []
    width = max([len(r) for r in rows] + [8])
    for metric in METRICS:
        if metric.kind not in kinds:
            continue
        label = metric.label.replace("N idle", f"{idle_conns} idle")
        arrow = "higher is better" if metric.higher_better else "lower is better"
        lines.append(f"{label}  ({arrow})")
        per_row = summary[metric.key]
        for row in rows:
            lines.append(f"  {row:<{width}}  {_cell(metric, row, per_row, unavailable)}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _cell(
    metric: Metric, row: str, per_row: dict[str, dict[str, Any]], unavailable: dict[str, str]
) -> str:
    """Median (ratios)  [min-max, n=...] or the reason there is no figure."""
    if row in unavailable:
        return unavailable[row]
    if row == "direct" and not metric.direct:
        return "n/a"
    stats = per_row.get(row)
    if not stats or stats["median"] is None:
        errs = stats["errors"] if stats else []
        return f"failed: {errs[0]}" if errs else "no data"
    med = stats["median"]
    ratios = [
        r
        for r in (
            _ratio(med, per_row.get("socat"), "socat") if row != "socat" else None,
            _ratio(med, per_row.get("direct"), "direct") if row != "direct" else None,
        )
        if r
    ]
    text = metric.fmt.format(med)
    if ratios:
        text += f" ({', '.join(ratios)})"
    spread = (
        f"[{metric.fmt.format(stats['min'])}-{metric.fmt.format(stats['max'])}, n={stats['n']}]"
    )
    text = f"{text:<40} {spread}"
    if stats["errors"]:
        text += f"  {len(stats['errors'])} failed: {stats['errors'][0][:60]}"
    return text
