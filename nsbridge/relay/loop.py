"""A small epoll event loop: fd handlers, timers, and thread-safe wake-ups.

Why not asyncio: the relay's hot path is "event on fd -> two syscalls", and asyncio's
transports/protocols add layers (and copies) between those.  This loop calls the
handler registered for an fd with the epoll event mask, nothing more.
"""

from __future__ import annotations

import heapq
import itertools
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable

Handler = Callable[[int], None]

IN = select.EPOLLIN
OUT = select.EPOLLOUT
ERR = select.EPOLLERR
HUP = select.EPOLLHUP
RDHUP = select.EPOLLRDHUP
ET = select.EPOLLET


def _cancelled() -> None:
    """What a cancelled timer holds instead of its callback."""


class Timer:
    """A pending call_later; cancel() makes it a no-op."""

    __slots__ = ("_loop", "callback", "cancelled", "deadline")

    def __init__(self, deadline: float, callback: Callable[[], None],
                 loop: EventLoop | None = None) -> None:
        self.deadline = deadline
        self.callback = callback
        self.cancelled = False
        self._loop = loop

    def cancel(self) -> None:
        # Drop the callback too: a cancelled timer stays in the heap until its deadline
        # (a connect timeout: 30 s), and its bound method would keep the whole session
        # (sockets, buffers) alive that long -- tens of MiB at 1,000 connections/s.  The
        # loop also compacts its heap once cancelled entries dominate it.
        if self.cancelled:
            return
        self.cancelled = True
        self.callback = _cancelled
        if self._loop is not None:
            self._loop._timer_cancelled()


class EventLoop:
    """Single-threaded reactor.  Only call_soon_threadsafe() and stop() may be used from
    other threads."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._handlers: dict[int, Handler] = {}
        self._timers: list[tuple[float, int, Timer]] = []
        self._cancelled = 0  # cancelled timers still in the heap
        self._seq = itertools.count()
        self._calls: deque[Callable[[], None]] = deque()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._epoll.register(self._wake_r, IN)
        self._handlers[self._wake_r] = self._drain_wakeups
        self._running = False
        self._thread: threading.Thread | None = None
        self._waiter: Callable[[float], bool] | None = None

    # ---- registration ------------------------------------------------------------

    def fileno(self) -> int:
        """The loop's epoll fd (a waiter nests it in its own set)."""
        return self._epoll.fileno()

    def set_waiter(self, waiter: Callable[[float], bool] | None) -> None:
        """Let ``waiter(timeout)`` do the waiting (before run()): the native TCP relay
        serves its connections' events there, without a round trip through Python, and
        returns True when this loop's own fds are ready (it nests our epoll fd)."""
        self._waiter = waiter

    def add(self, fd: int, mask: int, handler: Handler) -> None:
        self._epoll.register(fd, mask)
        self._handlers[fd] = handler

    def set_handler(self, fd: int, handler: Handler) -> None:
        """Route ``fd``'s events to another handler: no syscall, the epoll mask stays."""
        self._handlers[fd] = handler

    def modify(self, fd: int, mask: int) -> None:
        self._epoll.modify(fd, mask)

    def remove(self, fd: int) -> None:
        """Stop watching ``fd``; call before closing it (a dup'ed fd would keep firing)."""
        if self._handlers.pop(fd, None) is not None:
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass

    def forget(self, fd: int) -> None:
        """Stop dispatching ``fd``'s events, without the epoll_ctl that remove() makes.

        Only for an fd the caller closes right away and whose file nothing else holds
        (no dup, no other process): closing the last reference takes a file out of every
        epoll set, so the syscall would be wasted.  Otherwise use remove()."""
        self._handlers.pop(fd, None)

    # ---- timers and cross-thread calls ----------------------------------------------

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(time.monotonic() + delay, callback, self)
        heapq.heappush(self._timers, (timer.deadline, next(self._seq), timer))
        return timer

    def _timer_cancelled(self) -> None:
        """Rebuild the heap without cancelled timers once they are most of it, so memory
        follows the live timers, not the deadlines of cancelled ones."""
        self._cancelled += 1
        if self._cancelled > 256 and self._cancelled * 2 > len(self._timers):
            self._timers[:] = [entry for entry in self._timers if not entry[2].cancelled]
            heapq.heapify(self._timers)
            self._cancelled = 0

    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None:
        """Queue ``callback`` for the loop thread; safe from signal handlers and threads."""
        self._calls.append(callback)
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # already awake-pending

    def _drain_wakeups(self, _events: int) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        while self._calls:
            self._calls.popleft()()

    # ---- running ---------------------------------------------------------------------

    def run(self) -> None:
        """Dispatch events until stop() is called."""
        self._running = True
        self._thread = threading.current_thread()
        poll = self._epoll.poll
        handlers = self._handlers
        timers = self._timers
        waiter = self._waiter
        while self._running:
            timeout = -1.0
            if timers:
                timeout = max(0.0, timers[0][0] - time.monotonic())
            if waiter is None:
                ready = poll(timeout, 512)
            elif waiter(timeout):
                ready = poll(0, 512)
            else:
                ready = []
            for fd, events in ready:
                handler = handlers.get(fd)
                if handler is not None:
                    handler(events)
            if timers:
                now = time.monotonic()
                while timers and timers[0][0] <= now:
                    timer = heapq.heappop(timers)[2]
                    if timer.cancelled:
                        self._cancelled = max(0, self._cancelled - 1)
                    else:
                        timer.callback()

    def stop(self) -> None:
        """Make run() return after the current iteration (any thread)."""
        def _stop() -> None:
            self._running = False

        self.call_soon_threadsafe(_stop)

    def close(self) -> None:
        self._epoll.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
