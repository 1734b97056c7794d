"""Which clients a forward accepts: ``--allow`` / ``--deny`` networks.

A forward often exposes a service that was private to its namespace, so "who may use
it" belongs next to "where it listens".  Rules are parsed once at start (a typo is an
error naming the entry, not a silently open forward) and checked per accepted client.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from nsbridge.errors import UserError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_EXAMPLES = "e.g. 10.0.0.0/8, 192.0.2.7, fd00::/8 or ::1"


@dataclass(frozen=True)
class ClientAcl:
    """Allow and deny networks, and the decision for one client.

    Semantics of :meth:`permits`:

    * no rules at all: every client is permitted;
    * a client matching any deny rule is refused, even if an allow rule matches too
      (deny wins, so ``--allow 10.0.0.0/8 --deny 10.0.0.5`` carves out one host);
    * if at least one allow rule exists, a client must match one of them;
    * IPv4-mapped IPv6 clients (``::ffff:127.0.0.1``, what a dual-stack ``[::]``
      listener reports for IPv4 clients) are matched as their IPv4 address, so
      ``--deny 127.0.0.0/8`` blocks them too.  Likewise a rule written inside
      ``::ffff:0:0/96`` is stored as its IPv4 network.  ``::/0`` therefore matches IPv6
      clients only; write ``0.0.0.0/0`` for IPv4;
    * Unix-socket clients (sockaddr not an ``(host, port, …)`` tuple) have no IP address:
      no rule can name them, so they are permitted only when there are no allow rules —
      an allow list means "only these networks", and a Unix client is in none.
    """

    allow: tuple[Network, ...] = ()
    deny: tuple[Network, ...] = ()

    @classmethod
    def parse(
        cls,
        allow: Iterable[str],
        deny: Iterable[str],
        *,
        allow_name: str = "--allow",
        deny_name: str = "--deny",
    ) -> ClientAcl:
        """Parse CIDRs or single addresses; a :class:`UserError` names the first bad one.

        ``allow_name``/``deny_name`` are how the user wrote them (a config file key, say).
        """
        return cls(
            tuple(parse_network(text, what=allow_name) for text in allow),
            tuple(parse_network(text, what=deny_name) for text in deny),
        )

    def __bool__(self) -> bool:
        """True when there is any rule: callers can skip the check on open forwards."""
        return bool(self.allow or self.deny)

    def permits(self, sockaddr: object) -> bool:
        """Whether a client with this ``getpeername()`` sockaddr may connect."""
        address = client_address(sockaddr)
        if address is None:
            return not self.allow
        if _matches(address, self.deny):
            return False
        return not self.allow or _matches(address, self.allow)


def _matches(address: IPAddress, networks: tuple[Network, ...]) -> bool:
    # ``in`` is False across IP versions, so mixed lists need no sorting out.
    return any(address in network for network in networks)


def client_address(sockaddr: object) -> IPAddress | None:
    """The IP address an ACL sees for a sockaddr: mapped IPv6 unwrapped, zone dropped.

    None for anything that is not an IP sockaddr (Unix path, abstract name, unnamed).
    """
    if not (isinstance(sockaddr, tuple) and sockaddr and isinstance(sockaddr[0], str)):
        return None
    try:
        address = ipaddress.ip_address(sockaddr[0].partition("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def parse_network(text: str, *, what: str) -> Network:
    """``10.0.0.0/8``, ``192.0.2.7`` (a /32), ``fd00::/8``, ``::1`` -> a network.

    Host bits must be clear: ``10.0.0.1/8`` is refused with the network it probably
    meant, because silently widening a rule is the wrong surprise in access control.
    """
    shown = _show(text)
    address_text, slash, prefix_text = text.partition("/")
    try:
        if "%" in address_text:
            raise ValueError
        address = ipaddress.ip_address(address_text)
    except ValueError:
        raise UserError(
            f"{what} {shown}: not a network ({_show(address_text)} is not an IPv4 or IPv6 "
            f"address; {_EXAMPLES})"
        ) from None
    max_prefix = address.max_prefixlen
    if slash and not (
        prefix_text.isascii() and prefix_text.isdigit() and int(prefix_text) <= max_prefix
    ):
        raise UserError(
            f"{what} {shown}: not a network (prefix length /{prefix_text} is not "
            f"0-{max_prefix} for IPv{address.version})"
        )
    prefix = int(prefix_text) if slash else max_prefix
    network = ipaddress.ip_network((address, prefix), strict=False)
    if network.network_address != address:
        raise UserError(f"{what} {shown}: not a network (host bits set; did you mean {network}?)")
    return _unmap(network)


def _unmap(network: Network) -> Network:
    """``::ffff:10.0.0.0/104`` -> ``10.0.0.0/8``: clients are matched in IPv4 terms."""
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_MAPPED):
        mapped = network.network_address.ipv4_mapped
        assert mapped is not None
        return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def _show(text: str) -> str:
    """The entry as typed, quoted only when it would otherwise be invisible or ambiguous."""
    if text and text.isprintable() and " " not in text:
        return text
    return repr(text)
