"""nsbridge as a process: the command line that runs the checkout's package, a running
forwarder with its log, and what the tests read about processes from /proc."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from helpers.environment import REPO


@dataclass
class Forwarder:
    """A running ``nsbridge forward`` (or ``netns-tcp-bridge``) process."""

    proc: subprocess.Popen
    log_path: Path
    port: int | None = None
    extra: dict = field(default_factory=dict)

    def log(self) -> str:
        return self.log_path.read_text()

    def wait(self, timeout: float = 20) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(timeout=timeout)


def nsbridge_command(*args: str, compat: bool = False) -> list[str]:
    """Run the checkout's package (works without installing)."""
    module = "nsbridge.cli.compat" if compat else "nsbridge"
    return [sys.executable, "-m", module, *args]


def run_nsbridge(*args: str, timeout: float = 30, **kwargs) -> subprocess.CompletedProcess:
    """Run nsbridge to completion (for commands expected to fail fast)."""
    return subprocess.run(nsbridge_command(*args), capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, **kwargs)



def start_forwarder(log_path: Path, *args: str, compat: bool = False, wait_ready: bool = True,
                    pass_fds: tuple[int, ...] = (), prefix: tuple[str, ...] = ()) -> Forwarder:
    """Start nsbridge in the background, logging to ``log_path``; returns once it listens
    (or has exited).  With ``-l ...:0`` the chosen port is parsed from the -v log and set
    as ``.port``.  The caller kills it (the ``forwarder`` fixture does)."""
    argv = [*prefix, *nsbridge_command(*args, compat=compat)]
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT,
                                cwd=REPO, pass_fds=pass_fds)
    fwd = Forwarder(proc, log_path)
    if wait_ready:
        try:
            _wait_listening(fwd)
        except BaseException:
            fwd.proc.kill()
            fwd.proc.wait(timeout=10)
            raise
    return fwd


_LISTEN_RE = re.compile(r"forwarding (\S+?):(\d+) ")


def _wait_listening(fwd: Forwarder, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = fwd.log()
        match = _LISTEN_RE.search(text)
        if match:
            fwd.port = int(match.group(2))
            return
        if fwd.proc.poll() is not None:
            raise AssertionError(f"nsbridge exited with {fwd.proc.returncode}:\n{text}")
        time.sleep(0.02)
    raise AssertionError(f"nsbridge did not start listening:\n{fwd.log()}")



_FORWARDING_RE = re.compile(r"forwarding (\S+) \(netns")


def wait_forwarding(fwd: Forwarder, count: int = 1, timeout: float = 15) -> list[str]:
    """Wait for ``count`` ``forwarding ADDR (netns …)`` lines (-v) and return the ADDRs.

    The supervisor logs that line once a listener is bound, for every kind of endpoint
    (the ``forwarder`` fixture's own wait only understands HOST:PORT listeners).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = fwd.log()
        found = _FORWARDING_RE.findall(text)
        if len(found) >= count:
            return found
        if fwd.proc.poll() is not None:
            raise AssertionError(f"nsbridge exited with {fwd.proc.returncode}:\n{text}")
        time.sleep(0.02)
    raise AssertionError(f"nsbridge did not log {count} forwards:\n{fwd.log()}")


def host_port(text: str) -> tuple[str, int]:
    """``127.0.0.1:80`` / ``[::1]:80`` (as nsbridge logs them) to a sockaddr tuple."""
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)



def processes_mentioning(word: str) -> set[int]:
    """PIDs whose command line contains ``word`` (a marker only one run uses)."""
    found = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if word.encode() in f.read():
                        found.add(int(pid))
            except OSError:
                pass
    return found


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (nsbridge's supervisor and its workers)."""
    pids = [pid]
    for current in pids:
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except FileNotFoundError:  # exited since its parent listed it (a killed worker)
            continue
        for task in tasks:
            try:
                with open(f"/proc/{current}/task/{task}/children") as f:
                    pids.extend(int(x) for x in f.read().split())
            except OSError:
                pass
    return pids


def open_fds(pid: int) -> int:
    """Open fds summed over the process tree of ``pid``."""
    return sum(len(os.listdir(f"/proc/{p}/fd")) for p in process_tree(pid))

