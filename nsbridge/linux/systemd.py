"""systemd socket activation and readiness notification, without libsystemd.

Socket activation lets systemd own the listening port: it binds before nsbridge runs
(so clients queue instead of being refused during a restart) and nsbridge needs no
privilege to bind low ports.  Notification (``Type=notify``) lets units ordered after
nsbridge start only once it really forwards.  Both protocols are a few environment
variables and one datagram, documented in sd_listen_fds(3) and sd_notify(3); linking
libsystemd (or depending on python-systemd) for that is not worth it.
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Mapping, MutableMapping

from nsbridge.errors import UserError, describe_oserror

LISTEN_FDS_START = 3
_LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
_MAX_FDS = 65536  # far beyond any real unit; stops a typo from touching every fd number


def listen_fds(
    environ: MutableMapping[str, str] = os.environ, unset: bool = True
) -> dict[str, list[int]]:
    """The sockets systemd passed, by ``FileDescriptorName=`` (default ``"unknown"``).

    Follows sd_listen_fds_with_names(3): nothing was passed unless ``LISTEN_PID`` is set
    and equals our PID (the variables may be inherited from a parent they were meant
    for); then fds ``3 .. 3+LISTEN_FDS-1`` are ours, named in order by the colon-separated
    ``LISTEN_FDNAMES``.  Several sockets may share a name, hence lists.  Each fd gets
    ``FD_CLOEXEC`` so programs nsbridge runs do not inherit listeners.  With ``unset``
    (the default) the variables are removed whatever the outcome, so nothing started
    later mistakes them for its own.  Malformed values raise :class:`UserError`.
    """
    try:
        return _listen_fds(environ)
    finally:
        if unset:
            for name in _LISTEN_VARS:
                environ.pop(name, None)


def _listen_fds(environ: Mapping[str, str]) -> dict[str, list[int]]:
    pid_text = environ.get("LISTEN_PID")
    if pid_text is None:
        return {}
    if _parse_count("LISTEN_PID", pid_text, minimum=1) != os.getpid():
        return {}
    count_text = environ.get("LISTEN_FDS")
    if count_text is None:
        return {}
    count = _parse_count("LISTEN_FDS", count_text, minimum=0)
    names = _fd_names(environ.get("LISTEN_FDNAMES"), count)
    fds = list(range(LISTEN_FDS_START, LISTEN_FDS_START + count))
    for fd in fds:  # check all before changing any
        _check_open(fd, count)
    result: dict[str, list[int]] = {}
    for fd, name in zip(fds, names, strict=True):
        flags = fcntl.fcntl(fd, fcntl.F_GETFD)
        fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
        result.setdefault(name, []).append(fd)
    return result


def _parse_count(variable: str, text: str, *, minimum: int) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) < minimum or int(text) > 2**31 - 1:
        low = "a PID" if minimum else "a number of file descriptors"
        raise UserError(f"{variable}={text!r}: not {low} (socket activation environment)")
    value = int(text)
    if variable == "LISTEN_FDS" and value > _MAX_FDS:
        raise UserError(f"{variable}={text!r}: implausibly many file descriptors")
    return value


def _fd_names(text: str | None, count: int) -> list[str]:
    if text is None:
        return ["unknown"] * count
    names = text.split(":") if text else []
    if len(names) != count:
        raise UserError(
            f"LISTEN_FDNAMES={text!r}: {len(names)} names for LISTEN_FDS={count} file descriptors"
        )
    return names


def _check_open(fd: int, count: int) -> None:
    try:
        os.fstat(fd)
    except OSError as exc:
        raise UserError(
            f"LISTEN_FDS={count}: file descriptor {fd} is not open ({describe_oserror(exc)})"
        ) from None


def fds_named(fds: Mapping[str, list[int]], name: str, *, what: str) -> list[int]:
    """The fds systemd passed under ``name``; a :class:`UserError` lists what it did pass.

    ``what`` is the option that asked (``--listen-fd-name web``), for the message.
    """
    if name in fds:
        return list(fds[name])
    if not fds:
        passed = "no sockets (is the service started by its .socket unit?)"
    else:
        passed = "sockets named " + ", ".join(sorted(fds))
    raise UserError(f"{what} {name}: systemd passed {passed}")


# ---- sd_notify ------------------------------------------------------------------------


def notify(state: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Send ``state`` (``"READY=1"``, newline-separated assignments) to ``$NOTIFY_SOCKET``.

    Returns False when ``NOTIFY_SOCKET`` is unset or empty (not run by systemd with
    ``Type=notify``): callers notify unconditionally.  True once the datagram is sent.
    ``/path`` is a filesystem socket, ``@name`` an abstract one.  A malformed or
    unreachable socket raises :class:`UserError`.  systemd checks the sender's PID
    (``NotifyAccess=main``), so call this from the main process, not a worker.
    """
    target_text = environ.get("NOTIFY_SOCKET", "")
    if not target_text:
        return False
    address = _notify_address(target_text)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto(state.encode("utf-8"), address)
        except OSError as exc:
            first = state.split("\n", 1)[0]
            raise UserError(
                f"NOTIFY_SOCKET={target_text}: cannot send {first} ({describe_oserror(exc)})"
            ) from None
    return True


def _notify_address(text: str) -> str | bytes:
    if text.startswith("/"):
        return text
    if text.startswith("@") and len(text) > 1:
        return b"\0" + text[1:].encode("utf-8")
    raise UserError(f"NOTIFY_SOCKET={text!r}: expected an absolute path or @abstract-name")


def ready(environ: Mapping[str, str] = os.environ) -> bool:
    """Tell systemd start-up is done: listeners open, workers running."""
    return notify("READY=1", environ)


def stopping(environ: Mapping[str, str] = os.environ) -> bool:
    """Tell systemd a drain has begun, so ``systemctl status`` shows "deactivating"."""
    return notify("STOPPING=1", environ)


def status(text: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Set the one-line status ``systemctl status`` shows.

    Newlines are folded to spaces: each line of a notification is its own assignment,
    so a status built from client data must not be able to say ``READY=1``.
    """
    return notify("STATUS=" + " ".join(text.splitlines()), environ)
