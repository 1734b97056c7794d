"""Deal new connections of an SO_REUSEPORT group to its listeners in turn (eBPF).

Why: with ``--accept reuseport`` each worker accepts from its own listener, which saves the
supervisor's accept + SCM_RIGHTS hop (docs/performance.md has its cost).  But the kernel
places each client by a hash of its 4-tuple, and a few long-lived connections (a
keep-alive load balancer, ``iperf3 -P 4``) then land 3:1 or 4:0 on two workers, one core
carrying most of the work.  A tiny SK_REUSEPORT program fixes the placement: it counts
SYNs in a one-slot array and picks listener ``count % n`` from a REUSEPORT_SOCKARRAY, which
is exactly the hand-off's round-robin, done by the kernel at SYN time.

The program is hand-assembled (21 instructions) so that nsbridge needs no compiler, no
libbpf and no BPF object file; this module only speaks the ``bpf(2)`` system call through
ctypes.  Loading it needs CAP_BPF (root, or a capable daemon); without it ``attach``
returns the reason and the caller keeps the hash placement or the hand-off.

Once attached, the group holds the program and the program holds both maps, so no file
descriptor of ours stays open.  A listener that closes leaves the sockarray by itself.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import socket
import struct
from collections.abc import Callable

from nsbridge.linux.libc import libc

__all__ = ["attach_round_robin", "round_robin_unavailable"]

# bpf(2) commands, map and program types (linux/bpf.h)
_BPF_MAP_CREATE = 0
_BPF_MAP_UPDATE_ELEM = 2
_BPF_PROG_LOAD = 5
_MAP_TYPE_ARRAY = 2
_MAP_TYPE_REUSEPORT_SOCKARRAY = 20
_PROG_TYPE_SK_REUSEPORT = 21
_ATTACH_SK_REUSEPORT_SELECT = 39
_HELPER_MAP_LOOKUP_ELEM = 1
_HELPER_SK_SELECT_REUSEPORT = 82
_SK_PASS = 1
_SO_ATTACH_REUSEPORT_EBPF = 52
_ATTR_SIZE = 144  # sizeof(union bpf_attr) on 6.x; the kernel accepts a larger, zeroed tail

_SYSCALL_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "ppc64le": 361,
                "riscv64": 280, "s390x": 351}


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    """One ``struct bpf_insn``: opcode, dst/src registers in one byte, offset, immediate."""
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def _load_map_fd(dst: int, map_fd: int) -> bytes:
    """``dst = map`` (a 64-bit immediate load, two slots, src = BPF_PSEUDO_MAP_FD)."""
    return _insn(0x18, dst, 1, 0, map_fd) + _insn(0, 0, 0, 0, 0)


def _program(counter_fd: int, sockarray_fd: int, listeners: int) -> bytes:
    """The selector: ``index = counter++ % listeners``; select that listener; pass.

    If the counter cannot be read or the slot is empty (a listener closed), the program
    still returns SK_PASS without a selection, and the kernel falls back to its hash.
    """
    r0, r1, r2, r3, r4, r6, r10 = 0, 1, 2, 3, 4, 6, 10
    code = [
        _insn(0xBF, r6, r1),                    # r6 = ctx
        _insn(0x62, r10, 0, -4, 0),             # *(u32 *)(fp - 4) = 0   (key of slot 0)
        _insn(0xBF, r2, r10),                   # r2 = fp
        _insn(0x07, r2, 0, 0, -4),              # r2 += -4
        _load_map_fd(r1, counter_fd),           # r1 = counter map
        _insn(0x85, imm=_HELPER_MAP_LOOKUP_ELEM),
        _insn(0x15, r0, 0, 11, 0),              # if r0 == NULL goto pass
        _insn(0xB7, r1, 0, 0, 1),               # r1 = 1
        _insn(0xC3, r0, r1, 0, 0x01),           # r1 = atomic_fetch_add((u32 *)r0, r1)
        _insn(0x94, r1, 0, 0, listeners),       # w1 %= listeners
        _insn(0x63, r10, r1, -8),               # *(u32 *)(fp - 8) = r1
        _insn(0xBF, r1, r6),                    # r1 = ctx
        _load_map_fd(r2, sockarray_fd),         # r2 = sockarray
        _insn(0xBF, r3, r10),                   # r3 = fp
        _insn(0x07, r3, 0, 0, -8),              # r3 += -8
        _insn(0xB7, r4, 0, 0, 0),               # r4 = 0 (flags)
        _insn(0x85, imm=_HELPER_SK_SELECT_REUSEPORT),
        _insn(0xB7, r0, 0, 0, _SK_PASS),        # pass: r0 = SK_PASS
        _insn(0x95),                            # exit
    ]
    return b"".join(code)


def _bpf(command: int, attr: bytes) -> int:
    """Call bpf(2); returns its result or raises OSError with the kernel's errno."""
    number = _SYSCALL_BPF.get(platform.machine())
    if number is None:
        raise OSError(errno.ENOSYS, f"no bpf(2) number known for {platform.machine()}")
    buffer = ctypes.create_string_buffer(attr.ljust(_ATTR_SIZE, b"\0"), _ATTR_SIZE)
    result = libc.syscall(ctypes.c_long(number), ctypes.c_int(command), buffer,
                          ctypes.c_uint(_ATTR_SIZE))
    if result < 0:
        # The kernel's words alone: the caller reports them as the reason round robin
        # is unavailable ("Operation not permitted"), which already says what failed.
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))
    return int(result)


def _create_map(map_type: int, value_size: int, entries: int) -> int:
    return _bpf(_BPF_MAP_CREATE, struct.pack("<IIIII", map_type, 4, value_size, entries, 0))


def _update(map_fd: int, key: int, value: int) -> None:
    key_buffer = ctypes.c_uint32(key)
    value_buffer = ctypes.c_uint32(value)
    _bpf(_BPF_MAP_UPDATE_ELEM, struct.pack(
        "<IIQQQ", map_fd, 0, ctypes.addressof(key_buffer), ctypes.addressof(value_buffer), 0))


def _load(instructions: bytes) -> int:
    code = ctypes.create_string_buffer(instructions, len(instructions))
    license_text = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(4096)
    attr = struct.pack("<IIQQIIQII16sII", _PROG_TYPE_SK_REUSEPORT, len(instructions) // 8,
                       ctypes.addressof(code), ctypes.addressof(license_text),
                       1, len(log), ctypes.addressof(log), 0, 0, b"nsbridge_rr",
                       0, _ATTACH_SK_REUSEPORT_SELECT)
    try:
        return _bpf(_BPF_PROG_LOAD, attr)
    except OSError as exc:
        detail = log.value.decode(errors="replace").strip().splitlines()
        if detail:
            raise OSError(exc.errno, f"{exc.strerror}: {detail[-1]}") from None
        raise


def _load_selector(slots: int, fds: list[int]) -> tuple[int, int]:
    """Create both maps and load the program for ``slots`` listeners: (sockarray, program).

    Every fd made is appended to ``fds`` at once, so the caller closes them all whatever
    fails; attached, the group and the program hold what they need.
    """
    counter = _create_map(_MAP_TYPE_ARRAY, 4, 1)
    fds.append(counter)
    sockarray = _create_map(_MAP_TYPE_REUSEPORT_SOCKARRAY, 4, slots)
    fds.append(sockarray)
    prog = _load(_program(counter, sockarray, slots))
    fds.append(prog)
    return sockarray, prog


def _reason_if_fails(action: Callable[[list[int]], object]) -> str | None:
    """Run ``action(fds)``; None if it worked, else the kernel's one-line reason.  The fds
    it made are closed either way."""
    fds: list[int] = []
    try:
        action(fds)
    except OSError as exc:
        return exc.strerror or str(exc)
    finally:
        for fd in fds:
            os.close(fd)
    return None


_unavailable: list[str | None] = []  # the probe's answer, once per process


def round_robin_unavailable() -> str | None:
    """Why this process cannot deal clients in turn (None: it can).

    Loads the program once against throw-away maps, so the caller can choose the hand-off
    before it binds anything (``--accept auto`` without CAP_BPF).  Asked once per process.
    """
    if not _unavailable:
        _unavailable.append(_reason_if_fails(lambda fds: _load_selector(1, fds)))
    return _unavailable[0]


def attach_round_robin(listeners: list[socket.socket]) -> str | None:
    """Make the SO_REUSEPORT group of ``listeners`` deal new clients to them in turn.

    ``listeners`` are listening sockets of one group, in the order the connections should
    go (listener *i* to worker *i*).  Returns None once attached, or a one-line reason
    (typically "Operation not permitted": loading needs CAP_BPF), in which case nothing
    changed and the kernel's hash keeps placing clients.
    """
    def attach(fds: list[int]) -> None:
        sockarray, prog = _load_selector(len(listeners), fds)
        for index, sock in enumerate(listeners):
            _update(sockarray, index, sock.fileno())
        listeners[0].setsockopt(socket.SOL_SOCKET, _SO_ATTACH_REUSEPORT_EBPF,
                                struct.pack("i", prog))

    return _reason_if_fails(attach)
