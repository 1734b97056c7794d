"""Start, watch and stop the background processes of a benchmark run.

Why a registry: every server and forwarder must be stopped in `finally`,
also after Ctrl-C, and only processes this harness started may be
signalled, always by PID.  Each started process is remembered together
with its start time so that a recycled PID is never hit by mistake.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from . import procstat

CLONE_NEWNET = 0x40000000
NOFILE_WANTED = 65536


class BenchError(RuntimeError):
    """A setup step failed; the message says which and why."""


def raise_nofile(wanted: int = NOFILE_WANTED) -> tuple[int, int]:
    """Raise RLIMIT_NOFILE (soft and, as root, hard) for us and our children.

    10,000 idle connections need 10,000 fds in the client and 20,000 in
    the forwarder, which is above the box's default hard limit of 20000.
    Raising the hard limit needs CAP_SYS_RESOURCE, which a container may
    lack even for root; the (soft, hard) limits in force are returned so
    the caller can size the idle test to what a process can hold.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
    except OSError:
        nr_open = wanted
    target = min(wanted, nr_open)
    if hard != resource.RLIM_INFINITY and hard < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
            return target, target
        except (ValueError, OSError):
            target = hard
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft, hard


def _start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat: identifies a process beyond its PID."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text(errors="replace")
    except OSError:
        return None
    return int(raw[raw.rindex(")") + 2 :].split()[19])


@dataclass
class Managed:
    """One started process, its log file and its identity."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    start_time: int | None = field(default=None)

    @property
    def pid(self) -> int:
        """PID of the started process (ip netns exec execs, so it is the server)."""
        return self.popen.pid

    def alive(self) -> bool:
        """True while the process has not exited."""
        return self.popen.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        """Last lines of the process output, for error messages."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class ProcessRegistry:
    """Owns every background process of the run and stops them all."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: list[Managed] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        cwd: str | None = None,
        env: dict[str, str] | None = None,
    ) -> Managed:
        """Start argv with output to a log file, in its own session.

        Own session: a Ctrl-C in the terminal reaches only the harness,
        which then stops the children in order instead of racing them.
        """
        log = self.logdir / f"{name}.{len(self.procs)}.log"
        with open(log, "wb") as out:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env,
                start_new_session=True,
            )
        managed = Managed(name, popen, log, _start_time(popen.pid))
        self.procs.append(managed)
        return managed

    def stop(self, managed: Managed, timeout: float = 5.0) -> None:
        """SIGTERM the process, then SIGKILL it and any descendants left over.

        Descendants (socat's forks, a forwarder's workers) are recorded
        before the signal so that orphans re-parented to init are still
        found; each is checked by start time before it is killed.
        """
        if managed not in self.procs:
            return
        self.procs.remove(managed)
        family = [(p.pid, _start_time(p.pid)) for p in procstat.tree([managed.pid])]
        if managed.alive():
            with contextlib.suppress(ProcessLookupError):
                managed.popen.terminate()
            try:
                managed.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                managed.popen.kill()
                managed.popen.wait(timeout)
        for pid, started in family:
            if pid != managed.pid and started is not None and _start_time(pid) == started:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def stop_all(self) -> None:
        """Stop everything, newest first (forwarders before the servers they use)."""
        for managed in reversed(list(self.procs)):
            try:
                self.stop(managed)
            except Exception as exc:
                print(f"warning: could not stop {managed.name} (pid {managed.pid}): {exc}")


def _libc_setns(netns_path: str) -> None:
    """Move the calling thread into a network namespace."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({netns_path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def _try_connect(port: int) -> bool:
    """One connect attempt to 127.0.0.1:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        try:
            s.connect(("127.0.0.1", port))
            return True
        except OSError:
            return False


def try_connect(port: int, netns_path: str | None = None) -> bool:
    """Probe a port on 127.0.0.1 of the caller's namespace or of netns_path.

    The namespace case runs in a throw-away thread that setns()es itself,
    because setns affects only the calling thread and Python 3.11 has no
    os.setns; the main thread never leaves the caller's namespace.
    """
    if netns_path is None:
        return _try_connect(port)
    result: list[bool] = []

    def probe() -> None:
        _libc_setns(netns_path)
        result.append(_try_connect(port))

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(5)
    return bool(result and result[0])


def wait_port(
    port: int,
    what: str,
    proc: Managed | None = None,
    netns_path: str | None = None,
    timeout: float = 15.0,
) -> None:
    """Poll with connect until something listens, or fail with a clear message."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if try_connect(port, netns_path):
            return
        if proc is not None and not proc.alive():
            raise BenchError(
                f"{what} exited with code {proc.popen.returncode} before "
                f"listening on 127.0.0.1:{port}:\n{proc.log_tail()}"
            )
        time.sleep(0.05)
    where = f" in netns {netns_path}" if netns_path else ""
    tail = f":\n{proc.log_tail()}" if proc is not None else ""
    raise BenchError(
        f"{what} did not listen on 127.0.0.1:{port}{where} within {timeout:.0f}s{tail}"
    )


def free_port() -> int:
    """A currently free TCP port on the caller's loopback (kernel-chosen)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Netns:
    """A uniquely named network namespace with loopback up; deleted on close."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.path = f"/run/netns/{name}"
        self.created = False

    def create(self) -> None:
        """ip netns add NAME; ip -n NAME link set lo up."""
        run_checked(["ip", "netns", "add", self.name])
        self.created = True
        run_checked(["ip", "-n", self.name, "link", "set", "lo", "up"])

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        """Prefix a command so it runs inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def delete(self) -> None:
        """Remove the namespace (idempotent)."""
        if self.created:
            subprocess.run(
                ["ip", "netns", "del", self.name],
                check=False,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            self.created = False


def run_checked(argv: Sequence[str], timeout: float = 30.0) -> str:
    """Run a short command; raise BenchError with its output if it fails."""
    try:
        res = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BenchError(f"{' '.join(argv)}: {exc}") from exc
    if res.returncode != 0:
        raise BenchError(f"{' '.join(argv)} failed ({res.returncode}): {res.stderr.strip()}")
    return res.stdout


def _raise_interrupt(signum: int, _frame: object) -> NoReturn:
    """Turn SIGTERM/SIGHUP into KeyboardInterrupt so `finally` tears down.

    Handlers are restored to the default first, so a second signal during
    teardown is not swallowed.
    """
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise KeyboardInterrupt(f"signal {signum}")


def bench_main(name: str, bench: Callable[[], int]) -> int:
    """A benchmark's entry point: errors become one clear line and exit code 2, an
    interrupt (Ctrl-C, SIGTERM, SIGHUP) tears everything down and exits 130."""
    # SIGINT explicitly too: a shell starts background jobs with SIGINT
    # ignored, and Python then never raises KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)
    try:
        return bench()
    except BenchError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted; namespace and processes cleaned up", file=sys.stderr)
        return 130
