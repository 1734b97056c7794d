"""The Internet checksum (RFC 1071) and the TCP/UDP/ICMPv6 pseudo-header sum, sans-IO.

Shared by the parser (:mod:`.packets`, which verifies), the builders (:mod:`.packetbuild`,
which fill the field in) and the ICMP echo path (which patches replies incrementally).

* **One big integer per buffer.**  The ones' complement sum of 16-bit words is congruent
  to the buffer read as one big-endian integer modulo 2**16 - 1 (because 2**16 ≡ 1), so
  ``int.from_bytes`` plus one ``%`` does the whole sum in C; measured on this project's
  machine it beats ``array('H')``/``memoryview.cast`` summation several times over.
* **Big payloads are not checksummed in Python at all**: builders can set
  ``VIRTIO_NET_HDR_F_NEEDS_CSUM`` (``offload=True``) so the kernel finishes the checksum.
"""

from __future__ import annotations

_CHUNK = 4096  # above this, sum per-chunk integers: the final modulo stays small


def ones_sum(data: bytes | bytearray | memoryview) -> int:
    """The folded 16-bit ones' complement sum of ``data`` (RFC 1071), not complemented.

    An odd trailing byte is padded with zero, as the RFC says.  The result is in
    0..0xFFFF and is 0 only for all-zero input, exactly as end-around-carry folding
    gives.  Sums of even-length pieces can be added and re-folded with :func:`fold`.
    """
    size = len(data)
    if size <= _CHUNK:
        total = int.from_bytes(data, "big")
        return fold(total << 8 if size & 1 else total)
    # Per-chunk integers (all chunks but the last are even-sized, so each is word
    # aligned on its own) keep the final modulo small: ``%`` on a 64 KiB integer is
    # slower than summing sixteen 4 KiB ones.
    view = memoryview(data)
    last = (size - 1) // _CHUNK * _CHUNK
    total = sum([int.from_bytes(view[i : i + _CHUNK], "big") for i in range(0, last, _CHUNK)])
    tail = int.from_bytes(view[last:], "big")
    total += tail << 8 if size & 1 else tail
    return fold(total)


def fold(total: int) -> int:
    """Reduce a non-negative sum of big-endian 16-bit-aligned integers to 0..0xFFFF.

    ``x % 0xFFFF`` is the ones' complement sum except that a non-zero multiple of 0xFFFF
    folds to 0xFFFF (negative zero), never 0.
    """
    reduced = total % 0xFFFF
    if reduced == 0 and total:
        return 0xFFFF
    return reduced


def checksum(data: bytes | bytearray | memoryview) -> int:
    """The Internet checksum of ``data``: the complement of its ones' complement sum."""
    return ~ones_sum(data) & 0xFFFF


def pseudo_header_sum(src: bytes, dst: bytes, protocol: int, length: int) -> int:
    """Folded sum of the TCP/UDP/ICMPv6 pseudo-header (RFC 768, RFC 8200 section 8.1).

    The IPv4 and IPv6 pseudo-headers have the same ones' complement sum for the same
    values (the zero padding adds nothing), so one function serves both.
    """
    return fold(int.from_bytes(src, "big") + int.from_bytes(dst, "big") + protocol + length)


def l4_checksum(src: bytes, dst: bytes, protocol: int, segment: bytes) -> int:
    """The checksum field value for a TCP/UDP/ICMPv6 ``segment`` whose field is zero.

    UDP's 0 (meaning "no checksum") is *not* mapped to 0xFFFF here; see
    :func:`.packetbuild.build_udp`.
    """
    partial = pseudo_header_sum(src, dst, protocol, len(segment))
    return ~fold(partial + ones_sum(segment)) & 0xFFFF
