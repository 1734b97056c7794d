"""Several worker processes, so the relay can use every core.

Shape: the supervisor (the process the user started) opens every forward — binds the
listeners, resolves the targets, checks the namespaces — then forks N workers.  It keeps
accepting and hands each accepted socket to the next worker, round-robin, over a
``SOCK_SEQPACKET`` socketpair with ``SCM_RIGHTS``.  Each worker runs its own event loop
and socket factories and relays the connections it was given.

Why hand-off rather than every worker accepting from a shared listener: with
EPOLLEXCLUSIVE the kernel wakes the *first idle* waiter, so on an idle machine every new
long-lived connection lands on the same worker (iperf3 -P 4 would use one core); with
SO_REUSEPORT the 4-tuple hash decides, which splits four flows 3:1 or 4:0 half of the
time.  Round-robin hand-off costs one sendmsg per connection in the supervisor and
splits N flows evenly.

The supervisor also watches each worker through a pidfd and restarts one that dies, so a
crash loses only that worker's connections.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import struct
import sys
import time
import traceback
from dataclasses import dataclass

from .bridge import Bridge, MoverName
from .forward import Forward
from .relay.loop import IN, EventLoop
from .signals import StopSignals

log = logging.getLogger("nsbridge")

_ACCEPT_BATCH = 64
_INDEX = struct.Struct("H")
_RESTART_WINDOW = 10.0
_MAX_RESTARTS_IN_WINDOW = 5


@dataclass
class Worker:
    index: int
    pid: int
    pidfd: int
    channel: socket.socket  # supervisor's end of the hand-off socketpair
    started: float


class Supervisor:
    """Accepts for every forward and distributes connections to worker processes."""

    def __init__(self, opened: list[Forward], count: int, mover: MoverName, drain: float,
                 pipe_size: int | None = None) -> None:
        self.opened = opened
        self.count = count
        self.mover = mover
        self.pipe_size = pipe_size
        self.drain = drain
        self.loop = EventLoop()
        self.workers: dict[int, Worker] = {}
        self._next = 0
        self._stopping = False
        self._restarts: list[float] = []
        self._stops: StopSignals | None = None
        self.exit_code = 0

    # ---- lifecycle ----------------------------------------------------------------------

    def run(self, stops: StopSignals) -> int:
        """Fork the workers, then accept and distribute until stopped."""
        self._stops = stops
        for index in range(self.count):
            self._spawn(index)
        for position, forward in enumerate(self.opened):
            assert forward.listener is not None
            self.loop.add(forward.listener.fileno(), IN,
                          lambda _e, p=position: self._accept(p))
        stops.attach(self.loop, lambda signum, _count: self.stop(signum))
        self.loop.run()
        self.loop.close()
        return self.exit_code

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """Close the listeners and pass the signal on; return once every worker exited."""
        if not self._stopping:
            log.info("%s: stopping", signal.Signals(signum).name)
        self._stopping = True
        for forward in self.opened:
            if forward.listener is not None:
                self.loop.remove(forward.listener.fileno())
                forward.listener.close()
                forward.listener = None
        for worker in self.workers.values():
            try:
                os.kill(worker.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        if not self.workers:
            self.loop.stop()

    # ---- workers ------------------------------------------------------------------------

    def _spawn(self, index: int) -> None:
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sys.stderr.flush()
        # SIGINT/SIGTERM are blocked (StopSignals) and stay blocked in the child: a
        # SIGTERM that arrives before the worker reads its own signalfd just waits there.
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            # Ctrl-C reaches the whole process group; workers obey only the supervisor,
            # which turns it into one SIGTERM (drain) or, on a second Ctrl-C, another (now).
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                parent_end.close()
                code = self._worker_main(child_end)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(code)
        child_end.close()
        parent_end.setblocking(False)
        pidfd = os.pidfd_open(pid)
        worker = Worker(index, pid, pidfd, parent_end, time.monotonic())
        self.workers[index] = worker
        self.loop.add(pidfd, IN, lambda _e, w=worker: self._reap(w))
        log.debug("worker %d started (pid %d)", index, pid)

    def _worker_main(self, channel: socket.socket) -> int:
        """Runs in the child: drop the supervisor's fds, relay what arrives on ``channel``."""
        self.loop.close()
        if self._stops is not None:
            os.close(self._stops.fd)  # the supervisor's; this worker reads its own
        for forward in self.opened:
            if forward.listener is not None:
                forward.listener.close()
        for worker in self.workers.values():
            worker.channel.close()
            os.close(worker.pidfd)
        bridge = Bridge(mover=self.mover, pipe_size=self.pipe_size)
        forwards = [bridge.adopt(forward) for forward in self.opened]

        stops = StopSignals((signal.SIGTERM,))
        stops.attach(bridge.loop, lambda _signum, count: bridge.shutdown(
            self.drain if count == 1 else None))

        def on_handoff(_events: int) -> None:
            while True:
                try:
                    data, fds, _flags, _addr = socket.recv_fds(channel, 2 * _ACCEPT_BATCH,
                                                               _ACCEPT_BATCH)
                except BlockingIOError:
                    return
                if not data and not fds:  # the supervisor is gone: finish and exit
                    bridge.loop.remove(channel.fileno())
                    bridge.shutdown(self.drain or None)
                    return
                for (position,), fd in zip(_INDEX.iter_unpack(data), fds, strict=False):
                    forwards[position].start_session(socket.socket(fileno=fd))

        channel.setblocking(False)
        bridge.loop.add(channel.fileno(), IN, on_handoff)
        try:
            bridge.run()
        finally:
            stops.close()
            bridge.close()
        return 0

    def _reap(self, worker: Worker) -> None:
        self.loop.remove(worker.pidfd)
        os.close(worker.pidfd)
        worker.channel.close()
        _, status = os.waitpid(worker.pid, 0)
        del self.workers[worker.index]
        if self._stopping:
            if not self.workers:
                self.loop.stop()
            return
        how = (f"signal {signal.Signals(-os.waitstatus_to_exitcode(status)).name}"
               if os.WIFSIGNALED(status) else f"exit code {os.waitstatus_to_exitcode(status)}")
        now = time.monotonic()
        self._restarts = [t for t in self._restarts if now - t < _RESTART_WINDOW]
        if len(self._restarts) >= _MAX_RESTARTS_IN_WINDOW:
            log.error("worker %d (pid %d) ended (%s); too many restarts, giving up",
                      worker.index, worker.pid, how)
            self.exit_code = 1
            self.stop()
            return
        self._restarts.append(now)
        log.warning("worker %d (pid %d) ended unexpectedly (%s); its connections were "
                    "lost; starting a new one", worker.index, worker.pid, how)
        self._spawn(worker.index)

    # ---- accepting and handing off ------------------------------------------------------

    def _accept(self, position: int) -> None:
        forward = self.opened[position]
        listener = forward.listener
        if listener is None:
            return
        accepted: list[int] = []
        for _ in range(_ACCEPT_BATCH):
            try:
                fd, _peer = listener._accept()  # type: ignore[attr-defined]
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno in (24, 23, 105, 12):  # EMFILE ENFILE ENOBUFS ENOMEM
                    log.warning("accept on %s failed: %s", forward.listen_address, exc.strerror)
                    break
                continue
            accepted.append(fd)
        if accepted:
            self._hand_off(position, accepted)

    def _hand_off(self, position: int, fds: list[int]) -> None:
        """Give each fd to the next worker in turn; if one cannot take it, try the others."""
        order = sorted(self.workers)
        if not order:
            for fd in fds:
                _reset_fd(fd)
            return
        batches: dict[int, list[int]] = {}
        for fd in fds:
            batches.setdefault(order[self._next % len(order)], []).append(fd)
            self._next += 1
        header = _INDEX.pack(position)
        for index, batch in batches.items():
            for attempt in range(len(order)):
                worker = self.workers.get(order[(order.index(index) + attempt) % len(order)])
                if worker is None:
                    continue
                try:
                    socket.send_fds(worker.channel, [header * len(batch)], batch)
                    break
                except OSError:
                    continue  # busy or dying worker: try the next one
            else:
                for fd in batch:
                    _reset_fd(fd)
                continue
            for fd in batch:
                os.close(fd)


def _reset_fd(fd: int) -> None:
    sock = socket.socket(fileno=fd)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()
