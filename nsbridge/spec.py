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
from dataclasses import dataclass, field
from typing import Any

from .addresses import HostPort, UnixAddress
from .netns import Netns

STREAM = "stream"
UDP = "udp"


@dataclass
class ListenAddress:
    address: HostPort | UnixAddress
    netns: Netns | None = None
    protocol: str = STREAM
    mode: int | None = None  # unix socket file permissions
    owner: tuple[int, int] | None = None  # unix socket file (uid, gid), -1 = unchanged


@dataclass
class ListenSocket:
    sock: socket.socket
    label: str = ""

    @property
    def protocol(self) -> str:
        return UDP if self.sock.type == socket.SOCK_DGRAM else STREAM


@dataclass
class Preaccepted:
    sock: socket.socket
    protocol: str = STREAM


@dataclass
class ConnectAddress:
    address: HostPort | UnixAddress
    netns: Netns | None = None
    protocol: str = STREAM


@dataclass
class Preconnected:
    sock: socket.socket
    protocol: str = STREAM


ListenSide = ListenAddress | ListenSocket | Preaccepted
ConnectSide = ConnectAddress | Preconnected


@dataclass
class ForwardSpec:
    listen: ListenSide
    connect: ConnectSide
    connect_timeout: float | None = 30.0
    name: str = ""
    allow: list[str] = field(default_factory=list)  # client networks (CIDR)
    deny: list[str] = field(default_factory=list)
    proxy: str | None = None  # "v1" / "v2": PROXY protocol header to the target
    idle_timeout: float = 60.0  # UDP flows
    max_flows: int = 4096  # UDP flows
    source: dict[str, Any] = field(default_factory=dict)  # how it was described (listing)

    @property
    def one_shot(self) -> bool:
        """-S or -C: exactly one connection is carried, then the forward is finished."""
        return isinstance(self.listen, Preaccepted) or isinstance(self.connect, Preconnected)

    @property
    def protocol(self) -> str:
        return self.listen.protocol

    @property
    def netns_handles(self) -> list[Netns]:
        return [side.netns for side in (self.listen, self.connect)
                if isinstance(side, (ListenAddress, ConnectAddress)) and side.netns is not None]
