"""Adopting inherited socket fds (-L, -S, -C) and opening listeners, with clear refusals.

An inherited fd can be anything: closed, a file, a datagram socket, a connected socket
where a listening one was meant.  Each is checked here once so the error names the flag,
the fd and what it actually is.
"""

from __future__ import annotations

import errno
import os
import socket
import stat

from .addresses import ResolvedAddress
from .errors import UserError, describe_oserror
from .factory import SocketFactory


def _fd_kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISFIFO(mode):
        return "a pipe"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISDIR(mode):
        return "a directory"
    return "not a socket"


# Saying what an inherited socket *is* tells the user which fd they mixed up.
_SOCKET_KINDS = {
    socket.SOCK_DGRAM: "a datagram (UDP or Unix datagram) socket",
    socket.SOCK_SEQPACKET: "a seqpacket socket",
    socket.SOCK_RAW: "a raw socket",
}


def _adopt_stream_socket(fd_text: str | int, what: str) -> socket.socket:
    try:
        fd = int(fd_text)
        if fd < 0:
            raise ValueError
    except ValueError:
        raise UserError(f"{what} {fd_text!r}: not a file descriptor number") from None
    try:
        st = os.fstat(fd)
    except OSError:
        raise UserError(f"{what} {fd}: file descriptor {fd} is not open") from None
    if not stat.S_ISSOCK(st.st_mode):
        kind = _fd_kind(st.st_mode)
        raise UserError(f"{what} {fd}: file descriptor {fd} is {kind}, not a socket")
    sock = socket.socket(fileno=fd)
    if sock.type != socket.SOCK_STREAM:
        kind = _SOCKET_KINDS.get(sock.type, f"a type {int(sock.type)} socket")
        sock.detach()
        raise UserError(
            f"{what} {fd}: socket is {kind}; expected a stream (TCP or Unix stream) socket"
        )
    os.set_inheritable(fd, False)
    return sock


def adopt_listening_fd(fd_text: str | int, what: str = "--listen-fd") -> socket.socket:
    """An inherited listening socket (netns_tcp_bridge -L, systemd socket activation)."""
    sock = _adopt_stream_socket(fd_text, what)
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        fd = sock.detach()
        raise UserError(
            f"{what} {fd}: socket is not listening (for a connected client socket use "
            "-S/--preaccepted-fd)"
        )
    sock.setblocking(False)
    return sock


def adopt_connected_fd(fd_text: str | int, what: str) -> socket.socket:
    """An inherited connected socket (netns_tcp_bridge -S or -C)."""
    sock = _adopt_stream_socket(fd_text, what)
    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        fd = sock.detach()
        # A listener is a valid listen side (-L), but never a target: say so only for -S.
        hint = ("pass a listening socket with -L/--listen-fd" if what.startswith("-S")
                else "it must already be connected to the target")
        raise UserError(f"{what} {fd}: socket is listening, not connected ({hint})")
    try:
        sock.getpeername()
    except OSError:
        fd = sock.detach()
        raise UserError(
            f"{what} {fd}: socket is not connected (connect it before passing it)"
        ) from None
    sock.setblocking(False)
    return sock


def open_listener(
    factory: SocketFactory, address: ResolvedAddress, *, what: str, backlog: int = socket.SOMAXCONN
) -> socket.socket:
    """A listening TCP socket bound to ``address`` inside the factory's namespace."""
    where = f"in network namespace {factory.label}" if factory.label != "current" else ""
    sock = factory.socket(address.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address.sockaddr)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        hint = {
            errno.EADDRINUSE: "another socket already listens there; pick another port or stop it",
            errno.EADDRNOTAVAIL: "no interface in that namespace has this address",
            errno.EACCES: "ports below 1024 need root or CAP_NET_BIND_SERVICE",
        }.get(exc.errno or 0, "")
        place = f"cannot listen {where}".rstrip()
        text = f"{what} {address}: {place}: {describe_oserror(exc)}"
        raise UserError(text + (f" ({hint})" if hint else "")) from None
    return sock
