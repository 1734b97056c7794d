"""SIGINT/SIGTERM as events of the event loop, via signalfd(2).

Python-level signal handlers proved racy here: a handler runs only in the main thread
"soon", and around fork() or with namespace threads alive a signal could be noticed
late or not at all, leaving a forwarder that ignored its SIGTERM.  So the stop signals
are blocked in every thread from the very start (threads and forked workers inherit the
mask) and read from a signalfd registered in the loop.  A signal that arrives while
nsbridge is still starting simply waits in the signalfd until the loop reads it.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import struct
from collections.abc import Callable

from nsbridge.linux.libc import checked, libc

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:  # the loop's type only: linux/ has no run-time dependency on relay/
    from nsbridge.relay.loop import EventLoop

StopAction = Callable[[int, int], None]  # (signal number, how many signals so far)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_SFD_NONBLOCK = os.O_NONBLOCK
_SFD_CLOEXEC = os.O_CLOEXEC
_SIGINFO_SIZE = 128  # sizeof(struct signalfd_siginfo)


class _SigSet(ctypes.Structure):
    _fields_ = [("bits", ctypes.c_ulong * (1024 // (8 * ctypes.sizeof(ctypes.c_ulong))))]


def _sigset(signals: tuple[int, ...]) -> _SigSet:
    mask = _SigSet()
    libc.sigemptyset(ctypes.byref(mask))
    for signum in signals:
        libc.sigaddset(ctypes.byref(mask), int(signum))
    return mask


def block_stop_signals(signals: tuple[int, ...] = STOP_SIGNALS) -> None:
    """Block the stop signals in the calling thread (and in threads and children it makes).

    Every thread but the one whose loop reads the signalfd calls this (the socket
    factory's namespace threads): a stop signal then never interrupts one of them."""
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)


class StopSignals:
    """Blocks the stop signals now; delivers them to ``action`` once attached to a loop."""

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS) -> None:
        block_stop_signals(signals)
        mask = _sigset(signals)
        self.fd = checked("signalfd", -1, ctypes.byref(mask), _SFD_NONBLOCK | _SFD_CLOEXEC)
        self.count = 0
        self._loop: EventLoop | None = None
        self._action: StopAction | None = None

    def attach(self, loop: EventLoop, action: StopAction) -> None:
        """Deliver signals (including any that already arrived) to ``action`` in ``loop``."""
        self._loop = loop
        self._action = action
        loop.add(self.fd, select.EPOLLIN, self._on_readable)

    def _on_readable(self, _events: int) -> None:
        while True:
            try:
                data = os.read(self.fd, _SIGINFO_SIZE * 8)
            except BlockingIOError:
                return
            for offset in range(0, len(data) - _SIGINFO_SIZE + 1, _SIGINFO_SIZE):
                (signum,) = struct.unpack_from("I", data, offset)
                self.count += 1
                assert self._action is not None
                self._action(signum, self.count)

    def close(self) -> None:
        if self.fd >= 0:
            if self._loop is not None:
                self._loop.remove(self.fd)
            os.close(self.fd)
            self.fd = -1
