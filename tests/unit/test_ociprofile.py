"""The seccomp section for containers served by the agent
(nsbridge.usernet.proto.ociprofile): it closes the doors ``run --bypass``'s own filter
closes (nsbridge.linux.seccomp.notify_program), named as libseccomp names them."""

from __future__ import annotations

import errno

import pytest

from nsbridge.linux import seccomp
from nsbridge.usernet.proto.ociprofile import (
    FLAGS_ARGUMENT,
    MSG_FASTOPEN,
    NOT_IMPLEMENTED,
    NOTIFIED,
    ProfileError,
    seccomp_section,
)


def test_the_same_calls_as_run_bypass_are_trapped_and_refused() -> None:
    program = seccomp.notify_program(seccomp.X86_64)
    trapped = {seccomp.X86_64.numbers[name] for name in NOTIFIED}
    notify_jumps = {insn.k for insn in program if insn.jt == "notify"}
    nosys_jumps = {insn.k for insn in program if insn.jt == "nosys"}
    assert notify_jumps == trapped
    assert nosys_jumps == {seccomp.X86_64.numbers[name] for name in NOT_IMPLEMENTED}
    assert MSG_FASTOPEN == seccomp.MSG_FASTOPEN
    # notify_program reads sendmsg's flags from the third argument, the others' from
    # the fourth: the profile's masks sit on the same arguments.
    assert FLAGS_ARGUMENT == {"sendto": 3, "sendmmsg": 3, "sendmsg": 2}


def test_the_section() -> None:
    section = seccomp_section("/run/user/1000/nsb.sock", "web", machine="x86_64")
    assert section["defaultAction"] == "SCMP_ACT_ALLOW"
    assert section["architectures"] == ["SCMP_ARCH_X86_64"]
    assert section["listenerPath"] == "/run/user/1000/nsb.sock"
    assert section["listenerMetadata"] == "web"
    rules = section["syscalls"]
    assert rules[0] == {"names": ["connect", "listen"], "action": "SCMP_ACT_NOTIFY"}
    assert rules[1]["errnoRet"] == errno.ENOSYS
    fastopen = {rule["names"][0]: rule for rule in rules[2:]}
    for name, index in FLAGS_ARGUMENT.items():
        (argument,) = fastopen[name]["args"]
        assert argument == {"index": index, "value": MSG_FASTOPEN, "valueTwo": MSG_FASTOPEN,
                            "op": "SCMP_CMP_MASKED_EQ"}
        assert fastopen[name]["errnoRet"] == errno.EOPNOTSUPP
    assert seccomp_section("/a", machine="arm64")["architectures"] == ["SCMP_ARCH_AARCH64"]
    assert "listenerMetadata" not in seccomp_section("/a", machine="x86_64")


@pytest.mark.parametrize(("path", "machine", "message"), [
    ("relative.sock", "x86_64", "absolute"),
    ("/a.sock", "riscv64", "no seccomp architecture"),
])
def test_refusals(path: str, machine: str, message: str) -> None:
    with pytest.raises(ProfileError, match=message):
        seccomp_section(path, machine=machine)
