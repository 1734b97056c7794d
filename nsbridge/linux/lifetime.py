"""Tie nsbridge's lifetime to other processes: ``--exit-with PID`` and ``--ready-fd N``.

A forward started for another program (a test harness, a container's helper, a script)
should go away when that program does, and that program should be able to wait until
the forward accepts connections instead of sleeping and hoping.  Both are done with
plain file descriptors so the event loop can watch them like any socket.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select

from nsbridge.errors import UserError, describe_oserror

READY_MESSAGE = b"\n"


def open_exit_with(pid_text: str, *, what: str = "--exit-with") -> int:
    """A pidfd for ``--exit-with PID``: it becomes readable when that process exits.

    A pidfd (pidfd_open(2), Linux 5.3+) names the process itself, not a number that can
    be reused once it exits, so watching it cannot end up following an unrelated
    process; only the moment between the user reading the PID and this call is open to
    reuse.  Register it with ``EventLoop.add(fd, IN, …)``.  The fd is close-on-exec.
    A process that already exited but is not yet reaped (a zombie) gives a pidfd that is
    readable at once, which is right: it is gone.
    """
    pid = _parse_pid(pid_text, what)
    if pid == os.getpid():
        raise UserError(f"{what} {pid}: that is nsbridge itself; give the PID to follow")
    try:
        return os.pidfd_open(pid)
    except OSError as exc:
        raise UserError(f"{what} {pid}: {_pidfd_error(pid, exc)}") from None


def _parse_pid(pid_text: str, what: str) -> int:
    text = str(pid_text)
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) <= 2**31 - 1:
        raise UserError(f"{what} {text!r}: not a process ID (a positive number)")
    return int(text)


def _pidfd_error(pid: int, exc: OSError) -> str:
    if exc.errno == errno.ESRCH:
        return f"no process with PID {pid} (it has exited, or never existed here)"
    if exc.errno in (errno.EINVAL, errno.ENOENT):  # kernels differ; both mean "a thread"
        return f"PID {pid} is not a process (a thread ID?)"
    if exc.errno == errno.ENOSYS:
        return "needs Linux 5.3 or later (pidfd_open)"
    return f"cannot watch PID {pid} ({describe_oserror(exc)})"


def _parse_fd(fd_text: str | int, what: str) -> int:
    text = str(fd_text)
    if not (text.isascii() and text.isdigit()) or int(text) > 2**31 - 1:
        raise UserError(f"{what} {text!r}: not a file descriptor number")
    return int(text)


def has_exited(pidfd: int) -> bool:
    """Whether the process behind ``pidfd`` has exited, without blocking."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


# ---- --ready-fd -------------------------------------------------------------------------


def check_ready_fd(fd_text: str | int, *, what: str = "--ready-fd") -> int:
    """Validate ``--ready-fd N`` at start, long before there is anything to announce.

    The fd must be open, writable, and not 0-2: writing the signal to stdout and then
    closing it would break the output it was meant to share.  Workers forked later
    inherit it; they should close their copy, or a reader waiting for EOF waits for them.
    """
    fd = _parse_fd(fd_text, what)
    if fd <= 2:
        raise UserError(
            f"{what} {fd}: fd {fd} is stdin/stdout/stderr; pass a separate fd (3 or higher)"
        )
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError:
        raise UserError(f"{what} {fd}: file descriptor {fd} is not open") from None
    if flags & os.O_ACCMODE == os.O_RDONLY:
        raise UserError(
            f"{what} {fd}: file descriptor {fd} is open read-only (the read end of a pipe?)"
        )
    return fd


def write_ready(fd_text: str | int, *, what: str = "--ready-fd") -> None:
    """Announce readiness on ``--ready-fd N``: write one ``b"\\n"``, then close the fd.

    One newline is the s6 readiness convention (``notification-fd``), so s6 supervision
    and a shell's ``read -u N`` both understand it; closing also gives readers that wait
    for EOF their signal, and keeps the fd from leaking into anything started later.
    Validation failures leave the fd alone; once writing is attempted the fd is closed
    whatever happens.  A reader that went away is a :class:`UserError`.
    """
    fd = check_ready_fd(fd_text, what=what)
    try:
        os.write(fd, READY_MESSAGE)  # one byte: written whole or not at all
    except BlockingIOError:
        raise UserError(f"{what} {fd}: cannot write (it is full; nobody reads it)") from None
    except OSError as exc:
        raise UserError(f"{what} {fd}: cannot write ({describe_oserror(exc)})") from None
    finally:
        os.close(fd)
