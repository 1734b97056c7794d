"""The host's own addresses, kept current from the kernel: what host access closes.

The policy denies a flow to one of the host's addresses unless host access is on
(:mod:`nsbridge.usernet.proto.hostaccess`).  "The host's addresses" must be the ones
that exist when the flow is decided, not at start: a VPN comes up, DHCP renews to a
new address, a container bridge appears.  So this set is filled by a netlink dump
(``RTM_GETADDR``) and kept current from the address events (``RTNLGRP_IPV4_IFADDR``,
``RTNLGRP_IPV6_IFADDR``) on the same socket, and every membership test first reads
whatever events are queued (non-blocking).  That makes it race-free: once
``ip addr add`` has returned, the kernel has queued its event on this socket, so a flow
decided afterwards sees the address.  With nothing queued the cost is one ``poll`` and a
set lookup.  If the socket's queue overflowed (``ENOBUFS``: events were
lost) the set is dumped again from scratch.

What counts: every IPv4 and IPv6 address on every interface (the local address,
``IFA_LOCAL``, for point-to-point IPv4 links, whose ``IFA_ADDRESS`` is the peer), and
each IPv4 address's broadcast addresses: the one configured (``IFA_BROADCAST``) and,
for a prefix shorter than /31, the subnet's directed broadcast, which the kernel treats
as a broadcast whether or not it was configured (dialing it would broadcast on the
host's network).  Loopback addresses are in it too, harmlessly
(the policy never dials them anyway).

Why a raw socket and not pyroute2 (which the namespace set-up uses): this check runs on
every new flow, and with nothing queued it must cost one ``recv``; pyroute2 parses every
message into objects and owns its socket's reads.  The two message types read here
(``ifaddrmsg`` and three attributes) are a few lines of ``struct`` (:mod:`nsbridge.linux.rtaddr`).

The socket belongs to the network namespace of the thread that opens it (a socket is
bound to its namespace for life), so open it where the host side dials from.
Not thread-safe: one thread (the event loop's) tests and drains.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import select
import socket
from collections import Counter
from collections.abc import Callable
from typing import Protocol

from nsbridge.linux import rtaddr

_DUMP_TIMEOUT = 5.0  # seconds for the kernel to finish a dump (it answers at once)
RECEIVE_BUFFER = 1 << 20  # room for a burst of events between two decisions

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
_Key = tuple[int, int, int, bytes]  # family, interface index, prefix length, local address


class LiveSource(Protocol):
    """An address set a decision may read whose changes a cache must see: a
    :class:`HostAddresses`, or something kept current by one that may come later (the
    seccomp agent's per-container addresses, readable once the container's namespace
    can be entered).  ``live()`` is that :class:`HostAddresses`, or None while there is
    none yet (then nothing decided from the set may be cached)."""

    def live(self) -> HostAddresses | None: ...


class HostAddresses:
    """A live set of the host namespace's addresses (module doc); ``address in it``.

    ``receive_buffer`` is the event socket's buffer (tests make it tiny to provoke an
    overflow).  ``sock``: an unbound ``NETLINK_ROUTE`` socket made elsewhere, whose
    namespace's addresses to keep instead of this thread's (the seccomp agent's view of
    a container, :mod:`nsbridge.linux.nssocket`); it is owned from here on.  Close it
    with :meth:`close` (or use it as a context manager).
    """

    def __init__(self, receive_buffer: int = RECEIVE_BUFFER,
                 sock: socket.socket | None = None) -> None:
        self._sock = sock if sock is not None else socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
        self._sock.setblocking(False)
        self._entries: dict[_Key, tuple[Address, ...]] = {}
        self._count: Counter[Address] = Counter()
        self._buffer = bytearray(1 << 16)
        self._seq = 0
        self.resyncs = 0  # dumps after the first: how often events were lost
        self._before_change: list[Callable[[], None]] = []
        self._ready = select.poll()
        self._ready.register(self._sock.fileno(), select.POLLIN)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
            self._sock.bind((0, rtaddr.RTMGRP_IPV4_IFADDR | rtaddr.RTMGRP_IPV6_IFADDR))
            self._resync()
        except BaseException:
            self._sock.close()
            raise

    # ---- what the policy asks -----------------------------------------------------------

    def __contains__(self, address: object) -> bool:
        if self._ready.poll(0):  # refresh() inlined: this runs on every new flow
            self.refresh()
        return address in self._count

    def refresh(self) -> None:
        """Apply every queued address event (re-dump if some were lost).

        ``poll(0)`` first: with nothing queued (nearly every flow) that is cheaper than a
        ``recv`` that fails with EAGAIN, whose exception Python must build and catch."""
        if not self._ready.poll(0):
            return
        self._changing()
        while True:
            try:
                size = self._sock.recv_into(self._buffer)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                self.resyncs += 1
                self._resync()
                return
            self._apply(memoryview(self._buffer)[:size])

    def before_change(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` before any queued event is read (and before a re-dump).

        For a cache of decisions made from this set, kept by another thread that sees
        :meth:`fileno` readable while events wait (the socket switcher's native thread):
        the callback forgets every decision *before* the set can change, so a decision
        still cached was made with every event read so far applied, and while one is
        queued the cache's owner sees the fd readable and asks again.  No window in
        between where a changed set and an old decision meet."""
        self._before_change.append(callback)

    def live(self) -> HostAddresses:
        """This set itself: what a decision cache watches (see :class:`LiveSource`)."""
        return self

    def discard_before_change(self, callback: Callable[[], None]) -> None:
        """Stop calling ``callback`` (its cache is gone)."""
        if callback in self._before_change:
            self._before_change.remove(callback)

    def _changing(self) -> None:
        for callback in self._before_change:
            callback()

    def snapshot(self) -> frozenset[Address]:
        """The current addresses (after applying queued events)."""
        self.refresh()
        return frozenset(self._count)

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> HostAddresses:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- netlink ------------------------------------------------------------------------

    def _resync(self) -> None:
        """Start over from full dumps until one completes with no event lost meanwhile.

        The socket stays (it belongs to the namespace it was made in, whichever thread
        runs this).  The queue is emptied first: the kernel starts a dump only when the
        queue has room, and continues it as we read.  Events queued during a dump are
        read in order with its parts, each reflecting the state when it was made, so the
        set ends current; an overflow during a dump (``ENOBUFS``) loses events, so the
        dump is read to its end and made again."""
        self._changing()
        while True:
            self._drain()
            self._entries.clear()
            self._count.clear()
            self._seq += 1
            seq = self._seq
            self._sock.send(rtaddr.dump_request(socket.AF_UNSPEC, seq))
            if self._read_dump(seq):
                return

    def _drain(self) -> None:
        """Discard what is queued (a dump follows)."""
        while True:
            try:
                self._sock.recv_into(self._buffer)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise

    def _read_dump(self, seq: int) -> bool:
        """Read dump ``seq`` to its end; False if events were lost meanwhile."""
        complete = True
        while True:
            try:
                size = self._sock.recv_into(self._buffer)
            except BlockingIOError:
                ready, _, _ = select.select([self._sock], [], [], _DUMP_TIMEOUT)
                if not ready:
                    raise TimeoutError("netlink: the address dump did not finish") from None
                continue
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                complete = False
                continue
            if self._apply(memoryview(self._buffer)[:size], seq):
                return complete

    def _apply(self, data: memoryview, seq: int | None = None) -> bool:
        """Apply the messages in one datagram; True when it ended dump ``seq``."""
        done = False
        for kind, msg_seq, body in rtaddr.messages(data):
            if kind in (rtaddr.RTM_NEWADDR, rtaddr.RTM_DELADDR):
                self._address_message(kind, body)
            elif seq is not None and msg_seq == seq:
                if kind == rtaddr.NLMSG_DONE:
                    done = True
                elif kind == rtaddr.NLMSG_ERROR:
                    code = rtaddr.error_code(body)
                    if code:
                        raise OSError(code, f"netlink address dump: {os.strerror(code)}")
        return done

    def _address_message(self, kind: int, body: bytes | memoryview) -> None:
        message = rtaddr.parse_ifaddr(body)
        if message is None:
            return
        local = message.local
        if local is None:
            return
        family, prefixlen = message.family, message.prefixlen
        key = (family, message.index, prefixlen, local)
        old = self._entries.pop(key, None)
        if old is not None:
            self._count.subtract(old)
            for gone in old:
                if self._count[gone] <= 0:
                    del self._count[gone]
        if kind == rtaddr.RTM_DELADDR:
            return
        addresses: tuple[Address, ...] = (ipaddress.ip_address(local),)
        broadcast = message.attrs.get(rtaddr.IFA_BROADCAST)
        if broadcast is not None and broadcast != local:
            addresses += (ipaddress.ip_address(broadcast),)
        if family == socket.AF_INET and prefixlen < 31:
            subnet = ipaddress.IPv4Network((local, prefixlen), strict=False)
            addresses += (subnet.broadcast_address,)
        self._entries[key] = addresses
        self._count.update(addresses)
