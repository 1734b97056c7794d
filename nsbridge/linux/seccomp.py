"""A seccomp deny-list filter, assembled here as classic BPF and installed without libseccomp.

Why a deny list: a process that serves a namespace uses a long, changing set of system
calls (Python's runtime, sockets, epoll, splice...), and a wrong guess in an allow list
takes networking down; a deny list removes what a serving process never needs and an
attacker who took it over would want (running programs, debugging other processes,
mounting, loading kernel code, entering namespaces).  slirp4netns makes the same choice.

A second program, :func:`notify_program`, is ``nsbridge run --bypass``'s: it hands the
program's ``connect``/``listen`` calls to a listener (``SECCOMP_RET_USER_NOTIF``,
served by :mod:`.seccomp_notify` and ``usernet/host/switcher.py``).

Two halves, so the program can be tested and reused (issue 18 wants a notify filter)
without a kernel:

* :func:`assemble` and :func:`deny_list_program` are pure: a list of :class:`Insn`
  with symbolic jump targets in, the kernel's ``struct sock_filter`` bytes out.  The
  program checks the ABI first (``seccomp_data.arch``; on x86_64 also the x32 bit of the
  system call number), because a process can enter the kernel through another ABI (x86's
  ``int 0x80``, x32) whose numbers differ: a foreign ABI kills the process.  Then each
  denied number returns an errno, ``clone`` is denied only when asked for new namespaces
  (its flags are the first argument), ``clone3`` (whose flags sit behind a pointer the
  filter cannot read) gets ENOSYS so the C library falls back to ``clone``, and anything
  else is allowed.
* :func:`install` needs the kernel: ``prctl(PR_SET_NO_NEW_PRIVS)`` (what lets a process
  without CAP_SYS_ADMIN install a filter) then ``seccomp(SECCOMP_SET_MODE_FILTER)`` with
  ``TSYNC``, so every thread of the process gets it.  A filter stays for the life of
  the process and every child it forks.

System call numbers are known for x86_64 and aarch64 (:data:`ARCHES`); elsewhere
:func:`native_arch` raises :class:`SeccompUnsupported` with one line, and the caller
refuses the option rather than run without the filter it asked for.
"""

from __future__ import annotations

import ctypes
import errno
import platform
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from nsbridge.linux.libc import last_error, libc

# Classic BPF opcodes (linux/filter.h, linux/bpf_common.h): the few a filter needs.
BPF_LD_W_ABS = 0x20  # A = 32-bit word of seccomp_data at k
BPF_JEQ_K = 0x15  # jump jt if A == k, else jf
BPF_JGE_K = 0x35  # jump jt if A >= k, else jf
BPF_JSET_K = 0x45  # jump jt if A & k, else jf
BPF_RET_K = 0x06  # return k

# seccomp return values (linux/seccomp.h).
RET_KILL_PROCESS = 0x80000000
RET_ERRNO = 0x00050000
RET_USER_NOTIF = 0x7FC00000  # Linux 5.0: the call waits for a listener's answer
RET_ALLOW = 0x7FFF0000

# struct seccomp_data: int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6].
OFFSET_NR = 0
OFFSET_ARCH = 4
OFFSET_ARGS = 16

PR_SET_NO_NEW_PRIVS = 38
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_TSYNC = 1
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3  # the result is a notification listener's fd
# Linux 5.19: once the listener has received a notification, the caller waits for the
# answer killably (only a fatal signal ends the wait), not interruptibly.
SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV = 1 << 5
MSG_FASTOPEN = 0x20000000  # <linux/socket.h>: a send that connects first
MAX_INSNS = 4096  # BPF_MAXINSNS
X32_SYSCALL_BIT = 0x40000000

# Flags of clone(2) that make new namespaces (CLONE_NEWTIME exists only for clone3 and
# unshare, whose numbers are denied outright).
CLONE_NEW_ANY = (0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000
                 | 0x20000000 | 0x40000000)


class SeccompError(OSError):
    """The filter could not be assembled or installed."""


class SeccompUnsupported(SeccompError):
    """No system call table for this machine's ABI here."""


@dataclass(frozen=True)
class Arch:
    """An ABI: its ``AUDIT_ARCH_*`` value, whether x32 numbers share it, and its numbers."""

    name: str
    audit_arch: int
    x32_bit: bool
    numbers: dict[str, int]


def _table(pairs: str) -> dict[str, int]:
    words = pairs.split()
    return {name: int(number) for name, number in zip(words[::2], words[1::2], strict=True)}


# From the kernel's uapi headers (asm/unistd_64.h; asm-generic/unistd.h for aarch64).
X86_64 = Arch("x86_64", 0xC000003E, True, _table("""
    execve 59 execveat 322 ptrace 101 process_vm_readv 310 process_vm_writev 311
    pidfd_getfd 438 pidfd_open 434 pidfd_send_signal 424 mount 165 umount2 166
    pivot_root 155 chroot 161 move_mount 429 fsopen 430 fsconfig 431 fsmount 432
    fspick 433 open_tree 428 mount_setattr 442 init_module 175 finit_module 313
    delete_module 176 kexec_load 246 kexec_file_load 320 reboot 169 swapon 167
    swapoff 168 bpf 321 perf_event_open 298 keyctl 250 add_key 248 request_key 249
    userfaultfd 323 open_by_handle_at 304 name_to_handle_at 303 unshare 272 setns 308
    prctl 157 acct 163 quotactl 179 lookup_dcookie 212 syslog 103 iopl 172 ioperm 173
    io_uring_setup 425 io_uring_enter 426 io_uring_register 427 clone 56 clone3 435
    seccomp 317 getppid 110
    connect 42 listen 50 sendto 44 sendmsg 46 sendmmsg 307
"""))
AARCH64 = Arch("aarch64", 0xC00000B7, False, _table("""
    execve 221 execveat 281 ptrace 117 process_vm_readv 270 process_vm_writev 271
    pidfd_getfd 438 pidfd_open 434 pidfd_send_signal 424 mount 40 umount2 39
    pivot_root 41 chroot 51 move_mount 429 fsopen 430 fsconfig 431 fsmount 432
    fspick 433 open_tree 428 mount_setattr 442 init_module 105 finit_module 273
    delete_module 106 kexec_load 104 kexec_file_load 294 reboot 142 swapon 224
    swapoff 225 bpf 280 perf_event_open 241 keyctl 219 add_key 217 request_key 218
    userfaultfd 282 open_by_handle_at 265 name_to_handle_at 264 unshare 97 setns 268
    prctl 167 acct 89 quotactl 60 lookup_dcookie 18 syslog 116
    io_uring_setup 425 io_uring_enter 426 io_uring_register 427 clone 220 clone3 435
    seccomp 277 getppid 173
    connect 203 listen 201 sendto 206 sendmsg 211 sendmmsg 269
"""))
ARCHES = {arch.name: arch for arch in (X86_64, AARCH64)}

# What a process that serves a namespace never calls once it is set up, and an attacker
# who took it over would: run a program, reach into other processes, change mounts or
# its root, load kernel code, reboot or swap, use the kernel's BPF, perf and key stores,
# userfaultfd (a tool for kernel exploits), file handles (which escape a root), enter or
# make namespaces, change its own process attributes (prctl: dumpable again, ...), read
# the kernel log, and io_uring, whose operations bypass a filter.  ``iopl``/``ioperm``
# exist on x86 only and are skipped where a table lacks a name.
DENIED = (
    "execve", "execveat",
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "pidfd_open",
    "pidfd_send_signal",
    "mount", "umount2", "pivot_root", "chroot", "move_mount", "fsopen", "fsconfig",
    "fsmount", "fspick", "open_tree", "mount_setattr",
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load",
    "reboot", "swapon", "swapoff", "acct", "quotactl", "iopl", "ioperm",
    "bpf", "perf_event_open", "lookup_dcookie", "syslog",
    "keyctl", "add_key", "request_key",
    "userfaultfd", "open_by_handle_at", "name_to_handle_at",
    "unshare", "setns", "prctl",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
)


@dataclass(frozen=True)
class Insn:
    """One instruction; ``jt``/``jf`` are labels or a number of instructions to skip
    (0: the next one); ``label`` names this instruction as a jump target."""

    code: int
    k: int = 0
    jt: str | int = 0
    jf: str | int = 0
    label: str | None = None


def assemble(program: Sequence[Insn]) -> bytes:
    """``struct sock_filter`` bytes for ``program``: labels resolved to forward offsets.

    Classic BPF jumps only forward, by at most 255 instructions for a conditional jump;
    a backward or too-long jump, an unknown label or an oversized program raises
    :class:`SeccompError` (assembling is the place to catch them, not the kernel)."""
    if not 0 < len(program) <= MAX_INSNS:
        raise SeccompError(errno.EINVAL, f"a filter has 1-{MAX_INSNS} instructions, "
                           f"not {len(program)}")
    where: dict[str, int] = {}
    for index, insn in enumerate(program):
        if insn.label is not None:
            if insn.label in where:
                raise SeccompError(errno.EINVAL, f"label {insn.label!r} defined twice")
            where[insn.label] = index

    def offset(index: int, target: str | int, limit: int) -> int:
        """How many instructions a jump from ``index`` to ``target`` skips."""
        if isinstance(target, int):
            skip = target
        elif target in where:
            skip = where[target] - index - 1
        else:
            raise SeccompError(errno.EINVAL, f"unknown label {target!r}")
        if not 0 <= skip <= limit or index + 1 + skip >= len(program):
            raise SeccompError(errno.EINVAL, f"instruction {index}: jump to {target!r} "
                               "out of range")
        return skip

    out = bytearray()
    for index, insn in enumerate(program):
        jt = jf = 0
        if insn.code in (BPF_JEQ_K, BPF_JGE_K, BPF_JSET_K):
            jt, jf = offset(index, insn.jt, 255), offset(index, insn.jf, 255)
        elif insn.code not in (BPF_LD_W_ABS, BPF_RET_K):
            raise SeccompError(errno.EINVAL, f"instruction {index}: opcode "
                               f"{insn.code:#x} is not one this assembler knows")
        out += struct.pack("=HBBI", insn.code, jt, jf, insn.k & 0xFFFFFFFF)
    return bytes(out)


def deny_list_program(arch: Arch, denied: Iterable[str] = DENIED,
                      error: int = errno.EPERM) -> list[Insn]:
    """The filter: foreign ABI → kill the process; a denied number → ``error``;
    ``clone`` with a CLONE_NEW* flag → ``error``; ``clone3`` → ENOSYS; else allow.

    Names the table lacks (``iopl`` on aarch64) are skipped; ``clone`` and ``clone3``
    are handled apart from the list."""
    numbers = sorted({arch.numbers[name] for name in denied
                      if name in arch.numbers and name not in ("clone", "clone3")})
    program = [
        Insn(BPF_LD_W_ABS, OFFSET_ARCH),
        Insn(BPF_JEQ_K, arch.audit_arch, jt=0, jf="kill"),
        Insn(BPF_LD_W_ABS, OFFSET_NR),
    ]
    if arch.x32_bit:
        program.append(Insn(BPF_JGE_K, X32_SYSCALL_BIT, jt="kill", jf=0))
    program += [Insn(BPF_JEQ_K, number, jt="deny", jf=0) for number in numbers]
    program += [
        Insn(BPF_JEQ_K, arch.numbers["clone3"], jt="nosys", jf=0),
        Insn(BPF_JEQ_K, arch.numbers["clone"], jt=0, jf="allow"),
        Insn(BPF_LD_W_ABS, OFFSET_ARGS),  # the flags' low word (both ABIs are little-endian)
        Insn(BPF_JSET_K, CLONE_NEW_ANY, jt="deny", jf=0),
        Insn(BPF_RET_K, RET_ALLOW, label="allow"),
        Insn(BPF_RET_K, RET_ERRNO | (error & 0xFFFF), label="deny"),
        Insn(BPF_RET_K, RET_ERRNO | errno.ENOSYS, label="nosys"),
        Insn(BPF_RET_K, RET_KILL_PROCESS, label="kill"),
    ]
    return program


def notify_program(arch: Arch, trapped: Iterable[str] = ("connect", "listen"),
                   denied: Iterable[str] = ("io_uring_setup", "io_uring_enter",
                                            "io_uring_register")) -> list[Insn]:
    """The filter of ``nsbridge run --bypass`` (socket switching): foreign ABI → kill;
    each ``trapped`` call → a user notification (the host side answers it); each
    ``denied`` call → ENOSYS; a send that carries ``MSG_FASTOPEN`` (``sendto``/``sendmmsg``
    flags in the fourth argument, ``sendmsg``'s in the third) → EOPNOTSUPP; anything
    else allowed.

    Why these: a TCP connection starts only by ``connect``, a send with
    ``MSG_FASTOPEN`` (the kernel connects first) or an io_uring operation (which seccomp
    never sees), and a socket starts listening only by ``listen``.  Trapping the first,
    refusing the next two and trapping the last leaves the program no way to start
    traffic on a socket of the host's namespace that the host side did not decide.  The
    flags are read from the register itself (the low word), which the program cannot
    change after the filter ran; ``TCP_FASTOPEN_CONNECT`` needs a ``connect``, which is
    trapped.  ENOSYS for io_uring lets programs fall back to plain system calls."""
    numbers = arch.numbers
    program = [
        Insn(BPF_LD_W_ABS, OFFSET_ARCH),
        Insn(BPF_JEQ_K, arch.audit_arch, jt=0, jf="kill"),
        Insn(BPF_LD_W_ABS, OFFSET_NR),
    ]
    if arch.x32_bit:
        program.append(Insn(BPF_JGE_K, X32_SYSCALL_BIT, jt="kill", jf=0))
    program += [Insn(BPF_JEQ_K, numbers[name], jt="notify", jf=0) for name in trapped]
    program += [Insn(BPF_JEQ_K, numbers[name], jt="nosys", jf=0) for name in denied]
    program += [
        Insn(BPF_JEQ_K, numbers["sendto"], jt="flags3", jf=0),
        Insn(BPF_JEQ_K, numbers["sendmmsg"], jt="flags3", jf=0),
        Insn(BPF_JEQ_K, numbers["sendmsg"], jt=0, jf="allow"),
        Insn(BPF_LD_W_ABS, OFFSET_ARGS + 8 * 2),
        Insn(BPF_JSET_K, MSG_FASTOPEN, jt="notsupp", jf="allow"),
        Insn(BPF_LD_W_ABS, OFFSET_ARGS + 8 * 3, label="flags3"),
        Insn(BPF_JSET_K, MSG_FASTOPEN, jt="notsupp", jf="allow"),
        Insn(BPF_RET_K, RET_ALLOW, label="allow"),
        Insn(BPF_RET_K, RET_USER_NOTIF, label="notify"),
        Insn(BPF_RET_K, RET_ERRNO | errno.ENOSYS, label="nosys"),
        Insn(BPF_RET_K, RET_ERRNO | errno.EOPNOTSUPP, label="notsupp"),
        Insn(BPF_RET_K, RET_KILL_PROCESS, label="kill"),
    ]
    return program


def native_arch(machine: str | None = None) -> Arch:
    """The ABI this interpreter runs under; :class:`SeccompUnsupported` elsewhere."""
    machine = machine or platform.machine()
    name = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine.lower(), machine.lower())
    if name not in ARCHES or struct.calcsize("P") != 8:
        raise SeccompUnsupported(errno.ENOSYS, f"seccomp filters are built for "
                                 f"{', '.join(ARCHES)} only, not {machine}")
    return ARCHES[name]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                       ctypes.c_ulong]


def install(program: bytes, flags: int = SECCOMP_FILTER_FLAG_TSYNC) -> int:
    """Install assembled ``program`` on this process (every thread, every later child),
    with ``no_new_privs`` set first.  Raises :class:`SeccompError`.

    Returns what ``seccomp(2)`` returned: 0, or with
    ``SECCOMP_FILTER_FLAG_NEW_LISTENER`` in ``flags`` the listener's fd (close-on-exec).
    The kernel refuses that flag beside plain TSYNC: a caller asking for a listener
    must be single-threaded and pass it alone."""
    if not program or len(program) % 8:
        raise SeccompError(errno.EINVAL, "not an assembled filter")
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        exc = last_error("prctl(PR_SET_NO_NEW_PRIVS)")
        raise SeccompError(exc.errno, str(exc))
    # TSYNC: threads already running get the filter too (later ones inherit it); a
    # positive result names a thread that could not be synchronised.
    number = native_arch().numbers["seccomp"]
    result = libc.syscall(ctypes.c_long(number), ctypes.c_ulong(SECCOMP_SET_MODE_FILTER),
                          ctypes.c_ulong(flags), ctypes.byref(fprog))
    if result < 0:
        exc = last_error("seccomp(SECCOMP_SET_MODE_FILTER)")
        raise SeccompError(exc.errno, str(exc))
    if flags & SECCOMP_FILTER_FLAG_NEW_LISTENER:
        return int(result)
    if result > 0:
        raise SeccompError(errno.EBUSY, f"seccomp: thread {result} cannot take the filter")
    return 0


def install_listener(program: bytes, *, wait_killable: bool = True) -> tuple[int, bool]:
    """Install assembled ``program`` with a notification listener; (its fd, whether
    the callers wait killably).

    ``wait_killable`` asks for ``SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV`` (Linux 5.19)
    and falls back without it where the kernel refuses the flag (``EINVAL``).  Why it
    matters to socket switching: without it, a signal that reaches a thread whose
    trapped call the listener is already serving interrupts the wait; the kernel then
    restarts the call (a handler with ``SA_RESTART``) as a new notification, or returns
    ``EINTR``, while the first answer is being prepared, so a host side that dials for
    the call may dial twice.  With it, a received call is answered before the signal's
    handler runs; ``SIGKILL`` still ends the wait at once."""
    if wait_killable:
        try:
            return install(program, SECCOMP_FILTER_FLAG_NEW_LISTENER
                           | SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV), True
        except SeccompError as exc:
            if exc.errno != errno.EINVAL:
                raise
    return install(program, SECCOMP_FILTER_FLAG_NEW_LISTENER), False


def install_deny_list(denied: Iterable[str] = DENIED, error: int = errno.EPERM) -> Arch:
    """Assemble :func:`deny_list_program` for this machine and install it; the ABI."""
    arch = native_arch()
    install(assemble(deny_list_program(arch, denied, error)))
    return arch

