"""The two data movers a TCP session can use, by name (``--engine splice|copy``).

``splice`` moves bytes socket -> pipe -> socket inside the kernel (pipes from a pool, held
only while the destination is full); ``copy`` reads into a buffer and writes it out, which
is cheaper for short exchanges.  Forwarding and user-mode networking's TCP fast path both
pick one here, so the choice lives in the data plane, below both.
"""

from __future__ import annotations

from nsbridge.relay.pipes import PipePool
from nsbridge.relay.tcp import CopyMover, Mover, SplicePipeMover

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (worker memory)
if TYPE_CHECKING:
    from typing import Literal

    MoverName = Literal["splice", "copy"]
else:
    MoverName = str


def make_mover(name: MoverName, pipe_size: int | None = None) -> Mover:
    """The mover called ``name`` ("copy", otherwise splice with pipes of ``pipe_size``)."""
    if name == "copy":
        return CopyMover()
    return SplicePipeMover(PipePool(pipe_size) if pipe_size else PipePool())
