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

from nsbridge.errors import UserError, describe_oserror
from nsbridge.net.addresses import ResolvedAddress, UnixAddress
from nsbridge.net.factory import SocketFactory


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


def _adopt_stream_socket(fd_text: str | int, what: str, *, allow_udp: bool = False,
                         ) -> socket.socket:
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
    if allow_udp and sock.type == socket.SOCK_DGRAM and sock.family != socket.AF_UNIX:
        os.set_inheritable(fd, False)
        return sock
    if sock.type != socket.SOCK_STREAM:
        kind = _SOCKET_KINDS.get(sock.type, f"a type {int(sock.type)} socket")
        sock.detach()
        raise UserError(
            f"{what} {fd}: socket is {kind}; expected a stream (TCP or Unix stream) socket"
        )
    os.set_inheritable(fd, False)
    return sock


def adopt_listening_fd(fd_text: str | int, what: str = "--listen-fd", *,
                       allow_udp: bool = False) -> socket.socket:
    """An inherited listening socket (netns_tcp_bridge -L, systemd socket activation), or
    with ``allow_udp`` a bound UDP socket (fd:N and systemd:NAME endpoints)."""
    sock = _adopt_stream_socket(fd_text, what, allow_udp=allow_udp)
    if sock.type == socket.SOCK_DGRAM:
        if sock.getsockname()[1] == 0:
            fd = sock.detach()
            raise UserError(f"{what} {fd}: UDP socket is not bound to an address")
        sock.setblocking(False)
        return sock
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
    factory: SocketFactory, address: ResolvedAddress, *, what: str,
    backlog: int = socket.SOMAXCONN, reuseport: bool = False, sibling: bool = False,
) -> socket.socket:
    """A listening TCP socket bound to ``address`` inside the factory's namespace.

    ``reuseport`` sets SO_REUSEPORT before bind() (it only counts there), so that each
    worker can bind its own listener to the same address (``sibling``: one more member of
    a group this process just made).  With it on, a bind succeeds next to any other
    SO_REUSEPORT listener of the same user, which would then silently share the clients,
    so the first listener of a group first checks with a plain bind that nobody listens
    on the port: "address in use" stays an error in every accept mode.
    """
    if reuseport and not sibling and _port(address) != 0:
        _bind_listener(factory, address, what=what, backlog=None, reuseport=False).close()
    return _bind_listener(factory, address, what=what, backlog=backlog, reuseport=reuseport)


def _port(address: ResolvedAddress) -> int:
    sockaddr = address.sockaddr
    return int(sockaddr[1]) if isinstance(sockaddr, tuple) else 0


def _bind_listener(factory: SocketFactory, address: ResolvedAddress, *, what: str,
                   backlog: int | None, reuseport: bool) -> socket.socket:
    """Bind (and listen, unless ``backlog`` is None: a probe) or raise a UserError."""
    where = f"in network namespace {factory.label}" if factory.label != "current" else ""
    sock = factory.socket(address.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address.sockaddr)
        if backlog is not None:
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


def open_udp_socket(factory: SocketFactory, address: ResolvedAddress, *, what: str,
                    ) -> socket.socket:
    """A bound UDP socket inside the factory's namespace."""
    sock = factory.socket(address.family, socket.SOCK_DGRAM)
    try:
        sock.bind(address.sockaddr)
    except OSError as exc:
        sock.close()
        where = f" in network namespace {factory.label}" if factory.label != "current" else ""
        raise UserError(f"{what} udp:{address}: cannot bind{where}: {describe_oserror(exc)}"
                        ) from None
    return sock


def open_unix_listener(factory: SocketFactory, address: UnixAddress, *, mode: int | None,
                       owner: tuple[int, int] | None, backlog: int = socket.SOMAXCONN,
                       ) -> socket.socket:
    """A listening Unix stream socket; abstract ones are made inside the namespace.

    A leftover socket file that nobody listens on any more (a crashed predecessor) is
    replaced; a live one, or a file that is not a socket, is refused.
    """
    if not address.abstract:
        clear_stale_socket(address.path)
    sock = factory.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(address.sockaddr)
        if not address.abstract:
            if mode is not None:
                os.chmod(address.path, mode)
            if owner is not None:
                os.chown(address.path, *owner)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise UserError(f"listen {address}: cannot listen: {describe_oserror(exc)}") from None
    return sock


def clear_stale_socket(path: str) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UserError(f"listen unix:{path}: {describe_oserror(exc)}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise UserError(f"listen unix:{path}: a file that is not a socket is in the way; "
                        "remove it or pick another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)  # stale: left behind by a process that is gone
        return
    except OSError:
        return
    finally:
        probe.close()
    raise UserError(f"listen unix:{path}: another process is listening on it; stop it or "
                    "pick another path")


def listen_private_unix(path: str, what: str, backlog: int, *,
                        shared: bool = False) -> socket.socket:
    """A listening Unix socket at ``path`` for a control-type socket (``what`` names the
    option in errors, e.g. ``--control PATH``): created mode 0600 from the start (the
    umask is set around bind, so there is no moment another user could connect), made
    0666 only when ``shared`` (the peer's credentials then decide); a stale socket file is
    replaced, anything else in the way is refused."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise UserError(f"{what}: directory {directory} does not exist")
    try:
        clear_stale_socket(path)
    except UserError as exc:
        raise UserError(f"{what}: {str(exc).split(': ', 1)[-1]}") from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old_umask = os.umask(0o177)
    try:
        sock.bind(path)
        if shared:
            os.chmod(path, 0o666)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise UserError(f"{what}: cannot create the socket: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    return sock


def remove_unix_socket(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
