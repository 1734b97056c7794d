"""rootlesskit as the real client of a slirp4netns-compatible helper: an unprivileged user
with subordinate ids, a "host" and an "outside" namespace with servers, the helper binary
under test, and rootlesskit run as that user inside the host namespace.

rootlesskit (1.1.0, Debian's) starts the helper as ``BIN --mtu M -r 3
[--disable-host-loopback] [--cidr C] [--api-socket STATE/.s4nn.sock] [--enable-ipv6]
PID tap0`` after creating ``tap0`` in the child's namespace itself, waits for the ready
byte, then configures tap0 (address network+100, default route via network+2) and, with
``--copy-up=/etc``, writes ``nameserver network+3`` into the copied /etc/resolv.conf. It
gives the helper PR_SET_PDEATHSIG=SIGKILL and, on a normal exit, kills it and removes its
state directory. The ``slirp4netns`` port driver sends ``add_hostfwd`` to that API socket
with the child's address as ``guest_addr``; ``builtin`` relays ports itself.

The helpers under test (``HELPERS``):

* ``slirp4netns``: the real /usr/bin/slirp4netns, so a broken environment fails loudly;
* ``nsbridge``: ours. The test runs the checkout's code, not whatever is installed: a
  wrapper script (in the user's home) calls the ``nsbridge-slirp4netns`` entry point that
  the checkout's pyproject.toml declares, with the distribution's Python and copies of
  nsbridge's dependencies (root's interpreter may sit in a home the user cannot read).
  ``NSBRIDGE_SLIRP4NETNS=PATH`` in the environment names an installed binary instead.
  Without either, ``helper_binary`` raises "nsbridge-slirp4netns not found": a failure,
  never a skip, so a lost entry point cannot pass unnoticed.

``/dev/net/tun``: rootlesskit opens it as the user (root only inside its own user
namespace, which grants no access to the host's device node), so it must be mode 0666
as on stock systems. Some machines (this project's CI image) ship it 0600:
``tun_open_to_users`` makes it 0666 while the tests run and puts the old mode back.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import stat
import subprocess
import time
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import Requirement

from helpers.environment import REPO
from helpers.netns import delete_netns, listen_in
from helpers.servers import DNS_NAME, StreamServer, UdpServer, dns_answer
from helpers.unprivileged import copy_distributions, system_python
from helpers.usernet_host import (
    HOST_V4,
    OUTSIDE_V4,
    OUTSIDE_V6,
    new_host_netns,
    new_outside_netns,
)

HELPERS = ["slirp4netns", "nsbridge"]
REAL_SLIRP4NETNS = "/usr/bin/slirp4netns"
ENTRY_POINT = "nsbridge-slirp4netns"
PROBE = REPO / "tests" / "helpers" / "rootlesskit_probe.py"

# The "outside" (helpers.usernet_host.new_outside_netns): a namespace behind a veth, for the
# internet, so what the child reaches there is never one of the host's own addresses.
# What the child sees (rootlesskit's and slirp4netns's defaults).
CHILD_V4, GATEWAY_V4, DNS_V4 = "10.0.2.100", "10.0.2.2", "10.0.2.3"
USER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class HelperNotFound(AssertionError):
    """Our helper is not in the checkout (or where NSBRIDGE_SLIRP4NETNS points)."""


@dataclass
class RootlessUser:
    """A fresh login user with subordinate uid/gid ranges (as /etc/subuid and /etc/subgid
    give them), and a TMPDIR of its own where rootlesskit makes its state directory."""

    name: str
    uid: int
    gid: int
    home: Path

    @property
    def tmpdir(self) -> Path:
        return self.home / "tmp"

    def argv(self, *command: str) -> list[str]:
        """``command`` run as this user with a clean environment."""
        env = [f"HOME={self.home}", f"PATH={USER_PATH}", f"TMPDIR={self.tmpdir}",
               f"USER={self.name}", "LANG=C.UTF-8"]
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups",
                "env", "-i", *env, *command]


@contextlib.contextmanager
def rootless_user() -> Iterator[RootlessUser]:
    """``useradd -m`` a uniquely named user (shadow's useradd gives it subordinate ids
    from login.defs; added by hand when it did not), removed with its home and its
    /etc/subuid and /etc/subgid lines at the end, even on failure."""
    name = f"nsbrk-{uuid.uuid4().hex[:10]}"
    subprocess.run(["useradd", "-m", "-s", "/bin/sh", name], check=True,
                   capture_output=True)
    try:
        entry = pwd.getpwnam(name)
        for table, option in (("/etc/subuid", "--add-subuids"),
                              ("/etc/subgid", "--add-subgids")):
            if not _subid_lines(table, name):
                start = _free_subid_start(table)
                subprocess.run(["usermod", option, f"{start}-{start + 65535}", name],
                               check=True, capture_output=True)
        user = RootlessUser(name, entry.pw_uid, entry.pw_gid, Path(entry.pw_dir))
        user.tmpdir.mkdir(exist_ok=True)
        os.chown(user.tmpdir, user.uid, user.gid)
        yield user
    finally:
        subprocess.run(["userdel", "-r", "-f", name], capture_output=True)
        for table in ("/etc/subuid", "/etc/subgid"):
            if _subid_lines(table, name):
                _drop_subid_lines(table, name)


def _subid_lines(table: str, name: str) -> list[str]:
    with open(table) as lines:
        return [line for line in lines if line.split(":", 1)[0] == name]


def _free_subid_start(table: str) -> int:
    ends = [100000]
    with open(table) as lines:
        for line in lines:
            parts = line.strip().split(":")
            if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                ends.append(int(parts[1]) + int(parts[2]))
    return max(ends)


def _drop_subid_lines(table: str, name: str) -> None:
    with open(table) as lines:
        kept = [line for line in lines if line.split(":", 1)[0] != name]
    with open(table, "w") as out:
        out.writelines(kept)


@contextlib.contextmanager
def tun_open_to_users() -> Iterator[None]:
    """/dev/net/tun readable and writable by everyone while the block runs (see the module
    docstring), its mode restored afterwards when it was changed."""
    mode = stat.S_IMODE(os.stat("/dev/net/tun").st_mode)
    if mode & 0o006 == 0o006:
        yield
        return
    os.chmod("/dev/net/tun", 0o666)
    try:
        yield
    finally:
        os.chmod("/dev/net/tun", mode)


def helper_binary(kind: str, user: RootlessUser) -> str:
    """The path rootlesskit gets as ``--slirp4netns-binary`` for helper ``kind``."""
    if kind == "slirp4netns":
        return REAL_SLIRP4NETNS
    installed = os.environ.get("NSBRIDGE_SLIRP4NETNS")
    if installed:
        if not os.access(installed, os.X_OK):
            raise HelperNotFound(f"{ENTRY_POINT} not found: NSBRIDGE_SLIRP4NETNS={installed} "
                                 "is not an executable")
        return installed
    with open(REPO / "pyproject.toml", "rb") as file:
        project = tomllib.load(file)["project"]
    target = project.get("scripts", {}).get(ENTRY_POINT)
    if target is None:
        raise HelperNotFound(f"{ENTRY_POINT} not found: the checkout's pyproject.toml has no "
                             f"[project.scripts] {ENTRY_POINT} entry (and "
                             "NSBRIDGE_SLIRP4NETNS is not set)")
    return str(_wrapper_script(user, target, project.get("dependencies", [])))


def _wrapper_script(user: RootlessUser, target: str, dependencies: list[str]) -> Path:
    """A script in the user's home that runs the entry point ``module:function`` of the
    checkout with the distribution's Python and copies of ``dependencies``."""
    script = user.home / ENTRY_POINT
    if script.exists():
        return script
    site = user.home / "site-packages"
    copy_distributions(site, tuple(Requirement(text).name for text in dependencies))
    module, function = target.split(":")
    code = (f"import sys; sys.argv[0] = {ENTRY_POINT!r}; "
            f"from {module} import {function} as main; sys.exit(main())")
    script.write_text(f'#!/bin/sh\nPYTHONPATH={REPO}:{site} exec {system_python()} '
                      f'-c "{code}" "$@"\n')
    script.chmod(0o755)
    subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", str(site), str(script)],
                   check=True)
    # Byte-compiled as an installed copy is (pip compiles on install): the user cannot
    # write __pycache__ into the checkout, and without it every start would compile the
    # sources again, which time-to-ready would then measure instead of nsbridge.
    subprocess.run([system_python(), "-m", "compileall", "-q", str(REPO / "nsbridge"),
                    str(site)], check=True)
    return script


@dataclass
class World:
    """The host namespace (servers on its loopback, a DNS resolver on its address, its
    own /etc/resolv.conf through ``ip netns exec``'s /etc/netns) and the outside."""

    host: str
    outside: str
    tcp_loopback: StreamServer
    tcp_outside: StreamServer
    tcp_outside6: StreamServer
    udp_outside: UdpServer
    dns: UdpServer
    servers: list = field(default_factory=list)


def who(conn) -> None:
    """Answer a client with the address it came from, after reading its line."""
    peer = conn.getpeername()[0]
    conn.recv(4096)
    conn.sendall(f"{peer}\n".encode())


@contextlib.contextmanager
def rootlesskit_world() -> Iterator[World]:
    host = new_host_netns(prefix="nsrk")
    outside = ""
    etc = Path("/etc/netns") / host
    servers: list = []
    try:
        outside = new_outside_netns(host, "nsro")
        etc.mkdir(parents=True)
        (etc / "resolv.conf").write_text(f"nameserver {HOST_V4}\n")
        def tcp(ns: str, address: str) -> StreamServer:
            server = StreamServer(listen_in(ns, address))
            servers.append(server)
            server.start(who)
            return server

        def udp(ns: str, address: str, port: int = 0, answer=None) -> UdpServer:
            server = UdpServer(ns, answer or (lambda data: data.upper()), address, port)
            servers.append(server)
            return server

        yield World(host, outside, tcp(host, "127.0.0.1"), tcp(outside, OUTSIDE_V4),
                    tcp(outside, OUTSIDE_V6), udp(outside, OUTSIDE_V4),
                    udp(host, HOST_V4, 53, dns_answer), servers)
    finally:
        for server in servers:
            server.close()
        shutil.rmtree(etc, ignore_errors=True)
        if outside:
            delete_netns(outside)
        delete_netns(host)


def rootlesskit_argv(world: World, user: RootlessUser, binary: str, flags: list[str],
                     command: list[str]) -> list[str]:
    """rootlesskit run as ``user`` in the host namespace with helper ``binary``.

    ``--slirp4netns-sandbox=auto --slirp4netns-seccomp=auto`` (dockerd-rootless.sh's
    defaults): rootlesskit then adds ``--enable-sandbox --enable-seccomp``
    whenever the helper's ``--help`` lists them, so every case runs locked down for
    both helpers."""
    return ["ip", "netns", "exec", world.host, *user.argv(
        "rootlesskit", "--net=slirp4netns", f"--slirp4netns-binary={binary}",
        "--slirp4netns-sandbox=auto", "--slirp4netns-seccomp=auto",
        "--copy-up=/etc", *flags, *command)]


def run_rootlesskit(world: World, user: RootlessUser, binary: str, flags: list[str],
                    script: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``script`` (sh) inside rootlesskit and wait for it."""
    argv = rootlesskit_argv(world, user, binary, flags, ["sh", "-c", script])
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def start_rootlesskit(world: World, user: RootlessUser, binary: str, flags: list[str],
                      command: list[str]) -> subprocess.Popen:
    """rootlesskit in the background, stdin and stdout piped (the caller ends it)."""
    argv = rootlesskit_argv(world, user, binary, flags, command)
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def probe(*args: str) -> str:
    """The shell words that run the probe program inside."""
    return " ".join(["python3", str(PROBE), *args])


def user_processes(uid: int) -> dict[int, str]:
    """pid -> command line of every process whose real uid is ``uid``."""
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("Uid:") and int(line.split()[1]) == uid:
                found[int(entry.name)] = cmdline.strip()
    return found


def socket_files(top: Path) -> list[Path]:
    """Every Unix socket file under ``top``."""
    return [path for path in top.rglob("*")
            if not path.is_symlink() and stat.S_ISSOCK(path.lstat().st_mode)]


def end_user_processes(uid: int, timeout: float = 5) -> dict[int, str]:
    """Wait for the user's processes to go; SIGKILL the ones still there (by pid, all
    started by this test through rootlesskit) and return what was left."""
    deadline = time.monotonic() + timeout
    while (left := user_processes(uid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return left


DIG = f"dig +short +time=2 +tries=3 @{DNS_V4} {DNS_NAME} A"
