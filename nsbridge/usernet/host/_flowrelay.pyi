"""Types of the native relay (``_flowrelay.c``), which the type checker cannot read.

Kept next to the C file so a change to its method table or to ``Relay_init``'s argument
parsing is seen to need one here; :mod:`nsbridge.usernet.host.flowrelay` is the caller.
"""

from collections.abc import Callable
from typing import Any

from _typeshed import ReadableBuffer

class Relay:
    """Serves one relay tun device from a thread of its own (see ``_flowrelay.c``)."""

    def __init__(
        self,
        tun_fd: int,
        new_flow: Callable[[bytes], int],
        on_error: Callable[[bytes, int], object],
        idle_timeout: float = 60.0,
        max_flows: int = 4096,
    ) -> None:
        """``new_flow(packet)`` returns the new flow's host socket fd (the relay then owns
        it) or -1; ``on_error(quote, errno)``'s result is ignored.  Both are called on the
        relay thread with the GIL held."""
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def stats(self) -> dict[str, Any]:
        """Counters, flat: ints named as the engine's (``EngineStats``) where the engine
        keeps the same counter, the relay's own otherwise, and ``rejected``, a dict of
        ints by the reason ``classify`` gives."""

def classify(packet: ReadableBuffer, /) -> str:
    """What the relay makes of one packet: ``"echo"``, ``"udp"`` or why it drops it."""

def flow_key(packet: ReadableBuffer, /) -> tuple[int, bytes, bytes, int, int, int] | None:
    """For tests: (IP protocol, source, destination, source port or echo id, destination
    port or 0, payload offset) of the flow the relay files ``packet`` under, or None
    when it drops it."""
