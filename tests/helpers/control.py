"""``nsbridge ctl`` as a user types it, and the daemon's counters read through it."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

from helpers.processes import run_nsbridge
from helpers.waiting import wait_until


def ctl(control: str | Path, *args: str) -> subprocess.CompletedProcess:
    """``nsbridge ctl --control PATH ARGS...`` as a user would type it."""
    return run_nsbridge("ctl", "--control", str(control), *args)


def ctl_json(control: str | Path, *args: str) -> dict:
    """``nsbridge ctl ... ARGS --json``, parsed (asserting it succeeded)."""
    result = ctl(control, *args, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def stats_by_name(control: str | Path) -> dict[str, dict]:
    """The daemon's counters per forward name, via ``nsbridge ctl stats --json``."""
    return {row["name"]: row for row in ctl_json(control, "stats")["stats"]}


def wait_stats(control: str | Path, condition: Callable[[dict[str, dict]], bool],
               what: str, timeout: float = 10) -> dict[str, dict]:
    """Poll ``ctl stats`` until ``condition`` holds: workers report every 0.5 s."""
    box: dict[str, dict[str, dict]] = {}

    def check() -> bool:
        box["stats"] = stats_by_name(control)
        return condition(box["stats"])

    try:
        wait_until(check, timeout=timeout, what=what)
    except AssertionError:
        raise AssertionError(f"timed out waiting for {what}: {box.get('stats')}") from None
    return box["stats"]
