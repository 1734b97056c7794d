"""Accepting clients: one batch-accept helper with one overload policy.

Every listener nsbridge polls goes through :class:`Acceptor`: a forward's (or a worker's
own SO_REUSEPORT) listener, the supervisor's hand-off listeners, the user-mode TCP
redirect listeners and the control socket.  Why one helper: listeners are polled
level-triggered, so whatever keeps ``accept()`` from taking the waiting client leaves
the listener readable, and a loop that simply tries again on the next wake-up becomes a
busy loop (100% CPU, a log line per attempt).  That is what happens when the process runs
out of file descriptors (EMFILE, ENFILE) or the kernel out of memory (ENOBUFS, ENOMEM),
which is exactly when a forwarder is busiest.  Four loops with three different answers
to that question are now this one.

The policy:

* Up to :data:`ACCEPT_BATCH` clients per readiness event: a burst is drained in few
  wake-ups, and the loop's other fds still get their turn in between.
* The listener is non-blocking (set on :meth:`Acceptor.start`), so a wake-up whose client
  is gone ends with EAGAIN instead of blocking the loop.  Accepted sockets are
  close-on-exec (Python accepts with ``accept4(SOCK_CLOEXEC)``): a program nsbridge starts
  never inherits a client.  Whether a client socket is non-blocking is its user's choice.
* Out of fds or memory: stop watching the listener and try again after
  :data:`RETRY_DELAY`, again and again, until an accept works.  The clients wait in the
  kernel's accept queue meanwhile.  One warning when such an episode starts, one info
  line when it ends: never a line per attempt.
* A client that went away between its handshake and our ``accept()`` (ECONNABORTED,
  EPROTO): counted, and the next client is taken.
* EINVAL: the listener no longer listens (shut down by its owner, e.g. the supervisor
  stopping a worker's SO_REUSEPORT listener).  The owner is told and it is no longer
  watched, since polling it would spin.
* Anything else is unexpected: logged, counted, and backed off like exhaustion rather
  than retried at once, because an error that persists on a level-triggered listener
  would spin as surely as EMFILE does.

Why a constant retry delay and not a growing one: descriptors come back when
connections end, which has nothing to do with how long we have been waiting, so a
growing delay would only leave clients queued longer after the cause is gone.

Supported: stream listeners of any family (TCP, Unix).  Not here: datagram sockets
(nothing to accept) and what to do with a client (the ``on_client`` callback's job).
"""

from __future__ import annotations

import errno
import socket
import time
from collections.abc import Callable

from nsbridge.errors import errno_name
from nsbridge.relay.log import INFO, log
from nsbridge.relay.loop import IN, EventLoop, Timer

__all__ = ["ACCEPT_BATCH", "RETRY_DELAY", "Acceptor"]

ACCEPT_BATCH = 64

# Short enough that a client queued during an episode is taken almost as soon as a
# descriptor frees up (well inside TCP's initial one-second retransmission timeout, the
# wait a client sees anyway when an accept queue is full); long enough that retrying
# costs next to nothing (two epoll_ctl calls and one failed accept per try).
RETRY_DELAY = 0.1

# Out of descriptors or kernel memory: waiting helps, retrying at once does not.
EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# This one client is gone (it reset, or its connection failed, before we took it): take
# the next.  accept(2) lists more errors that may be pending on a new connection, but
# most of them (EOPNOTSUPP, EPERM...) also describe a lasting fault of the listener, and
# retrying those at once would spin: they take the unexpected-error path instead.
CLIENT_GONE = frozenset({errno.ECONNABORTED, errno.EPROTO})

OnClient = Callable[[socket.socket, object], None]


class Acceptor:
    """Accepts from one listening socket on an :class:`~nsbridge.relay.loop.EventLoop`.

    ``on_client(client, peer)`` gets each accepted socket (same family, type and protocol
    as the listener) and owns it from then on.  ``after_batch()``, if given, runs after
    every wake-up's batch, even one cut short by an error: the supervisor hands its
    batch to the workers there.  ``on_not_listening()``, if given, runs when the listener
    turns out to be shut down (it may call :meth:`close`); without it the acceptor just
    stops watching.  ``name`` completes "accept on ..." in log lines.

    The acceptor owns the listener's registration with the loop, never the listener:
    its owner calls :meth:`close` (which also cancels a pending retry) before closing
    the listener.  Counters: ``aborted`` clients gone before they were taken,
    ``exhausted`` accepts refused for want of fds or memory, ``failed`` other errors,
    ``episodes`` times accepting had to pause.
    """

    __slots__ = ("_after_batch", "_closed", "_fd", "_held", "_logged_errno", "_mask",
                 "_on_client", "_on_not_listening", "_refusals", "_retry", "_since", "_watching",
                 "aborted", "client_kind", "episodes", "exhausted", "failed", "listener",
                 "loop", "name")

    def __init__(self, loop: EventLoop, listener: socket.socket, on_client: OnClient, *,
                 name: str, after_batch: Callable[[], None] | None = None,
                 on_not_listening: Callable[[], None] | None = None) -> None:
        self.loop = loop
        self.listener = listener
        self.name = name
        # With all three given, socket(fileno=) asks the kernel for neither type nor
        # protocol; looked up once, as each of these properties makes an enum member.
        self.client_kind = (listener.family, listener.type, listener.proto)
        self._on_client = on_client
        self._after_batch = after_batch
        self._on_not_listening = on_not_listening
        self._fd = listener.fileno()
        self._watching = False
        self._closed = False
        self._held = False  # the owner's pause (backpressure), see hold()
        self._retry: Timer | None = None  # pending while backing off
        self._mask = 0
        self._since: float | None = None  # when the current episode started
        self._logged_errno = 0
        self._refusals = 0  # failed attempts in the current episode
        self.aborted = 0
        self.exhausted = 0
        self.failed = 0
        self.episodes = 0

    # ---- owner's controls ------------------------------------------------------------

    def start(self) -> None:
        """Start watching the listener (made non-blocking here)."""
        if self._watching or self._closed:
            return
        self.listener.setblocking(False)
        self._mask = self._wanted_mask()
        self.loop.add(self._fd, self._mask, self._on_ready)
        self._watching = True

    def hold(self) -> None:
        """Stop accepting until :meth:`release`, e.g. while the clients cannot be passed
        on; the kernel's accept queue holds new ones meanwhile.  Independent of backing
        off: a retry that falls due while held waits for the release."""
        self._held = True
        self._update_mask()

    def release(self) -> None:
        self._held = False
        self._update_mask()

    def close(self) -> None:
        """Stop watching for good; the listener itself stays open (its owner closes it)."""
        if self._closed:
            return
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._watching:
            self._watching = False
            self.loop.remove(self._fd)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def backing_off(self) -> bool:
        """Whether accepting is paused until the retry delay ends."""
        return self._retry is not None

    # ---- accepting -----------------------------------------------------------------

    def _on_ready(self, _events: int) -> None:
        accept = self.listener._accept  # type: ignore[attr-defined]
        on_client = self._on_client
        kind = self.client_kind
        not_listening = False
        for _ in range(ACCEPT_BATCH):
            try:
                fd, peer = accept()
            except BlockingIOError:
                break
            except OSError as exc:
                code = exc.errno
                if code in CLIENT_GONE:
                    self.aborted += 1
                    continue
                if code == errno.EINVAL:
                    not_listening = True
                else:
                    self._back_off(exc)
                break
            if self._since is not None:
                self._episode_over()
            on_client(socket.socket(*kind, fileno=fd), peer)
            if self._closed:  # the owner stopped listening (a one-shot forward)
                break
        if self._after_batch is not None:
            self._after_batch()
        if not_listening:
            self._not_listening()

    def _not_listening(self) -> None:
        if self._on_not_listening is not None:
            self._on_not_listening()
        self.close()

    def _back_off(self, exc: OSError) -> None:
        """Stop watching for RETRY_DELAY; log when an episode starts (or its error changes)."""
        if exc.errno in EXHAUSTED:
            self.exhausted += 1
        else:
            self.failed += 1
        self._refusals += 1
        if self._since is None:
            self._since = time.monotonic()
            self.episodes += 1
        if exc.errno != self._logged_errno:
            self._logged_errno = exc.errno or 0
            log.warning("accept on %s failed: %s (%s); retrying every %gs until it works",
                        self.name, exc.strerror or exc, errno_name(exc.errno), RETRY_DELAY)
        if self._retry is None:
            self._retry = self.loop.call_later(RETRY_DELAY, self._retry_now)
            self._update_mask()

    def _retry_now(self) -> None:
        self._retry = None
        if not self._closed:
            self._update_mask()

    def _episode_over(self) -> None:
        assert self._since is not None
        if log.isEnabledFor(INFO):
            log.info("accept on %s works again after %.1fs (%d attempts refused)", self.name,
                     time.monotonic() - self._since, self._refusals)
        self._since = None
        self._logged_errno = 0
        self._refusals = 0

    # ---- the epoll mask ----------------------------------------------------------------

    def _wanted_mask(self) -> int:
        return 0 if self._held or self._retry is not None else IN

    def _update_mask(self) -> None:
        if not self._watching:
            return
        mask = self._wanted_mask()
        if mask != self._mask:
            self._mask = mask
            self.loop.modify(self._fd, mask)

