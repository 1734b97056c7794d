"""The seccomp deny-list filter (nsbridge.linux.seccomp): the assembled program run
through a small classic-BPF interpreter for every ABI it knows, the assembler's refusals,
and the kernel's verdict on the real filter installed in a child process (which then
tries denied and allowed calls)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest

from helpers.bpf_filter import run_filter
from helpers.environment import REPO
from nsbridge.linux import seccomp
from nsbridge.linux.seccomp import (
    AARCH64,
    ARCHES,
    BPF_JEQ_K,
    BPF_LD_W_ABS,
    BPF_RET_K,
    DENIED,
    RET_ALLOW,
    RET_ERRNO,
    RET_KILL_PROCESS,
    X86_64,
    Arch,
    Insn,
    SeccompError,
    SeccompUnsupported,
    assemble,
    deny_list_program,
)

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
SIGCHLD = 17
AUDIT_ARCH_I386 = 0x40000003
AUDIT_ARCH_ARM = 0x40000028


@pytest.mark.parametrize("arch", list(ARCHES.values()), ids=list(ARCHES))
def test_every_denied_call_and_nothing_else(arch: Arch) -> None:
    program = assemble(deny_list_program(arch))
    denied = {arch.numbers[name] for name in DENIED if name in arch.numbers}
    eperm = RET_ERRNO | errno.EPERM
    for name in DENIED:
        if name in arch.numbers:
            assert run_filter(program, arch.numbers[name], arch.audit_arch) == eperm, name
    for nr in range(0, 470):  # read, write, socket, epoll, splice ... : allowed
        if nr in denied or nr in (arch.numbers["clone"], arch.numbers["clone3"]):
            continue
        assert run_filter(program, nr, arch.audit_arch) == RET_ALLOW, nr


@pytest.mark.parametrize("arch", list(ARCHES.values()), ids=list(ARCHES))
def test_clone_for_namespaces_denied_clone3_sent_to_clone(arch: Arch) -> None:
    program = assemble(deny_list_program(arch))
    clone = arch.numbers["clone"]
    assert run_filter(program, clone, arch.audit_arch, (SIGCHLD,)) == RET_ALLOW  # fork
    assert run_filter(program, clone, arch.audit_arch, (0x3D0F00,)) == RET_ALLOW  # thread
    for flags in (CLONE_NEWUSER | SIGCHLD, CLONE_NEWNET, 0x00020000, 0x7E020000):
        assert run_filter(program, clone, arch.audit_arch, (flags,)) == \
            RET_ERRNO | errno.EPERM, hex(flags)
    # Only the low word holds flags clone(2) knows; a high word is not a namespace.
    assert run_filter(program, clone, arch.audit_arch, (1 << 40,)) == RET_ALLOW
    assert run_filter(program, arch.numbers["clone3"], arch.audit_arch) == \
        RET_ERRNO | errno.ENOSYS


@pytest.mark.parametrize(("arch", "foreign"), [
    (X86_64, AUDIT_ARCH_I386), (X86_64, AARCH64.audit_arch), (AARCH64, AUDIT_ARCH_ARM),
    (AARCH64, X86_64.audit_arch), (X86_64, 0)])
def test_a_foreign_abi_kills(arch: Arch, foreign: int) -> None:
    """x86's int 0x80 ABI numbers calls differently (11 is execve there): any call
    through a foreign ABI ends the process, whatever its number."""
    program = assemble(deny_list_program(arch))
    for nr in (0, 1, 11, 59, 221):
        assert run_filter(program, nr, foreign) == RET_KILL_PROCESS


def test_x32_numbers_kill() -> None:
    """x32 shares x86_64's AUDIT_ARCH value and sets bit 30 of the number."""
    program = assemble(deny_list_program(X86_64))
    for nr in (0x40000000, 0x40000000 + 59, 0x40000000 + 520, 0x7FFFFFFF):
        assert run_filter(program, nr, X86_64.audit_arch) == RET_KILL_PROCESS
    aarch = assemble(deny_list_program(AARCH64))
    assert run_filter(aarch, 0x40000000, AARCH64.audit_arch) == RET_ALLOW  # no x32 there


def test_other_errno_and_list() -> None:
    program = assemble(deny_list_program(X86_64, ("getppid", "iopl"), errno.EACCES))
    assert run_filter(program, 110, X86_64.audit_arch) == RET_ERRNO | errno.EACCES
    assert run_filter(program, 59, X86_64.audit_arch) == RET_ALLOW  # execve: not listed
    # iopl has no number on aarch64: skipped, not an error.
    assemble(deny_list_program(AARCH64, ("iopl", "getppid")))


def test_assembler_refuses_bad_programs() -> None:
    with pytest.raises(SeccompError, match="unknown label"):
        assemble([Insn(BPF_JEQ_K, 1, jt="nowhere"), Insn(BPF_RET_K, 0)])
    with pytest.raises(SeccompError, match="out of range"):  # backward
        assemble([Insn(BPF_RET_K, 0, label="top"), Insn(BPF_JEQ_K, 1, jt="top"),
                  Insn(BPF_RET_K, 0)])
    far = [Insn(BPF_JEQ_K, 1, jt="end")] + [Insn(BPF_LD_W_ABS, 0)] * 256 + \
        [Insn(BPF_RET_K, 0, label="end")]
    with pytest.raises(SeccompError, match="out of range"):  # more than 255 ahead
        assemble(far)
    with pytest.raises(SeccompError, match="out of range"):  # past the end
        assemble([Insn(BPF_JEQ_K, 1, jt=1), Insn(BPF_RET_K, 0)])
    with pytest.raises(SeccompError, match="twice"):
        assemble([Insn(BPF_RET_K, 0, label="a"), Insn(BPF_RET_K, 0, label="a")])
    with pytest.raises(SeccompError, match="1-4096"):
        assemble([])
    with pytest.raises(SeccompError, match="opcode"):
        assemble([Insn(0x07), Insn(BPF_RET_K, 0)])


def test_unknown_machine_refused_with_one_line() -> None:
    with pytest.raises(SeccompUnsupported, match="x86_64, aarch64 only, not riscv64"):
        seccomp.native_arch("riscv64")
    assert seccomp.native_arch("amd64") is X86_64
    assert seccomp.native_arch("arm64") is AARCH64


KERNEL_CHECK = r"""
import ctypes, errno, json, os, socket, sys
from nsbridge.linux import seccomp
libc = ctypes.CDLL(None, use_errno=True)
arch = seccomp.native_arch()
before = libc.syscall(arch.numbers["getppid"])
seccomp.install_deny_list(seccomp.DENIED + ("getppid",))
def call(name, *args):
    ctypes.set_errno(0)
    result = libc.syscall(ctypes.c_long(arch.numbers[name]), *[ctypes.c_ulong(a) for a in args])
    return result, ctypes.get_errno()
out = {"getppid": call("getppid"), "before": before}
out["prctl"] = call("prctl", 3)  # PR_GET_DUMPABLE
out["unshare"] = call("unshare", 0x10000000)
out["clone_newuser"] = call("clone", 0x10000000 | 17, 0, 0, 0, 0)
out["clone3"] = call("clone3", 0, 0)
try:
    os.execv("/bin/true", ["true"])
except OSError as exc:
    out["execv"] = exc.errno
pid = os.fork()  # plain clone: allowed
if pid == 0:
    os._exit(7)
out["fork"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
with socket.socket() as s:
    out["socket"] = s.fileno() > 0
with open("/proc/self/status") as f:
    out["status"] = [line.split()[1] for line in f if line.startswith("Seccomp:")][0]
print(json.dumps(out))
"""


def test_the_kernel_applies_the_filter() -> None:
    """Installed in a child (no privilege needed: no_new_privs), the filter makes the
    denied calls fail with EPERM (clone3 with ENOSYS) while fork, sockets and files work."""
    result = subprocess.run([sys.executable, "-c", KERNEL_CHECK], capture_output=True,
                            text=True, timeout=30, cwd=REPO)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["before"] > 0
    assert out["getppid"] == [-1, errno.EPERM]
    assert out["prctl"] == [-1, errno.EPERM]
    assert out["unshare"] == [-1, errno.EPERM]
    assert out["clone_newuser"] == [-1, errno.EPERM]
    assert out["clone3"] == [-1, errno.ENOSYS]
    assert out["execv"] == errno.EPERM
    assert out["fork"] == 7 and out["socket"] is True
    assert out["status"] == "2"



THREADS_CHECK = r"""
import ctypes, errno, json, threading
from nsbridge.linux import seccomp
libc = ctypes.CDLL(None, use_errno=True)
nr = seccomp.native_arch().numbers["getppid"]
started, result = threading.Event(), {}
go = threading.Event()
def worker():
    started.set()
    go.wait()
    ctypes.set_errno(0)
    result["thread"] = [libc.syscall(nr), ctypes.get_errno()]
thread = threading.Thread(target=worker)
thread.start()
started.wait()
seccomp.install_deny_list(("getppid",))  # installed from the main thread
go.set()
thread.join()
print(json.dumps(result))
"""


def test_a_thread_already_running_gets_the_filter_too() -> None:
    result = subprocess.run([sys.executable, "-c", THREADS_CHECK], capture_output=True,
                            text=True, timeout=30, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["thread"] == [-1, errno.EPERM]


LISTENER_CHECK = """
import json, os, sys
from nsbridge.linux import seccomp
program = seccomp.assemble(seccomp.notify_program(seccomp.native_arch()))
out = {}
for wait_killable in (True, False):
    pid = os.fork()
    if pid == 0:
        fd, killable = seccomp.install_listener(program, wait_killable=wait_killable)
        os.write(1, json.dumps([fd >= 0, killable]).encode() + b"\\n")
        os._exit(0)
    os.waitpid(pid, 0)
"""


def test_install_listener_asks_for_wait_killable_where_the_kernel_has_it() -> None:
    """WAIT_KILLABLE_RECV (Linux 5.19) with the listener where the kernel accepts it,
    a plain listener otherwise, and never when asked not to."""
    result = subprocess.run([sys.executable, "-c", LISTENER_CHECK], capture_output=True,
                            text=True, timeout=30, cwd=REPO)
    assert result.returncode == 0, result.stderr
    killable, plain = (json.loads(line) for line in result.stdout.splitlines())
    release = tuple(int(p) for p in os.uname().release.split("-")[0].split(".")[:2])
    assert killable == [True, release >= (5, 19)]
    assert plain == [True, False]
