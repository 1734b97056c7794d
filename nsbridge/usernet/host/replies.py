"""What the host side says back to the namespace when a packet gets no ordinary answer.

Every path of the tun engine (and the native relay, through the engine's flow
decisions) answers the same few situations the same way, so they are written once here:

* **Denied flows** get ICMP "administratively prohibited" from the gateway at once:
  the namespace's socket fails fast with ``EHOSTUNREACH`` (v4) / ``EACCES`` (v6) instead
  of waiting for a timeout (the policy counts the reason in ``stats.denied``), and ``-v``
  logs the flow and the reason, as the TCP paths do.
* **Host errors** a host socket reports (``ECONNREFUSED`` from a closed port,
  unreachable hosts and networks, a host firewall's ``EACCES``/``EPERM``) go back as the
  ICMP unreachable they stand for, from the flow's destination and quoting the flow's
  latest packet, so the namespace's program sees the same error it would see on a real
  network.

:class:`TunOutput` says where such an answer goes: the engine's own tun (frames with a
virtio-net header) by default, or the native relay's device (no header).  This module
also holds the limits every path shares when it reads answers from host sockets and
writes them to the namespace.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
from collections.abc import Callable
from typing import NamedTuple

from nsbridge.usernet.host.enginestats import EngineStats
from nsbridge.usernet.proto.addresses import UsernetAddresses
from nsbridge.usernet.proto.packetbuild import build_icmp_unreachable
from nsbridge.usernet.proto.packets import (
    MIN_MTU_V6,
    UDP,
    Parsed,
    UnreachableKind,
    may_send_icmp_error,
)

log = logging.getLogger("nsbridge")

BATCH = 256  # frames (or datagrams) per readiness event, for fairness
RECV_SIZE = 1 << 16  # above the largest UDP payload
OFFLOAD_MIN = 512  # payloads above this get their UDP checksum from the kernel
QUOTE = MIN_MTU_V6  # an ICMP error never quotes more than this; keep no more per flow

# Socket errors that report an ICMP error about an earlier datagram, and the unreachable
# kind that tells the namespace the same thing.
ERRNO_KINDS: dict[int, UnreachableKind] = {
    errno.ECONNREFUSED: "port",
    errno.EHOSTUNREACH: "host",
    errno.EHOSTDOWN: "host",
    errno.ENONET: "host",
    errno.ENETUNREACH: "net",
    errno.EACCES: "admin",
    errno.EPERM: "admin",
}


class TunOutput(NamedTuple):
    """Where an answer the engine builds goes: a frame writer and whether that device's
    frames start with a virtio-net header (the main tun's do; the native relay's not)."""

    write: Callable[[bytes], None]
    vnet: bool


class Replies:
    """ICMP answers to the namespace, through ``tun`` unless a call names another output.

    Counts every unreachable it sends in ``stats.unreachable_sent`` by kind.
    """

    def __init__(self, tun: TunOutput, stats: EngineStats, addresses: UsernetAddresses) -> None:
        self.tun = tun
        self.stats = stats
        self._gateway_of = {4: addresses.gateway.packed, 6: addresses.gateway6.packed}

    def unreachable(self, quote: bytes, kind: UnreachableKind, src: bytes | None,
                    out: TunOutput | None = None) -> None:
        """Tell the namespace ``kind`` unreachable about the packet starting with ``quote``
        (through ``out``: the native relay's device has no virtio header)."""
        write, vnet = out or self.tun
        write(build_icmp_unreachable(quote, kind, src=src, vnet=vnet))
        self.stats.unreachable_sent[kind] += 1

    def deny(self, parsed: Parsed, reason: str = "", out: TunOutput | None = None) -> None:
        """Answer a denied flow with "administratively prohibited" from the gateway (and
        say so at -v, as the TCP paths do, so a user sees why a flow goes nowhere)."""
        if reason and log.isEnabledFor(logging.INFO):
            l4 = parsed.l4
            port = f":{l4.dport}" if isinstance(l4, UDP) else ""
            what = "udp" if isinstance(l4, UDP) else "icmp"
            log.info("usernet %s: %s -> %s%s denied: %s", what, ip_text(parsed.ip.src),
                     ip_text(parsed.ip.dst), port, reason)
        if may_send_icmp_error(parsed):
            self.unreachable(parsed.packet[:QUOTE], "admin", self._gateway_of[parsed.ip.version],
                             out)

    def answer_host_error(self, err: int, quote: bytes, src: bytes,
                          out: TunOutput | None = None) -> bool:
        """Tell the namespace about host error ``err`` for the packet starting with
        ``quote``, as the ICMP unreachable (from ``src``) it stands for; False if it
        stands for none (the engine's flows and the native relay's come through here)."""
        kind = ERRNO_KINDS.get(err)
        if kind is None or not quote:
            return False
        self.unreachable(quote, kind, src, out)
        return True


def ip_text(packed_ip: bytes) -> str:
    """A packed address as text, for log lines."""
    return str(ipaddress.ip_address(packed_ip))
