"""The OCI runtime spec's seccomp agent message (``containerProcessState``), sans-IO.

A runtime (runc, crun) that starts a container whose seccomp profile names a
``listenerPath`` connects to that Unix socket, sends one JSON document with the
listener fd(s) attached (``SCM_RIGHTS``) and closes.  The document says which attached
fd is which (``fds``: ``"seccompFd"`` is the notify listener), the container's pid, the
profile's ``listenerMetadata`` and the container's state (id, status, bundle...).

Why it is parsed here, apart from the socket: whoever can connect to the agent's
socket chooses these bytes and fds, so they are untrusted input.  :func:`parse_state`
takes the bytes and the number of fds that came with them and returns a value or
raises :class:`StateError` with one line saying what was wrong (too long, not JSON,
a field missing or of the wrong type, ``fds`` not matching the fds received, no or
two ``seccompFd``).  Nothing is looked up from the document: what the agent acts on is
the fd itself (checked to be a seccomp listener by the caller), the pid only names the
container in logs and finds its namespace's addresses (a wrong one can only make the
agent leave more connects in the container's own namespace).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

SECCOMP_FD = "seccompFd"  # the spec's name for the notify listener among ``fds``
MAX_STATE = 64 * 1024  # bytes: a state with annotations is a few KiB; more is refused
MAX_FDS = 8  # the spec names one kind of fd; runtimes send one


class StateError(ValueError):
    """The message is not a container process state we can serve (one line)."""


@dataclass(frozen=True)
class ContainerState:
    """What the agent uses from a runtime's message: which attached fd is the seccomp
    listener, the container's pid and id (for logs), and the profile's metadata."""

    seccomp_index: int  # position of the listener among the fds received
    pid: int
    container_id: str
    metadata: str
    oci_version: str


def parse_state(data: bytes, fd_count: int) -> ContainerState:
    """The state in ``data`` (the whole message, read to EOF) that came with
    ``fd_count`` fds; :class:`StateError` for anything else."""
    if len(data) > MAX_STATE:
        raise StateError(f"state message longer than {MAX_STATE} bytes")
    if not data.strip():
        raise StateError("empty state message")
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise StateError(f"state message is not JSON: {_short(exc)}") from None
    if not isinstance(document, dict):
        raise StateError("state message is not a JSON object")
    version = _field(document, "ociVersion", str)
    fds = _field(document, "fds", list)
    pid = _field(document, "pid", int)
    state = _field(document, "state", dict)
    metadata = document.get("metadata", "")
    if not isinstance(metadata, str):
        raise StateError("'metadata' is not a string")
    container_id = state.get("id", "")
    if not isinstance(container_id, str):
        raise StateError("'state.id' is not a string")
    if isinstance(pid, bool) or pid <= 0:
        raise StateError(f"'pid' {pid!r} is not a process id")
    if not all(isinstance(name, str) for name in fds):
        raise StateError("'fds' holds something other than names")
    if len(fds) != fd_count:
        raise StateError(f"'fds' names {len(fds)} fds but {fd_count} came with the message")
    if fds.count(SECCOMP_FD) != 1:
        raise StateError(f"'fds' must name {SECCOMP_FD!r} exactly once, not {fds!r:.80}")
    return ContainerState(fds.index(SECCOMP_FD), pid, container_id[:128], metadata[:256],
                          version[:32])


def _field(document: dict, name: str, kind: type) -> Any:
    if name not in document:
        raise StateError(f"no {name!r} in the state message")
    value = document[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise StateError(f"{name!r} is not a {kind.__name__}")
    return value


def _short(exc: Exception) -> str:
    return str(exc).splitlines()[0][:80]
