"""A pool of kernel pipes for splice(): socket -> pipe -> socket without copying to Python.

A pipe is only held by a connection while it has bytes in flight that the destination
could not take yet; the usual case is fill-and-drain in one go, after which the pipe goes
straight back to the pool.  So 10,000 idle connections hold no pipes, and the number of
pipes open is bounded by the connections that are actually backed up.
"""

from __future__ import annotations

import fcntl
import os

DEFAULT_PIPE_SIZE = 1 << 20


class PipePool:
    def __init__(self, pipe_size: int = DEFAULT_PIPE_SIZE, max_idle: int = 64) -> None:
        self.pipe_size = pipe_size
        self._max_idle = max_idle
        self._idle: list[tuple[int, int]] = []

    def acquire(self) -> tuple[int, int]:
        """An empty (read_fd, write_fd) pair, non-blocking."""
        if self._idle:
            return self._idle.pop()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            # Bigger pipes move more per splice call; the kernel may cap the size
            # (fs.pipe-max-size, or per-user pipe quotas): then keep what we got.
            self.pipe_size = fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, self.pipe_size)
        except OSError:
            pass
        return r, w

    def release(self, pipe: tuple[int, int]) -> None:
        """Return a pipe that is known to be empty."""
        if len(self._idle) < self._max_idle:
            self._idle.append(pipe)
        else:
            self.discard(pipe)

    def discard(self, pipe: tuple[int, int]) -> None:
        """Close a pipe that may still hold data (an aborted transfer)."""
        os.close(pipe[0])
        os.close(pipe[1])

    def close(self) -> None:
        while self._idle:
            self.discard(self._idle.pop())
