"""What a forward is, as plain validated data (no sockets opened beyond inherited fds).

Listen side, one of:
  ``ListenAddress``  bind a TCP/UDP address or a Unix socket, in a namespace (-l, tcp:, udp:,
                     unix:, unix-abstract:)
  ``ListenSocket``   an inherited listening (or bound UDP) socket (-L, fd:N, systemd:NAME)
  ``Preaccepted``    one inherited connected client (-S)
Connect side, one of:
  ``ConnectAddress`` dial a TCP/UDP address or a Unix socket from a namespace (-c, ...)
  ``Preconnected``   one inherited connected target (-C)

With -S or -C the forward carries exactly one connection ("one-shot").
"""

from __future__ import annotations

import socket

from nsbridge.defaults import CONNECT_TIMEOUT, MAX_UDP_FLOWS, UDP_IDLE_TIMEOUT
from nsbridge.linux.netns import Netns
from nsbridge.net.addresses import HostPort, UnixAddress

STREAM = "stream"
UDP = "udp"


class _Record:
    """Equality and repr from ``_fields``, as ``@dataclass`` would generate them.

    Hand-written: worker processes import this module, and ``dataclasses`` (with
    ``inspect``, ``ast``, ``dis``...) would cost each of them memory.
    """

    _fields: tuple[str, ...] = ()
    __hash__ = None  # type: ignore[assignment]  # mutable, like a dataclass with eq=True

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in self._fields)

    def __repr__(self) -> str:
        inner = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields)
        return f"{self.__class__.__qualname__}({inner})"


class ListenAddress(_Record):
    _fields = __match_args__ = ("address", "netns", "protocol", "mode", "owner")

    def __init__(self, address: HostPort | UnixAddress, netns: Netns | None = None,
                 protocol: str = STREAM, mode: int | None = None,
                 owner: tuple[int, int] | None = None) -> None:
        self.address = address
        self.netns = netns
        self.protocol = protocol
        self.mode = mode  # unix socket file permissions
        self.owner = owner  # unix socket file (uid, gid), -1 = unchanged


class ListenSocket(_Record):
    _fields = __match_args__ = ("sock", "label")

    def __init__(self, sock: socket.socket, label: str = "") -> None:
        self.sock = sock
        self.label = label

    @property
    def protocol(self) -> str:
        return UDP if self.sock.type == socket.SOCK_DGRAM else STREAM


class Preaccepted(_Record):
    _fields = __match_args__ = ("sock", "protocol")

    def __init__(self, sock: socket.socket, protocol: str = STREAM) -> None:
        self.sock = sock
        self.protocol = protocol


class ConnectAddress(_Record):
    _fields = __match_args__ = ("address", "netns", "protocol")

    def __init__(self, address: HostPort | UnixAddress, netns: Netns | None = None,
                 protocol: str = STREAM) -> None:
        self.address = address
        self.netns = netns
        self.protocol = protocol


class Preconnected(_Record):
    _fields = __match_args__ = ("sock", "protocol")

    def __init__(self, sock: socket.socket, protocol: str = STREAM) -> None:
        self.sock = sock
        self.protocol = protocol


ListenSide = ListenAddress | ListenSocket | Preaccepted
ConnectSide = ConnectAddress | Preconnected

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (worker memory)
if TYPE_CHECKING:
    from typing import Any


class ForwardSpec(_Record):
    _fields = __match_args__ = ("listen", "connect", "connect_timeout", "name", "allow",
                                "deny", "proxy", "idle_timeout", "max_flows", "source")

    def __init__(self, listen: ListenSide, connect: ConnectSide,
                 connect_timeout: float | None = CONNECT_TIMEOUT, name: str = "",
                 allow: list[str] | None = None, deny: list[str] | None = None,
                 proxy: str | None = None, idle_timeout: float = UDP_IDLE_TIMEOUT,
                 max_flows: int = MAX_UDP_FLOWS,
                 source: dict[str, Any] | None = None) -> None:
        self.listen = listen
        self.connect = connect
        self.connect_timeout = connect_timeout
        self.name = name
        self.allow = [] if allow is None else allow  # client networks (CIDR)
        self.deny = [] if deny is None else deny
        self.proxy = proxy  # "v1" / "v2": PROXY protocol header to the target
        self.idle_timeout = idle_timeout  # UDP flows
        self.max_flows = max_flows  # UDP flows
        # how it was described (listing)
        self.source: dict[str, Any] = {} if source is None else source

    @property
    def one_shot(self) -> bool:
        """-S or -C: exactly one connection is carried, then the forward is finished."""
        return isinstance(self.listen, Preaccepted) or isinstance(self.connect, Preconnected)

    @property
    def protocol(self) -> str:
        return self.listen.protocol
