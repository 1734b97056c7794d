"""The policy's allow and deny rules: ``[PROTO:]NETWORK[:PORT[-PORT]]``, parsed and matched.

A rule is a value (:class:`Rule`); :mod:`.policy` decides flows with them, deny rules
first.  Parsing quotes the user's text in every error and says what is wrong with it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Literal

from nsbridge.errors import UserError
from nsbridge.net.acl import parse_network
from nsbridge.usernet.proto.addresses import IPAddress, Network

Protocol = Literal["tcp", "udp", "icmp"]
PROTOCOLS: tuple[Protocol, ...] = ("tcp", "udp", "icmp")

_EVERY_V4 = ipaddress.IPv4Network("0.0.0.0/0")
_EVERY_V6 = ipaddress.IPv6Network("::/0")

RULE_EXAMPLES = "e.g. 10.0.0.0/8, 192.0.2.1:443, tcp:*:25 or udp:[2001:db8::]/32:53"
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
            raise UserError(f"{label}: missing ']' ({RULE_EXAMPLES})")
        inside, after = text[1:close], text[close + 1 :]
        if EVERY_ADDRESS in inside:
            raise _star_misused(label)
        prefix, colon, port = after.partition(":")
        if prefix and not prefix.startswith("/"):
            raise UserError(f"{label}: unexpected {after!r} after ']' ({RULE_EXAMPLES})")
        if after and not colon and not prefix:
            raise UserError(f"{label}: unexpected {after!r} after ']' ({RULE_EXAMPLES})")
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
            raise UserError(f"{label}: port {part!r} is not 1-65535 ({RULE_EXAMPLES})")
        ports.append(int(part))
    low, high = ports[0], ports[-1]
    if low > high:
        raise UserError(f"{label}: port range {text} is backwards")
    return low, high
