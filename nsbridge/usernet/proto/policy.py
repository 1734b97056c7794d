"""The host-side firewall of a user-mode namespace, sans-IO.

Every new flow the namespace starts — a TCP connection, a UDP flow, an ICMP echo id —
is dialed *from the host*, with the host's privileges and the host's view of the
network.  So a packet to ``10.0.2.2`` could reach services bound to the host's
loopback, a packet to ``0.0.0.0`` or ``::`` connects to loopback too, and a packet to
``169.254.169.254`` reaches a cloud's metadata service.  :meth:`Policy.decide` is the
one place that says yes or no, once per flow, before anything is dialed, and says
*what* to dial: the namespace's view of an address is not always the host's.

Decision order (the first that applies wins):

1. Port 0 (TCP/UDP) → deny.  Nothing listens there; dialing it means "pick one".
2. Addresses that are never a destination on the wire → deny: IPv4-mapped
   (``::ffff:a.b.c.d``: the namespace's kernel sends those as IPv4, so an IPv6 packet
   carrying one is crafted, and a dual-stack host socket would dial the IPv4 address,
   e.g. ``::ffff:127.0.0.1``), IPv4-compatible (``::a.b.c.d``, deprecated), unspecified
   and "this network" (``0.0.0.0/8``, ``::``; connecting to them reaches loopback),
   loopback (``127.0.0.0/8``, ``::1``), multicast, broadcast and the reserved
   ``240.0.0.0/4`` (limited broadcast and the namespace network's broadcast included).
   No rule overrides these.
3. IPv6 spellings of IPv4 addresses (:func:`.spellings.embedded_ipv4`: NAT64 with the
   well-known prefix ``64:ff9b::/96`` or a prefix the user named, SIIT ``::ffff:0:a.b.c.d``, 6to4
   ``2002::/16``, Teredo ``2001::/32``).  Where a translator or tunnel sits on the
   host's path, dialing one reaches the IPv4 address, so the flow is decided as the IPv6
   address *and* as each IPv4 address it embeds, through every step here, and denied if
   either reading is: a reading on the never list (step 2) → "SPELLING of a special
   address"; a reading that names the gateway, DNS address or namespace network → deny
   (the host's translator would take it to whatever the *host's* network has there);
   otherwise the IPv4 reading's own denial (link-local, deny rule, not in allow rules).
   Under an allow list both the IPv6 address and its IPv4 reading must be allowed.  An
   allowed one dials the IPv6 address as asked: the translator is on the host's path.
   The local-use NAT64 range ``64:ff9b:1::/48`` (RFC 8215) has no fixed layout (the
   operator picks a prefix of /48 to /96 inside it, and the readings of one address in
   those layouts disagree), so an address in it is denied ("nat64 prefix not named")
   unless a prefix named with ``nat64_prefixes`` covers it.
4. The gateway (``10.0.2.2``, ``fd00::2``), TCP and UDP, any port → the host's loopback
   (``127.0.0.1``, ``::1``, same port) when host access is allowed
   (``allow_host_access``, alias ``allow_host_loopback``), else deny.  ICMP echo to the
   gateway is answered by the gateway itself (``Allow(gateway, 0)``: nothing is dialed),
   whatever host access says: ``ping 10.0.2.2`` is a user's first check.
5. The DNS address (``10.0.2.3``, ``fd00::3``) → :class:`AllowResolver` for TCP/UDP port
   53; any other port, and ICMP, is denied.  Like the gateway, the DNS service is one
   service in both families: deny rules are matched against both DNS addresses, so a rule
   on ``10.0.2.3`` holds for ``fd00::3``.  Deny rules also see the host resolvers actually
   dialed (each with its own port and the flow's protocol, an IPv6 resolver also as the
   IPv4 addresses it spells): a resolver a rule covers is
   never asked, and when every resolver is covered the query is denied ("deny rule"),
   so ``--deny 10.250.0.0/24`` holds with ``--dns 10.250.0.2:53``.
6. Any other address in the namespace's own networks (``10.0.2.0/24``, ``fd00::/64``) →
   deny: nothing lives there but the namespace, and dialing it from the host would
   reach whatever the *host's* network has at that address.
7. Link-local (``169.254.0.0/16``, ``fe80::/10``) → deny ("link-local"), unless an
   allow rule *inside* that range names it (``allow 169.254.169.254``): a broad rule
   such as ``0.0.0.0/0`` or ``*`` does not open metadata services by accident.  IPv6
   link-local cannot be dialed without an interface, so it is always denied.
8. Deny rules → deny.  They are matched against every name of the destination.  A
   gateway flow is one service, the host's loopback, whichever family it was asked in
   and dialed as, so its names are both gateway addresses and both loopback addresses
   (``10.0.2.2``, ``fd00::2``, ``127.0.0.1``, ``::1``; the gateway addresses move with
   ``--cidr``/``--cidr6``).  In other words a rule "on a host-loopback or gateway
   address" is any rule whose network contains one of those four addresses (with its
   protocol and ports): ``deny tcp:127.0.0.1:22`` and ``deny 127.0.0.0/8`` hold for
   ``[fd00::2]:22`` too, ``deny 10.0.2.2`` covers ``fd00::2``, and so does a rule as
   broad as ``0.0.0.0/0``.  A rule on ``127.0.0.2`` names none of them: the gateway
   dials ``127.0.0.1`` only.
9. Allow rules, if there are any, must match (an allow list); without allow rules
   everything else is allowed.  Allow rules select outside destinations only: the
   gateway and DNS service follow their own switches (and deny rules).
10. The host's own addresses (every address of the host namespace, their interface
   broadcast addresses) → deny ("host address") unless host access is allowed or an
   allow rule names exactly that address (:mod:`.hostaccess`).

Deny wins over allow: rules are checked deny-first, whatever their order.  A rule's
network is one family's (``0.0.0.0/0``, ``[::]/0``) or ``*``, both families.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Container, Iterable
from dataclasses import dataclass

from nsbridge.net.addresses import format_sockaddr
from nsbridge.usernet.proto.addresses import IPAddress, UsernetAddresses
from nsbridge.usernet.proto.hostaccess import (
    HOST_ADDRESS,
    NO_HOST_ADDRESSES,
    exact_rules,
    is_host_address,
    opened_by_rule,
)
from nsbridge.usernet.proto.rules import PROTOCOLS, Rule
from nsbridge.usernet.proto.spellings import (
    IPV4_COMPATIBLE,
    IPV4_MAPPED,
    NAT64_LOCAL_USE,
    embedded_ipv4,
)

_LOOPBACK_V4 = ipaddress.IPv4Address("127.0.0.1")
_LOOPBACK_V6 = ipaddress.IPv6Address("::1")
_LINK_LOCAL = (ipaddress.IPv4Network("169.254.0.0/16"), ipaddress.IPv6Network("fe80::/10"))


@dataclass(frozen=True)
class Allow:
    """Dial ``host_ip:host_port`` from the host (for ICMP, ``host_port`` is 0)."""

    host_ip: IPAddress
    host_port: int


@dataclass(frozen=True)
class AllowResolver:
    """Hand the query to the host's resolvers (the flow was to the DNS address, port 53).

    ``targets``: the resolvers (``(ip, port)``, in order) that no deny rule covers for
    this protocol, when the policy was told the resolvers; None when it was not (the
    caller then uses its own list).
    """

    version: int
    targets: tuple[tuple[str, int], ...] | None = None


@dataclass(frozen=True)
class Deny:
    """Refuse the flow; ``reason`` is short and stable (the denial counters' key)."""

    reason: str


Decision = Allow | AllowResolver | Deny


class Policy:
    """Decides every new flow; see the module docstring for the order and the why.

    ``denied`` counts denials by reason, for the stats a user reads when something
    does not connect.  ``resolvers`` are the host's DNS servers (``(ip, port)``) that the
    DNS address forwards to; given, the deny rules are applied to them too.
    ``host_addresses`` holds the host's own addresses (anything with ``in``; the runner
    gives a live :class:`~nsbridge.usernet.host.hostaddrs.HostAddresses`), closed unless
    ``allow_host_access`` (``allow_host_loopback`` is its older name: either opens both).
    """

    def __init__(
        self,
        allow_host_loopback: bool = False,
        rules: Iterable[Rule] = (),
        addresses: UsernetAddresses | None = None,
        nat64_prefixes: Iterable[ipaddress.IPv6Network] = (),
        resolvers: Iterable[tuple[str, int]] | None = None,
        *,
        allow_host_access: bool = False,
        host_addresses: Container[object] = NO_HOST_ADDRESSES,
    ) -> None:
        self.allow_host_access = allow_host_access or allow_host_loopback
        self.allow_host_loopback = self.allow_host_access  # the older name, same switch
        self.host_addresses = host_addresses
        self.addresses = addresses or UsernetAddresses()
        rules = tuple(rules)
        self.deny_rules = tuple(rule for rule in rules if rule.action == "deny")
        self.allow_rules = tuple(rule for rule in rules if rule.action == "allow")
        self._exact_allow = exact_rules(self.allow_rules)  # the ones that open one host address
        self.nat64_prefixes = tuple(dict.fromkeys(nat64_prefixes))
        self.denied: Counter[str] = Counter()
        self.allowed = 0
        a = self.addresses
        self._gateways: dict[IPAddress, IPAddress] = {a.gateway: _LOOPBACK_V4,
                                                      a.gateway6: _LOOPBACK_V6}
        # every name of the host-loopback service (step 8 of the module docstring)
        self._loopback_names = (a.gateway, a.gateway6, _LOOPBACK_V4, _LOOPBACK_V6)
        self._dns = frozenset((a.dns, a.dns6))
        self._dns_names = (a.dns, a.dns6)
        self._broadcast = a.network.broadcast_address
        self.resolvers = None if resolvers is None else [(str(h), int(p)) for h, p in resolvers]
        # Per protocol, the resolvers no deny rule covers (rules are fixed for the run).
        self._resolver_targets: dict[str, tuple[tuple[str, int], ...]] = {
            protocol: tuple(resolver for resolver in self.resolvers or ()
                            if not self._denies_resolver(protocol, resolver))
            for protocol in ("tcp", "udp")
        }

    def decide(
        self, protocol: str, dst_ip: IPAddress | bytes | str, dst_port: int | None
    ) -> Decision:
        """The decision for a new flow to ``dst_ip:dst_port`` (port None/ignored for ICMP).

        ``dst_ip`` may be packed bytes straight from :mod:`.packets`.  Raises ValueError
        only for a protocol other than tcp, udp, icmp (a caller bug, not input).
        """
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {protocol!r}")
        address = ipaddress.ip_address(dst_ip)
        port = 0 if protocol == "icmp" else dst_port
        decision = self._decide(protocol, address, port)
        if isinstance(decision, Deny):
            self.denied[decision.reason] += 1
        else:
            self.allowed += 1
        return decision

    def _decide(self, protocol: str, address: IPAddress, port: int | None) -> Decision:
        if protocol != "icmp" and not port:
            return Deny("port 0")
        special = self._never(address)
        if special is not None:
            return Deny(special)
        if not isinstance(address, ipaddress.IPv6Address):
            return self._decide_address(protocol, address, port)
        if address in NAT64_LOCAL_USE and not any(
            address in prefix for prefix in self.nat64_prefixes
        ):
            return Deny("nat64 prefix not named")
        readings = embedded_ipv4(address, self.nat64_prefixes)
        for spelling, embedded in readings:
            if self._never(embedded) is not None:
                return Deny(f"{spelling} of a special address")
        decision = self._decide_address(protocol, address, port)
        if isinstance(decision, Deny) and decision.reason != HOST_ADDRESS:
            return decision
        for _spelling, embedded in readings:
            as_ipv4 = self._decide_address(protocol, embedded, port)
            if isinstance(as_ipv4, Deny) and as_ipv4.reason == HOST_ADDRESS:
                decision = decision if isinstance(decision, Deny) else as_ipv4
                continue  # the last step: another reading's earlier denial wins
            if isinstance(as_ipv4, Deny):
                return as_ipv4
            if as_ipv4 != Allow(embedded, port or 0) or embedded in self._gateways:
                # the gateway or the DNS address: the namespace's, not the host's
                return Deny("namespace network")
        return decision

    def _decide_address(self, protocol: str, address: IPAddress, port: int | None) -> Decision:
        """Steps 4-9 of the module docstring for one reading of the destination."""
        if address in self._gateways:
            if protocol == "icmp":  # the gateway answers echo itself; nothing is dialed
                return self._ruled(protocol, address, port, Allow(address, 0))
            if not self.allow_host_access:
                return Deny("host loopback disabled")
            return self._ruled(protocol, address, port, Allow(self._gateways[address], port or 0))
        if address in self._dns:
            if protocol == "icmp" or port != 53:
                return Deny("dns address: port 53 only")
            if self.resolvers is None:
                return self._ruled(protocol, address, port, AllowResolver(address.version))
            targets = self._resolver_targets[protocol]
            if self.resolvers and not targets:
                return Deny("deny rule")  # every resolver is covered by a deny rule
            return self._ruled(protocol, address, port, AllowResolver(address.version, targets))
        if address in self.addresses.network or address in self.addresses.network6:
            return Deny("namespace network")
        return self._outside(protocol, address, port)

    def _never(self, address: IPAddress) -> str | None:
        """The reason an address is never dialed, whatever the rules say; else None."""
        if isinstance(address, ipaddress.IPv6Address):
            if address in IPV4_MAPPED:
                return "ipv4-mapped address"
            if address in IPV4_COMPATIBLE and address > _LOOPBACK_V6:
                return "ipv4-compatible address"
        if address.is_unspecified or (address.version == 4 and address.packed[0] == 0):
            return "unspecified address"
        if address.is_loopback:
            return "loopback"
        if address.is_multicast:
            return "multicast"
        if address.version == 4 and (address == self._broadcast or address.packed[0] >= 240):
            return "broadcast or reserved"
        return None

    def _outside(self, protocol: str, address: IPAddress, port: int | None) -> Decision:
        if address.is_link_local and not self._link_local_allowed(protocol, address, port):
            return Deny("link-local")
        decision = self._ruled(protocol, address, port, Allow(address, port or 0),
                               outside=True)
        if (not self.allow_host_access and isinstance(decision, Allow)
                and is_host_address(self.host_addresses, address)
                and not opened_by_rule(self._exact_allow, protocol, address, port)):
            return Deny(HOST_ADDRESS)
        return decision

    def _link_local_allowed(self, protocol: str, address: IPAddress, port: int | None) -> bool:
        if address.version == 6:
            return False
        return any(
            rule.network.subnet_of(_LINK_LOCAL[0]) and rule.matches(protocol, address, port)
            for rule in self.allow_rules
            if rule.network is not None and rule.network.version == 4
        )

    def _ruled(
        self,
        protocol: str,
        address: IPAddress,
        port: int | None,
        allow: Allow | AllowResolver,
        *,
        outside: bool = False,
    ) -> Decision:
        """Deny rules (on every name of the destination), then the allow list."""
        if address in self._gateways:
            names: tuple[IPAddress, ...] = self._loopback_names
        elif address in self._dns:
            names = self._dns_names  # the DNS service is one service too, in both families
        else:
            names = (address,)
        if any(rule.matches(protocol, name, port) for rule in self.deny_rules for name in names):
            return Deny("deny rule")
        if (
            outside
            and self.allow_rules
            and not any(rule.matches(protocol, address, port) for rule in self.allow_rules)
        ):
            return Deny("not in allow rules")
        return allow

    def _denies_resolver(self, protocol: str, resolver: tuple[str, int]) -> bool:
        """Whether a deny rule covers this resolver (its address, or an IPv4 address its IPv6
        address spells through a translator on the host's path, with its own port)."""
        host, port = resolver
        address = ipaddress.ip_address(host.partition("%")[0])
        names: list[IPAddress] = [address]
        if isinstance(address, ipaddress.IPv6Address):
            names += [ipv4 for _spelling, ipv4 in embedded_ipv4(address, self.nat64_prefixes)]
        return any(rule.matches(protocol, name, port)
                   for rule in self.deny_rules for name in names)

    def denied_resolvers(self) -> list[str]:
        """One line per host resolver a deny rule covers, and for which protocols (for a
        start-up warning: DNS through it is refused)."""
        lines = []
        for resolver in self.resolvers or ():
            covered = [p for p in ("udp", "tcp") if resolver not in self._resolver_targets[p]]
            if covered:
                lines.append(f"DNS resolver {format_sockaddr(resolver)} is covered by a deny "
                             f"rule: DNS over {' and '.join(covered)} is not sent to it")
        return lines

    def describe(self) -> str:
        """One line for the start-up log (-v): host access, rules and NAT64 prefixes."""
        parts = ["host access " + ("allowed" if self.allow_host_access else "denied")]
        parts.extend(str(rule) for rule in (*self.deny_rules, *self.allow_rules))
        parts.extend(f"nat64 prefix {prefix}" for prefix in self.nat64_prefixes)
        return "; ".join(parts)

    def single_family_port_rules(self) -> list[str]:
        """Warnings (one line each) for port rules that cover one family only.

        ``deny tcp:0.0.0.0/0:25`` reads as "port 25, everywhere", but IPv6 flows to port
        25 pass it.  A rule with ports whose network is a whole family (``0.0.0.0/0``,
        ``[::]/0``) is flagged unless a rule of the same action covers the other family
        for the same protocol and ports (``*``, or that family's ``/0``).  Narrower
        networks have no other-family twin to look for, so they are left alone.
        """
        warnings = []
        rules = (*self.deny_rules, *self.allow_rules)
        for rule in rules:
            if rule.ports is None or rule.network is None or rule.network.prefixlen:
                continue
            other = 6 if rule.network.version == 4 else 4
            if any(_covers(wider, rule) and wider.covers_family(other) for wider in rules):
                continue
            both = Rule(rule.action, None, rule.protocol, rule.ports)
            verb = "denied" if rule.action == "deny" else "allowed"
            warnings.append(
                f"{rule} covers IPv{rule.network.version} only: IPv{other} flows to those "
                f"ports are not {verb} by it; write {str(both).split(' ', 1)[1]} for both "
                "families"
            )
        return warnings

    def accepts_source(self, src_ip: IPAddress | bytes) -> bool:
        """Whether a packet's source is plausibly the namespace (anti-spoofing check).

        The namespace's own address, or another host address of its networks (users
        may add addresses), but never the gateway, DNS or broadcast addresses.
        """
        address = ipaddress.ip_address(src_ip)
        a = self.addresses
        if address in a.local_addresses() or address == self._broadcast:
            return False
        network = a.network if address.version == 4 else a.network6
        return address in network and address != network.network_address


def _covers(wider: Rule, rule: Rule) -> bool:
    """Whether ``wider`` has the action of ``rule`` and at least its protocol and ports."""
    if wider.action != rule.action or wider.protocol not in (None, rule.protocol):
        return False
    if wider.ports is None or rule.ports is None:
        return wider.ports is None
    return wider.ports[0] <= rule.ports[0] and rule.ports[1] <= wider.ports[1]
