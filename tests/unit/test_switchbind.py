"""Bind switching's pure rules (``usernet/host/switchbind.py``) and the listener dump it
reads (``linux/sockdiag.py``), without a kernel.

* :func:`reaches` mirrors the device path: the guest's interface address or the
  wildcard of its family, on the published port; an IPv6 ``::`` socket without
  ``IPV6_V6ONLY`` takes IPv4 too, a v6-only one never; the namespace's loopback never.
* :func:`overlaps` is the kernel's "address in use" between two TCP binds.
* :func:`bound_of_sockaddr` reads only what the kernel would take for the socket's
  family (a short or foreign sockaddr is no address).
* The sock_diag request and answers: inodes of listeners, NLMSG_DONE, an error's errno,
  truncated messages refused.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct

import pytest

from nsbridge.linux import sockdiag
from nsbridge.usernet.host.switchbind import Bound, bound_of_sockaddr, overlaps, reaches

V4, V6 = socket.AF_INET, socket.AF_INET6
GUEST4, GUEST6 = ipaddress.ip_address("10.0.2.100"), ipaddress.ip_address("fd00::100")


def bound(family: int, ip: str, port: int = 80, v6only: bool = False) -> Bound:
    return Bound(family, ipaddress.ip_address(ip), port, v6only)


@pytest.mark.parametrize(("where", "by_v4", "by_v6"), [
    (bound(V4, "0.0.0.0"), True, False),
    (bound(V4, "10.0.2.100"), True, False),
    (bound(V4, "127.0.0.1"), False, False),
    (bound(V4, "10.0.2.101"), False, False),
    (bound(V6, "::"), True, True),
    (bound(V6, "::", v6only=True), False, True),
    (bound(V6, "fd00::100"), False, True),
    (bound(V6, "::1"), False, False),
    (bound(V6, "::ffff:10.0.2.100"), True, False),
    (bound(V6, "::ffff:0.0.0.0"), True, False),
    (bound(V6, "::ffff:127.0.0.1"), False, False),
    (bound(V4, "0.0.0.0", port=81), False, False),
])
def test_reaches_mirrors_the_device_path(where: Bound, by_v4: bool, by_v6: bool) -> None:
    assert reaches(GUEST4, 80, where) is by_v4
    assert reaches(GUEST6, 80, where) is by_v6


@pytest.mark.parametrize(("a", "b", "expected"), [
    (bound(V4, "0.0.0.0"), bound(V4, "127.0.0.1"), True),
    (bound(V4, "10.0.2.100"), bound(V4, "127.0.0.1"), False),
    (bound(V4, "10.0.2.100"), bound(V4, "10.0.2.100"), True),
    (bound(V4, "0.0.0.0"), bound(V4, "0.0.0.0", port=81), False),
    (bound(V4, "0.0.0.0"), bound(V6, "::"), True),
    (bound(V4, "0.0.0.0"), bound(V6, "::", v6only=True), False),
    (bound(V6, "::", v6only=True), bound(V6, "fd00::100"), True),
    (bound(V4, "10.0.2.100"), bound(V6, "::ffff:10.0.2.100"), True),
    (bound(V6, "fd00::100"), bound(V6, "::1"), False),
])
def test_overlaps_is_symmetric_and_the_kernels(a: Bound, b: Bound, expected: bool) -> None:
    assert overlaps(a, b) is expected and overlaps(b, a) is expected


def test_bound_of_sockaddr_reads_only_what_the_kernel_would_take() -> None:
    sin = struct.pack("=H", V4) + struct.pack("!H", 80) + bytes([10, 0, 2, 100]) + bytes(8)
    assert bound_of_sockaddr(V4, sin, False) == bound(V4, "10.0.2.100")
    sin6 = struct.pack("=H", V6) + struct.pack("!HI", 443, 0) + GUEST6.packed + bytes(4)
    assert bound_of_sockaddr(V6, sin6, True) == bound(V6, "fd00::100", 443, True)
    assert bound_of_sockaddr(V6, sin, False) is None  # AF_INET on an IPv6 socket
    assert bound_of_sockaddr(V4, sin[:15], False) is None  # too short
    assert bound_of_sockaddr(V4, b"", False) is None
    assert bound_of_sockaddr(V4, struct.pack("=H", socket.AF_UNIX) + b"/x\0", False) is None


def _answer(*parts: tuple[int, bytes]) -> bytes:
    out = b""
    for kind, body in parts:
        length = 16 + len(body)
        out += struct.pack("=IHHII", length, kind, 2, 1, 0) + body + bytes(-length % 4)
    return out


def _listener(inode: int, state: int = sockdiag.TCP_LISTEN) -> bytes:
    return struct.pack("=BBBB48xIIIII", V4, state, 0, 0, 0, 0, 0, 1000, inode)


def test_sock_diag_request_and_answers() -> None:
    request = sockdiag.dump_request(V6, seq=9)
    length, kind, flags, seq, _ = struct.unpack_from("=IHHII", request)
    assert (length, kind, seq) == (len(request), sockdiag.SOCK_DIAG_BY_FAMILY, 9)
    assert flags == sockdiag.NLM_F_REQUEST | sockdiag.NLM_F_DUMP
    family, protocol, _ext, _pad, states = struct.unpack_from("=BBBBI", request, 16)
    assert (family, protocol, states) == (V6, socket.IPPROTO_TCP, 1 << sockdiag.TCP_LISTEN)
    data = _answer((sockdiag.SOCK_DIAG_BY_FAMILY, _listener(4242)),
                   (sockdiag.SOCK_DIAG_BY_FAMILY, _listener(7, state=1)))
    assert sockdiag.listener_inodes_in(data) == ({4242}, False)
    done = _answer((sockdiag.SOCK_DIAG_BY_FAMILY, _listener(1)), (sockdiag.NLMSG_DONE, b"\0" * 4))
    assert sockdiag.listener_inodes_in(done) == ({1}, True)
    with pytest.raises(OSError) as caught:
        sockdiag.listener_inodes_in(_answer((sockdiag.NLMSG_ERROR,
                                             struct.pack("=i", -errno.EPERM) + bytes(16))))
    assert caught.value.errno == errno.EPERM
    with pytest.raises(ValueError):
        sockdiag.listener_inodes_in(data[:-8])  # the second message cut short
