"""The seccomp section of an OCI ``config.json`` that hands a container to
``nsbridge seccomp-agent``, sans-IO (values in, a JSON-ready dict out).

The runtime (runc, crun) builds the container's filter from this section with
libseccomp; the agent cannot add to it.  So the section must close by itself every
door ``nsbridge run --bypass``'s own filter (:func:`nsbridge.linux.seccomp.
notify_program`) closes, or a container could start traffic the agent never decided:

* ``connect`` and ``listen`` → ``SCMP_ACT_NOTIFY`` (the agent answers them);
* ``io_uring_setup``/``enter``/``register`` → ENOSYS (io_uring's connect and sendmsg
  never meet seccomp; ENOSYS lets programs fall back to plain calls);
* ``sendto``/``sendmmsg`` with ``MSG_FASTOPEN`` in their fourth argument, ``sendmsg`` in
  its third → EOPNOTSUPP (a send that connects first would connect a switched socket
  again, undecided);
* ``architectures`` names the native ABI only: libseccomp then sends every call made
  through another ABI (x86's ``int 0x80`` with its ``socketcall``, x32) to the
  runtime's bad-architecture action, which never runs it.

``defaultAction`` is ``SCMP_ACT_ALLOW``: this section adds socket switching and takes
away nothing else.  A deny list of one's own can join the same ``syscalls`` list, as
long as it gives none of the calls above another action.
"""

from __future__ import annotations

import errno
import platform

NOTIFIED = ("connect", "listen")
NOT_IMPLEMENTED = ("io_uring_setup", "io_uring_enter", "io_uring_register")
MSG_FASTOPEN = 0x20000000
# The send calls and the index of their flags argument.
FLAGS_ARGUMENT = {"sendto": 3, "sendmmsg": 3, "sendmsg": 2}
ARCHITECTURES = {"x86_64": "SCMP_ARCH_X86_64", "aarch64": "SCMP_ARCH_AARCH64"}


class ProfileError(ValueError):
    """No section can be made for these values (one line)."""


def seccomp_section(listener_path: str, metadata: str = "",
                    machine: str | None = None) -> dict:
    """The ``linux.seccomp`` object for a container served by the agent at
    ``listener_path`` (an absolute path, as the runtime sees it)."""
    machine = (machine or platform.machine()).lower()
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    if machine not in ARCHITECTURES:
        raise ProfileError(f"no seccomp architecture name for {machine}")
    if not listener_path.startswith("/"):
        raise ProfileError(f"listenerPath {listener_path!r} must be an absolute path")
    section: dict = {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": [ARCHITECTURES[machine]],
        "listenerPath": listener_path,
        "syscalls": syscall_rules(),
    }
    if metadata:
        section["listenerMetadata"] = metadata
    return section


def syscall_rules() -> list[dict]:
    """The ``syscalls`` entries the agent needs (module docstring)."""
    rules: list[dict] = [
        {"names": list(NOTIFIED), "action": "SCMP_ACT_NOTIFY"},
        {"names": list(NOT_IMPLEMENTED), "action": "SCMP_ACT_ERRNO",
         "errnoRet": errno.ENOSYS},
    ]
    for name, index in FLAGS_ARGUMENT.items():
        rules.append({"names": [name], "action": "SCMP_ACT_ERRNO",
                      "errnoRet": errno.EOPNOTSUPP,
                      "args": [{"index": index, "value": MSG_FASTOPEN,
                                "valueTwo": MSG_FASTOPEN, "op": "SCMP_CMP_MASKED_EQ"}]})
    return rules

