"""Socket switching (``nsbridge run --bypass``): the program's outbound TCP sockets become
sockets of the host's namespace, each connect decided by the policy first.

The program runs under the filter of :func:`nsbridge.linux.seccomp.notify_program`:
every ``connect``, ``listen`` and ``bind`` it makes waits for this module's answer,
io_uring and sends with ``MSG_FASTOPEN`` are refused.  (Published ports, whose listener
the program gets at ``listen``, and ``bind``: :mod:`.switchbind`.)  For each trapped
call, on the event loop:

1. Our own reference to the program's socket (``pidfd_getfd`` on its fd number), the
   sockaddr read from its memory, then ``ID_VALID`` (the thread still waits, so what we
   read was its).  From here on we act on *that* socket and *those* bytes only.
2. Where the socket lives (``SIOCGSKNS``): in the namespace (or one the program made),
   or in the host's namespace (a socket we switched earlier, or one handed in).
3. A TCP connect to an outside address: :meth:`Policy.decide
   <nsbridge.usernet.proto.policy.Policy.decide>`, as the fast path decides
   (:mod:`.redirect`).  Deny → ``ECONNREFUSED``, counted, logged at ``-v``.  Allow → a
   socket of the host's namespace (same family, the options we copy, bound to
   ``--outbound-addr``) connects to what the policy said, non-blocking, and ``ADDFD``
   puts it over the program's fd number: a non-blocking socket is answered at once
   (``EINPROGRESS``), a blocking one when the connect has finished (the loop never
   waits).  The DNS address (``AllowResolver``) is not switched: the fast path serves it.
4. Everything else — the namespace's own loopback and addresses (``0.0.0.0`` and ``::``
   included: connect(2) reads them as this host), the DNS address, UDP,
   Unix sockets, ``AF_UNSPEC``, ``listen`` on a namespace socket — is *performed here*,
   on the program's own socket, with the address we read: the result is what the
   program's own call would have given, and every packet it sends still meets today's
   paths (fast path, engine, policy).  Blocking ones run in a short-lived thread.

Why never ``SECCOMP_USER_NOTIF_FLAG_CONTINUE``, not even for a namespace-local connect
that needs no decision: the kernel would then read the sockaddr and look up the fd
number *again*.  Another thread can change both in between (write another address,
``dup2`` a switched host socket over the number), and a host socket connected by the
kernel unchecked is a way around the policy.  Performing the call ourselves on the
object and bytes we checked leaves no such gap.

Who makes the system calls: where it was built, the native core (``_notifycore.c``,
chosen by :mod:`nsbridge.linux.notifycore`) runs step 1 and the where-it-lives check of
a connect in one call, and step 3's host socket, connect, ``ADDFD`` and answer in
another, with the GIL released; this module keeps every decision.  Same steps, same
order, same outcomes as the Python path, which serves without it (or with
``NSBRIDGE_SWITCH=python``); listen and bind always take the Python path.

Who waits on the listener: with the native core, a thread of its own (``Server``),
which gets the kernel's synchronous wake-ups (``SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP``,
Linux 6.6), and serves a connect without waking Python when this module decided the
same destination before: a *decision cache*, filled here only with plain switches
(allowed, TCP, a socket of the namespace, no ``--bypass-exclude`` rule, not the
namespace's own addresses or the DNS address).  Why that is sound: a switch's decision
depends on the destination (address, port, the socket's family) and on inputs fixed for
the switcher's life (the policy's rules and address layout, host access, the exclude
rules, the own addresses when they are a fixed set, the outbound addresses) — except
the host's addresses, a live :class:`~.hostaddrs.HostAddresses`.  Its netlink socket is
watched by the thread: while an event is queued on it, every connect comes here; and
before this side reads one, the cache is emptied (:meth:`HostAddresses.before_change
<nsbridge.usernet.host.hostaddrs.HostAddresses.before_change>`).  So an entry is valid
as of the last read of events, and any unread event sends the connect here.  A live
set whose :class:`HostAddresses` comes later (the seccomp agent's per-container
addresses, read once the container's namespace can be entered) keeps the cache empty
until then, and is watched from then on; a set that cannot be watched at all turns the
cache off, and the thread then queues every connect.  Everything the thread does not finish
(denials, misses, binds, listens, a cached switch that failed or is still connecting)
comes to the loop through a queue with what was fetched, and is served as below.

What a host socket in the program cannot do: ``connect`` undecided (trapped: an outside
address is decided, then connected on that socket by us, so the kernel's answers stay
its own: ``EISCONN``, ``EALREADY``...; the namespace's own addresses are refused with
``ENETUNREACH`` on it), ``listen`` (trapped: ``EOPNOTSUPP``), a send with
``MSG_FASTOPEN`` or io_uring (refused by the filter).  So it only ever talks to the one
peer the policy allowed.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import ipaddress
import logging
import os
import select
import socket
import struct
import threading
from collections import Counter, deque
from collections.abc import Callable, Container
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING

from nsbridge.defaults import CONNECT_TIMEOUT
from nsbridge.linux import inroot, notifycore
from nsbridge.linux import seccomp_notify as notify
from nsbridge.linux.libc import libc
from nsbridge.net.addresses import format_sockaddr
from nsbridge.relay.loop import ERR, HUP, IN, OUT, EventLoop, Timer
from nsbridge.usernet.host.hostaddrs import HostAddresses, LiveSource
from nsbridge.usernet.host.outbound import NONE, OutboundAddresses
from nsbridge.usernet.host.switchbind import (
    PRIVILEGED_PORTS,
    PublishedListeners,
    bound_of_sockaddr,
    may_bind_privileged,
)
from nsbridge.usernet.proto.addresses import IPAddress
from nsbridge.usernet.proto.exclude import NO_EXCLUDE, ExcludeRules
from nsbridge.usernet.proto.policy import Allow, AllowResolver, Policy

if TYPE_CHECKING:
    from nsbridge.usernet.host.inbound import InboundPorts

log = logging.getLogger("nsbridge")

MAX_SOCKADDR = 128  # sizeof(struct sockaddr_storage): the kernel refuses longer (EINVAL)
IPPROTO_MPTCP = 262

# Options copied from the program's socket to its host replacement: plain integers the
# program may have set before connect.  Buffer sizes are not copied (reading them back
# cannot tell a set value from the default, and setting one turns autotuning off);
# SO_BINDTODEVICE is not (the namespace's device names mean nothing on the host).
_COPIED = (
    (socket.SOL_SOCKET, socket.SO_KEEPALIVE),
    (socket.SOL_SOCKET, socket.SO_REUSEADDR),
    (socket.SOL_SOCKET, socket.SO_PRIORITY),
    (socket.IPPROTO_TCP, socket.TCP_NODELAY),
    (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
    (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
    (socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
    (socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
)
_LINGER = struct.Struct("ii")
_TIMEVAL = struct.Struct("=qq")  # struct timeval on the 64-bit ABIs we serve

libc.connect.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
libc.listen.argtypes = [ctypes.c_int, ctypes.c_int]
libc.bind.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]

# Refusal reasons of the switcher's own (the policy's are its own words).
ON_SWITCHED = "namespace address on a switched socket"
LISTEN_SWITCHED = "listen on a switched socket"
FOREIGN_SOCKET = "undecidable connect on a host socket"
BIND_SWITCHED = "bind on a host socket"
CONNECT_PUBLISHED = "connect on a published listener"
PUBLISHED_IN_USE = "published port in use"
LOW_PORT = "privileged port without CAP_NET_BIND_SERVICE"


@dataclass
class SwitchStats:
    """Counters of socket switching; ``denied`` by the policy's reason, ``refused`` by
    the switcher's own."""

    notifications: int = 0  # trapped calls received
    switched: int = 0  # connects now carried by a host socket
    cached: int = 0  # of the connects decided, those the native thread took from its cache
    connect_failed: int = 0  # allowed, but the host connect failed (refused, timeout...)
    performed: int = 0  # calls made here on the program's own socket (not switched)
    denied: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)
    gone: int = 0  # the caller stopped waiting before the answer (killed, signal)
    excluded: int = 0  # allowed, made on the program's own socket (--bypass-exclude)
    errors: int = 0  # unexpected failures (logged), answered with the errno

    def as_dict(self) -> dict:
        return {name: dict(value) if isinstance(value, Counter) else value
                for name, value in self.__dict__.items()}


class _Call:
    """One trapped call being answered: the notification, the thread's pidfd, and our
    reference to the program's socket (both closed by :meth:`close`).

    ``fetched``: what the native core's ``receive`` fetched for a connect (pidfd, fd,
    sockaddr, namespace; see ``_notifycore.pyi``), None on the Python path or for other
    calls; ``raw`` and ``netns`` keep its last two once taken over."""

    __slots__ = ("fd", "fetched", "netns", "notification", "pidfd", "raw", "sock")

    def __init__(self, notification: notify.Notification,
                 fetched: tuple[int | None, int | None, bytes | int | None, int | None]
                 | None = None) -> None:
        self.notification = notification
        self.fetched = fetched
        self.pidfd = -1
        self.sock: socket.socket | None = None
        self.fd = _signed(notification.args[0])
        self.raw: bytes | int | None = None
        self.netns: int | None = None

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class SocketSwitcher:
    """Serves a ``run --bypass`` program's seccomp listener on ``loop`` (see the module
    docstring).  Host sockets are made in the namespace of the loop's thread.

    ``own_addresses``: the program's namespace's own addresses (anything with ``in``),
    whose connects stay in it; default the ``run`` namespace's (the policy's
    ``namespace`` addresses).  ``on_end``: called once every process under the filter
    has exited (the listener hung up): the seccomp agent frees a container's switcher
    there; ``run`` ends with its program anyway."""

    def __init__(self, loop: EventLoop, listener: int, policy: Policy, *,
                 outbound: OutboundAddresses = NONE,
                 connect_timeout: float = CONNECT_TIMEOUT,
                 exclude: ExcludeRules = NO_EXCLUDE,
                 own_addresses: Container[object] | None = None,
                 on_end: Callable[[], None] | None = None,
                 inbound: InboundPorts | None = None, namespace: int | None = None) -> None:
        self.loop = loop
        self.exclude = exclude
        self.listener = listener
        self.policy = policy
        self.outbound = outbound
        self.connect_timeout = connect_timeout
        self.stats = SwitchStats()
        self._host_netns = os.stat("/proc/thread-self/ns/net").st_ino
        a = policy.addresses
        self._own: Container[object] = own_addresses if own_addresses is not None \
            else {a.namespace, a.namespace6}
        self._on_end = on_end
        self._pending: dict[int, tuple[_Call, socket.socket, Timer]] = {}
        self._blocking = _BlockingCalls()
        self._closed = False
        # Published ports: a program's listener may become the publication's host
        # listener (switchbind.py).
        self.published = PublishedListeners(loop, inbound, namespace)
        from nsbridge.linux.seccomp import native_arch

        numbers = native_arch().numbers
        self._connect_nr, self._listen_nr = numbers["connect"], numbers["listen"]
        self._bind_nr = numbers["bind"]
        # The native core, or None: the Python path (notifycore.py says which and why).
        self._core = notifycore.chosen()
        # The core's serving thread, once started; None: the loop serves the listener.
        self._server: notifycore.Server | None = None
        self._cache = False  # whether decisions go into the thread's cache
        self._sources: list[LiveSource] = []  # the live sets a switch's decision reads
        self._watched: list[HostAddresses] = []  # those the thread watches so far

    def start(self) -> None:
        if self._core is not None and self._start_thread():
            return
        self.loop.add(self.listener, IN, self._on_listener)

    def _start_thread(self) -> bool:
        """Serve the listener from the native core's thread (module docstring); False,
        said at ``-v``, when it cannot start (the loop serves then)."""
        assert self._core is not None
        if os.stat("/proc/thread-self/ns/net").st_ino != self._host_netns:
            log.info("bypass: switched connects served on the event loop (this thread is "
                     "in another network namespace than the switcher's)")
            return False
        sources = self._live_sources()
        try:
            server = self._core.Server(self.listener, self._connect_nr, self._host_netns)
            self.loop.add(server.fileno(), IN, self._on_queue)
            try:
                sync = server.start()
            except OSError:
                self.loop.remove(server.fileno())
                server.close()
                raise
        except OSError as exc:
            log.info("bypass: no serving thread (%s): switched connects are served on the "
                     "event loop", exc.strerror or exc)
            return False
        self._server = server
        if sources is not None:
            self._cache = True
            self._sources = sources
        log.info("bypass: switched connects served by a native thread (%s; decision cache "
                 "%s)", "synchronous wake-ups" if sync == 0 else
                 f"no synchronous wake-ups: {os.strerror(sync)}, they need Linux 6.6",
                 "on" if self._cache else "off: an address set it reads cannot be watched")
        return True

    def _live_sources(self) -> list[LiveSource] | None:
        """The live address sets a switch's decision reads, whose events the thread must
        watch; None when one of them cannot be watched (no cache then)."""
        sources: list[object] = [self._own]
        if not self.policy.allow_host_access:
            sources.append(self.policy.host_addresses)
        live: list[LiveSource] = []
        for source in sources:
            if callable(getattr(source, "live", None)):
                live.append(source)  # type: ignore[arg-type]  # LiveSource by its method
            elif not isinstance(source, (frozenset, set)):
                return None
        return live

    def _watching(self) -> bool:
        """Whether every live set has its :class:`HostAddresses` watched by the thread,
        watching those that came since (a container's addresses once its namespace could
        be read); False while one has none yet: nothing may be cached then.  A set is
        watched (its fd polled by the thread, the cache emptied before its events are
        read) before the first decision made from it is cached."""
        assert self._server is not None
        for source in self._sources:
            live = source.live()
            if live is None:
                return False
            if not any(live is watched for watched in self._watched):
                self._server.watch(live.fileno())
                live.before_change(self._forget)
                self._watched.append(live)
        return True

    def _forget(self) -> None:
        """A watched address set is about to change: no cached decision survives it."""
        if self._server is not None:
            self._server.cache_clear()

    def close(self) -> None:
        """Stop serving; the program's trapped calls then fail with ENOSYS (the kernel's
        answer once no listener is left), so nothing waits forever."""
        if self._closed:
            return
        self._closed = True
        self.published.close()
        self.loop.remove(self.listener)
        if self._server is not None:
            self._fold()
            self.loop.remove(self._server.fileno())
            self._server.close()  # joins the thread; queued calls' fds closed
            for source in self._watched:
                source.discard_before_change(self._forget)
            self._server = None
        for call, host, timer in list(self._pending.values()):
            timer.cancel()
            self.loop.remove(host.fileno())
            host.close()
            call.close()
        self._pending.clear()
        os.close(self.listener)

    def snapshot(self) -> dict:
        self._fold()
        return {**self.stats.as_dict(), "published": dict(vars(self.published.stats))}

    # ---- receiving -----------------------------------------------------------------

    def _on_listener(self, events: int) -> None:
        if not events & IN:
            if events & (HUP | ERR):
                # Every process under the filter has exited: nothing more will come.
                self.loop.remove(self.listener)
                if self._on_end is not None:
                    self._on_end()
            return
        fetched = None
        try:
            if self._core is not None:
                nid, pid, nr, arch, args, *rest = self._core.receive(self.listener,
                                                                     self._connect_nr)
                notification = notify.Notification(nid, pid, nr, arch, args)
                if rest[0] is not None:
                    fetched = (rest[0], rest[1], rest[2], rest[3])
            else:
                notification = notify.receive(self.listener)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.EINTR):
                log.warning("bypass: reading the seccomp listener failed: %s", exc.strerror)
            return
        self.stats.notifications += 1
        self._run(_Call(notification, fetched), self._serve)

    def _on_queue(self, _events: int) -> None:
        """What the native thread handed over (module docstring), oldest first."""
        assert self._core is not None and self._server is not None
        core = self._core
        items = self._server.take()
        self._fold()
        for index, (kind, value, nid, pid, nr, arch, args, pidfd, sockfd, raw,
                    netns) in enumerate(items):
            if self._closed:  # on_end closed us: what is left only holds fds
                for rest in items[index:]:
                    _release(core, rest)
                return
            if kind == core.HUNG_UP:
                # Every process under the filter has exited: nothing more will come.
                self.loop.remove(self._server.fileno())
                if self._on_end is not None:
                    self._on_end()
                continue
            if kind == core.RECV_FAILED:
                log.warning("bypass: reading the seccomp listener failed: %s",
                            os.strerror(value))
                continue
            call = _Call(notify.Notification(nid, pid, nr, arch, args),
                         None if pidfd is None else (pidfd, sockfd, raw, netns))
            if kind == core.NOTIFY:
                self._run(call, self._serve)
            else:
                self._run(call, functools.partial(self._cached_outcome, kind, value))

    def _cached_outcome(self, kind: int, value: int, call: _Call) -> None:
        """A connect the thread switched from the cache whose outcome it leaves to us:
        the host connect failed (``value``: its errno), is still connecting for a
        blocking program (``value``: the host socket), or a step failed (its errno)."""
        assert self._core is not None and call.fetched is not None
        host = socket.socket(fileno=value) if kind == self._core.SWITCH_PENDING else None
        pidfd, sockfd, raw, _netns = call.fetched
        assert pidfd is not None and sockfd is not None and isinstance(raw, bytes)
        call.pidfd, call.raw = pidfd, raw
        call.sock = _socket_of(sockfd)
        destination = _inet_destination(call.sock.family, struct.unpack_from("=H", raw)[0],
                                        raw)
        assert destination is not None  # the thread serves TCP destinations only
        shown = format_sockaddr((str(destination[0]), destination[1]))
        if host is not None:
            self._wait_connect(call, host, shown)
        elif kind == self._core.SWITCH_FAILED:
            self._connect_failed(call, shown, value)
        else:
            raise OSError(value, os.strerror(value))

    def _fold(self) -> None:
        """The thread's counts into ours: every connect it served from the cache was
        an allowed decision, so the policy counts it too."""
        if self._server is None:
            return
        notifications, hits, switched, gone = self._server.counts()
        self.stats.notifications += notifications
        self.stats.switched += switched
        self.stats.gone += gone
        self.stats.cached += hits
        self.policy.allowed += hits

    def _run(self, call: _Call, serve: Callable[[_Call], None]) -> None:
        """``serve(call)``, answering the call when it fails as the Python path always
        has (gone, the errno of a failed step, EIO for a bug)."""
        notification = call.notification
        try:
            serve(call)
        except notify.NotificationGone:
            self.stats.gone += 1
            call.close()
        except OSError as exc:
            if not notify.is_valid(self.listener, notification.id):
                self.stats.gone += 1
            else:
                self.stats.errors += 1
                log.info("bypass: pid %d: %s", notification.pid, exc)
                self._answer(call, error=exc.errno or errno.EIO)
            call.close()
        except Exception:
            self.stats.errors += 1
            log.exception("bypass: a trapped call failed")
            self._answer(call, error=errno.EIO)
            call.close()

    def _answer(self, call: _Call, value: int = 0, error: int = 0) -> None:
        if not notify.respond(self.listener, call.notification.id, value, error):
            self.stats.gone += 1

    def _serve(self, call: _Call) -> None:
        n = call.notification
        if call.fetched is not None:
            self._serve_fetched(call)
            return
        call.pidfd = notify.pidfd_of_thread(n.pid)
        notify.check_valid(self.listener, n.id)  # the pid still names the caller
        try:
            call.sock = _socket_of(notify.take_fd(call.pidfd, call.fd))
        except OSError as exc:
            # EBADF: no such fd; ENOTSOCK: socket() refused what it got.
            notify.check_valid(self.listener, n.id)
            self._answer(call, error=exc.errno or errno.EBADF)
            call.close()
            return
        if n.nr == self._listen_nr:
            self._listen(call, _signed(n.args[1]))
        elif n.nr == self._connect_nr:
            self._connect(call)
        elif n.nr == self._bind_nr:
            self._bind(call)
        else:
            self._answer(call, error=errno.ENOSYS)
            call.close()

    def _serve_fetched(self, call: _Call) -> None:
        """A connect whose pidfd, socket reference and sockaddr the native core fetched
        (with ID_VALID after each step, as :meth:`_serve` and :meth:`_connect` check):
        the same outcomes as the Python path for each failure."""
        n = call.notification
        assert call.fetched is not None
        pidfd, sockfd, call.raw, call.netns = call.fetched
        assert pidfd is not None and sockfd is not None
        if pidfd < 0:  # no pidfd, or the caller was gone already (ENOENT)
            raise OSError(-pidfd, os.strerror(-pidfd))
        call.pidfd = pidfd
        try:
            if sockfd < 0:
                raise OSError(-sockfd, os.strerror(-sockfd))
            call.sock = _socket_of(sockfd)
        except OSError as exc:
            notify.check_valid(self.listener, n.id)
            self._answer(call, error=exc.errno or errno.EBADF)
            call.close()
            return
        self._connect(call)

    # ---- listen --------------------------------------------------------------------

    def _listen(self, call: _Call, backlog: int) -> None:
        sock = call.sock
        assert sock is not None
        if self._is_host_socket(sock):
            if self.published.owns(sock):  # the publication's listener, handed over
                self._perform(call, lambda fd: libc.listen(fd, backlog), blocking=False)
                return
            self._refuse(call, LISTEN_SWITCHED, "listen", errno.EOPNOTSUPP)
            return
        target = self.published.listen_target(sock)
        if isinstance(target, int):
            self._refuse(call, PUBLISHED_IN_USE, "listen", target)
        elif target is not None:
            n = call.notification
            self.published.hand_over(target, sock, backlog, lambda host: notify.install_fd(
                self.listener, n.id, host.fileno(), call.fd, notify.fd_cloexec(n.pid, call.fd)))
            self._answer(call)
            call.close()
        else:
            self._perform(call, lambda fd: libc.listen(fd, backlog), blocking=False)

    # ---- bind ----------------------------------------------------------------------

    def _bind(self, call: _Call) -> None:
        """Performed on the program's own socket with the bytes read (a namespace
        socket); refused on a host socket, which would reserve a host port (a switched
        socket disconnected with AF_UNSPEC is unbound again)."""
        n, sock = call.notification, call.sock
        assert sock is not None
        length = n.args[2] & 0xFFFFFFFF
        if length > MAX_SOCKADDR:
            notify.check_valid(self.listener, n.id)
            self._answer(call, error=errno.EINVAL)
            call.close()
            return
        raw = notify.read_memory(n.pid, n.args[1], length)
        notify.check_valid(self.listener, n.id)  # the bytes were the caller's
        if self._is_host_socket(sock):
            self._refuse(call, BIND_SWITCHED, "bind", errno.EINVAL)
            return
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            bound = bound_of_sockaddr(sock.family, raw, False)
            if bound is not None and 0 < bound.port < PRIVILEGED_PORTS and \
                    not may_bind_privileged(n.pid):
                self._refuse(call, LOW_PORT, f"bind :{bound.port}", errno.EACCES)
                return
            refused = self.published.bind(sock, raw)
            if refused:
                self._refuse(call, PUBLISHED_IN_USE, "bind", refused)
                return
        holder = -1
        if len(raw) >= 2 and struct.unpack_from("=H", raw)[0] == socket.AF_UNIX \
                and sock.family == socket.AF_UNIX:
            raw, holder = inroot.unix_sockaddr(raw, n.pid, create=True)
        self._perform(call, _closing(holder, lambda fd: libc.bind(fd, raw, len(raw))),
                      blocking=holder >= 0)

    # ---- connect -------------------------------------------------------------------

    def _connect(self, call: _Call) -> None:
        n, sock = call.notification, call.sock
        assert sock is not None
        length = n.args[2] & 0xFFFFFFFF
        if length > MAX_SOCKADDR or length < 2:
            notify.check_valid(self.listener, n.id)
            self._answer(call, error=errno.EINVAL)
            call.close()
            return
        if call.fetched is None:
            raw = notify.read_memory(n.pid, n.args[1], length)
            notify.check_valid(self.listener, n.id)  # the bytes were the caller's
            host_socket = self._is_host_socket(sock)
        else:  # read and checked by the native core, and where the socket lives
            if not isinstance(call.raw, bytes):
                error = -call.raw if isinstance(call.raw, int) else errno.EFAULT
                if error == errno.ENOENT:
                    raise notify.NotificationGone(errno.ENOENT, "the trapped call is gone")
                raise OSError(error, "cannot read the caller's memory")
            raw = call.raw
            host_socket = call.netns is None or call.netns == self._host_netns
        family = struct.unpack_from("=H", raw)[0]
        if host_socket and self.published.owns(sock):
            self._refuse(call, CONNECT_PUBLISHED, f"-> {_family_name(family)}", errno.EOPNOTSUPP)
            return
        tcp = (sock.family in (socket.AF_INET, socket.AF_INET6)
               and sock.type == socket.SOCK_STREAM
               and sock.proto in (0, socket.IPPROTO_TCP))
        destination = _inet_destination(sock.family, family, raw) if tcp else None
        if destination is None:
            if host_socket and family != socket.AF_UNSPEC:
                # Not a TCP connect to an address we can decide (another family, a
                # socket handed in from outside): performing it would be unchecked.
                self._refuse(call, FOREIGN_SOCKET, f"-> {_family_name(family)}", errno.EPERM)
                return
            # Not TCP to an address, or AF_UNSPEC (a disconnect: a switched socket stays
            # one of the host's, and every later connect or listen on it is trapped).
            holder = -1
            if family == socket.AF_UNIX and sock.family == socket.AF_UNIX:
                raw, holder = inroot.unix_sockaddr(raw, n.pid, create=False)
            self._perform(call, _closing(holder, lambda fd: libc.connect(fd, raw, len(raw))),
                          blocking=_is_blocking(sock))
            return
        ip, port = destination
        shown = format_sockaddr((str(ip), port))
        decided_ip = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) and \
            ip.ipv4_mapped is not None else ip
        # The namespace's own addresses (0.0.0.0 and :: mean "this host" to connect(2)
        # too) need no decision; the DNS address is served by the namespace's own path
        # (checked queries).  Both stay in the namespace, never on a switched socket.
        own = decided_ip.is_loopback or decided_ip.is_unspecified or decided_ip in self._own
        decision = None if own else self.policy.decide("tcp", decided_ip, port)
        if decision is None or isinstance(decision, AllowResolver):
            if host_socket:
                self._refuse(call, ON_SWITCHED, f"-> {shown}", errno.ENETUNREACH)
                return
            self._perform(call, lambda fd: libc.connect(fd, raw, len(raw)),
                          blocking=_is_blocking(sock))
            return
        if not isinstance(decision, Allow):
            self.stats.denied[decision.reason] += 1
            if log.isEnabledFor(logging.INFO):
                log.info("usernet tcp: bypass pid %d -> %s denied: %s", n.pid, shown,
                         decision.reason)
            self._answer(call, error=errno.ECONNREFUSED)
            call.close()
            return
        if host_socket:
            # Already switched: the kernel's own connect on it, to what was decided,
            # keeps its semantics (EISCONN, EALREADY, the error of a failed attempt, a
            # new attempt after that or after AF_UNSPEC) for programs that poll so.
            target = _sockaddr(sock.family, decision.host_ip, decision.host_port)
            self._perform(call, lambda fd: libc.connect(fd, target, len(target)),
                          blocking=_is_blocking(sock))
            return
        rule = self.exclude.match(port, ip, decided_ip) if self.exclude else None
        if rule is not None:
            self._excluded(call, raw, shown, ExcludeRules.describe(rule))
            return
        self._switch(call, decision, mapped=decided_ip is not ip, shown=shown)

    def _excluded(self, call: _Call, raw: bytes, shown: str, rule: str) -> None:
        """An allowed connect a ``--bypass-exclude`` rule covers: made here on the
        program's own socket with the bytes we read, so it leaves by the namespace's
        path (the fast path, which decides it again) and keeps the namespace's address
        for protocols that announce it.  Only the path changes; the policy has spoken."""
        assert call.sock is not None
        self.stats.excluded += 1
        if log.isEnabledFor(logging.INFO):
            log.info("usernet tcp: bypass pid %d -> %s excluded (%s): the namespace's path",
                     call.notification.pid, shown, rule)
        self._perform(call, lambda fd: libc.connect(fd, raw, len(raw)),
                      blocking=_is_blocking(call.sock))

    def _switch(self, call: _Call, decision: Allow, *, mapped: bool, shown: str) -> None:
        """A host socket connects to the allowed target and replaces the program's."""
        sock = call.sock
        assert sock is not None
        target_ip = decision.host_ip
        if mapped and isinstance(target_ip, ipaddress.IPv4Address):
            # An IPv6 socket asked for an IPv4 address (::ffff:a.b.c.d): keep it IPv6.
            target: tuple[str, int] = (f"::ffff:{target_ip}", decision.host_port)
            family = socket.AF_INET6
        else:
            target = (str(target_ip), decision.host_port)
            family = socket.AF_INET6 if target_ip.version == 6 else socket.AF_INET
        blocking = _is_blocking(sock)
        if self._core is not None:
            self._switch_native(call, family, target_ip, decision.host_port, mapped,
                                blocking, shown)
            return
        host = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK
                             | socket.SOCK_CLOEXEC)
        try:
            _copy_options(sock, host)
            if family == socket.AF_INET6 and mapped:
                host.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            self.outbound.bind(host, str(target_ip))
            result = host.connect_ex(target)
        except OSError:
            host.close()
            raise
        if result == 0:
            self._install(call, host, blocking, 0)
        elif result != errno.EINPROGRESS:
            host.close()
            self._connect_failed(call, shown, result)
        elif not blocking:
            self._install(call, host, blocking, errno.EINPROGRESS)
        elif _connected_now(host):
            # A target on this host has usually answered before connect() returned
            # (the handshake runs inside the call): no round through the loop.
            self._connect_finished(call, host, shown, 0)
        else:
            self._wait_connect(call, host, shown)

    def _wait_connect(self, call: _Call, host: socket.socket, shown: str) -> None:
        """A blocking program's connect with no outcome yet: the loop waits for it."""
        assert call.sock is not None
        nid = call.notification.id
        wait, expired = self._blocking_wait(call.sock)
        timer = self.loop.call_later(wait, lambda: self._connect_done(nid, shown, expired))
        self._pending[nid] = (call, host, timer)
        self.loop.add(host.fileno(), OUT, lambda _e: self._connect_done(nid, shown))

    def _switch_native(self, call: _Call, family: int, target_ip: IPAddress, port: int,
                       mapped: bool, blocking: bool, shown: str) -> None:
        """:meth:`_switch`'s system calls in one call of the native core: the host
        socket, options, outbound bind, connect, and (when there is an outcome at once)
        ADDFD and the answer.  The same outcomes, counted the same way."""
        assert self._core is not None and call.sock is not None
        core, n = self._core, call.notification
        target = _sockaddr(family, target_ip, port)
        v6only_off = family == socket.AF_INET6 and mapped
        bound = self._outbound_sockaddr(family, target_ip)
        if self._cache and isinstance(call.raw, bytes) and self._server is not None \
                and not log.isEnabledFor(logging.DEBUG) and self._watching():
            # A plain switch, allowed (see the module docstring on why it may be cached;
            # at -vv every switch is left to us, so each is logged).
            self._server.cache_put(call.sock.family, call.raw, family, target, v6only_off,
                                   bound)
        outcome, value = core.switch_connect(
            self.listener, n.id, n.pid, call.fd, call.sock.fileno(), call.sock.family,
            family, target, v6only_off, bound, blocking)
        if outcome == core.FAILED:
            self._connect_failed(call, shown, value)
        elif outcome == core.PENDING:
            self._wait_connect(call, socket.socket(fileno=value), shown)
        else:
            self._installed(call, outcome)

    def _installed(self, call: _Call, outcome: int) -> None:
        """Count what the native core's install did (SWITCHED, SWITCHED_GONE, GONE)."""
        assert self._core is not None
        if outcome == self._core.GONE:
            self.stats.gone += 1
        else:
            self.stats.switched += 1
            if outcome == self._core.SWITCHED_GONE:
                self.stats.gone += 1
            if log.isEnabledFor(logging.DEBUG):
                log.debug("usernet tcp: bypass pid %d fd %d switched", call.notification.pid,
                          call.fd)
        call.close()

    def _outbound_sockaddr(self, family: int, target_ip: IPAddress) -> bytes | None:
        """The sockaddr :meth:`OutboundAddresses.bind` would bind a host socket of
        ``family`` to for ``target_ip`` (port 0), or None for no bind."""
        outbound = self.outbound
        if outbound.ipv4 is None and outbound.ipv6 is None:
            return None
        source = outbound.source_for(target_ip)
        if source is None or (family == socket.AF_INET6) != (source.version == 6):
            return None
        return _sockaddr(family, source, 0)

    def _blocking_wait(self, sock: socket.socket) -> tuple[float, int]:
        """How long a blocking connect of the program may wait here, and the answer when
        that runs out: the program's own ``SO_SNDTIMEO`` if it set a shorter one (the
        kernel then answers ``EINPROGRESS`` and the attempt goes on in the background,
        so the switched socket is installed still connecting), else our connect
        timeout (``ETIMEDOUT``)."""
        send_timeout = _send_timeout(sock)
        if 0 < send_timeout < self.connect_timeout:
            return send_timeout, errno.EINPROGRESS
        return self.connect_timeout, errno.ETIMEDOUT

    def _connect_done(self, nid: int, shown: str, expired: int = 0) -> None:
        """The pending blocking connect ``nid`` finished, or its wait ran out
        (``expired``: the answer that gives, see :meth:`_blocking_wait`)."""
        entry = self._pending.pop(nid, None)
        if entry is None:
            return
        call, host, timer = entry
        timer.cancel()
        self.loop.remove(host.fileno())
        self._connect_finished(call, host, shown, expired)

    def _connect_finished(self, call: _Call, host: socket.socket, shown: str,
                          error: int) -> None:
        """A blocking program's connect has an outcome: install (answering 0, or
        ``EINPROGRESS`` when its ``SO_SNDTIMEO`` ran out first), or its error."""
        error = error or host.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error and error != errno.EINPROGRESS:
            host.close()
            self._connect_failed(call, shown, error)
            return
        try:
            self._install(call, host, True, error)
        except notify.NotificationGone:
            self.stats.gone += 1
            call.close()
        except OSError as exc:
            self.stats.errors += 1
            log.info("bypass: installing a switched socket failed: %s", exc)
            self._answer(call, error=exc.errno or errno.EIO)
            call.close()

    def _install(self, call: _Call, host: socket.socket, blocking: bool, result: int) -> None:
        """``host`` over the program's fd number (its close-on-exec flag kept), then the
        answer.  The program's namespace socket is closed by the replacement."""
        n = call.notification
        if self._core is not None:
            outcome = self._core.install(self.listener, n.id, n.pid, call.fd, host.detach(),
                                         blocking, result)
            if outcome == self._core.GONE:
                raise notify.NotificationGone(errno.ENOENT, "the trapped call is gone")
            self._installed(call, outcome)
            return
        try:
            if blocking:
                host.setblocking(True)  # the file's flag: the program's socket was blocking
            cloexec = notify.fd_cloexec(n.pid, call.fd)
            notify.install_fd(self.listener, n.id, host.fileno(), call.fd, cloexec)
        finally:
            host.close()  # the program holds its own reference now (or nobody does)
        self.stats.switched += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug("usernet tcp: bypass pid %d fd %d switched", n.pid, call.fd)
        self._answer(call, error=result)
        call.close()

    def _connect_failed(self, call: _Call, shown: str, error: int) -> None:
        self.stats.connect_failed += 1
        if log.isEnabledFor(logging.INFO):
            log.info("usernet tcp: bypass pid %d -> %s: %s", call.notification.pid, shown,
                     os.strerror(error))
        self._answer(call, error=error)
        call.close()

    # ---- helpers -------------------------------------------------------------------

    def _refuse(self, call: _Call, reason: str, shown: str, error: int) -> None:
        self.stats.refused[reason] += 1
        if log.isEnabledFor(logging.INFO):
            log.info("usernet tcp: bypass pid %d %s refused: %s", call.notification.pid,
                     shown, reason)
        self._answer(call, error=error)
        call.close()

    def _is_host_socket(self, sock: socket.socket) -> bool:
        """True for a socket of the host's namespace (or one we may not inspect, which
        is treated the same way: it is not the program's own)."""
        netns = notify.socket_netns(sock.fileno())
        return netns is None or netns == self._host_netns

    def _perform(self, call: _Call, operation: Callable[[int], int], *,
                 blocking: bool) -> None:
        """Run ``operation(fd)`` (a libc call) on our reference to the program's socket
        and answer with its result; a call that may block runs in a thread."""
        assert call.sock is not None
        fd = call.sock.fileno()
        self.stats.performed += 1

        def run() -> tuple[int, int]:
            result = operation(fd)
            return (result, ctypes.get_errno() if result < 0 else 0)

        def answer(result: tuple[int, int]) -> None:
            if not self._closed:
                self._answer(call, error=result[1])
            call.close()

        if not blocking:
            answer(run())
            return

        def in_thread() -> None:
            result = run()
            self.loop.call_soon_threadsafe(lambda: answer(result))

        self._blocking.submit(in_thread)


class _BlockingCalls:
    """Runs calls that may block (a program's blocking connect to its own namespace) in
    at most :data:`MAX_THREADS` daemon threads, the rest queued: a program that makes
    thousands at once cannot make thousands of threads here, and a call that never
    returns (a Unix listener that never accepts) holds one thread, not the loop.
    Daemon threads: nsbridge's exit must not wait for a connect."""

    MAX_THREADS = 32

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: deque[Callable[[], None]] = deque()
        self._threads = 0

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            self._queue.append(job)
            if self._threads >= self.MAX_THREADS:
                return
            self._threads += 1
        threading.Thread(target=self._work, name="nsbridge-bypass-call", daemon=True).start()

    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._threads -= 1
                    return
                job = self._queue.popleft()
            job()


def _release(core: ModuleType, item: tuple) -> None:
    """Close the fds a queued item of the thread holds (the switcher is closing; the
    kernel answers its call when the listener is closed)."""
    kind, value, _nid, _pid, _nr, _arch, _args, pidfd, sockfd, _raw, _netns = item
    if kind == core.SWITCH_PENDING:
        os.close(value)
    if pidfd is not None and pidfd >= 0:
        os.close(pidfd)
        if sockfd is not None and sockfd >= 0:
            os.close(sockfd)


def _socket_of(fd: int) -> socket.socket:
    """A socket object owning ``fd``; ENOTSOCK (``fd`` closed) when it is no socket."""
    try:
        return socket.socket(fileno=fd)
    except OSError:
        os.close(fd)
        raise


def _signed(value: int) -> int:
    """A system call's int argument (the low 32 bits, signed) from its u64 slot."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


def _connected_now(sock: socket.socket) -> bool:
    """Whether a non-blocking connect in progress has an outcome already (writable: done,
    or failed, which SO_ERROR then says)."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLOUT)
    return bool(poller.poll(0))


def _is_blocking(sock: socket.socket) -> bool:
    return not fcntl.fcntl(sock.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK


def _send_timeout(sock: socket.socket) -> float:
    """The socket's ``SO_SNDTIMEO`` in seconds (0: none), which bounds a blocking
    connect in the kernel too."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _TIMEVAL.size)
    except OSError:
        return 0.0
    seconds, microseconds = _TIMEVAL.unpack(raw)
    return seconds + microseconds / 1e6


def _family_name(family: int) -> str:
    try:
        return socket.AddressFamily(family).name
    except ValueError:
        return f"family {family}"


def _inet_destination(sock_family: int, family: int,
                      raw: bytes) -> tuple[IPAddress, int] | None:
    """(address, port) of an AF_INET/AF_INET6 sockaddr the kernel would accept for a
    socket of ``sock_family``; None for anything else (which is then performed as is,
    and the kernel gives its own error)."""
    if family == socket.AF_INET and len(raw) >= 16 and sock_family == socket.AF_INET:
        return ipaddress.IPv4Address(raw[4:8]), struct.unpack_from("!H", raw, 2)[0]
    if family == socket.AF_INET6 and len(raw) >= 24 and sock_family == socket.AF_INET6:
        return ipaddress.IPv6Address(raw[8:24]), struct.unpack_from("!H", raw, 2)[0]
    return None


def _sockaddr(family: int, ip: IPAddress, port: int) -> bytes:
    """The ``sockaddr_in``/``sockaddr_in6`` for ``ip:port`` on a socket of ``family``
    (an IPv4 address on an IPv6 socket as ``::ffff:a.b.c.d``)."""
    if family == socket.AF_INET:
        return struct.pack("=H", family) + struct.pack("!H", port) + ip.packed + bytes(8)
    packed = ip.packed if ip.version == 6 else bytes(10) + b"\xff\xff" + ip.packed
    return struct.pack("=H", family) + struct.pack("!HI", port, 0) + packed + bytes(4)


def _closing(holder: int, operation: Callable[[int], int]) -> Callable[[int], int]:
    """``operation``, then ``holder`` closed (an fd the call's sockaddr names through
    ``/proc/self/fd``; -1 for none)."""
    if holder < 0:
        return operation

    def run(fd: int) -> int:
        try:
            return operation(fd)
        finally:
            os.close(holder)

    return run


def _copy_options(source: socket.socket, target: socket.socket) -> None:
    """The program's option values onto ``target``, a fresh socket: only those that differ
    from a fresh socket's (each setsockopt costs a system call on every connect, and some
    make the connect itself slower)."""
    defaults = _fresh_defaults(target.family)
    for level, option in _COPIED:
        try:
            value = source.getsockopt(level, option)
            if value != defaults.get((level, option)):
                target.setsockopt(level, option, value)
        except OSError:
            pass
    try:
        linger = source.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER.size)
        if _LINGER.unpack(linger)[0]:
            target.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
    except OSError:
        pass
    if source.family == target.family == socket.AF_INET:
        _copy_int(source, target, socket.IPPROTO_IP, socket.IP_TOS)
    elif source.family == target.family == socket.AF_INET6:
        _copy_int(source, target, socket.IPPROTO_IPV6, socket.IPV6_TCLASS)


@functools.cache
def _fresh_defaults(family: int) -> dict[tuple[int, int], int]:
    """The copied options' values on a fresh TCP socket of ``family`` (a host socket:
    the values are the host namespace's sysctl defaults, read once)."""
    values: dict[tuple[int, int], int] = {}
    with socket.socket(family, socket.SOCK_STREAM) as fresh:
        for level, option in _COPIED:
            try:
                values[(level, option)] = fresh.getsockopt(level, option)
            except OSError:
                pass
    return values


def _copy_int(source: socket.socket, target: socket.socket, level: int, option: int) -> None:
    try:
        target.setsockopt(level, option, source.getsockopt(level, option))
    except OSError:
        pass
