"""The daemon: a supervisor process that owns every listener, and N worker processes that
relay.  This is how every non-one-shot forward runs from the command line.

Shape: the supervisor opens each forward — binds the listener, resolves the target,
checks the namespaces — then starts N workers.  Each worker runs its own event loop and
socket factories.  How a worker gets its clients is the ``--accept`` mode:

* ``reuseport``: for a TCP forward that listens on an address, every worker gets its own
  listener bound with SO_REUSEPORT and accepts by itself, so no process stands between
  the kernel and the worker.  The kernel would place each client by a hash of its
  4-tuple, which splits four long flows 3:1 or 4:0 half of the time (one core does most
  of the work), so the supervisor attaches a small eBPF program to the group that deals
  new clients to the listeners in turn (linux/reuseport_bpf.py).  Loading it needs CAP_BPF;
  without it the hash places clients.
* ``handoff``: the supervisor accepts and hands each accepted socket to the next worker,
  round-robin, over a ``SOCK_SEQPACKET`` socketpair with ``SCM_RIGHTS``.  Even, but the
  supervisor spends CPU on an accept and a hand-off for every new connection.  Inherited
  listeners (-L, fd:, systemd:), Unix listeners and UDP always use it.
* ``auto`` (default): ``reuseport`` when that is even (the program loads, or there is
  one worker), ``handoff`` otherwise.  Measured side by side: the same keep-alive and
  ``-P 4`` throughput as the hand-off, and more new connections per second (figures in
  docs/architecture.md and docs/performance.md).

Why not every worker accepting from one shared listener: with EPOLLEXCLUSIVE the kernel
wakes the *first idle* waiter, so on an idle machine every new long-lived connection
lands on the same worker (iperf3 -P 4 would use one core).

With reuseport the supervisor keeps a copy of each worker's listener without polling
it, so a replacement worker takes over the same socket and the clients waiting in its
accept queue survive a worker crash.

The supervisor is also the control plane: forwards can be added and removed while it
runs (it tells the workers over the same channel), a UDP forward is relayed by one
worker (chosen by forward id), workers report per-forward counters every
``STATS_INTERVAL`` seconds (and at once when a control client asks for statistics), and
a worker that dies is replaced.  The supervisor never keeps threads alive (namespace
threads are only used while opening a forward), because fork() in a threaded process
can deadlock the child.

Why one module of ~640 lines and one class of 30 methods: listeners, workers and the
hand-off share one piece of state — which worker holds which forward, listener and
pending fds — and every operation (add, remove, a worker's death, a full channel)
changes several of them at once.  Split across classes, each would reach into the
others' tables; the sections below (forwards, lifecycle, workers, hand-off) keep it
readable instead.
"""

from __future__ import annotations

import itertools
import logging
import marshal
import os
import select
import signal
import socket
import struct
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from nsbridge.errors import UserError
from nsbridge.forward.bridge import Bridge
from nsbridge.forward.forward import Forward, ForwardStats
from nsbridge.forward.spec import UDP, ConnectAddress, ForwardSpec, ListenAddress
from nsbridge.forward.worker import (
    ADD,
    CONNECTIONS,
    MAX_MESSAGE,
    REMOVE,
    REPORT,
    REPORTED,
    STATS,
    STATS_INTERVAL,
    WORKER_BOOT,
    forward_message,
    release_free_heap,
)
from nsbridge.linux.reuseport_bpf import attach_round_robin, round_robin_unavailable
from nsbridge.linux.signals import StopSignals
from nsbridge.net.addresses import HostPort
from nsbridge.relay.accept import Acceptor
from nsbridge.relay.loop import IN, OUT, EventLoop
from nsbridge.relay.movers import MoverName
from nsbridge.relay.tcp import reset_and_close

log = logging.getLogger("nsbridge")

__all__ = ["ACCEPT_MODES", "AUTO", "HANDOFF", "REUSEPORT", "STATS_INTERVAL", "Supervisor", "Worker"]

AUTO = "auto"
HANDOFF = "handoff"
REUSEPORT = "reuseport"
ACCEPT_MODES = (AUTO, HANDOFF, REUSEPORT)
# How long a control request for statistics waits for the workers' fresh counters.
REPORT_TIMEOUT = 0.25
_RESTART_WINDOW = 10.0
_MAX_RESTARTS_IN_WINDOW = 5
# The worker's side of the channel (messages, boot code) is nsbridge/forward/worker.py.


@dataclass
class Worker:
    index: int
    pid: int
    pidfd: int
    channel: socket.socket  # supervisor's end of the hand-off socketpair
    started: float
    stats: dict[int, dict[str, int]] = field(default_factory=dict)
    reports: int = 0  # answers to REPORT received, so stats() knows when all are in
    backlog: deque[tuple[bytes, list[int]]] = field(default_factory=deque)  # not yet sent


def _stats_from(counters: dict[str, int]) -> ForwardStats:
    return ForwardStats(**{k: v for k, v in counters.items() if k in ForwardStats.FIELDS})


class Supervisor:
    """Owns the listeners, accepts, distributes connections, answers the control socket."""

    def __init__(self, count: int, mover: MoverName, drain: float,
                 pipe_size: int | None = None, accept: str = AUTO) -> None:
        self.count = count
        self.accept = accept
        self.mover = mover
        self.pipe_size = pipe_size
        self.drain = drain
        self.loop = EventLoop()
        # Only for its namespace threads while opening: it relays nothing itself.
        self.opener = Bridge(mover=mover, relay="python")
        self.forwards: dict[int, Forward] = {}
        self.workers: dict[int, Worker] = {}
        self._ids = itertools.count(1)
        self._next = 0
        self._running = False
        self._paused = False
        self._stopping = False
        self._restarts: list[float] = []
        self._retired: dict[int, ForwardStats] = {}  # counters of workers that died
        # --accept reuseport forwards: forward id -> {worker index: that worker's listener}.
        # Kept (never polled) here so a replacement worker gets the same socket back.
        self._own_listeners: dict[int, dict[int, socket.socket]] = {}
        self._acceptors: dict[int, Acceptor] = {}  # forward id -> its hand-off acceptor
        self.exit_code = 0

    # ---- forwards -------------------------------------------------------------------------

    def add(self, spec: ForwardSpec) -> Forward:
        """Open ``spec`` (raises UserError) and start carrying it, now or once running."""
        name = spec.name or self._unused_name()
        if any(f.spec.name == name for f in self.forwards.values()):
            raise UserError(f"a forward named {name!r} exists already; names must be unique")
        spec.name = name
        if spec.one_shot:
            raise UserError(f"forward {name}: -S/-C (one connection) cannot run as a daemon "
                            "forward; run it on its own")
        reuseport = self._accepts_itself(spec)
        listeners: dict[int, socket.socket] = {}
        try:
            if reuseport:
                forward = self._open_reuseport(spec, listeners)
            else:
                forward = self.opener.add(spec, start=False)
        finally:
            self.opener.close_factories()  # no threads may exist across fork()
            self.opener.forwards.clear()
        if self.accept == REUSEPORT and not reuseport:
            log.warning("forward %s: --accept reuseport needs a TCP address to bind; this "
                        "forward's listen side is %s, so it uses the hand-off", name,
                        _listen_kind(spec))
        forward_id = next(self._ids)
        forward.stats = ForwardStats()
        self.forwards[forward_id] = forward
        if reuseport:
            self._own_listeners[forward_id] = listeners
        if self._running:
            self._broadcast_add(forward_id, forward)
            self._watch_listener(forward_id, forward)
        log.info("forwarding %s (netns %s) -> %s (netns %s)%s", forward.listen_address,
                 forward.listen_factory.label, forward.target_description,
                 forward.connect_factory.label,
                 f" [{spec.protocol}]" if spec.protocol == UDP else "")
        return forward

    def _accepts_itself(self, spec: ForwardSpec) -> bool:
        """Whether each worker should accept ``spec``'s clients from its own listener.

        ``auto`` does so when it costs nothing: one worker (no supervisor hop needed), or
        several when the kernel can deal clients to them in turn (the eBPF program loads,
        i.e. CAP_BPF).  Otherwise, and for listeners that cannot be duplicated, the hand-off.
        """
        if self.accept == HANDOFF or not _reuseport_possible(spec):
            return False
        if self.accept == REUSEPORT or self.count == 1:
            return True
        reason = round_robin_unavailable()
        if reason is not None:
            log.debug("forward %s: hand-off (dealing clients in turn from SO_REUSEPORT "
                      "listeners needs an eBPF program: %s)", spec.name, reason)
        return reason is None

    def _open_reuseport(self, spec: ForwardSpec,
                        listeners: dict[int, socket.socket]) -> Forward:
        """Open ``spec`` with an SO_REUSEPORT listener, plus one sibling per worker.

        Worker 0 gets the first listener itself, so clients that connect before the
        workers run wait in a queue someone will accept from; no listener in the group
        may be left unpolled, or the clients hashed to it would hang.  All of them are
        made now, while the opener's namespace threads exist (the supervisor keeps none).
        Fills ``listeners`` as it goes, so the caller can close them on failure.
        """
        listen_ns = spec.listen.netns if isinstance(spec.listen, ListenAddress) else None
        connect_ns = spec.connect.netns if isinstance(spec.connect, ConnectAddress) else None
        forward = Forward(spec=spec, loop=self.opener.loop, mover=self.opener.mover,
                          listen_factory=self.opener.factory(listen_ns),
                          connect_factory=self.opener.factory(connect_ns),
                          on_finished=lambda _forward: None, reuseport=self.count > 1)
        forward.open()
        assert forward.listener is not None
        listeners[0] = forward.listener
        try:
            for index in range(1, self.count):
                listeners[index] = forward.reuseport_sibling()
        except BaseException:
            for sock in listeners.values():
                sock.close()
            raise
        if self.count > 1:
            reason = attach_round_robin([listeners[index] for index in range(self.count)])
            if reason is None:
                log.debug("forward %s: new clients go to the workers in turn (eBPF)",
                          spec.name)
            else:
                log.info("forward %s: the kernel's 4-tuple hash places new clients (dealing "
                         "them in turn needs an eBPF program: %s)", spec.name, reason)
        return forward

    def _unused_name(self) -> str:
        """forward-N for an unnamed forward; after a removal len()+1 may be taken."""
        taken = {f.spec.name for f in self.forwards.values()}
        number = len(self.forwards) + 1
        while f"forward-{number}" in taken:
            number += 1
        return f"forward-{number}"

    def remove(self, name: str, kill: bool = False) -> None:
        """Close a forward's listener; its connections finish unless ``kill``."""
        forward_id = self._id_of(name)
        forward = self.forwards.pop(forward_id)
        self._close_own_listeners(forward_id)  # first: it shuts down forward.listener too
        self._own_listeners.pop(forward_id, None)
        self._stop_accepting(forward_id)
        forward.stop_listening()
        for worker in list(self.workers.values()):
            self._send(worker, REMOVE + marshal.dumps((forward_id, kill)), [])
        self._retired.pop(forward_id, None)
        log.info("removed forward %s%s", name, " (connections reset)" if kill else "")

    def _id_of(self, name: str) -> int:
        for forward_id, forward in self.forwards.items():
            if forward.spec.name == name:
                return forward_id
        known = ", ".join(f.spec.name for f in self.forwards.values()) or "none"
        raise UserError(f"no forward named {name!r} (forwards: {known})")

    def describe(self) -> list[dict[str, Any]]:
        return [{"name": f.spec.name, "protocol": f.spec.protocol,
                 "listen": f.spec.source.get("listen", f.listen_address),
                 "connect": f.spec.source.get("connect", f.target_description),
                 "listening_on": f.listen_address, "allow": f.spec.allow, "deny": f.spec.deny,
                 "proxy": f.spec.proxy}
                for f in self.forwards.values()]

    def stats(self) -> list[dict[str, Any]]:
        """Counters per forward, summed over workers.

        The workers are asked for their counters first (:meth:`_refresh_worker_stats`), so
        a client that reads statistics right after its own connection sees it counted,
        instead of figures up to STATS_INTERVAL old.
        """
        self._refresh_worker_stats()
        rows = []
        for forward_id, forward in self.forwards.items():
            total = ForwardStats(**self._retired.get(forward_id, ForwardStats()).as_dict())
            for worker in self.workers.values():
                counters = worker.stats.get(forward_id)
                if counters:
                    _add_into(total, _stats_from(counters))
            if forward.spec.protocol != UDP and forward_id not in self._own_listeners:
                # the supervisor admits hand-off clients; reuseport workers count their own
                total.accepted = forward.stats.accepted
                total.denied = forward.stats.denied
            rows.append({"name": forward.spec.name, "protocol": forward.spec.protocol,
                         **total.as_dict()})
        return rows

    def _refresh_worker_stats(self, timeout: float = REPORT_TIMEOUT) -> None:
        """Ask every worker for its counters now and wait (briefly) for the answers.

        Blocking the supervisor's loop here is bounded by ``timeout`` and happens only on a
        control request; a worker too busy to answer in time is read as last reported.
        """
        asked = {}
        for worker in self.workers.values():
            if worker.backlog:
                continue  # its channel is full; the periodic report will do
            try:
                worker.channel.send(REPORT)
            except OSError:
                continue
            asked[worker.channel.fileno()] = (worker, worker.reports)
        deadline = time.monotonic() + timeout
        while asked:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            ready, _, _ = select.select(list(asked), [], [], remaining)
            for fd in ready:
                worker, before = asked[fd]
                if not self._on_worker_message(worker) or worker.reports > before:
                    del asked[fd]

    # ---- lifecycle ----------------------------------------------------------------------

    def run(self, stops: StopSignals) -> int:
        """Start the workers, then accept and distribute until stopped."""
        for index in range(self.count):
            self._spawn(index)
        self._running = True
        for forward_id, forward in self.forwards.items():
            self._watch_listener(forward_id, forward)
        stops.attach(self.loop, lambda signum, _count: self.stop(signum))
        release_free_heap()  # what parsing, compiling and opening freed (~1-2 MiB)
        self.loop.run()
        return self.exit_code

    def _watch_listener(self, forward_id: int, forward: Forward) -> None:
        """Accept ``forward``'s clients here, if the workers do not (relay/accept.py's
        policy: batches, and a pause rather than a spin when the supervisor runs out of
        fds); each batch is handed off as a whole."""
        listener = self._handed_off_listener(forward_id, forward)
        if listener is None:
            return
        accepted: list[int] = []
        acceptor = Acceptor(self.loop, listener, partial(_admit, forward, accepted),
                            name=forward.listen_address,
                            after_batch=partial(self._hand_off_batch, forward_id, accepted))
        self._acceptors[forward_id] = acceptor
        if self._paused:
            acceptor.hold()
        acceptor.start()

    def _stop_accepting(self, forward_id: int) -> None:
        acceptor = self._acceptors.pop(forward_id, None)
        if acceptor is not None:
            acceptor.close()

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """Close the listeners and pass the signal on; return once every worker exited."""
        if not self._stopping:
            log.info("%s: stopping", signal.Signals(signum).name)
        self._stopping = True
        for forward_id, forward in self.forwards.items():
            self._close_own_listeners(forward_id)  # first: it shuts down forward.listener too
            self._stop_accepting(forward_id)
            forward.stop_listening()
        for worker in self.workers.values():
            try:
                os.kill(worker.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        if not self.workers:
            self.loop.stop()

    def _handed_off_listener(self, forward_id: int, forward: Forward) -> socket.socket | None:
        """The listener the supervisor polls and accepts this forward's clients from, or
        None if it does not (UDP, no listener, or workers with listeners of their own)."""
        if forward.spec.protocol == UDP or forward_id in self._own_listeners:
            return None
        return forward.listener

    def _close_own_listeners(self, forward_id: int) -> None:
        """Stop a reuseport forward's worker listeners now, and close our copies.

        Closing our copy alone would leave each worker's listener accepting until that
        worker handles its SIGTERM or REMOVE, so a client arriving during a drain would
        still be taken (and the program deals clients to every listener in turn).  A
        ``shutdown()`` of a listening socket stops it for every process that holds it,
        at once, as closing the hand-off's one listener does; the workers then see their
        listener fail (EINVAL) and stop polling it.  The first listener is also
        ``forward.listener``; closing a socket object twice is harmless.  The entry
        stays, so stats() still knows who counts this forward's clients.
        """
        for sock in self._own_listeners.get(forward_id, {}).values():
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # closed already (a second stop), or never listening
            sock.close()

    def close(self) -> None:
        for forward_id, forward in self.forwards.items():
            self._close_own_listeners(forward_id)
            forward.stop_listening()
        self.opener.close()
        self.loop.close()

    # ---- workers ------------------------------------------------------------------------

    def _spawn(self, index: int) -> None:
        """Start worker ``index`` as a fresh ``python3 -S`` process and send it the forwards.

        A fresh interpreter instead of fork(): a forked worker would carry the
        supervisor's whole heap (and this environment's site-packages start-up, ~11 MiB)
        as resident memory of its own, and every supervisor fd it must not keep.  The
        worker starts with only the channel, the relay modules, and the stop signals still
        blocked (the signal mask survives exec), so a SIGTERM waits in its signalfd.
        """
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        child_end.set_inheritable(True)
        args = [sys.executable, "-S", "-c", WORKER_BOOT, _package_root(),
                str(child_end.fileno()), str(index), self.mover, str(self.pipe_size or 0),
                str(self.drain), str(logging.getLogger("nsbridge").getEffectiveLevel())]
        sys.stderr.flush()
        try:
            pid = os.posix_spawn(sys.executable, args, os.environ)
        finally:
            child_end.close()
        parent_end.setblocking(False)
        pidfd = os.pidfd_open(pid)
        worker = Worker(index, pid, pidfd, parent_end, time.monotonic())
        self.workers[index] = worker
        self.loop.add(pidfd, IN, lambda _e: self._reap(worker))
        self.loop.add(parent_end.fileno(), IN, lambda e: self._on_channel(worker, e))
        for forward_id, forward in self.forwards.items():
            self._send_forward(worker, forward_id, forward)
        log.debug("worker %d started (pid %d)", index, pid)

    def _on_channel(self, worker: Worker, events: int) -> None:
        if events & OUT:
            self._flush_backlog(worker)
        if events & IN:
            self._on_worker_message(worker)

    def _on_worker_message(self, worker: Worker) -> bool:
        """Read what the worker sent; False once its channel has ended."""
        while True:
            try:
                data = worker.channel.recv(MAX_MESSAGE)
            except BlockingIOError:
                return True
            except OSError:
                data = b""
            if not data:  # the worker is gone; its pidfd will tell
                self.loop.remove(worker.channel.fileno())
                return False
            if data[:1] in (STATS, REPORTED):
                try:
                    worker.stats = marshal.loads(data[1:])
                except (EOFError, ValueError, TypeError):
                    log.warning("worker %d sent unreadable statistics", worker.index)
                if data[:1] == REPORTED:
                    worker.reports += 1

    def _reap(self, worker: Worker) -> None:
        self.loop.remove(worker.pidfd)
        self.loop.remove(worker.channel.fileno())
        os.close(worker.pidfd)
        worker.channel.close()
        _, status = os.waitpid(worker.pid, 0)
        del self.workers[worker.index]
        for _message, fds in worker.backlog:  # handed to a worker that never took them
            for fd in fds:
                reset_and_close(socket.socket(fileno=fd))
        worker.backlog.clear()
        self._update_accepting()
        for forward_id, counters in worker.stats.items():  # keep totals monotonic
            stats = _stats_from(counters)
            stats.reset += stats.active  # its open connections died with it
            stats.active = 0
            _add_into(self._retired.setdefault(forward_id, ForwardStats()), stats)
        if self._stopping:
            if not self.workers:
                self.loop.stop()
            return
        code = os.waitstatus_to_exitcode(status)
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
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

    def _send(self, worker: Worker, message: bytes, fds: list[int]) -> bool:
        try:
            socket.send_fds(worker.channel, [message], fds)
            return True
        except OSError:
            return False

    def _broadcast_add(self, forward_id: int, forward: Forward) -> None:
        for worker in list(self.workers.values()):
            self._send_forward(worker, forward_id, forward)

    def _send_forward(self, worker: Worker, forward_id: int, forward: Forward) -> None:
        udp = forward.spec.protocol == UDP and self._udp_owner(forward_id) == worker.index
        own = self._own_listeners.get(forward_id, {}).get(worker.index)
        message, fds = _portable(forward_id, forward, udp, own)
        if not self._send(worker, ADD + message, fds):
            log.warning("worker %d did not take forward %s", worker.index, forward.spec.name)

    def _udp_owner(self, forward_id: int) -> int:
        return forward_id % self.count

    # ---- accepting and handing off ------------------------------------------------------

    def _hand_off_batch(self, forward_id: int, accepted: list[int]) -> None:
        if accepted:
            fds = accepted[:]
            accepted.clear()
            self._hand_off(forward_id, fds)

    def _hand_off(self, forward_id: int, fds: list[int]) -> None:
        """Give each fd to the next worker in turn.

        A worker whose channel is full gets the batch queued (backpressure: accepting
        pauses until it drains, and the kernel's listen backlog holds new clients), so a
        burst never turns into resets.  Only when no worker exists are clients reset.
        """
        order = sorted(self.workers)
        if not order:
            for fd in fds:
                reset_and_close(socket.socket(fileno=fd))
            return
        batches: dict[int, list[int]] = {}
        for fd in fds:
            batches.setdefault(order[self._next % len(order)], []).append(fd)
            self._next += 1
        for index, batch in batches.items():
            message = CONNECTIONS + struct.pack(f"{len(batch)}I", *([forward_id] * len(batch)))
            self._deliver(self.workers[index], message, batch)

    def _deliver(self, worker: Worker, message: bytes, fds: list[int]) -> None:
        if not worker.backlog:
            try:
                socket.send_fds(worker.channel, [message], fds)
            except (BlockingIOError, InterruptedError):
                pass  # full: queue it below
            except OSError:
                pass  # dying worker: queued, then reset when it is reaped
            else:
                for fd in fds:
                    os.close(fd)
                return
        worker.backlog.append((message, fds))
        self.loop.modify(worker.channel.fileno(), IN | OUT)
        self._update_accepting()

    def _flush_backlog(self, worker: Worker) -> None:
        while worker.backlog:
            message, fds = worker.backlog[0]
            try:
                socket.send_fds(worker.channel, [message], fds)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # the worker is going; _reap resets what it never took
            worker.backlog.popleft()
            for fd in fds:
                os.close(fd)
        self.loop.modify(worker.channel.fileno(), IN)
        self._update_accepting()

    def _update_accepting(self) -> None:
        """Poll the listeners only while no worker has a backlog."""
        paused = any(w.backlog for w in self.workers.values())
        if paused == self._paused:
            return
        self._paused = paused
        for acceptor in self._acceptors.values():
            if paused:
                acceptor.hold()
            else:
                acceptor.release()
        if paused:
            log.debug("workers are busy: accepting paused")


def _admit(forward: Forward, accepted: list[int], client: socket.socket, peer: object) -> None:
    """A client the supervisor accepted: reset it, or keep its fd for the hand-off."""
    if not forward.admits(peer):
        reset_and_close(client)
        return
    forward.stats.accepted += 1
    accepted.append(client.detach())


def _reuseport_possible(spec: ForwardSpec) -> bool:
    """Only a TCP forward that binds an address can give each worker its own listener."""
    listen = spec.listen
    return (isinstance(listen, ListenAddress) and spec.protocol != UDP
            and isinstance(listen.address, HostPort))


def _listen_kind(spec: ForwardSpec) -> str:
    if spec.protocol == UDP:
        return "UDP"
    if isinstance(spec.listen, ListenAddress):
        return "a Unix socket"
    return "an inherited socket (-L, fd:, systemd:)"


def _add_into(total: ForwardStats, more: ForwardStats) -> None:
    for key, value in more.as_dict().items():
        setattr(total, key, getattr(total, key) + value)


def _portable(forward_id: int, forward: Forward, udp: bool,
              own_listener: socket.socket | None) -> tuple[bytes, list[int]]:
    """A forward as a worker receives it after start-up: a message plus fds.

    ``own_listener``: the worker's SO_REUSEPORT listener (the same socket again for a
    replacement worker)."""
    spec = forward.spec
    assert forward.target is not None and isinstance(spec.connect, ConnectAddress)
    netns = spec.connect.netns
    fds = [netns.fd] if netns is not None else []
    if udp:
        assert forward.listener is not None
        fds.append(forward.listener.fileno())
    if own_listener is not None:
        fds.append(own_listener.fileno())
    label = netns.label if netns is not None else None
    message = forward_message(forward_id, spec, forward.target, label, udp,
                              own_listener is not None)
    return message, fds


def _package_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
