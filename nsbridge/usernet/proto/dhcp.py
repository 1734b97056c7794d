"""A DHCPv4 server for a TAP guest that asks, sans-IO (RFC 2131, RFC 2132).

rootlesskit configures ``tap0`` itself and podman's ``-c`` lets slirp4netns do it, but a
guest may also run a DHCP client, and slirp4netns answers one; so does
:class:`DhcpServer`, with libslirp's plan: addresses from the network's ``.15``
upward (sixteen of them), one per client MAC, a day's lease; options subnet mask,
router (the gateway), DNS server, lease time, server identifier (the gateway) and the
interface MTU.

The messages it handles: DISCOVER → OFFER, REQUEST → ACK (or NAK for an address that is
not the client's to have), RELEASE frees the client's address.  Anything else
(DECLINE, INFORM, a REQUEST meant for another server, not a BOOTREQUEST, a broken
option list) is a counted :class:`Unsupported` or :class:`Malformed` and never raises.
Leases are kept by MAC, so a client gets the same address back; a lease whose time ran
out is given to a new client only when no address is free.  Time comes in as ``now``
(monotonic seconds): no clock is read here.

Replies are broadcast (IP ``255.255.255.255``) from the gateway's port 67 to port 68, in
an Ethernet frame addressed to the client's MAC, as libslirp sends them: a client has no
address yet, and DHCP clients read from a packet socket that sees them either way.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from nsbridge.usernet.proto.addresses import UsernetAddresses
from nsbridge.usernet.proto.checksum import checksum
from nsbridge.usernet.proto.ethernet import ETH_P_IP, header
from nsbridge.usernet.proto.packetbuild import build_udp
from nsbridge.usernet.proto.packets import PROTO_UDP, Malformed, Unsupported

SERVER_PORT = 67
CLIENT_PORT = 68
FIRST_HOST = 15  # libslirp's first DHCP address (network + 15)
POOL_SIZE = 16
LEASE_TIME = 86400

DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK, RELEASE, INFORM = range(1, 9)

_OPT_PAD, _OPT_END = 0, 255
_OPT_MASK, _OPT_ROUTER, _OPT_DNS, _OPT_MTU = 1, 3, 6, 26
_OPT_REQUESTED_IP, _OPT_LEASE, _OPT_TYPE, _OPT_SERVER_ID = 50, 51, 53, 54
_MAGIC = b"\x63\x82\x53\x63"
_BOOTP = struct.Struct("!BBBBIHH4s4s4s4s16s64s128s")  # 236 bytes, then the magic cookie
_BOOTREQUEST, _BOOTREPLY = 1, 2
_MIN_BOOTP = 300  # RFC 1542: pad replies for old relay agents and clients
BROADCAST_IP = b"\xff\xff\xff\xff"


def is_dhcp_request(packet: bytes | bytearray | memoryview, length: int,
                    gateway: bytes) -> bool:
    """Whether an IPv4 packet of ``length`` bytes is UDP to port 67 on the broadcast
    address or the gateway: the only DHCP messages meant for this server (every other
    port-67 datagram is an ordinary flow for the policy to decide)."""
    if length < 28 or packet[9] != PROTO_UDP:
        return False
    ihl = (packet[0] & 0x0F) * 4
    if length < ihl + 8 or packet[ihl + 2 : ihl + 4] != b"\x00\x43":
        return False
    return packet[16:20] in (BROADCAST_IP, gateway)


@dataclass
class Lease:
    address: bytes  # packed IPv4
    expires: float  # monotonic seconds; 0 while only offered


def _options(data: bytes) -> dict[int, bytes] | Malformed:
    found: dict[int, bytes] = {}
    at = 0
    while at < len(data):
        kind = data[at]
        if kind == _OPT_END:
            return found
        if kind == _OPT_PAD:
            at += 1
            continue
        if at + 2 > len(data) or at + 2 + data[at + 1] > len(data):
            return Malformed("dhcp: truncated option")
        found.setdefault(kind, data[at + 2 : at + 2 + data[at + 1]])
        at += 2 + data[at + 1]
    return Malformed("dhcp: no end option")


class DhcpServer:
    """The namespace network's DHCP server; one per TAP."""

    def __init__(self, addresses: UsernetAddresses, our_mac: bytes, *,
                 lease_time: int = LEASE_TIME, pool_size: int = POOL_SIZE) -> None:
        self.addresses = addresses
        self.our_mac = our_mac
        self.lease_time = lease_time
        network = addresses.network
        reserved = {addresses.gateway, addresses.dns, network.network_address,
                    network.broadcast_address}
        self.pool = [network[FIRST_HOST + i].packed
                     for i in range(min(pool_size, max(0, network.num_addresses - FIRST_HOST - 1)))
                     if network[FIRST_HOST + i] not in reserved]
        self.leases: dict[bytes, Lease] = {}  # by client MAC

    # ---- leases ---------------------------------------------------------------------

    def _address_for(self, mac: bytes, now: float) -> bytes | None:
        """The client's address: its lease, a free one, or the longest-expired one."""
        lease = self.leases.get(mac)
        if lease is not None:
            return lease.address
        taken = {lease.address for lease in self.leases.values()}
        for address in self.pool:
            if address not in taken:
                self.leases[mac] = Lease(address, 0.0)
                return address
        expired = [(lease.expires, owner) for owner, lease in self.leases.items()
                   if lease.expires <= now]  # offered only, or run out
        if not expired:
            return None
        _, owner = min(expired)
        address = self.leases.pop(owner).address
        self.leases[mac] = Lease(address, 0.0)
        return address

    # ---- messages -------------------------------------------------------------------

    def handle(self, eth_src: bytes, packet: bytes,
               now: float) -> bytes | Malformed | Unsupported:
        """The reply frame to an IPv4 ``packet`` for which :func:`is_dhcp_request` held,
        from ``eth_src``, or why there is none."""
        if len(packet) < 20 or packet[0] >> 4 != 4:
            return Malformed("dhcp: short")
        ihl = (packet[0] & 0x0F) * 4
        total = int.from_bytes(packet[2:4], "big")
        if ihl < 20 or total > len(packet) or total < ihl + 8 or checksum(packet[:ihl]):
            return Malformed("dhcp: bad IPv4 header")
        if int.from_bytes(packet[6:8], "big") & 0x3FFF:
            return Malformed("dhcp: fragment")
        udp_length = int.from_bytes(packet[ihl + 4 : ihl + 6], "big")
        if udp_length < 8 or ihl + udp_length > total:
            return Malformed("dhcp: bad UDP length")
        bootp = packet[ihl + 8 : ihl + udp_length]
        if len(bootp) < _BOOTP.size + 4 or bootp[_BOOTP.size : _BOOTP.size + 4] != _MAGIC:
            return Malformed("dhcp: not a DHCP message")
        op, htype, hlen, _hops, xid, _secs, flags, ciaddr, _yi, _si, _gi, chaddr, _sn, _f = \
            _BOOTP.unpack_from(bootp)
        if op != _BOOTREQUEST or htype != 1 or hlen != 6:
            return Unsupported("dhcp: not an Ethernet BOOTREQUEST")
        mac = chaddr[:6]
        if mac != eth_src:
            return Malformed("dhcp: client address is not the frame's sender")
        options = _options(bootp[_BOOTP.size + 4 :])
        if isinstance(options, Malformed):
            return options
        kind = options.get(_OPT_TYPE, b"")
        if len(kind) != 1:
            return Malformed("dhcp: no message type")
        gateway = self.addresses.gateway.packed
        server = options.get(_OPT_SERVER_ID)
        if kind[0] == DISCOVER:
            address = self._address_for(mac, now)
            if address is None:
                return Unsupported("dhcp: no free address")
            return self._reply(OFFER, xid, flags, b"\0" * 4, address, mac)
        if kind[0] == REQUEST:
            if server is not None and server != gateway:
                return Unsupported("dhcp: request for another server")
            wanted = options.get(_OPT_REQUESTED_IP) or ciaddr
            lease = self.leases.get(mac)
            if lease is None and wanted in self.pool and wanted not in {
                    other.address for other in self.leases.values()}:
                lease = self.leases[mac] = Lease(wanted, 0.0)  # a client rebooting
            if lease is None or wanted != lease.address:
                return self._reply(NAK, xid, flags, b"\0" * 4, b"\0" * 4, mac)
            lease.expires = now + self.lease_time
            return self._reply(ACK, xid, flags, ciaddr, lease.address, mac)
        if kind[0] == RELEASE:
            lease = self.leases.get(mac)
            if lease is not None and lease.address == ciaddr and server in (None, gateway):
                del self.leases[mac]
                return Unsupported("dhcp: released")
            return Unsupported("dhcp: release of an address not the client's")
        return Unsupported(f"dhcp: message type {kind[0]} not served")

    def _reply(self, kind: int, xid: int, flags: int, ciaddr: bytes, yiaddr: bytes,
               mac: bytes) -> bytes:
        addresses = self.addresses
        gateway = addresses.gateway.packed
        options = bytes((_OPT_TYPE, 1, kind, _OPT_SERVER_ID, 4)) + gateway
        if kind != NAK:
            mask = ipaddress.IPv4Network(addresses.network).netmask.packed
            options += bytes((_OPT_LEASE, 4)) + self.lease_time.to_bytes(4, "big")
            options += bytes((_OPT_MASK, 4)) + mask
            options += bytes((_OPT_ROUTER, 4)) + gateway
            options += bytes((_OPT_DNS, 4)) + addresses.dns.packed
            options += bytes((_OPT_MTU, 2)) + min(addresses.mtu, 0xFFFF).to_bytes(2, "big")
        options += bytes((_OPT_END,))
        bootp = _BOOTP.pack(_BOOTREPLY, 1, 6, 0, xid, 0, flags, ciaddr, yiaddr,
                            gateway if kind != NAK else b"\0" * 4, b"\0" * 4,
                            mac + b"\0" * 10, b"", b"") + _MAGIC + options
        bootp += b"\0" * max(0, _MIN_BOOTP - len(bootp))
        packet = build_udp(gateway, BROADCAST_IP, SERVER_PORT, CLIENT_PORT, bootp, vnet=False)
        return header(mac, self.our_mac, ETH_P_IP) + packet
