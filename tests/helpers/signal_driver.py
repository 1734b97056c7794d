"""Drives ``api.run(bypass=True)`` for the signal tests (test_switching_signals.py), run
in the switching world's host namespace: prints one JSON object.

``interrupt IP PORT RESTART AFTER``: the probe's ``interrupted`` case; what it saw and
the switcher's counters.  ``kill IP PORT LINGER``: the probe's ``blocked`` case under a
shell that stays ``LINGER`` seconds after it; the probe is sent SIGKILL while its
connect waits: how long it took to die, and the counters once the shell is done.
``NSBRIDGE_BYPASS_WAIT_KILLABLE=0`` in the environment turns the filter flag off.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from nsbridge.usernet import api

PROBE = str(Path(__file__).with_name("switch_probe_tcp.py"))


def interrupt(ip: str, port: str, restart: str, after: str) -> dict:
    read_end, write_end = os.pipe()
    with api.run([sys.executable, PROBE, "interrupted", ip, port, restart, after],
                 bypass=True, dns=[(ip, 53)], stdout=write_end) as proc:
        os.close(write_end)
        with os.fdopen(read_end) as output:
            seen = output.read()
        proc.wait(timeout=60)
        stats = proc.stats()
    return {"probe": json.loads(seen.strip().splitlines()[-1]), "bypass": stats["bypass"]}


def kill(ip: str, port: str, linger: str) -> dict:
    read_end, write_end = os.pipe()
    script = f"{sys.executable} {PROBE} blocked {ip} {port}; sleep {linger}"
    with api.run(["sh", "-c", script], bypass=True, dns=[(ip, 53)],
                 stdout=write_end) as proc:
        os.close(write_end)
        with os.fdopen(read_end) as output:
            line = output.readline().split()
            assert line[0] == "blocking", line
            pid = int(line[1])
            time.sleep(0.5)  # received by the switcher, waiting for its answer
            started = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            while _alive(pid) and time.monotonic() - started < 20:
                time.sleep(0.01)
            died_after = time.monotonic() - started
            output.read()
        proc.wait(timeout=60)
        stats = proc.stats()
    return {"died_after": round(died_after, 2), "bypass": stats["bypass"]}


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie has ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


if __name__ == "__main__":
    print(json.dumps({"interrupt": interrupt, "kill": kill}[sys.argv[1]](*sys.argv[2:])),
          flush=True)
