"""ARP for a TAP guest, sans-IO: who has the gateway or the DNS address?

Before it sends an IPv4 packet to 10.0.2.2 (its default route) or 10.0.2.3, the guest's
kernel asks who has that address; :func:`answer_arp` builds the reply, naming the host
side's one MAC (:func:`~.ethernet.host_mac`).  As libslirp does, only the gateway and
DNS addresses are answered: any other address of the namespace's network is the guest's
own or nobody's, and answering for it would make a DHCP client's or ``arping -D``'s
duplicate-address probe fail.  Requests from the guest also tell us its MAC (the caller
learns it from every frame's source).

Replies are unicast to the asker, padded to Ethernet's 60-byte minimum.  Anything that
is not an Ethernet/IPv4 request of the right sizes comes back as :class:`Malformed`, a
well-formed request or reply that needs no answer as :class:`Unsupported`, each with a
short reason to count: hostile frames never raise.
"""

from __future__ import annotations

import struct

from nsbridge.usernet.proto.addresses import UsernetAddresses
from nsbridge.usernet.proto.ethernet import ETH_P_ARP, ETH_P_IP, header
from nsbridge.usernet.proto.packets import Malformed, Unsupported

ARP_REQUEST = 1
ARP_REPLY = 2
_HTYPE_ETHERNET = 1
_ARP = struct.Struct("!HHBBH6s4s6s4s")  # 28 bytes
_MIN_FRAME = 60  # Ethernet's minimum without the FCS


def build_arp(op: int, sender_mac: bytes, sender_ip: bytes, target_mac: bytes,
              target_ip: bytes, *, eth_dst: bytes) -> bytes:
    """An ARP frame (Ethernet header included, padded to 60 bytes)."""
    body = _ARP.pack(_HTYPE_ETHERNET, ETH_P_IP, 6, 4, op, sender_mac, sender_ip, target_mac,
                     target_ip)
    frame = header(eth_dst, sender_mac, ETH_P_ARP) + body
    return frame + b"\0" * (_MIN_FRAME - len(frame))


def answer_arp(payload: bytes, addresses: UsernetAddresses,
               our_mac: bytes) -> bytes | Malformed | Unsupported:
    """The reply frame to an ARP ``payload`` (the bytes after the Ethernet header), or
    why there is none."""
    if len(payload) < _ARP.size:
        return Malformed("arp: short")
    htype, ptype, hlen, plen, op, sha, spa, _tha, tpa = _ARP.unpack_from(payload)
    if htype != _HTYPE_ETHERNET or ptype != ETH_P_IP or hlen != 6 or plen != 4:
        return Malformed("arp: not Ethernet/IPv4")
    if op == ARP_REPLY:
        return Unsupported("arp: reply")
    if op != ARP_REQUEST:
        return Malformed("arp: bad operation")
    if sha[0] & 1:
        return Malformed("arp: group sender address")
    if tpa == spa:
        return Unsupported("arp: gratuitous")
    if tpa not in (addresses.gateway.packed, addresses.dns.packed):
        return Unsupported("arp: not our address")
    return build_arp(ARP_REPLY, our_mac, tpa, sha, spa, eth_dst=sha)
