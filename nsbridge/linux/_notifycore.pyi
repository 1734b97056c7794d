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
NOTIFY: int
SWITCH_FAILED: int
SWITCH_PENDING: int
SWITCH_ERROR: int
HUNG_UP: int
RECV_FAILED: int
CACHE_SLOTS: int

class Server:
    """A thread serving ``listener`` (see the C source): sets the synchronous wake-up
    flag, polls, RECVs, switches connects whose decision is cached, queues the rest."""

    def __init__(self, listener: int, connect_nr: int, host_netns: int,
                 watch: list[int] | tuple[int, ...] = ...) -> None: ...
    def start(self) -> int:
        """The errno of setting SYNC_WAKE_UP (0: set; EINVAL before Linux 6.6).
        OSError when no thread could be made."""
    def fileno(self) -> int:
        """The queue's eventfd: readable when items wait."""
    def take(self) -> list[tuple[int, int, int, int, int, int, tuple[int, ...], int | None,
                                 int | None, bytes | int | None, int | None]]:
        """Every queued item: (kind, value) + receive()'s tuple; the fds are the
        caller's now."""
    def cache_put(self, sock_family: int, raw: bytes, family: int, target: ReadableBuffer,
                  v6only_off: bool, bind: ReadableBuffer | None) -> None:
        """Cache a switch decided for the destination in ``raw`` (the caller's sockaddr)
        on a socket of ``sock_family``: connect to ``target`` on a socket of
        ``family``, bound to ``bind``."""
    def cache_clear(self) -> None: ...
    def watch(self, fd: int, /) -> None:
        """Watch one more fd (a queued event on it sends connects to Python); the cache
        is emptied.  ValueError past the limit or when closed."""
    def cached(self) -> int: ...
    def counts(self) -> tuple[int, int, int, int]:
        """(notifications, hits, switched, gone) since the last call."""
    def compares_cookies(self) -> bool:
        """Whether the thread tells the host side's sockets by SO_NETNS_COOKIE (Linux
        5.14, ``host_netns`` being the caller's namespace), else by namespace inode."""
    def close(self) -> None:
        """Stop and join the thread, close the fds of queued items.  Idempotent."""

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
