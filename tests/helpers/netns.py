"""Named network namespaces and sockets made inside them.

Namespaces get unique names and the caller deletes them (the fixtures do, even when a test
fails).  Entering one is done by a short-lived thread of the test's own, deliberately
independent of nsbridge's code, so tests do not trust what they test.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from helpers.waiting import wait_until

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def ip(*args: str) -> None:
    """``ip ARGS`` (iproute2), raising with its output when it fails."""
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def new_netns(prefix: str = "nsbt") -> str:
    """A fresh named namespace (``PREFIX-<random>``) with ``lo`` up; the caller deletes
    it with ``delete_netns``, also when the set-up fails half-way."""
    name = f"{prefix}-{uuid.uuid4().hex[:10]}"
    ip("netns", "add", name)
    try:
        ip("-n", name, "link", "set", "lo", "up")
    except BaseException:
        delete_netns(name)
        raise
    return name


def delete_netns(name: str) -> None:
    """Delete namespace ``name``; one already gone is not an error (cleanup paths)."""
    subprocess.run(["ip", "netns", "del", name], capture_output=True)


def in_netns(name: str, fn: Callable[[], object]) -> object:
    """Run ``fn`` in a short-lived thread that entered namespace ``name``.

    Deliberately independent of nsbridge's own code, so tests do not trust what they test.
    """
    box: dict[str, object] = {}

    def run() -> None:
        fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc
        finally:
            os.close(fd)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]


def listen_in(name: str | None, host: str = "127.0.0.1", port: int = 0,
              backlog: int = 1024) -> socket.socket:
    """A listening TCP socket inside namespace ``name`` (None: the test's own)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET

    def make() -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        return sock

    return make() if name is None else in_netns(name, make)  # type: ignore[return-value]


def connect_in(name: str | None, address: tuple) -> socket.socket:
    """A TCP connection made from inside namespace ``name``."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET

    def make() -> socket.socket:
        return socket.create_connection(address, timeout=10) if family == socket.AF_INET \
            else _connect6(address)

    return make() if name is None else in_netns(name, make)  # type: ignore[return-value]


def _connect6(address: tuple) -> socket.socket:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(address)
    return sock



def reachable_in(netns: str, address: tuple) -> bool:
    """Whether a TCP connection to ``address`` succeeds from inside ``netns`` (1 s)."""
    def probe() -> bool:
        try:
            socket.create_connection(address, timeout=1).close()
            return True
        except OSError:
            return False

    return bool(in_netns(netns, probe))



def free_port(netns: str | None = None, kind: int = socket.SOCK_STREAM,
              host: str = "127.0.0.1") -> int:
    """A port nobody uses right now (bound, noted, closed) in ``netns``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET

    def pick() -> int:
        with socket.socket(family, kind) as sock:
            sock.bind((host, 0))
            return sock.getsockname()[1]

    return pick() if netns is None else in_netns(netns, pick)  # type: ignore[return-value]


@contextlib.contextmanager
def podman_style_namespace(host: str, mount: Path) -> Iterator[tuple[subprocess.Popen, str]]:
    """A user+network namespace made from ``host`` (``unshare -Ur --net``) with its
    network namespace bind-mounted at ``mount``, as podman keeps one: yields (the
    process holding it, its user namespace's /proc path).  The holder may be killed
    early (the bind mount keeps the namespace); both end when the block does."""
    holder = subprocess.Popen(["ip", "netns", "exec", host, "unshare", "-Ur", "--net",
                               "sleep", "60"])
    mount.touch()
    try:
        wait_until(lambda: os.readlink(f"/proc/{holder.pid}/ns/net") !=
                   os.readlink("/proc/self/ns/net") and
                   os.readlink(f"/proc/{holder.pid}/ns/user") !=
                   os.readlink("/proc/self/ns/user"), timeout=5)
        subprocess.run(["mount", "--bind", f"/proc/{holder.pid}/ns/net", str(mount)],
                       check=True)
        yield holder, f"/proc/{holder.pid}/ns/user"
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.wait()
        subprocess.run(["umount", str(mount)], capture_output=True)
