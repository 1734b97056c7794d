"""Types of the native switching core (``_notifycore.c``), which the type checker cannot
read.  Kept next to the C file so a change to its method table is seen to need one here;
:mod:`nsbridge.usernet.host.switcher` is the caller (through :mod:`.notifycore`).
"""

from _typeshed import ReadableBuffer

SWITCHED: int
SWITCHED_GONE: int
GONE: int
FAILED: int
PENDING: int

def receive(
    listener: int, connect_nr: int, /
) -> tuple[
    int, int, int, int, tuple[int, ...], int | None, int | None, bytes | int | None, int | None
]:
    """(id, pid, nr, arch, args, pidfd, sockfd, raw, netns).  For a call other than
    ``connect_nr`` the last four are None.  For a connect: ``pidfd`` (a negative errno
    when it could not be had or the caller was gone), ``sockfd`` (ours, or a negative
    errno from pidfd_getfd), ``raw`` (the sockaddr bytes checked with ID_VALID, a
    negative errno, or None for a length outside 2..128) and the socket's network
    namespace inode (None when the kernel will not say).  OSError from RECV."""

def switch_connect(
    listener: int,
    id: int,
    pid: int,
    fd: int,
    source: int,
    source_family: int,
    family: int,
    target: ReadableBuffer,
    v6only_off: bool,
    bind: ReadableBuffer | None,
    blocking: bool,
) -> tuple[int, int]:
    """(outcome, value): SWITCHED/SWITCHED_GONE with the errno answered, GONE, FAILED
    with the connect's errno (not answered), PENDING with the host socket's fd (the
    caller's now).  OSError for a host socket, bind, ADDFD or SEND failure."""

def install(listener: int, id: int, pid: int, fd: int, host: int, blocking: bool,
            result: int, /) -> int:
    """``host`` (closed in every case) over the caller's ``fd``, then the answer
    ``result``: SWITCHED, SWITCHED_GONE or GONE; OSError otherwise."""
