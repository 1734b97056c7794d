"""A small classic-BPF interpreter: what a seccomp filter returns for one call, as the
kernel would compute it, so filters are tested for every ABI without installing them."""

from __future__ import annotations

import struct

from nsbridge.linux import seccomp


def run_filter(program: bytes, nr: int, arch: int, args: tuple[int, ...] = ()) -> int:
    """Interpret ``program`` (struct sock_filter bytes) on one ``seccomp_data``, as the
    kernel would: the value it returns."""
    data = struct.pack("=iIQ6Q", nr, arch, 0, *(list(args) + [0] * (6 - len(args))))
    insns = [struct.unpack_from("=HBBI", program, at) for at in range(0, len(program), 8)]
    pc, acc = 0, 0
    for _ in range(len(insns)):  # forward jumps only: at most one pass
        code, jt, jf, k = insns[pc]
        if code == seccomp.BPF_LD_W_ABS:
            acc = struct.unpack_from("=I", data, k)[0]
            pc += 1
        elif code == seccomp.BPF_JEQ_K:
            pc += 1 + (jt if acc == k else jf)
        elif code == seccomp.BPF_JGE_K:
            pc += 1 + (jt if acc >= k else jf)
        elif code == seccomp.BPF_JSET_K:
            pc += 1 + (jt if acc & k else jf)
        elif code == seccomp.BPF_RET_K:
            return k
        else:
            raise AssertionError(f"opcode {code:#x} at {pc}")
    raise AssertionError("ran off the end of the program")
