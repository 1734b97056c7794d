"""Who a published port's client is inside the namespace, and where it may be sent.

A published port in device mode (:mod:`nsbridge.usernet.host.inbound`) dials the guest
through the device *as the client*, so the server inside sees who connected.  Not every
client address can be shown as itself:

* a client on the host's **loopback** (127.0.0.0/8, ``::1``) or the unspecified address
  is the host itself, and the host is the gateway inside: 10.0.2.2 / ``fd00::2``, as
  slirp4netns shows it (a packet from 127.0.0.1 arriving on an interface is a martian
  the guest's kernel drops);
* a client whose address lies **in the guest's own network** (the guest's address, the
  gateway's, another host of that range on the real network) would look like a neighbour
  on the virtual link, and the guest would answer it there instead of through the
  gateway: it is shown as the gateway too;
* a client of the **other family** (an IPv4 client of an IPv6 guest address) cannot be
  written in the guest's family: the gateway of the guest's family;
* any other client is shown with its **real address** (an IPv4-mapped IPv6 address,
  from a dual-stack listener, as the IPv4 address it is).

The guest address a port may dial is one of the namespace's network other than the
network's own, broadcast, gateway and DNS addresses: anything else would be written into
the device only to be routed by the guest's kernel back out to us (and, with IPv4
forwarding on in the guest, to anywhere), which would make a published port a way to
reach what the policy decides.
"""

from __future__ import annotations

import ipaddress

from nsbridge.usernet.proto.addresses import UsernetAddresses

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def client_inside(client: str, guest: IPAddress, addresses: UsernetAddresses) -> IPAddress:
    """The source address the guest sees for a client at ``client`` (a host-side socket
    address's text, maybe with a ``%scope``) dialing ``guest`` (see the module doc)."""
    ip: IPAddress = ipaddress.ip_address(client.partition("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if guest.version == 4:
        gateway: IPAddress = addresses.gateway
        network: ipaddress.IPv4Network | ipaddress.IPv6Network = addresses.network
    else:
        gateway, network = addresses.gateway6, addresses.network6
    if (ip.version != guest.version or ip.is_loopback or ip.is_unspecified
            or ip in network):
        return gateway
    return ip


def guest_target_problem(guest: IPAddress, addresses: UsernetAddresses) -> str | None:
    """Why ``guest`` cannot be a published port's target (one phrase), or None."""
    if guest.version == 4:
        network: ipaddress.IPv4Network | ipaddress.IPv6Network = addresses.network
        taken: tuple[IPAddress, ...] = (addresses.gateway, addresses.dns,
                                        network.network_address, network.broadcast_address)
    else:
        network = addresses.network6
        taken = (addresses.gateway6, addresses.dns6, network.network_address)
    if guest not in network:
        return f"{guest} is not in the namespace's network {network}"
    if guest in taken:
        return f"{guest} is the network's, gateway's or DNS address, not the namespace's"
    return None
