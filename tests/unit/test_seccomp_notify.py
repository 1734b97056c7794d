"""Socket switching's filter and notification parsing, without a kernel: the notify
program run through the classic-BPF interpreter for every ABI it knows (what is trapped,
refused, killed and allowed), and ``struct seccomp_notif`` read as a value (short or
odd input refused with ValueError, never misread)."""

from __future__ import annotations

import errno
import struct

import pytest

from helpers.bpf_filter import run_filter
from nsbridge.linux import seccomp_notify
from nsbridge.linux.seccomp import (
    ARCHES,
    MSG_FASTOPEN,
    RET_ALLOW,
    RET_ERRNO,
    RET_KILL_PROCESS,
    RET_USER_NOTIF,
    X32_SYSCALL_BIT,
    X86_64,
    Arch,
    assemble,
    notify_program,
)

AUDIT_ARCH_I386 = 0x40000003


@pytest.mark.parametrize("arch", list(ARCHES.values()), ids=list(ARCHES))
def test_connect_listen_and_bind_trapped_io_uring_refused(arch: Arch) -> None:
    program = assemble(notify_program(arch))
    n = arch.numbers
    assert run_filter(program, n["connect"], arch.audit_arch) == RET_USER_NOTIF
    assert run_filter(program, n["listen"], arch.audit_arch) == RET_USER_NOTIF
    assert run_filter(program, n["bind"], arch.audit_arch) == RET_USER_NOTIF
    for name in ("io_uring_setup", "io_uring_enter", "io_uring_register"):
        assert run_filter(program, n[name], arch.audit_arch) == RET_ERRNO | errno.ENOSYS
    # Everything else runs untouched, the filter's own helpers included.
    for name in ("execve", "clone", "pidfd_getfd", "getppid", "bpf", "unshare"):
        assert run_filter(program, n[name], arch.audit_arch) == RET_ALLOW


@pytest.mark.parametrize("arch", list(ARCHES.values()), ids=list(ARCHES))
def test_sends_with_fastopen_refused_others_allowed(arch: Arch) -> None:
    program = assemble(notify_program(arch))
    n = arch.numbers
    refused = RET_ERRNO | errno.EOPNOTSUPP
    # sendto(fd, buf, len, flags, addr, addrlen) and sendmmsg(fd, vec, n, flags): 4th;
    # sendmsg(fd, msg, flags): 3rd.  High bits of the register do not hide the flag.
    for name, index in (("sendto", 3), ("sendmmsg", 3), ("sendmsg", 2)):
        args = [3, 0x7FFF0000, 10, 0, 0, 0]
        assert run_filter(program, n[name], arch.audit_arch, tuple(args)) == RET_ALLOW
        args[index] = MSG_FASTOPEN | 0x4000  # with MSG_NOSIGNAL
        assert run_filter(program, n[name], arch.audit_arch, tuple(args)) == refused
        args[index] = (0xFFFFFFFF << 32) | MSG_FASTOPEN
        assert run_filter(program, n[name], arch.audit_arch, tuple(args)) == refused
        args[index] = 1 << 40  # only the high word: the kernel reads an int
        assert run_filter(program, n[name], arch.audit_arch, tuple(args)) == RET_ALLOW


@pytest.mark.parametrize("arch", list(ARCHES.values()), ids=list(ARCHES))
def test_foreign_abi_killed(arch: Arch) -> None:
    program = assemble(notify_program(arch))
    for foreign in (AUDIT_ARCH_I386, 0x40000028, 0):
        # socketcall (102 on i386) and connect both: any number of a foreign ABI.
        for nr in (102, 362, arch.numbers["connect"]):
            assert run_filter(program, nr, foreign) == RET_KILL_PROCESS


def test_x32_numbers_killed() -> None:
    program = assemble(notify_program(X86_64))
    for nr in (X32_SYSCALL_BIT | 42, X32_SYSCALL_BIT | 39, 0x7FFFFFFF):
        assert run_filter(program, nr, X86_64.audit_arch) == RET_KILL_PROCESS


def notif(nid: int = 7, pid: int = 1234, nr: int = 42, args: tuple[int, ...] = ()) -> bytes:
    return struct.pack("=QIIiIQ6Q", nid, pid, 0, nr, X86_64.audit_arch, 0x401000,
                       *(list(args) + [0] * (6 - len(args))))


def test_notification_parsed() -> None:
    value = seccomp_notify.parse_notification(notif(args=(5, 0x7FFE0000, 16)))
    assert (value.id, value.pid, value.nr, value.arch) == (7, 1234, 42, X86_64.audit_arch)
    assert value.args == (5, 0x7FFE0000, 16, 0, 0, 0)
    # A longer buffer (a newer kernel's struct) is read for its known prefix.
    assert seccomp_notify.parse_notification(notif() + b"\xff" * 16).id == 7


@pytest.mark.parametrize("size", [0, 1, 79])
def test_short_notification_refused(size: int) -> None:
    with pytest.raises(ValueError, match="80 bytes"):
        seccomp_notify.parse_notification(notif()[:size])


def test_structs_match_the_kernel() -> None:
    assert seccomp_notify.NOTIF.size == 80
    assert seccomp_notify.RESPONSE.size == seccomp_notify.ADDFD.size == 24


def test_unsupported_kernels_get_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from nsbridge.errors import UserError
    from nsbridge.usernet.options import UsernetOptions, check_options

    actions = tmp_path / "actions_avail"
    actions.write_text("kill_process kill_thread trap errno user_notif trace log allow\n")
    monkeypatch.setattr(seccomp_notify, "ACTIONS_AVAIL", str(actions))
    monkeypatch.setattr(seccomp_notify.platform, "release", lambda: "6.1.0-13-amd64")
    assert seccomp_notify.unsupported() is None
    monkeypatch.setattr(seccomp_notify.platform, "release", lambda: "5.8.18-100.fc31")
    assert "older than 5.9" in (seccomp_notify.unsupported() or "")
    monkeypatch.setattr(seccomp_notify.platform, "release", lambda: "5.10.0")
    actions.write_text("kill_process errno allow\n")
    assert "user_notif" in (seccomp_notify.unsupported() or "")
    actions.unlink()
    assert "cannot read" in (seccomp_notify.unsupported() or "")
    with pytest.raises(UserError) as caught:
        check_options(UsernetOptions(bypass=True))
    assert str(caught.value).startswith("--bypass: ") and "\n" not in str(caught.value)
