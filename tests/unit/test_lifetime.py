"""``--exit-with PID`` (a pidfd that turns readable when a real child exits) and
``--ready-fd N`` (one newline down a real pipe, then the fd is closed), with the bad
input each refuses.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from helpers.environment import REPO
from nsbridge.errors import UserError
from nsbridge.linux import lifetime


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen]:
    """A child that lives until its stdin is closed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def readable_within(fd: int, seconds: float) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(seconds * 1000))


# ---- --exit-with ----------------------------------------------------------------------


def test_pidfd_becomes_readable_when_the_child_exits(sleeper: subprocess.Popen) -> None:
    pidfd = lifetime.open_exit_with(str(sleeper.pid))
    try:
        assert os.get_inheritable(pidfd) is False
        assert not readable_within(pidfd, 0.2)
        assert not lifetime.has_exited(pidfd)
        assert sleeper.stdin is not None
        sleeper.stdin.close()
        assert readable_within(pidfd, 30)
        assert lifetime.has_exited(pidfd)
    finally:
        os.close(pidfd)


def test_zombie_is_already_gone() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 30
        while _state(proc.pid) != "Z":  # exited, deliberately not reaped yet
            assert time.monotonic() < deadline
            time.sleep(0.02)
        pidfd = lifetime.open_exit_with(str(proc.pid))
        try:
            assert lifetime.has_exited(pidfd)
        finally:
            os.close(pidfd)
    finally:
        proc.wait(timeout=30)


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rpartition(")")[2].split()[0]


def test_exited_and_reaped_pid() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=30)
    with pytest.raises(UserError) as info:
        lifetime.open_exit_with(str(proc.pid))
    assert str(info.value).startswith(f"--exit-with {proc.pid}: no process with PID {proc.pid}")


@pytest.mark.parametrize("text", ["abc", "", "-5", "0", "1.5", " 12", "99999999999", "١٢"])
def test_not_a_pid(text: str) -> None:
    with pytest.raises(UserError) as info:
        lifetime.open_exit_with(text)
    assert str(info.value) == f"--exit-with {text!r}: not a process ID (a positive number)"


def test_own_pid_is_refused() -> None:
    with pytest.raises(UserError, match=rf"^--exit-with {os.getpid()}: that is nsbridge itself"):
        lifetime.open_exit_with(str(os.getpid()))


def test_thread_id_is_refused() -> None:
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        tid = thread.native_id
        with pytest.raises(UserError, match=rf"^--exit-with {tid}: PID {tid} is not a process"):
            lifetime.open_exit_with(str(tid))
    finally:
        stop.set()
        thread.join()


# ---- --ready-fd -------------------------------------------------------------------------


def test_ready_fd_writes_a_newline_and_closes() -> None:
    r, w = os.pipe()
    try:
        lifetime.write_ready(str(w))
        assert os.read(r, 10) == b"\n"
        assert os.read(r, 10) == b""  # our only write end was closed: EOF
    finally:
        os.close(r)


def test_ready_fd_from_a_child_process() -> None:
    """The real use: a parent waits on a pipe until the child says it is ready."""
    r, w = os.pipe()
    code = (
        "import sys; from nsbridge.linux import lifetime; "
        f"lifetime.write_ready({w}); sys.stdin.read()"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], pass_fds=(w,), stdin=subprocess.PIPE, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    os.close(w)
    try:
        assert readable_within(r, 30)
        assert os.read(r, 10) == b"\n"
        assert os.read(r, 10) == b""  # closed by the child, which is still running
        assert proc.poll() is None
    finally:
        os.close(r)
        assert proc.stdin is not None
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0


def test_ready_fd_reader_gone() -> None:
    r, w = os.pipe()
    os.close(r)
    with pytest.raises(UserError, match=rf"^--ready-fd {w}: cannot write \(Broken pipe\)"):
        lifetime.write_ready(w)
    with pytest.raises(OSError):
        os.fstat(w)  # closed even though the write failed


@pytest.mark.parametrize("text", ["abc", "", "-1", "3.0", "99999999999"])
def test_ready_fd_not_a_number(text: str) -> None:
    with pytest.raises(UserError) as info:
        lifetime.write_ready(text)
    assert str(info.value) == f"--ready-fd {text!r}: not a file descriptor number"


@pytest.mark.parametrize("fd", [0, 1, 2])
def test_ready_fd_standard_streams_refused(fd: int) -> None:
    with pytest.raises(UserError, match=rf"^--ready-fd {fd}: fd {fd} is stdin/stdout/stderr"):
        lifetime.check_ready_fd(str(fd))


def test_ready_fd_not_open() -> None:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(UserError, match=rf"^--ready-fd {w}: file descriptor {w} is not open$"):
        lifetime.write_ready(str(w))


def test_ready_fd_read_only() -> None:
    r, w = os.pipe()
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        for bad in (r, fd):
            with pytest.raises(UserError, match=rf"^--ready-fd {bad}: .* is open read-only"):
                lifetime.write_ready(str(bad))
            os.fstat(bad)  # a refused fd is left open: it was never ours to close
    finally:
        for each in (r, w, fd):
            os.close(each)
