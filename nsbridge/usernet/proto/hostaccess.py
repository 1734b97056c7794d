"""Host access: the host's own addresses are closed to the namespace unless allowed.

Every flow the namespace starts is dialed *by the host*, locally.  A connection to one
of the host's own addresses (its LAN address, a VPN address, an interface's broadcast
address) therefore never crosses the external interface, so input filtering there does
not apply: a database on ``0.0.0.0`` or an admin UI bound to the LAN address, which the
host's firewall protects from the network, would be open to the sandbox.  The host's
loopback behind the gateway address is the same kind of door.  Both are one switch,
*host access*, off by default (``--allow-host-access``; ``--allow-host-loopback`` is
its older name).

With host access off a destination that is one of the host's addresses is denied
("host address") after the deny rules and the allow list had their say, unless an
allow rule names exactly that address (a /32 or /128, with its protocol and ports if
it gives them): ``--allow tcp:10.250.0.1:5432`` opens that one service.  A broad rule
(``0.0.0.0/0``, ``*``, ``10.250.0.0/24``) does not open the host by accident, as with
link-local addresses.  Deny rules still win, with host access on too.

Which addresses are the host's is not decided here (this module is sans-IO): the
policy is given a container (``address in host_addresses``), a frozenset in unit tests
and :class:`nsbridge.usernet.host.hostaddrs.HostAddresses` at run time, which follows
the kernel's address events so an address added while nsbridge runs is covered.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Container, Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nsbridge.usernet.proto.addresses import IPAddress
    from nsbridge.usernet.proto.rules import Rule

HOST_ADDRESS = "host address"  # the denial's reason (its counter's key)

# No host address is known: nothing is denied as one (the policy's default, so the
# policy alone, e.g. in unit tests, decides as before).
NO_HOST_ADDRESSES: Container[object] = frozenset()


def names_exactly(rule: Rule, address: IPAddress) -> bool:
    """Whether ``rule``'s network is exactly ``address`` (a /32 or a /128)."""
    network = rule.network
    return (network is not None and network.version == address.version
            and network.prefixlen == network.max_prefixlen
            and network.network_address == address)


def exact_rules(allow_rules: Iterable[Rule]) -> dict[IPAddress, tuple[Rule, ...]]:
    """The allow rules that name exactly one address, by that address: made once per
    policy, so a flow to a host address costs one dict lookup, not a walk of the rules."""
    exact: dict[IPAddress, tuple[Rule, ...]] = {}
    for rule in allow_rules:
        network = rule.network
        if network is not None and names_exactly(rule, network.network_address):
            exact[network.network_address] = (*exact.get(network.network_address, ()), rule)
    return exact


def opened_by_rule(exact: dict[IPAddress, tuple[Rule, ...]], protocol: str,
                   address: IPAddress, port: int | None) -> bool:
    """Whether an allow rule naming exactly this host address covers the flow
    (``exact`` from :func:`exact_rules`)."""
    rules = exact.get(address)
    return rules is not None and any(rule.matches(protocol, address, port) for rule in rules)


def is_host_address(host_addresses: Container[object], address: IPAddress) -> bool:
    """``address in host_addresses``; also as its IPv4 reading for an IPv4-mapped address
    (a dual-stack socket would dial that)."""
    if address in host_addresses:
        return True
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return mapped is not None and mapped in host_addresses
