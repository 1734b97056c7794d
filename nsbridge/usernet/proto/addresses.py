"""The virtual network a user-mode namespace sees: one frozen model of its addresses.

Every part of user-mode networking that needs the namespace's addresses takes them from
:class:`UsernetAddresses`: the policy (which addresses are the gateway, the DNS service,
the namespace's own networks), the engine's replies (which source to answer from), and
the set-up inside the namespace (:class:`~nsbridge.usernet.inside.netconf.NetConfig`,
which puts these addresses and routes on the tun device).  The defaults are
slirp4netns's address plan, written once in :mod:`nsbridge.defaults`.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from nsbridge.defaults import (
    DNS_HOST,
    GATEWAY_HOST,
    MAX_MTU,
    MIN_MTU,
    MTU,
    NAMESPACE_HOST,
    NAMESPACE_HOST6,
    USERNET_CIDR,
    USERNET_CIDR6,
    USERNET_DNS,
    USERNET_DNS6,
    USERNET_GATEWAY,
    USERNET_GATEWAY6,
    USERNET_NAMESPACE,
    USERNET_NAMESPACE6,
)
from nsbridge.errors import UserError
from nsbridge.net.acl import parse_network

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_DEFAULT_NETWORK = ipaddress.IPv4Network(USERNET_CIDR)
_DEFAULT_NAMESPACE = ipaddress.IPv4Address(USERNET_NAMESPACE)
_DEFAULT_GATEWAY = ipaddress.IPv4Address(USERNET_GATEWAY)
_DEFAULT_DNS = ipaddress.IPv4Address(USERNET_DNS)
_DEFAULT_NETWORK6 = ipaddress.IPv6Network(USERNET_CIDR6)
_DEFAULT_NAMESPACE6 = ipaddress.IPv6Address(USERNET_NAMESPACE6)
_DEFAULT_GATEWAY6 = ipaddress.IPv6Address(USERNET_GATEWAY6)
_DEFAULT_DNS6 = ipaddress.IPv6Address(USERNET_DNS6)


@dataclass(frozen=True)
class UsernetAddresses:
    """The virtual network a user-mode namespace sees (slirp4netns's defaults).

    Build it from user text with :meth:`parse`, which derives the gateway (``.2``),
    DNS (``.3``) and namespace (``.100``) addresses from a network the way slirp4netns's
    ``--cidr`` does.
    """

    network: ipaddress.IPv4Network = _DEFAULT_NETWORK
    namespace: ipaddress.IPv4Address = _DEFAULT_NAMESPACE
    gateway: ipaddress.IPv4Address = _DEFAULT_GATEWAY
    dns: ipaddress.IPv4Address = _DEFAULT_DNS
    network6: ipaddress.IPv6Network = _DEFAULT_NETWORK6
    namespace6: ipaddress.IPv6Address = _DEFAULT_NAMESPACE6
    gateway6: ipaddress.IPv6Address = _DEFAULT_GATEWAY6
    dns6: ipaddress.IPv6Address = _DEFAULT_DNS6
    mtu: int = MTU

    MIN_MTU = MIN_MTU  # IPv6's minimum; the namespace always has IPv6
    MAX_MTU = MAX_MTU  # slirp4netns's maximum; leaves room under the 64 KiB packet limit

    @classmethod
    def parse(
        cls,
        *,
        network: str = USERNET_CIDR,
        namespace: str | None = None,
        gateway: str | None = None,
        dns: str | None = None,
        network6: str = USERNET_CIDR6,
        namespace6: str | None = None,
        gateway6: str | None = None,
        dns6: str | None = None,
        mtu: str | int = MTU,
        labels: tuple[str, str] = ("usernet network", "usernet network6"),
    ) -> UsernetAddresses:
        """Addresses from user text; a :class:`UserError` names the first bad input.

        Omitted host addresses default to the network's ``.2``/``.3``/``.100``
        (``::2``/``::3``/``::100``).  ``labels`` name the two networks in errors (the
        CLI passes its option names).
        """
        net4 = _parse_net(network, labels[0], 4)
        net6 = _parse_net(network6, labels[1], 6)
        four = [
            _host(net4, text, default, name, labels[0])
            for text, default, name in (
                (namespace, NAMESPACE_HOST, "namespace"),
                (gateway, GATEWAY_HOST, "gateway"),
                (dns, DNS_HOST, "dns"),
            )
        ]
        six = [
            _host(net6, text, default, name, labels[1])
            for text, default, name in (
                (namespace6, NAMESPACE_HOST6, "namespace6"),
                (gateway6, GATEWAY_HOST, "gateway6"),
                (dns6, DNS_HOST, "dns6"),
            )
        ]
        _distinct(four, ("namespace", "gateway", "dns"))
        _distinct(six, ("namespace6", "gateway6", "dns6"))
        # _host returns the network's own family; mypy sees only the union.
        return cls(net4, four[0], four[1], four[2], net6, six[0], six[1], six[2],  # type: ignore[arg-type]
                   _parse_mtu(mtu))

    @property
    def interface(self) -> ipaddress.IPv4Interface:
        """The namespace's IPv4 address with its network's prefix, as the tun gets it."""
        return ipaddress.IPv4Interface((self.namespace, self.network.prefixlen))

    @property
    def interface6(self) -> ipaddress.IPv6Interface:
        """The namespace's IPv6 address with its network's prefix."""
        return ipaddress.IPv6Interface((self.namespace6, self.network6.prefixlen))

    def local_addresses(self) -> frozenset[IPAddress]:
        """Addresses the host side answers for (gateway and DNS, both families)."""
        return frozenset((self.gateway, self.dns, self.gateway6, self.dns6))


def _parse_net(text: str, label: str, version: int) -> Network:
    network = parse_network(text, what=label)
    if network.version != version:
        raise UserError(f"{label} {text}: not an IPv{version} network")
    return network


def _host(network: Network, text: str | None, default: int, name: str,
          label: str) -> IPAddress:
    """The address given for ``name``, or the network's default host ``default``."""
    if text is None:
        if default >= network.num_addresses - 1:
            raise UserError(
                f"{label} {network}: too small for the default {name} address "
                f"(host {default}); use a larger network"
            )
        return network[default]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise UserError(f"usernet {name} {text!r}: not an IP address") from None
    if address not in network or address in (network.network_address, _last(network)):
        raise UserError(f"usernet {name} {text}: not a host address in {network}")
    return address


def _last(network: Network) -> IPAddress:
    return network.broadcast_address


def _distinct(addresses: list[IPAddress], names: tuple[str, ...]) -> None:
    for i, address in enumerate(addresses):
        if address in addresses[:i]:
            other = names[addresses.index(address)]
            raise UserError(f"usernet {names[i]} {address}: same address as {other}")


def _parse_mtu(value: str | int) -> int:
    text = str(value)
    low, high = UsernetAddresses.MIN_MTU, UsernetAddresses.MAX_MTU
    if not (text.isascii() and text.isdigit() and low <= int(text) <= high):
        raise UserError(f"--mtu {text!r}: not a number from {low} to {high}")
    return int(text)
