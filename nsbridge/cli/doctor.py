"""``nsbridge doctor``: what this machine lets nsbridge do, and what to change when it doesn't.

When ``nsbridge run`` or ``forward`` fails on a new machine the cause is nearly always the
environment: a kernel too old for a feature, user namespaces switched off, ``/dev/net/tun``
closed to users, ping sockets not granted, an old pyroute2, the native relay not built.  Each
check here *tries* the thing (creates a sandbox namespace the way ``run`` does, opens a ping
socket, sets the socket option the tun TCP path needs) rather than reading version numbers,
and says in one line what works, what is missing, and what to do.

Levels: ``ok``; ``limited`` — a feature is unavailable but nsbridge falls back (slower or with
less); ``missing`` — a command cannot work.  The command exits 1 when anything is missing.
"""

from __future__ import annotations

import os
import platform
import socket
import stat
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

from nsbridge import __version__
from nsbridge.dependencies import pyroute2_problem, pyroute2_version
from nsbridge.errors import UserError, describe_oserror

Level = Literal["ok", "limited", "missing"]
TUN_PATH = "/dev/net/tun"
NOBODY = 65534


@dataclass(frozen=True)
class Finding:
    """One line of the report: what was checked, how it went, and what to do if not ok."""

    level: Level
    topic: str
    text: str

    def __str__(self) -> str:
        return f"{self.level:<8}{self.topic}: {self.text}"

    @classmethod
    def limited_if(cls, problem: str | None, topic: str, *, ok: str, instead: str) -> Finding:
        """An optional feature: "ok" saying ``ok`` when there is no ``problem``, else
        "limited" with the problem and what serves ``instead``."""
        if problem is None:
            return cls("ok", topic, ok)
        return cls("limited", topic, f"{problem}; {instead}")


def check_python() -> Finding:
    version = platform.python_version()
    return Finding("ok", "python", f"{version} ({sys.executable})")


def check_kernel() -> Finding:
    return Finding("ok", "kernel", f"Linux {platform.release()}")


def check_pyroute2() -> Finding:
    problem = pyroute2_problem()
    if problem is not None:
        return Finding("missing", "pyroute2",
                       f"{problem}; nsbridge run/attach and the demo need it (forward does not)")
    return Finding("ok", "pyroute2", str(pyroute2_version()))


def check_tun_device() -> Finding:
    """Users need read/write on /dev/net/tun (0666 is the usual mode) for ``run`` without
    root: the device is opened inside the user's own namespaces, by the user."""
    try:
        mode = stat.S_IMODE(os.stat(TUN_PATH).st_mode)
    except OSError as exc:
        return Finding("missing", "tun device",
                       f"{TUN_PATH}: {describe_oserror(exc)}; load the tun module "
                       "(modprobe tun) — nsbridge run/attach need it")
    if mode & 0o006 != 0o006:
        return Finding("limited", "tun device",
                       f"{TUN_PATH} is mode {mode:04o}: only root can use nsbridge run/attach; "
                       f"'chmod 0666 {TUN_PATH}' (the usual mode) lets users do it too")
    return Finding("ok", "tun device", f"{TUN_PATH} mode {mode:04o}")


def check_sandbox() -> Iterator[Finding]:
    """Create a ``run`` namespace for real (no command): user, network and mount namespaces,
    the tun device, netlink set-up, and the nftables redirect of the TCP fast path."""
    problem = pyroute2_problem()
    if problem is not None:
        yield Finding("missing", "nsbridge run", "cannot be tried without pyroute2")
        return
    from nsbridge.usernet.host import redirect
    from nsbridge.usernet.inside.sandbox import Sandbox

    who = "root" if os.geteuid() == 0 else "this user"
    try:
        handle = Sandbox.create(None, extra=redirect.setup_inside_optional, timeout=15)
    except UserError as exc:
        yield Finding("missing", "nsbridge run", f"does not work for {who}: {exc}")
        return
    with handle:
        fast_path = bool(handle.extra)
    yield Finding("ok", "nsbridge run", f"a sandbox namespace with a tun device works for {who}")
    if fast_path:
        yield Finding("ok", "tcp fast path", "nf_tables redirect works inside the namespace")
    else:
        yield Finding("limited", "tcp fast path",
                      "nf_tables is unavailable inside the namespace (kernel without "
                      "nf_tables/nft_redirect?): TCP takes the tun path (--tcp=tun)")


def check_unprivileged_users() -> Finding:
    """As root, whether ordinary users could use ``run``: a child drops to uid 65534 and
    creates user+network namespaces (the step that distributions switch off)."""
    from nsbridge.linux.netns import CLONE_NEWNET, unshare

    clone_newuser = 0x10000000
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            unshare(clone_newuser | CLONE_NEWNET)
            os.write(write_end, b"ok")
        except OSError as exc:
            os.write(write_end, describe_oserror(exc).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        answer = pipe.read().decode(errors="replace")
    os.waitpid(pid, 0)
    if answer == "ok":
        return Finding("ok", "user namespaces", "unprivileged users may create them")
    return Finding(
        "limited", "user namespaces",
        f"unprivileged users may not create them ({answer}): only root can use nsbridge run; "
        "enable them (sysctl kernel.unprivileged_userns_clone=1 on older Debian, "
        "user.max_user_namespaces > 0, or on Ubuntu 24.04+ an AppArmor profile / "
        "kernel.apparmor_restrict_unprivileged_userns=0)")


def check_tun_tcp_path() -> Finding:
    from nsbridge.usernet.host import tuntcp

    return Finding.limited_if(tuntcp.unavailable(), "--tcp=tun",
                              ok="this kernel has SO_PEEK_OFF on TCP",
                              instead="the nftables fast path serves TCP instead")


def check_ping_sockets() -> Finding:
    from nsbridge.usernet.host import flowrelay
    from nsbridge.usernet.host.engine import ping_group_range

    problem = flowrelay.ping_sockets_refused()
    if problem is None:
        return Finding("ok", "ping", "ping sockets are permitted (ping works inside run)")
    group_range = ping_group_range()
    fallback = "raw sockets serve ping (root)" if os.geteuid() == 0 else \
        "ping from inside run/attach is refused"
    return Finding("limited", "ping",
                   f"{problem} (range {group_range!r}, our gid {os.getegid()}): {fallback}; "
                   f"'sysctl -w net.ipv4.ping_group_range=\"0 2147483647\"' permits them")


def check_native_relay() -> Finding:
    from nsbridge.usernet.host import flowrelay

    return Finding.limited_if(flowrelay.unavailable(), "native relay",
                              ok="built (UDP and ping run in C)",
                              instead="UDP and ping are served by Python (slower)")


def check_native_tcp_relay() -> Finding:
    from nsbridge.relay import native

    return Finding.limited_if(native.unavailable(), "native TCP relay",
                              ok="built (forwarded TCP connections are relayed in C)",
                              instead="forwarded TCP is relayed by Python (slower)")


def check_native_switching() -> Finding:
    from nsbridge.linux import notifycore

    slower = notifycore.no_sync_wake_up()
    return Finding.limited_if(notifycore.unavailable(), "native switching core",
                              ok="built (run --bypass serves each connect's system calls "
                              "in C, from a thread of its own" + (f"; {slower})" if slower
                                                                  else " woken synchronously)"),
                              instead="run --bypass serves connects in Python (slower per "
                              "connect)")


def check_socket_switching() -> Finding:
    from nsbridge.linux.seccomp import SeccompUnsupported, native_arch
    from nsbridge.linux.seccomp_notify import unsupported

    try:
        native_arch()
        problem = unsupported()
    except SeccompUnsupported as exc:
        problem = exc.strerror
    return Finding.limited_if(problem, "--bypass",
                              ok="seccomp user notification with ADDFD (socket switching)",
                              instead="run --bypass is refused; TCP takes the other paths")


CHECKS: tuple[Callable[[], Finding | Iterator[Finding]], ...] = (
    check_python,
    check_kernel,
    check_pyroute2,
    check_tun_device,
    check_sandbox,
    check_tun_tcp_path,
    check_ping_sockets,
    check_native_relay,
    check_native_tcp_relay,
    check_native_switching,
    check_socket_switching,
)


def findings() -> list[Finding]:
    """Every check's findings, in order (root also learns what ordinary users may do)."""
    found: list[Finding] = []
    checks = list(CHECKS)
    if os.geteuid() == 0:
        checks.insert(5, check_unprivileged_users)
    for check in checks:
        result = check()
        found.extend([result] if isinstance(result, Finding) else result)
    return found


def run_doctor() -> int:
    """Print the report; 1 if anything is missing, else 0."""
    print(f"nsbridge {__version__} on {socket.gethostname()}")
    found = findings()
    for finding in found:
        print(finding)
    return 1 if any(f.level == "missing" for f in found) else 0
