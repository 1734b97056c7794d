"""Forwarder rows: how to start each forwarder for one upstream server.

Every forwarder listens on 127.0.0.1:PORT in the caller's namespace and
connects to 127.0.0.1:SERVERPORT inside namespace B.  A row may consist
of several processes (socat needs one per namespace); CPU and memory are
summed over all of them and their children.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .procs import BenchError, Managed, Netns, ProcessRegistry, free_port, wait_port

REPO_ROOT = Path(__file__).resolve().parents[2]
SOCAT_BUF = "1048576"


@dataclass
class Instance:
    """One running forwarder for one upstream: its listen port and processes."""

    row: str
    port: int
    procs: list[Managed] = field(default_factory=list)

    @property
    def pids(self) -> list[int]:
        """Root PIDs whose process trees make up the forwarder."""
        return [p.pid for p in self.procs]


class Forwarder:
    """Base class: a named row that can start instances or say why it cannot."""

    name = "forwarder"

    def unavailable_reason(self) -> str | None:
        """None if the row can run, else a short reason printed in the table."""
        return None

    def start(self, reg: ProcessRegistry, ns: Netns, upstream_port: int, workdir: Path) -> Instance:
        """Start a forwarder 127.0.0.1:<free port> -> B:127.0.0.1:upstream_port."""
        raise NotImplementedError


def _start_single(
    reg: ProcessRegistry,
    name: str,
    argv: list[str],
    cwd: str | None = None,
    env: dict[str, str] | None = None,
) -> Instance:
    """Start a one-command forwarder and wait until its listen port accepts."""
    # argv is built by the caller with a placeholder; the port is chosen here.
    port = free_port()
    real = [a.replace("{PORT}", str(port)) for a in argv]
    proc = reg.start(name, real, cwd=cwd, env=env)
    inst = Instance(name, port, [proc])
    try:
        wait_port(port, f"{name} ({shlex.join(real)})", proc)
    except BenchError:
        reg.stop(proc)
        raise
    return inst


class Nsbridge(Forwarder):
    """`python3 -m nsbridge forward`, run from the repo root without installing."""

    name = "nsbridge"

    def __init__(self, target_flag: str = "connect-netns") -> None:
        self.target_flag = target_flag
        self.extra = shlex.split(os.environ.get("NSBRIDGE_ARGS", ""))

    def unavailable_reason(self) -> str | None:
        """Probe `python3 -m nsbridge forward --help`; the CLI may not exist yet."""
        try:
            res = subprocess.run(
                [sys.executable, "-m", "nsbridge", "forward", "--help"],
                cwd=REPO_ROOT,
                capture_output=True,
                text=True,
                timeout=20,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"unavailable ({exc})"
        if res.returncode != 0:
            last = (res.stderr.strip().splitlines() or [f"exit {res.returncode}"])[-1]
            return f"unavailable ({last[:80]})"
        return None

    def start(self, reg: ProcessRegistry, ns: Netns, upstream_port: int, workdir: Path) -> Instance:
        """Start one nsbridge forward process (plus whatever workers it forks)."""
        target = (
            ["--connect-netns", ns.name] if self.target_flag == "connect-netns" else ["-t", ns.path]
        )
        argv = [
            sys.executable,
            "-m",
            "nsbridge",
            "forward",
            "-l",
            "127.0.0.1:{PORT}",
            *target,
            "-c",
            f"127.0.0.1:{upstream_port}",
            *self.extra,
        ]
        return _start_single(reg, self.name, argv, cwd=str(REPO_ROOT))


class SocatPair(Forwarder):
    """The classic pair: TCP-LISTEN here -> UNIX socket -> socat in B -> TCP.

    Both sockets fork per connection, as the classic recipe does.
    """

    name = "socat"

    def unavailable_reason(self) -> str | None:
        """socat must be installed."""
        return None if _which("socat") else "unavailable (socat not installed)"

    def start(self, reg: ProcessRegistry, ns: Netns, upstream_port: int, workdir: Path) -> Instance:
        """Start the B side first (it creates the socket file), then the listener."""
        sockdir = workdir / "socat"
        sockdir.mkdir(exist_ok=True)
        sock = sockdir / f"up{upstream_port}.{len(reg.procs)}.sock"
        inner = reg.start(
            "socat-B",
            ns.exec_argv(
                [
                    "socat",
                    "-b",
                    SOCAT_BUF,
                    f"UNIX-LISTEN:{sock},fork",
                    f"TCP:127.0.0.1:{upstream_port}",
                ]
            ),
        )
        try:
            _wait_path(sock, inner)
            port = free_port()
            outer = reg.start(
                "socat",
                [
                    "socat",
                    "-b",
                    SOCAT_BUF,
                    f"TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr,backlog=128",
                    f"UNIX-CONNECT:{sock}",
                ],
            )
        except BenchError:
            reg.stop(inner)
            raise
        inst = Instance(self.name, port, [outer, inner])
        try:
            wait_port(port, "socat listener", outer)
        except BenchError:
            reg.stop(outer)
            reg.stop(inner)
            raise
        return inst


class Extra(Forwarder):
    """Any forwarder command given as a template in NSBRIDGE_BENCH_EXTRA.

    Leading VAR=value words are put into the environment (handy for
    PYTHONPATH); the row is named after the binary unless
    NSBRIDGE_BENCH_EXTRA_NAME says otherwise.
    """

    def __init__(self, template: str, name: str | None = None) -> None:
        self.template = template
        words = shlex.split(template)
        self.env: dict[str, str] = {}
        self.assignments = 0
        while words and "=" in words[0] and not words[0].startswith("="):
            key, _, value = words.pop(0).partition("=")
            self.env[key] = value
            self.assignments += 1
        self.binary = words[0] if words else ""
        self.name = name or Path(self.binary).name or "extra"

    def unavailable_reason(self) -> str | None:
        """The binary must be found on PATH (or be a path that exists)."""
        return None if _which(self.binary) else f"unavailable ({self.binary!r} not found)"

    def start(self, reg: ProcessRegistry, ns: Netns, upstream_port: int, workdir: Path) -> Instance:
        """Substitute {listen} {connect} {netns_path} {netns} and run the command."""
        try:
            text = self.template.format(
                listen="127.0.0.1:{PORT}",
                connect=f"127.0.0.1:{upstream_port}",
                netns_path=ns.path,
                netns=ns.name,
                PORT="{PORT}",
            )
        except (KeyError, IndexError, ValueError) as exc:
            raise BenchError(f"NSBRIDGE_BENCH_EXTRA: bad placeholder {exc}") from exc
        argv = shlex.split(text)[self.assignments :]
        return _start_single(reg, self.name, argv, env={**os.environ, **self.env})


class CReference(Forwarder):
    """bench/reference/cforward.c: the same data path as nsbridge with no interpreter.

    Not a competitor: a yardstick.  It shows how much of a gap to `direct` any
    user-space forwarder pays on this machine (the second loopback TCP hop), so a
    missed target can be told apart from Python overhead.  Built with gcc into the
    workdir on first use; runs 2 worker processes like nsbridge's default.
    """

    name = "c-epoll"
    SOURCE = REPO_ROOT / "bench" / "reference" / "cforward.c"
    BINARY = "cforward"

    def __init__(self, workers: int = 2) -> None:
        self.workers = workers
        self._binary: Path | None = None

    def unavailable_reason(self) -> str | None:
        """It needs a C compiler."""
        return None if shutil.which("gcc") else "unavailable (gcc not found)"

    def _build(self, workdir: Path) -> Path:
        if self._binary is None:
            out = workdir / self.BINARY
            done = subprocess.run(
                ["gcc", "-O2", "-Wall", "-o", str(out), str(self.SOURCE)],
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode != 0:
                raise BenchError(f"gcc could not build {self.SOURCE}:\n{done.stderr}")
            self._binary = out
        return self._binary

    def start(self, reg: ProcessRegistry, ns: Netns, upstream_port: int, workdir: Path) -> Instance:
        """cforward 127.0.0.1:PORT <B's path> 127.0.0.1:SERVERPORT <workers>."""
        binary = self._build(workdir)
        argv = [
            str(binary),
            "127.0.0.1:{PORT}",
            str(ns.path),
            f"127.0.0.1:{upstream_port}",
            str(self.workers),
        ]
        return _start_single(reg, self.name, argv)


class CUringReference(CReference):
    """bench/reference/cforward_uring.c: cforward's data path on io_uring (issue 19's
    question whether io_uring beats epoll for the request path here).  Same arguments,
    same 2 workers; unavailable where the kernel refuses io_uring."""

    name = "c-uring"
    SOURCE = REPO_ROOT / "bench" / "reference" / "cforward_uring.c"
    BINARY = "cforward_uring"

    def unavailable_reason(self) -> str | None:
        """It needs a C compiler and io_uring enabled (kernel.io_uring_disabled 0)."""
        try:
            disabled = Path("/proc/sys/kernel/io_uring_disabled").read_text().strip()
        except OSError:
            disabled = "0"  # older kernels have no switch
        if disabled != "0":
            return f"unavailable (kernel.io_uring_disabled = {disabled})"
        return super().unavailable_reason()


def _which(cmd: str) -> bool:
    """True if cmd is an existing path or found on PATH."""
    return bool(cmd) and (Path(cmd).exists() if "/" in cmd else shutil.which(cmd) is not None)


def _wait_path(path: Path, proc: Managed, timeout: float = 10.0) -> None:
    """Wait for a UNIX socket file to appear (socat's listener is then ready)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return
        if not proc.alive():
            raise BenchError(f"{proc.name} exited before creating {path}:\n{proc.log_tail()}")
        time.sleep(0.02)
    raise BenchError(f"{proc.name} did not create {path} within {timeout:.0f}s")
