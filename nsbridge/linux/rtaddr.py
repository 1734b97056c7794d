"""rtnetlink address messages, sans-IO: the ``RTM_GETADDR`` dump request, the walk over
the netlink messages of one datagram, and ``ifaddrmsg`` with its attributes.

Two readers need the kernel's address list without pyroute2: the host-address set
(:mod:`nsbridge.usernet.host.hostaddrs`, on every new flow, where a parse must cost a
few ``struct`` calls) and the outbound-address resolver
(:mod:`nsbridge.usernet.host.outbound`, on the helper's start path, where pyroute2's
import would be most of the time to ready).  Both do their own I/O; this module only
turns bytes into values and back.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

# <linux/netlink.h>, <linux/rtnetlink.h>, <linux/if_addr.h>
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR = 0x10, 0x100
IFA_ADDRESS, IFA_LOCAL, IFA_BROADCAST, IFA_FLAGS = 1, 2, 4, 8
IFA_F_DADFAILED, IFA_F_TENTATIVE = 0x08, 0x40

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_RTATTR = struct.Struct("=HH")  # len, type
_ERROR = struct.Struct("=i")


def dump_request(family: int, seq: int) -> bytes:
    """An ``RTM_GETADDR`` dump request for ``family`` (``AF_UNSPEC``: both)."""
    header = _NLMSGHDR.pack(_NLMSGHDR.size + _IFADDRMSG.size, RTM_GETADDR,
                            NLM_F_REQUEST | NLM_F_DUMP, seq, 0)
    return header + _IFADDRMSG.pack(family, 0, 0, 0, 0)


def messages(data: bytes | memoryview) -> Iterator[tuple[int, int, bytes | memoryview]]:
    """(type, sequence number, body) of each whole message in one datagram; a truncated
    or malformed header ends the walk."""
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _flags, seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            return
        yield kind, seq, data[offset + _NLMSGHDR.size:offset + length]
        offset += (length + 3) & ~3


def error_code(body: bytes | memoryview) -> int:
    """The positive errno of an ``NLMSG_ERROR`` body (0: an acknowledgement)."""
    return -_ERROR.unpack_from(body)[0] if len(body) >= _ERROR.size else 0


@dataclass(frozen=True)
class IfAddr:
    """One ``ifaddrmsg``: its header fields and the attributes whose size fits the family
    (an address attribute of the wrong size is dropped, never misread)."""

    family: int
    prefixlen: int
    flags: int
    index: int
    attrs: dict[int, bytes]

    @property
    def local(self) -> bytes | None:
        """The interface's own address: ``IFA_LOCAL`` (a point-to-point IPv4 link's
        ``IFA_ADDRESS`` is the peer), else ``IFA_ADDRESS``."""
        return self.attrs.get(IFA_LOCAL) or self.attrs.get(IFA_ADDRESS)


_ADDRESS_ATTRS = (IFA_ADDRESS, IFA_LOCAL, IFA_BROADCAST)


def parse_ifaddr(body: bytes | memoryview) -> IfAddr | None:
    """The ``ifaddrmsg`` in ``body`` (an ``RTM_NEWADDR``/``RTM_DELADDR`` body); None when
    it is too short or not IPv4/IPv6.  ``IFA_FLAGS``, when present, replaces the 8-bit
    flags of the header (it carries the same bits and more)."""
    if len(body) < _IFADDRMSG.size:
        return None
    family, prefixlen, flags, _scope, index = _IFADDRMSG.unpack_from(body)
    if family not in (socket.AF_INET, socket.AF_INET6):
        return None
    size = 4 if family == socket.AF_INET else 16
    attrs: dict[int, bytes] = {}
    offset = _IFADDRMSG.size
    while offset + _RTATTR.size <= len(body):
        length, kind = _RTATTR.unpack_from(body, offset)
        if length < _RTATTR.size:
            break
        value = bytes(body[offset + _RTATTR.size:offset + length])
        if kind in _ADDRESS_ATTRS:
            if len(value) == size:
                attrs[kind] = value
        elif kind == IFA_FLAGS and len(value) == 4:
            flags = struct.unpack("=I", value)[0]
        offset += (length + 3) & ~3
    return IfAddr(family, prefixlen, flags, index, attrs)
