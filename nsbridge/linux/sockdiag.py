"""Which TCP listeners exist in this network namespace, by socket inode (``sock_diag``).

Socket switching hands a published port's host listener to the program
(``usernet/host/switchbind.py``) and keeps no reference to it: a reference would keep the
port listening after the program closed its socket, with clients queued for nobody.  So
the host side learns that the program's listener is gone by asking the kernel which
listening sockets exist (``NETLINK_SOCK_DIAG``, ``SOCK_DIAG_BY_FAMILY`` dump of
``TCP_LISTEN`` sockets: the listening hash only, a few entries) and looking for the
inode it handed over.  No privilege is needed for this dump.

:func:`dump_request` and :func:`listener_inodes_in` are sans-IO (tested without a
kernel); :func:`listening_inodes` does the I/O.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
TCP_LISTEN = 10

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
# struct inet_diag_req_v2: family, protocol, ext, pad, states, then struct inet_diag_sockid
# (sport, dport, src[16], dst[16], if, cookie[2]).
_REQUEST = struct.Struct("=BBBBI48x")
# struct inet_diag_msg: family, state, timer, retrans, sockid (48), expires, rqueue,
# wqueue, uid, inode.
_MESSAGE = struct.Struct("=BBBB48xIIIII")
_ERROR = struct.Struct("=i")


def dump_request(family: int, seq: int = 1) -> bytes:
    """The netlink message asking for every TCP listener of ``family``."""
    body = _REQUEST.pack(family, socket.IPPROTO_TCP, 0, 0, 1 << TCP_LISTEN)
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY,
                          NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body


def _messages(data: bytes) -> Iterator[tuple[int, bytes]]:
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            raise ValueError("a truncated netlink message")
        yield kind, data[offset + _NLMSGHDR.size: offset + length]
        offset += (length + 3) & ~3


def listener_inodes_in(data: bytes) -> tuple[set[int], bool]:
    """(the listeners' inodes in one datagram of the dump, whether it ended).  A
    netlink error raises OSError with its errno; a malformed datagram ValueError."""
    inodes: set[int] = set()
    for kind, body in _messages(data):
        if kind == NLMSG_DONE:
            return inodes, True
        if kind == NLMSG_ERROR:
            code = -_ERROR.unpack_from(body)[0] if len(body) >= _ERROR.size else errno.EIO
            raise OSError(code, f"sock_diag: {os.strerror(code)}")
        if kind == SOCK_DIAG_BY_FAMILY and len(body) >= _MESSAGE.size:
            _family, state, *_rest, inode = _MESSAGE.unpack_from(body)
            if state == TCP_LISTEN:
                inodes.add(inode)
    return inodes, False


def listening_inodes(family: int) -> set[int]:
    """The inodes of every TCP listener of ``family`` in the caller's network namespace."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC,
                       NETLINK_SOCK_DIAG) as sock:
        sock.settimeout(5)
        sock.send(dump_request(family))
        found: set[int] = set()
        while True:
            inodes, done = listener_inodes_in(sock.recv(65536))
            found |= inodes
            if done:
                return found
