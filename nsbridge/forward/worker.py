"""The worker side of the daemon (see :mod:`nsbridge.forward.supervisor`): a fresh ``python3 -S``
process that relays the connections its supervisor hands over.

Kept lean on purpose, because with 10,000 idle connections most of the daemon's memory
is per-process baseline.  A worker imports only the relay (event loop, TCP relay,
forward, socket factory) and nothing the command line or the supervisor needs:
messages travel as ``marshal`` data of plain types, not pickled objects, so unpickling
does not import ``dataclasses``/``pickle``; and the boot code replaces the ``logging``
logger with a stand-in (:func:`nsbridge.relay.log.use_stderr`) before this module is
imported.  ``python3 -S -X importtime`` on :data:`WORKER_BOOT` shows what it loads.
"""

from __future__ import annotations

import marshal
import os
import signal
import socket
import struct
import sys

from nsbridge.forward.bridge import Bridge
from nsbridge.forward.forward import Forward
from nsbridge.forward.spec import ConnectAddress, ForwardSpec, ListenAddress
from nsbridge.linux.libc import libc
from nsbridge.linux.netns import Netns
from nsbridge.linux.signals import StopSignals
from nsbridge.net.addresses import HostPort, ResolvedAddress, UnixAddress
from nsbridge.relay.log import log
from nsbridge.relay.loop import IN
from nsbridge.relay.movers import MoverName
from nsbridge.relay.tcp import reset_and_close

STATS_INTERVAL = 0.5
ACCEPT_BATCH = 64
MAX_MESSAGE = 1 << 16

# Supervisor -> worker messages: one type byte, then the body.
CONNECTIONS = b"C"  # body: forward ids (uint32 each); fds: the accepted sockets
ADD = b"A"  # body: marshalled forward_message(); fds: [connect netns fd] [udp socket] [listener]
REMOVE = b"R"  # body: marshalled (forward id, kill)
REPORT = b"Q"  # no body: send the counters now (a control client asked for them)
# Worker -> supervisor:
STATS = b"S"  # body: marshalled {forward id: counters}, sent every STATS_INTERVAL if changed
REPORTED = b"s"  # the same body, in answer to REPORT

# argv: package root, channel fd, index, mover, pipe size, drain, log level.  The
# stand-in logger goes in before any relay module binds ``log``.
WORKER_BOOT = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "import nsbridge.relay.log; nsbridge.relay.log.use_stderr(int(sys.argv[-1])); "
    "from nsbridge.forward.worker import worker_main; sys.exit(worker_main(sys.argv[2:]))"
)


def forward_message(forward_id: int, spec: ForwardSpec, target: ResolvedAddress,
                    netns_label: str | None, udp: bool, listener: bool) -> bytes:
    """What a worker needs to relay a forward, as marshal data; the fds travel beside it.

    ``udp``: this worker relays the forward's UDP socket; ``listener``: an SO_REUSEPORT
    listener of its own travels too, and the worker accepts from it.
    """
    assert isinstance(spec.connect, ConnectAddress)
    address = spec.connect.address
    if isinstance(address, HostPort):
        where: tuple = ("host", str(address.host), int(address.port))
    else:
        where = ("unix", str(address.path), bool(address.abstract))
    return marshal.dumps({
        "id": forward_id, "name": spec.name, "protocol": spec.protocol, "connect": where,
        "family": int(target.family), "sockaddr": target.sockaddr, "netns": netns_label,
        "udp": udp, "listener": listener, "connect_timeout": spec.connect_timeout,
        "allow": list(spec.allow), "deny": list(spec.deny), "proxy": spec.proxy,
        "idle_timeout": spec.idle_timeout, "max_flows": spec.max_flows,
    })  # marshal takes only plain types: int(), not an AddressFamily enum member


def _spec_from(message: dict) -> ForwardSpec:
    kind, first, second = message["connect"]
    address = HostPort(first, second) if kind == "host" else UnixAddress(first, second)
    protocol = message["protocol"]
    # The listen side stays in the supervisor: a placeholder here.
    return ForwardSpec(ListenAddress(HostPort("supervisor", 0), protocol=protocol),
                       ConnectAddress(address, None, protocol),
                       connect_timeout=message["connect_timeout"], name=message["name"],
                       allow=message["allow"], deny=message["deny"], proxy=message["proxy"],
                       idle_timeout=message["idle_timeout"], max_flows=message["max_flows"])


def release_free_heap() -> None:
    """Give the C heap's free pages back to the kernel (glibc ``malloc_trim``).

    Start-up frees a lot of memory that stays resident otherwise: where no ``.pyc`` can
    be read or written (PYTHONDONTWRITEBYTECODE, read-only checkout), every module is
    compiled from source, and the compiler's peak is ~0.7 MiB of a worker's baseline.
    A no-op where the C library has no malloc_trim (musl).
    """
    try:
        trim = libc.malloc_trim
    except AttributeError:
        return
    trim(0)


def worker_main(argv: list[str]) -> int:
    """Entry point of a worker process (see Supervisor._spawn and WORKER_BOOT)."""
    channel_fd, index, mover_arg, pipe_size, drain, _level = argv
    # As make_mover reads a name: "copy", or else splice.
    mover: MoverName = "copy" if mover_arg == "copy" else "splice"
    channel = socket.socket(fileno=int(channel_fd))
    release_free_heap()
    try:
        return _WorkerProcess(int(index), channel, mover, int(pipe_size) or None,
                              float(drain)).run()
    except BaseException:
        sys.excepthook(*sys.exc_info())  # the traceback, without importing traceback
        return 1


class _WorkerProcess:
    """Runs in a worker process: relays what the supervisor hands over."""

    def __init__(self, index: int, channel: socket.socket, mover: MoverName,
                 pipe_size: int | None, drain: float) -> None:
        self.index = index
        self.channel = channel
        self.drain = drain
        self.bridge = Bridge(mover=mover, pipe_size=pipe_size)
        self.forwards: dict[int, Forward] = {}
        self._last_stats: dict[int, dict[str, int]] = {}
        # (family, type, proto) of each forward's clients: socket(fileno=fd) without them
        # asks the kernel (getsockname + 2 getsockopt) for every handed-over connection,
        # and all clients of one forward come from the same listener.
        self._client_kinds: dict[int, tuple[int, int, int]] = {}

    def run(self) -> int:
        stops = StopSignals((signal.SIGTERM,))
        stops.attach(self.bridge.loop, lambda _signum, count: self.bridge.shutdown(
            self.drain if count == 1 else None))
        self.channel.setblocking(False)
        self.bridge.loop.add(self.channel.fileno(), IN, self._on_message)
        self._schedule_stats()
        try:
            self.bridge.run()
        finally:
            stops.close()
            self.bridge.close()
        return 0

    def _on_message(self, _events: int) -> None:
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.channel, MAX_MESSAGE,
                                                           ACCEPT_BATCH)
            except BlockingIOError:
                return
            if not data and not fds:  # the supervisor is gone: finish and exit
                self.bridge.loop.remove(self.channel.fileno())
                self.bridge.shutdown(self.drain or None)
                return
            kind, body = data[:1], data[1:]
            if kind == CONNECTIONS:
                self._start_sessions(body, fds)
            elif kind == ADD:
                self._add(marshal.loads(body), fds)
            elif kind == REMOVE:
                forward_id, kill = marshal.loads(body)
                self._remove(forward_id, kill)
            elif kind == REPORT:
                self._send_stats(REPORTED, self._current_stats())
            else:
                for fd in fds:
                    os.close(fd)

    def _start_sessions(self, body: bytes, fds: list[int]) -> None:
        ids = struct.unpack(f"{len(body) // 4}I", body)
        for forward_id, fd in zip(ids, fds, strict=False):
            forward = self.forwards.get(forward_id)
            kind = self._client_kinds.get(forward_id)
            if kind is None:
                client = socket.socket(fileno=fd)
                self._client_kinds[forward_id] = (client.family, client.type, client.proto)
            else:
                client = socket.socket(*kind, fileno=fd)
            if forward is None:
                reset_and_close(client)
            else:
                forward.start_session(client, accepted=True)

    def _add(self, message: dict, fds: list[int]) -> None:
        fds = list(fds)
        label = message["netns"]
        netns = Netns(fds.pop(0), label) if label else None
        udp_sock = socket.socket(fileno=fds.pop(0)) if message["udp"] else None
        listener = socket.socket(fileno=fds.pop(0)) if message["listener"] else None
        forward_id = message["id"]
        target = ResolvedAddress(message["family"], message["sockaddr"])
        forward = self.bridge.adopt(_spec_from(message), target, netns)
        if udp_sock is not None:
            forward.start_udp(udp_sock)
        self.forwards[forward_id] = forward
        if listener is not None:
            forward.listen_on(listener)
            log.debug("worker %d accepts %s itself (SO_REUSEPORT)", self.index,
                      message["name"])

    def _remove(self, forward_id: int, kill: bool) -> None:
        forward = self.forwards.pop(forward_id, None)
        if forward is None:
            return
        forward.stop_listening()
        if kill:
            forward.abort_all("reset: forward removed")
        self._last_stats.pop(forward_id, None)
        self._client_kinds.pop(forward_id, None)

    def _schedule_stats(self) -> None:
        self.bridge.loop.call_later(STATS_INTERVAL, self._report_stats)

    def _current_stats(self) -> dict[int, dict[str, int]]:
        return {i: f.snapshot().as_dict() for i, f in self.forwards.items()}

    def _report_stats(self) -> None:
        current = self._current_stats()
        if current != self._last_stats and self._send_stats(STATS, current):
            self._last_stats = current
        self._schedule_stats()

    def _send_stats(self, kind: bytes, current: dict[int, dict[str, int]]) -> bool:
        try:
            self.channel.send(kind + marshal.dumps(current))
        except OSError:
            return False
        return True
