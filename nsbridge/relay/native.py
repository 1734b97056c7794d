"""The native TCP relay's Python side: which relay serves, and the C core on a loop.

``_tcprelay.c`` relays an established client/target pair with no Python per event (see
its header for the semantics, which are relay/tcp.py's).  This module decides whether it
serves (:func:`chosen_relay`: ``NSBRIDGE_RELAY=python`` or a missing build picks the
Python relay, and :func:`unavailable` says why), and :class:`NativeRelay` puts one core
on an :class:`~nsbridge.relay.loop.EventLoop`: the core does the loop's waiting, serves
connection events itself and hands the loop back its own events, its timers, and the
records of connections that ended, which go to the owner of their slot (a forward) for
its statistics and its ``-v`` line.

Listeners (:meth:`NativeRelay.listen`): a forward whose clients need no Python (see
``Forward.accepts_natively``) gives the core its listener; the core accepts and connects
itself, from a pool of target sockets this module keeps filled through the forward's
socket factory, and hands back what it cannot finish (a slow or failed connect, an
empty pool, an accept error) to the listener's owner, which runs its Python path for it.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable

from nsbridge.errors import UserError, errno_name
from nsbridge.relay.loop import EventLoop
from nsbridge.relay.tcp import SMALL_READ

try:
    from nsbridge.relay import _tcprelay
except ImportError:  # built without a C compiler: the Python relay serves
    _tcprelay = None  # type: ignore[assignment]

__all__ = ["CORE_ACCEPTED", "NATIVE_ACCEPT_ENV", "RELAYS", "RELAY_ENV", "SOCKOPTS_ENV",
           "ListenerOwner", "NativeRelay", "chosen_relay", "native_accept_enabled",
           "parse_sockopts", "unavailable"]

RELAY_ENV = "NSBRIDGE_RELAY"
RELAYS = ("native", "python")

# Record codes (_tcprelay.c, enum outcome).
_CLOSED, _CLIENT_RESET, _SERVER_RESET, _ABORTED, _NO_PREAMBLE = range(5)

# What a slot's owner gets for each connection that ended: (token, bytes up, bytes down,
# duration in seconds, outcome in relay/tcp.py's words, the client's address when the
# core accepted it and was asked to keep it -- else None).
OnRecord = Callable[[int, int, int, float, str, "tuple | None"], None]

# The token of a pair the core accepted itself (Python gave it none).
CORE_ACCEPTED = -1

# Whether forwards may accept in the core (NSBRIDGE_NATIVE_ACCEPT=0: never, for A/B
# measurements and for tests comparing the two paths).
NATIVE_ACCEPT_ENV = "NSBRIDGE_NATIVE_ACCEPT"

# A listener's pool of target sockets, topped up to POOL_CAP whenever the core's wait
# returns with one taken (low-water mark = cap).  Topping up at once keeps an idle
# forward's fd count constant -- a pool that floated between a low mark and its cap
# would look like a leak to anyone counting fds -- and costs no extra round trip on
# short connections, whose records bring wait() back anyway.  Small: an idle forward
# holds POOL_CAP sockets per worker; a burst beyond it is handed back and served by
# Python's path, never dropped.
POOL_CAP = 16
POOL_LOW = POOL_CAP

# Socket options the core sets on every relayed socket as its pair starts, e.g.
# NSBRIDGE_RELAY_SOCKOPTS="server:sndbuf=16M,notsent_lowat=128K": the tuning knobs issue 19
# asked to try (docs/performance.md has what each measured).  Read once per process.
SOCKOPTS_ENV = "NSBRIDGE_RELAY_SOCKOPTS"
_SOL_SOCKET, _IPPROTO_TCP = socket.SOL_SOCKET, socket.IPPROTO_TCP
# name -> (level, option); the *FORCE buffer options pass net.core.[rw]mem_max, which is
# why they need CAP_NET_ADMIN (refusals are counted in Core.info()'s sockopt_failed).
_SOCKOPT_NAMES = {
    "sndbuf": (_SOL_SOCKET, 32),         # SO_SNDBUFFORCE
    "rcvbuf": (_SOL_SOCKET, 33),         # SO_RCVBUFFORCE
    "notsent_lowat": (_IPPROTO_TCP, 25),  # TCP_NOTSENT_LOWAT
    "busy_poll": (_SOL_SOCKET, 46),      # SO_BUSY_POLL, in microseconds
}
_SIDES = {"client": 1, "server": 2, "both": 3}
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20}


class ListenerOwner:
    """What the core's listener needs from its owner (a Forward): sockets for its pool,
    and a home for what the core hands back."""

    def pool_sockets(self, count: int) -> list[int]:
        """Up to ``count`` new unconnected target socket fds (ownership passes)."""
        raise NotImplementedError

    def handed_back(self, client_fd: int, server_fd: int, code: int) -> None:
        """See ``Core.take_handbacks``; the owner owns the fds from the call on."""
        raise NotImplementedError


def unavailable() -> str | None:
    """Why the native relay cannot serve here (None if it can): it was not built."""
    if _tcprelay is None:
        return ("nsbridge was installed without its native TCP relay (reinstall with a C "
                "compiler and the Python headers present); the Python relay serves, slower")
    return None


def chosen_relay(name: str | None = None) -> str:
    """The relay that serves: ``name`` (or $NSBRIDGE_RELAY) if given, else the fastest
    built one.  "native" asked for but not built falls back to "python" (``-v`` and
    ``nsbridge doctor`` say why).  An unknown name is a UserError."""
    where = "relay" if name else f"${RELAY_ENV}"
    name = name or os.environ.get(RELAY_ENV) or "native"
    if name not in RELAYS:
        raise UserError(f"{where}: unknown relay {name!r} (choose from {', '.join(RELAYS)})")
    if name == "native" and _tcprelay is None:
        return "python"
    return name


def native_accept_enabled() -> bool:
    """Whether forwards may accept in the core ($NSBRIDGE_NATIVE_ACCEPT not "0")."""
    return os.environ.get(NATIVE_ACCEPT_ENV, "1") != "0"


def parse_sockopts(text: str) -> list[tuple[int, int, int, int]]:
    """``[side:]name=value`` items, comma-separated, as Core's sockopts tuples (sides,
    level, option, value).  side: client, server or both (the default); name: sndbuf,
    rcvbuf, notsent_lowat, busy_poll; value: an integer, K or M suffix allowed.  Anything
    else is a UserError naming the item."""
    result = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        side, _, rest = item.rpartition(":")
        name, eq, value = rest.partition("=")
        value = value.strip().upper()
        unit = value[-1:] if value[-1:] in ("K", "M") else ""
        number = value[: len(value) - len(unit)]
        if (side or "both") not in _SIDES or name not in _SOCKOPT_NAMES or not eq \
                or not number.isdigit() or int(number) * _UNITS[unit] >= 1 << 31:
            raise UserError(
                f"${SOCKOPTS_ENV}: bad item {item!r} (want [client:|server:|both:]NAME=VALUE, "
                f"NAME one of {', '.join(_SOCKOPT_NAMES)}, VALUE an integer with an "
                "optional K or M under 2G)")
        level, option = _SOCKOPT_NAMES[name]
        result.append((_SIDES[side or "both"], level, option, int(number) * _UNITS[unit]))
    if len(result) > 8:
        raise UserError(f"${SOCKOPTS_ENV}: at most 8 items")
    return result


def sockaddr_from_raw(raw: bytes) -> tuple:
    """A raw struct sockaddr_in/_in6 (a record's peer) as Python's sockaddr tuple."""
    (family,) = struct.unpack_from("=H", raw)
    if family == socket.AF_INET6:
        port, flowinfo = struct.unpack_from("!HI", raw, 2)
        (scope_id,) = struct.unpack_from("=I", raw, 24)
        return (socket.inet_ntop(socket.AF_INET6, raw[8:24]), port, flowinfo, scope_id)
    (port,) = struct.unpack_from("!H", raw, 2)
    return (socket.inet_ntop(socket.AF_INET, raw[4:8]), port)


def outcome_words(code: int, err: int) -> str:
    """A record's outcome as the Python relay words it (tally() counts by these)."""
    if code == _CLOSED:
        return "closed"
    if code == _CLIENT_RESET:
        return f"client reset ({errno_name(err)})"
    if code == _SERVER_RESET:
        return f"server reset ({errno_name(err)})"
    if code == _NO_PREAMBLE:
        return "server did not take the PROXY header"
    return "reset by nsbridge"


class NativeRelay:
    """One C core doing the waiting of one event loop (set up before the loop runs)."""

    def __init__(self, loop: EventLoop, mover: str = "splice",
                 pipe_size: int | None = None) -> None:
        assert _tcprelay is not None
        self.core = _tcprelay.Core(loop.fileno(), copy=mover == "copy", small_read=SMALL_READ,
                                   pipe_size=pipe_size or (1 << 20),
                                   sockopts=parse_sockopts(os.environ.get(SOCKOPTS_ENV, "")))
        self._owners: dict[int, OnRecord] = {}
        self._listeners: dict[int, ListenerOwner] = {}
        self._abort_outcome = "reset by nsbridge"
        self._loop = loop
        loop.set_waiter(self.wait)

    def new_slot(self, on_record: OnRecord) -> int:
        """Counters for one forward; ``on_record`` gets its ended connections."""
        slot: int = self.core.new_slot()
        self._owners[slot] = on_record
        return slot

    def add(self, client_fd: int, server_fd: int, slot: int, token: int, preamble: bytes,
            exclusive: bool, nodelay: int) -> None:
        """Relay an established pair; the core owns both fds from now on."""
        self.core.add(client_fd, server_fd, slot, token, preamble, exclusive, nodelay)

    def wait(self, timeout: float) -> bool:
        """The loop's wait (EventLoop.set_waiter): True when the loop's own fds are ready."""
        flags: int = self.core.wait(-1 if timeout < 0 else int(timeout * 1000 + 0.999))
        if flags & 2:
            self._dispatch()
        if flags & 4:
            self._serve_listeners()
        return bool(flags & 1)

    # ---- listeners -----------------------------------------------------------------

    def listen(self, listener_fd: int, slot: int, family: int, sockaddr: tuple,
               owner: ListenerOwner, peer: bool = False) -> int:
        """Accept from ``listener_fd`` in the core and connect each client to ``sockaddr``
        (a numeric IPv4/IPv6 address) with a pooled socket; returns the listener's id.
        ``peer``: records carry the client's address (for ``-v`` lines).  The listener
        stays the caller's: :meth:`unlisten` before closing it."""
        host, port = sockaddr[0], sockaddr[1]
        scope_id = sockaddr[3] if len(sockaddr) > 3 else 0
        host = host.split("%", 1)[0]  # a link-local scope is in scope_id
        lid: int = self.core.listen(listener_fd, slot, family, host, port, scope_id,
                                    POOL_LOW, POOL_CAP, peer)
        self._listeners[lid] = owner
        self._serve_listeners()  # fill the pool before the first client
        return lid

    def unlisten(self, lid: int) -> None:
        """Stop accepting from ``lid``; what it handed back so far is served first."""
        self._serve_listeners()
        self.core.unlisten(lid)
        del self._listeners[lid]

    def _serve_listeners(self) -> None:
        listeners = self._listeners
        for lid, client_fd, server_fd, code in self.core.take_handbacks():
            listeners[lid].handed_back(client_fd, server_fd, code)
        for lid, count in self.core.pool_wants():
            owner = listeners.get(lid)
            if owner is None:
                continue
            for fd in owner.pool_sockets(count):
                self.core.pool_put(lid, fd)

    def listener_info(self, lid: int) -> dict[str, int]:
        info: dict[str, int] = self.core.listener_info(lid)
        return info


    def _dispatch(self) -> None:
        owners = self._owners
        for slot, token, up, down, duration, code, err, peer in self.core.take_records():
            words = self._abort_outcome if code == _ABORTED else outcome_words(code, err)
            owners[slot](token, up, down, duration, words,
                         None if peer is None else sockaddr_from_raw(peer))

    def live(self, slot: int) -> tuple[int, int, int, int]:
        """(open connections, bytes up, bytes down they moved so far, how many of the open
        ones the core accepted itself) of ``slot``."""
        active, up, down, core_accepted = self.core.slot(slot)
        return active, up, down, core_accepted

    def abort(self, slot: int, outcome: str) -> None:
        """Reset every open connection of ``slot`` now; their records say ``outcome``."""
        self._dispatch()  # earlier records keep their own words
        self._abort_outcome = outcome
        try:
            self.core.abort_slot(slot)
            self._dispatch()
        finally:
            self._abort_outcome = "reset by nsbridge"

    def info(self) -> dict[str, int]:
        info: dict[str, int] = self.core.info()
        return info

    def close(self, outcome: str = "reset: nsbridge closing") -> None:
        """Reset what is still open (records dispatched) and release the core."""
        self._loop.set_waiter(None)
        self._dispatch()
        self._abort_outcome = outcome
        self.core.close()
        self._dispatch()
