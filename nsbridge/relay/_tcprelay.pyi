"""Types of the native TCP relay (``_tcprelay.c``), which the type checker cannot read.

Kept next to the C file so a change to its method table or to ``Core_init``'s argument
parsing is seen to need one here; :mod:`nsbridge.relay.native` is the caller.
"""

from collections.abc import Sequence

from _typeshed import ReadableBuffer

class Core:
    """Relays established TCP pairs on an epoll set of its own (see ``_tcprelay.c``)."""

    def __init__(self, outer_fd: int, copy: bool = False, small_read: int = 65536,
                 pipe_size: int = 1048576,
                 sockopts: Sequence[tuple[int, int, int, int]] = ()) -> None:
        """``outer_fd``: the Python loop's epoll fd, nested in the core's set."""
    def new_slot(self) -> int: ...
    def add(self, client_fd: int, server_fd: int, slot: int, token: int,
            preamble: ReadableBuffer = b"", exclusive: bool = True, nodelay: int = 3) -> None:
        """The core owns both fds from the call on, even when it raises."""
    def wait(self, timeout_ms: int, /) -> int:
        """Bit 0: the outer fd is readable; bit 1: records are waiting."""
    def take_records(self) -> list[tuple[int, int, int, int, float, int, int, bytes | None]]:
        """(slot, token, bytes up, bytes down, duration, code, errno, raw client sockaddr
        or None) per ended pair."""
    def abort_slot(self, slot: int, /) -> None: ...
    def slot(self, slot: int, /) -> tuple[int, int, int, int]:
        """(open pairs, bytes up, bytes down they moved so far, open pairs it accepted)."""
    def listen(self, listener_fd: int, slot: int, family: int, host: str, port: int,
               scope_id: int = 0, low: int = 8, cap: int = 32, peer: bool = False) -> int:
        """Accept from the listener in the core; returns its id (see ``_tcprelay.c``)."""
    def unlisten(self, lid: int, /) -> None: ...
    def pool_put(self, lid: int, fd: int, /) -> bool:
        """The core owns ``fd`` from the call on; False: the pool was full (fd closed)."""
    def pool_wants(self) -> list[tuple[int, int]]:
        """(listener id, sockets wanted) for each pool under its low-water mark."""
    def take_handbacks(self) -> list[tuple[int, int, int, int]]:
        """(listener id, client fd, server fd, errno); the caller owns the fds."""
    def listener_info(self, lid: int, /) -> dict[str, int]: ...
    def info(self) -> dict[str, int]: ...
    def close(self) -> None: ...
