"""Run inside a sandbox or container: try to reach every other process through /proc.

Usage: ``python3 isolation_scanner.py REPORT STOP [READY]`` (standard library only:
it runs as the sandboxed program, under any interpreter).

It spins from its start until the file STOP exists (at most 120 s), listing /proc on every
pass, and for every process but itself tries what root of a user namespace could do to a
process that entered that namespace without being confined:

* ``root``/``cwd``: list ``/proc/PID/root/`` and ``/proc/PID/cwd/`` (another file system),
* ``environ``: read ``/proc/PID/environ``,
* ``mem``: open ``/proc/PID/mem``,
* ``fd``: open ``/proc/PID/fd/N`` (``fdlist``, listing the numbers, is recorded but
  not counted: the kernel allows it to any process of the same uid),
* ``getfd``: copy each fd with ``pidfd_getfd(2)`` (the listed ones, else 0-15 blindly),
* ``ptrace``: ``PTRACE_SEIZE`` (then interrupt and detach at once if it ever succeeds).

Processes that existed before the first pass are retried only every twentieth pass, new
ones on every pass, so a short-lived helper started later is met within a few ms.  READY
(if given) is created after the first pass, holding the scanner's pid: the caller starts
nsbridge only then.

REPORT gets one JSON object: ``passes``; ``seen`` (pid -> command line, every pid tried);
``outcome`` (pid -> {attempt: "ok" or the errno name}) and ``got`` (every success, with
what it yielded) — for a confined nsbridge ``got`` must stay empty.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import stat
import sys
import time

SYS_PIDFD_GETFD = 438
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_DETACH = 17
SYS_PTRACE = 101
WALL = 0x40000000  # waitpid's __WALL: a tracee that is not our child
BLIND_FDS = 16
FULL_PASS_EVERY = 20
MAX_SECONDS = 120

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


def _ptrace(request: int, pid: int) -> int:
    return int(libc.syscall(ctypes.c_long(SYS_PTRACE), ctypes.c_long(request),
                            ctypes.c_long(pid), ctypes.c_long(0), ctypes.c_long(0)))


def _errname(exc: OSError | int) -> str:
    code = exc if isinstance(exc, int) else (exc.errno or 0)
    return errno.errorcode.get(code, str(code))


def _readlink(pid: int, fd: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return None


def _cmdline(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None


class Scanner:
    def __init__(self) -> None:
        self.me = os.getpid()
        self.seen: dict[int, str] = {}
        self.outcome: dict[int, dict[str, str]] = {}
        self.got: list[dict[str, object]] = []
        self.passes = 0

    def note(self, pid: int, what: str, result: str, detail: object = None) -> None:
        before = self.outcome.setdefault(pid, {}).get(what)
        self.outcome[pid][what] = result if before != "ok" else before
        if result == "ok" and before != "ok" and what != "fdlist":
            self.got.append({"pid": pid, "cmdline": self.seen.get(pid), "what": what,
                             "detail": detail})

    def pids(self) -> list[int]:
        return [int(name) for name in os.listdir("/proc") if name.isdigit()]

    def probe(self, pid: int) -> None:
        if pid == self.me:
            return
        if pid not in self.seen:
            cmdline = _cmdline(pid)
            if cmdline is None:
                return  # gone already
            self.seen[pid] = cmdline
        for what in ("root", "cwd"):
            try:
                self.note(pid, what, "ok", sorted(os.listdir(f"/proc/{pid}/{what}/"))[:20])
            except OSError as exc:
                self.note(pid, what, _errname(exc))
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                self.note(pid, "environ", "ok", f.read(8192).decode(errors="replace"))
        except OSError as exc:
            self.note(pid, "environ", _errname(exc))
        try:
            os.close(os.open(f"/proc/{pid}/mem", os.O_RDONLY))
            self.note(pid, "mem", "ok")
        except OSError as exc:
            self.note(pid, "mem", _errname(exc))
        try:
            fds = sorted(int(name) for name in os.listdir(f"/proc/{pid}/fd"))
            self.note(pid, "fdlist", "ok")
        except OSError as exc:
            self.note(pid, "fdlist", _errname(exc))
            fds = list(range(BLIND_FDS))
        self.fd(pid, fds)
        self.getfd(pid, fds)
        self.ptrace(pid)

    def fd(self, pid: int, fds: list[int]) -> None:
        """Open the fds through /proc/PID/fd/N (listing the names is not enough: the
        kernel lets a same-uid process list fd numbers without the ptrace check)."""
        opened: list[dict[str, object]] = []
        result = "ENOENT"
        for fd in fds:
            try:
                os.close(os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY | os.O_NONBLOCK))
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ENXIO):
                    continue  # no such fd, or a socket (opened only through getfd)
                result = _errname(exc)
                break
            opened.append({"fd": fd, "target": _readlink(pid, fd)})
        self.note(pid, "fd", "ok" if opened else result, opened)

    def getfd(self, pid: int, fds: list[int]) -> None:
        try:
            pidfd = os.pidfd_open(pid)
        except OSError as exc:
            self.note(pid, "getfd", _errname(exc))
            return
        copied: list[dict[str, object]] = []
        result = "EBADF"
        try:
            for fd in fds:
                copy = libc.syscall(ctypes.c_long(SYS_PIDFD_GETFD), pidfd, fd, 0)
                if copy < 0:
                    code = ctypes.get_errno()
                    if code == errno.EBADF:
                        continue
                    result = _errname(code)
                    break  # EPERM: the same answer for every fd
                try:
                    mode = os.fstat(copy).st_mode
                    kind = ("socket" if stat.S_ISSOCK(mode) else "file"
                            if stat.S_ISREG(mode) else oct(stat.S_IFMT(mode)))
                    copied.append({"fd": fd, "kind": kind,
                                   "target": os.readlink(f"/proc/self/fd/{copy}")})
                finally:
                    os.close(copy)
        finally:
            os.close(pidfd)
        self.note(pid, "getfd", "ok" if copied else result, copied)

    def ptrace(self, pid: int) -> None:
        if _ptrace(PTRACE_SEIZE, pid) != 0:
            self.note(pid, "ptrace", _errname(ctypes.get_errno()))
            return
        self.note(pid, "ptrace", "ok")
        _ptrace(PTRACE_INTERRUPT, pid)
        try:
            os.waitpid(pid, WALL)
        except OSError:
            pass
        _ptrace(PTRACE_DETACH, pid)

    def run(self, stop: str, ready: str | None) -> None:
        deadline = time.monotonic() + MAX_SECONDS
        old: set[int] = set()
        while True:
            current = self.pids()
            full = self.passes % FULL_PASS_EVERY == 0
            for pid in current:
                if full or pid not in old:
                    self.probe(pid)
            if self.passes == 0:
                old = set(current)
                if ready:
                    with open(ready + ".tmp", "w") as f:
                        f.write(str(self.me))
                    os.rename(ready + ".tmp", ready)
            self.passes += 1
            if os.path.exists(stop) or time.monotonic() > deadline:
                return


def main() -> None:
    report, stop = sys.argv[1], sys.argv[2]
    ready = sys.argv[3] if len(sys.argv) > 3 else None
    scanner = Scanner()
    scanner.run(stop, ready)
    with open(report + ".tmp", "w") as f:
        json.dump({"me": scanner.me, "passes": scanner.passes, "seen": scanner.seen,
                   "outcome": scanner.outcome, "got": scanner.got}, f)
    os.rename(report + ".tmp", report)


if __name__ == "__main__":
    main()
