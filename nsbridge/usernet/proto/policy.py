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
3. IPv6 spellings of IPv4 addresses (:func:`embedded_ipv4`: NAT64 with the well-known
   prefix ``64:ff9b::/96`` or a prefix the user named, SIIT ``::ffff:0:a.b.c.d``, 6to4
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
from typing import Literal

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
from nsbridge.net.addresses import format_sockaddr
from nsbridge.usernet.proto.hostaccess import (
    HOST_ADDRESS,
    NO_HOST_ADDRESSES,
    is_host_address,
    opened_by_rule,
)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Protocol = Literal["tcp", "udp", "icmp"]
PROTOCOLS: tuple[Protocol, ...] = ("tcp", "udp", "icmp")

_LOOPBACK_V4 = ipaddress.IPv4Address("127.0.0.1")
_LOOPBACK_V6 = ipaddress.IPv6Address("::1")
_LINK_LOCAL = (ipaddress.IPv4Network("169.254.0.0/16"), ipaddress.IPv6Network("fe80::/10"))
_EVERY_V4 = ipaddress.IPv4Network("0.0.0.0/0")
_EVERY_V6 = ipaddress.IPv6Network("::/0")

# ---- IPv6 spellings of IPv4 addresses ------------------------------------------------

_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_COMPATIBLE = ipaddress.IPv6Network("::/96")
_SIIT = ipaddress.IPv6Network("::ffff:0:0:0/96")  # IPv4-translated (RFC 6145)
NAT64_WELL_KNOWN = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052
NAT64_LOCAL_USE = ipaddress.IPv6Network("64:ff9b:1::/48")  # RFC 8215
_SIX_TO_FOUR = ipaddress.IPv6Network("2002::/16")  # RFC 3056
_TEREDO = ipaddress.IPv6Network("2001::/32")  # RFC 4380
NAT64_PREFIX_LENGTHS = (32, 40, 48, 56, 64, 96)  # RFC 6052 section 2.2
_LOW32 = 0xFFFFFFFF

Spelling = Literal["ipv4-mapped", "ipv4-compatible", "siit", "nat64", "6to4", "teredo"]


def nat64_embedded(address: ipaddress.IPv6Address, prefixlen: int) -> ipaddress.IPv4Address:
    """The IPv4 address in ``address`` under a NAT64 prefix of ``prefixlen`` (RFC 6052).

    The 32 IPv4 bits follow the prefix but skip bits 64-71 (the "u" octet, kept zero
    for the interface-identifier format): a /48 prefix has them at bits 48-63 and
    72-87, a /56 at 56-63 and 72-95, a /64 at 72-103, a /96 at 96-127.  Squeezing the
    u octet out leaves a 120-bit number with the IPv4 bits right after the prefix.
    """
    if prefixlen not in NAT64_PREFIX_LENGTHS:
        raise ValueError(f"not an RFC 6052 prefix length: /{prefixlen}")
    value = int(address)
    if prefixlen == 96:
        return ipaddress.IPv4Address(value & _LOW32)
    squeezed = ((value >> 64) << 56) | (value & ((1 << 56) - 1))
    return ipaddress.IPv4Address((squeezed >> (120 - prefixlen - 32)) & _LOW32)


def embedded_ipv4(
    address: ipaddress.IPv6Address,
    nat64_prefixes: Iterable[ipaddress.IPv6Network] = (),
) -> tuple[tuple[Spelling, ipaddress.IPv4Address], ...]:
    """Every IPv4 address ``address`` spells, with how: what a translator or tunnel on
    the host's path would turn it into.

    * IPv4-mapped ``::ffff:a.b.c.d`` and IPv4-compatible ``::a.b.c.d`` (not ``::`` or
      ``::1``): a dual-stack socket or an old tunnel dials the IPv4 address.
    * SIIT ``::ffff:0:a.b.c.d`` (IPv4-translated, RFC 6145): a stateless translator.
    * NAT64: the well-known prefix ``64:ff9b::/96`` and every prefix in
      ``nat64_prefixes`` (RFC 6052 layouts, :func:`nat64_embedded`).  The local-use
      range ``64:ff9b:1::/48`` is read only through a named prefix: its layout is the
      operator's (see :meth:`Policy.decide`, step 3).
    * 6to4 ``2002:AABB:CCDD::/48``: the IPv6 packet is tunnelled to the IPv4 address in
      bits 16-47.
    * Teredo ``2001:0:SSSS:SSSS:FLAG:PORT:CCCC:CCCC``: *both* IPv4 addresses.  The
      payload goes, in UDP, straight to the client's address (bits 96-127, stored
      inverted), and the host's Teredo client also sends bubbles through the server
      (bits 32-63) to open that path; either is an IPv4 destination the host talks to
      on the flow's behalf, so a rule denying either must hold.
    """
    value = int(address)
    found: list[tuple[Spelling, ipaddress.IPv4Address]] = []
    if address in _MAPPED:
        found.append(("ipv4-mapped", ipaddress.IPv4Address(value & _LOW32)))
    if address in _COMPATIBLE and value > 1:
        found.append(("ipv4-compatible", ipaddress.IPv4Address(value & _LOW32)))
    if address in _SIIT:
        found.append(("siit", ipaddress.IPv4Address(value & _LOW32)))
    for prefix in (NAT64_WELL_KNOWN, *nat64_prefixes):
        if address in prefix:
            found.append(("nat64", nat64_embedded(address, prefix.prefixlen)))
    if address in _SIX_TO_FOUR:
        found.append(("6to4", ipaddress.IPv4Address((value >> 80) & _LOW32)))
    if address in _TEREDO:
        found.append(("teredo", ipaddress.IPv4Address((value >> 64) & _LOW32)))
        found.append(("teredo", ipaddress.IPv4Address(~value & _LOW32)))
    return tuple(dict.fromkeys(found))


def parse_nat64_prefix(text: str, *, what: str = "--nat64-prefix") -> ipaddress.IPv6Network:
    """A NAT64 prefix the host's translator uses, from user text (RFC 6052 rules)."""
    shown = text if text and text.isprintable() and " " not in text else repr(text)
    example = "e.g. 64:ff9b:1::/96 or 2001:db8:64::/64"
    if "/" not in text:
        raise UserError(f"{what} {shown}: give the prefix with its length ({example})")
    network = parse_network(text, what=what)
    if not isinstance(network, ipaddress.IPv6Network):
        raise UserError(f"{what} {shown}: not an IPv6 prefix ({example})")
    if network.prefixlen not in NAT64_PREFIX_LENGTHS:
        raise UserError(f"{what} {shown}: a NAT64 prefix is /32, /40, /48, /56, /64 or /96 "
                        f"(RFC 6052), not /{network.prefixlen}")
    if network.prefixlen == 96 and network.network_address.packed[8]:
        raise UserError(f"{what} {shown}: bits 64-71 of a /96 NAT64 prefix must be zero "
                        "(RFC 6052)")
    return network

# ---- addresses ----------------------------------------------------------------------

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


# ---- rules --------------------------------------------------------------------------

_RULE_EXAMPLES = "e.g. 10.0.0.0/8, 192.0.2.1:443, tcp:*:25 or udp:[2001:db8::]/32:53"
EVERY_ADDRESS = "*"  # a rule's network: every address of both families


@dataclass(frozen=True)
class Rule:
    """One allow or deny rule: ``[PROTO:]NETWORK[:PORT[-PORT]]``.

    ``protocol`` None matches every protocol; ``ports`` None matches every port (and
    ICMP).  A rule with ports matches only TCP and UDP: ICMP has no port, so
    ``allow 192.0.2.1:443`` must not let echo requests (which can carry any payload)
    through an allow list, nor ``deny *:25`` stop every ping.  IPv6 networks with
    a port are bracketed: ``[2001:db8::]/32:53`` or ``[2001:db8::/32]:53``; without a
    port the brackets may be left out.  ``network`` None is written ``*``: every
    address of both families (``tcp:*:25``), because ``0.0.0.0/0`` is IPv4 only and a
    port rule meant for "everywhere" that names one family leaves the other open.
    """

    action: Literal["allow", "deny"]
    network: Network | None
    protocol: Protocol | None = None
    ports: tuple[int, int] | None = None

    @classmethod
    def parse(cls, action: str, text: str, *, what: str | None = None) -> Rule:
        """Parse one rule; a :class:`UserError` quotes it and says what is wrong.

        ``what`` is how the user wrote the option (``--usernet-deny``), default the
        action itself.
        """
        shown = text if text and text.isprintable() and " " not in text else repr(text)
        label = f"{what or action} {shown}"
        if action not in ("allow", "deny"):
            raise UserError(f"{label}: action must be allow or deny, not {action!r}")
        protocol, rest = _split_protocol(text, label)
        address_text, port_text = _split_port(rest, label)
        network = _parse_rule_network(address_text, label)
        ports = None if port_text is None else _parse_ports(port_text, label)
        if ports is not None and protocol == "icmp":
            raise UserError(f"{label}: icmp has no ports")
        return cls(action, network, protocol, ports)  # type: ignore[arg-type]

    def matches(self, protocol: str, address: IPAddress, port: int | None) -> bool:
        """Whether this rule covers a flow (a rule with ports never covers ICMP)."""
        if self.protocol is not None and self.protocol != protocol:
            return False
        if self.network is not None and address not in self.network:
            return False
        if self.ports is None:
            return True
        if protocol == "icmp":
            return False
        return port is None or self.ports[0] <= port <= self.ports[1]

    def covers_family(self, version: int) -> bool:
        """Whether the network is all of one IP version's addresses (``*`` is both)."""
        return self.network is None or self.network == (_EVERY_V4 if version == 4
                                                       else _EVERY_V6)

    def __str__(self) -> str:
        network = EVERY_ADDRESS if self.network is None else str(self.network)
        if self.ports is not None and self.network is not None and self.network.version == 6:
            network = f"[{self.network.network_address}]/{self.network.prefixlen}"
        text = network if self.protocol is None else f"{self.protocol}:{network}"
        if self.ports is not None:
            low, high = self.ports
            text += f":{low}" if low == high else f":{low}-{high}"
        return f"{self.action} {text}"


def _split_protocol(text: str, label: str) -> tuple[Protocol | None, str]:
    head, colon, rest = text.partition(":")
    if colon and head.lower() in PROTOCOLS:
        return head.lower(), rest  # type: ignore[return-value]
    if colon and head.isalpha() and not all(c in "0123456789abcdefABCDEF" for c in head):
        # letters that cannot start an IPv6 address: a protocol we do not know
        raise UserError(f"{label}: unknown protocol {head!r} (tcp, udp or icmp)")
    return None, text


def _parse_rule_network(text: str, label: str) -> Network | None:
    if text == EVERY_ADDRESS:
        return None
    if EVERY_ADDRESS in text:
        raise _star_misused(label)
    return parse_network(text, what=f"{label}:")


def _star_misused(label: str) -> UserError:
    return UserError(f"{label}: '*' stands alone for every address of both families "
                     "(e.g. tcp:*:25); it takes no prefix length or brackets")


def _split_port(text: str, label: str) -> tuple[str, str | None]:
    """``NET[:PORT]`` / ``*[:PORT]`` / ``[V6NET]:PORT`` / ``[V6]/LEN:PORT`` / bare IPv6."""
    if text.startswith(EVERY_ADDRESS):
        address, colon, port = text.partition(":")
        return address, port if colon else None
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise UserError(f"{label}: missing ']' ({_RULE_EXAMPLES})")
        inside, after = text[1:close], text[close + 1 :]
        if EVERY_ADDRESS in inside:
            raise _star_misused(label)
        prefix, colon, port = after.partition(":")
        if prefix and not prefix.startswith("/"):
            raise UserError(f"{label}: unexpected {after!r} after ']' ({_RULE_EXAMPLES})")
        if after and not colon and not prefix:
            raise UserError(f"{label}: unexpected {after!r} after ']' ({_RULE_EXAMPLES})")
        return inside + prefix, port if colon else None
    if text.count(":") > 1:  # bare IPv6, no port possible
        return text, None
    address, colon, port = text.partition(":")
    return address, port if colon else None


def _parse_ports(text: str, label: str) -> tuple[int, int]:
    low_text, dash, high_text = text.partition("-")
    ports = []
    for part in (low_text, high_text) if dash else (low_text,):
        if not (part.isascii() and part.isdigit() and 1 <= int(part) <= 65535):
            raise UserError(f"{label}: port {part!r} is not 1-65535 ({_RULE_EXAMPLES})")
        ports.append(int(part))
    low, high = ports[0], ports[-1]
    if low > high:
        raise UserError(f"{label}: port range {text} is backwards")
    return low, high


# ---- decisions ----------------------------------------------------------------------


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
            if address in _MAPPED:
                return "ipv4-mapped address"
            if address in _COMPATIBLE and address > _LOOPBACK_V6:
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
                and not opened_by_rule(self.allow_rules, protocol, address, port)):
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
        """One line for the start-up log: loopback switch, rules and NAT64 prefixes."""
        parts = ["host loopback " + ("allowed" if self.allow_host_loopback else "denied")]
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
