"""What ``run``'s helper does inside the new namespaces before it becomes the command.

In this order (the essay in :mod:`.sandbox` says why): new namespaces and id maps
(:mod:`.userns`), non-dumpable, private mounts and our resolv.conf, the tun device and
netlink set-up (:mod:`.netconf`), the caller's ``extra`` callback, one report to the
parent, then — once the parent says "go" — ``exec`` of the command with the stdio,
fds, environment and working directory the caller chose.  :func:`_configure_here` is
also what ``attach``'s helper does in an existing namespace.

Runs only in forked helpers: every function here may ``_exit``.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
from collections.abc import Callable, Iterable
from typing import NoReturn

from nsbridge.errors import describe_oserror
from nsbridge.linux.libc import libc
from nsbridge.usernet.inside import confine, netconf
from nsbridge.usernet.inside.helper import _FIXED_FDS, _SCM_MAX_FD, _close_all, _send_error
from nsbridge.usernet.inside.netconf import NetConfig, SetupError
from nsbridge.usernet.inside.userns import _map_ids, _unshare_all

MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18

RESOLV_CONF = "/etc/resolv.conf"

ExtraFds = Callable[[], Iterable["int | socket.socket"]]
"""Run inside the namespace after it is configured; returns fds/sockets to send back."""

_libc = libc  # the one handle (nsbridge.linux.libc)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_void_p,
]


def _run_child(
    sock: socket.socket,
    argv: list[str] | None,
    config: NetConfig,
    resolv: str,
    extra: ExtraFds | None,
    stdio: tuple[int | None, ...],
    pass_fds: tuple[int, ...],
    env: dict[str, str],
    cwd: int,
    bypass: bool = False,
) -> NoReturn:
    """The ``run`` helper: new namespaces, setup, report, then become CMD.

    With ``bypass`` (socket switching) the helper installs the notify filter last,
    after every step of the set-up (which must not be trapped) and before the report,
    which carries the listener fd to the host side; what it does from there to the exec
    (read "go", move fds, exec) calls nothing the filter traps.  The filter then holds
    for CMD and every process it starts.

    Forked dumpable (see :func:`.helper._fork`): it becomes non-dumpable as soon as its id maps
    are written, before anything else happens in the new namespaces, and stays so until
    the exec that makes it CMD.
    """
    try:
        uid, gid = os.geteuid(), os.getegid()
        try:
            _unshare_all()
            _map_ids(uid, gid)
            confine.make_non_dumpable()
            warnings = _setup_mounts(resolv, config)
            header, fds = _configure_here(config, extra)
            if bypass:
                fds.append(_install_switch_filter(fds))
                header["seccomp_listener"] = True
        except SetupError as exc:
            _send_error(sock, str(exc))
            os._exit(1)
        header["warnings"] = warnings + header.get("warnings", [])
        socket.send_fds(sock, [json.dumps(header).encode()], fds)
        _close_all(fds)  # the parent has its own copies; CMD must not hold the tun
        if argv is None or not sock.recv(16):
            os._exit(0)  # no command, or the parent gave up (closed the socket)
        os.fchdir(cwd)  # the caller's working directory, for CMD
        _exec(sock, argv, stdio, pass_fds, env)
    except BaseException as exc:
        _send_error(sock, f"unexpected error in the namespace helper: {type(exc).__name__}: {exc}")
    os._exit(1)


WAIT_KILLABLE_VARIABLE = "NSBRIDGE_BYPASS_WAIT_KILLABLE"  # "0": never ask for the flag
# Read at import, in nsbridge's own process: the helper that installs the filter is
# forked from it with an empty environment.
_WAIT_KILLABLE = os.environ.get(WAIT_KILLABLE_VARIABLE, "1") != "0"


def _install_switch_filter(fds: list[int]) -> int:
    """Install ``run --bypass``'s notify filter here (no_new_privs first) and return its
    listener fd; on failure close ``fds`` and raise SetupError with one line."""
    from nsbridge.linux import seccomp

    try:
        if len(fds) >= _SCM_MAX_FD:
            raise SetupError("too many fds to pass the seccomp listener too")
        arch = seccomp.native_arch()
        # WAIT_KILLABLE_RECV where the kernel has it (see install_listener); the
        # variable turns it off to compare (tests, a kernel that misbehaves with it).
        listener, _killable = seccomp.install_listener(
            seccomp.assemble(seccomp.notify_program(arch)), wait_killable=_WAIT_KILLABLE)
        return listener
    except SetupError:
        _close_all(fds)
        raise
    except OSError as exc:
        _close_all(fds)
        raise SetupError(f"--bypass: cannot install the seccomp filter: "
                         f"{describe_oserror(exc)}") from None


def _mount(
    source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None
) -> None:
    def enc(text: str | None) -> bytes | None:
        return None if text is None else os.fsencode(text)

    data_buf = ctypes.c_char_p(enc(data)) if data is not None else None
    if _libc.mount(enc(source), enc(target), enc(fstype), flags, data_buf) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), target)


def _setup_mounts(resolv: str, config: NetConfig) -> list[str]:
    """Private mounts, then our resolv.conf in place of the host's.  Returns warnings.

    /etc/resolv.conf is often a symlink (systemd-resolved, NetworkManager).  mount(2)
    follows symlinks in its target, so binding over the *resolved* file is the same thing,
    spelled out: the symlink keeps pointing where it did and that file shows our content.
    If the symlink dangles (its target does not exist, e.g. resolved is not running) there
    is nothing to bind over and we must not create files outside: a tmpfs is mounted over
    the target's directory, in our private mount namespace only, and the file written
    there.  Anything stranger is left alone with a warning: DNS then uses the host's
    servers, which usually are not reachable from the namespace.
    """
    try:
        _mount(None, "/", None, MS_REC | MS_PRIVATE)
    except OSError as exc:
        raise SetupError(
            f"cannot make mounts private in the new mount namespace: {describe_oserror(exc)}"
        ) from None
    real = os.path.realpath(RESOLV_CONF)
    try:
        if os.path.isfile(real):
            _mount(resolv, real, None, MS_BIND)
            return []
        directory = os.path.dirname(real)
        if (
            os.path.islink(RESOLV_CONF)
            and not os.path.lexists(real)
            and os.path.isdir(directory)
            and directory != "/"
        ):
            _mount("tmpfs", directory, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
            with open(real, "w") as f:
                f.write(config.resolv_conf())
            return [
                f"{RESOLV_CONF} points to the missing {real}: mounted an empty tmpfs on "
                f"{directory} inside the namespace to hold resolv.conf"
            ]
    except OSError as exc:
        raise SetupError(
            f"cannot put resolv.conf in place at {real}: {describe_oserror(exc)}"
        ) from None
    what = "missing" if not os.path.lexists(RESOLV_CONF) else "not a regular file"
    return [f"{RESOLV_CONF} is {what}: DNS inside the namespace is not set to {config.dns4}"]


def _configure_here(config: NetConfig, extra: ExtraFds | None) -> tuple[dict, list[int]]:
    """tun + netlink + extra, in the namespace we are in.  (header, [tun, netns, userns,
    *extra]) — the fds are ours to close after sending."""
    tun = netconf.open_tun(config)
    fds = [tun.fd]
    try:
        ipv6 = netconf.configure(config, tun.ifname)
        fds.append(os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC))
        fds.append(os.open("/proc/self/ns/user", os.O_RDONLY | os.O_CLOEXEC))
        extra_fds = _collect(extra) if extra is not None else []
    except BaseException:
        _close_all(fds)
        raise
    if len(extra_fds) > _SCM_MAX_FD - _FIXED_FDS:
        raise SetupError(
            f"the extra callback returned {len(extra_fds)} fds; at most "
            f"{_SCM_MAX_FD - _FIXED_FDS} fit in one message"
        )
    header = {
        "ifname": tun.ifname,
        "offloads": list(tun.offloads),
        "vnet_hdr_size": tun.vnet_hdr_size,
        "ipv6": ipv6,
        "extra": len(extra_fds),
    }
    return header, fds + extra_fds


def _collect_only(fn: ExtraFds) -> tuple[dict, list[int]]:
    """``make_fds``'s work: just the callback's fds, no fixed leading ones."""
    fds = _collect(fn)
    if len(fds) > _SCM_MAX_FD:
        raise SetupError(f"the callback returned {len(fds)} fds; at most {_SCM_MAX_FD} fit")
    return {"extra": len(fds)}, fds


def _collect(fn: ExtraFds) -> list[int]:
    """Call the caller's callback; accept fds or socket objects (kept open until sent)."""
    try:
        items = list(fn())
    except SetupError:
        raise
    except BaseException as exc:
        raise SetupError(
            f"the extra callback failed inside the namespace: {type(exc).__name__}: {exc}"
        ) from None
    fds: list[int] = []
    for item in items:
        # Dup so a socket object being garbage-collected cannot close the fd before
        # send_fds; the helper exits right after, closing everything.
        fds.append(os.dup(item if isinstance(item, int) else item.fileno()))
    return fds


def _exec(
    sock: socket.socket,
    argv: list[str],
    stdio: tuple[int | None, ...],
    pass_fds: tuple[int, ...],
    env: dict[str, str],
) -> NoReturn:
    """Become CMD.  ``sock`` is close-on-exec: EOF tells the parent CMD started."""
    moved = [None if fd is None else os.dup(fd) for fd in stdio]  # dup first: no clobbering
    for target, fd in enumerate(moved):
        if fd is not None:
            os.dup2(fd, target)  # inheritable by default
            os.close(fd)
    for fd in pass_fds:
        os.set_inheritable(fd, True)
    confine.close_fds_except({0, 1, 2, sock.fileno(), *pass_fds})
    # Python ignores SIGPIPE and SIGXFSZ; a fresh program expects the defaults, and a
    # signal mask inherited from a namespace thread must not follow CMD either.
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    try:
        os.execvpe(argv[0], argv, env)  # searches env's PATH, as execvp searched ours
    except OSError as exc:
        _send_error(sock, f"cannot run {argv[0]!r}: {describe_oserror(exc)}")
    os._exit(127)
