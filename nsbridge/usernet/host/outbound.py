"""The source address of the host side's outbound sockets (``--outbound-addr(6)``).

slirp4netns's ``--outbound-addr=IPv4|INTERFACE`` and ``--outbound-addr6=IPv6|INTERFACE``
bind every socket it opens towards the outside to that address, so a multi-homed host
can choose which of its addresses (and so, with source routing, which uplink) the
namespace's traffic leaves from.  Here one value, :class:`OutboundAddresses`, holds the
chosen address of each family, and every host-side path that opens an outbound socket
asks it (:meth:`OutboundAddresses.bind`) right after making the socket: the tun TCP
path, the fast path's dialer (and its DNS over TCP), UDP flows and ping (which the
native relay's sockets come from too), and the DNS proxy's upstream sockets.  No path
decides the address itself.

What binding does and does not do:

* It decides the **source**, never what is allowed: the policy has decided the flow
  before its socket exists.
* A family without an outbound address keeps the kernel's choice.
* A destination on the host's **loopback** (the gateway with host access, a resolver
  such as 127.0.0.53) is not bound: that traffic never leaves the host, and a
  loopback-only service (systemd-resolved's stub) ignores queries from another source.
  libslirp binds those too; that difference is deliberate (docs/slirp4netns.md).
* TCP sockets are bound with ``IP_BIND_ADDRESS_NO_PORT``: the port is then chosen at
  ``connect()`` for the 4-tuple, as without binding, rather than at ``bind()`` from the
  ports free for *every* destination (which would cap connections at the ephemeral
  range, about 28,000, for the whole host side).

The value is resolved once, at start, in the network namespace the host side dials
from (:func:`resolve`): an address must be one of this host's (a test bind, so a typo is
``EADDRNOTAVAIL`` at start rather than every flow failing later), an interface name
becomes the first address of that family the kernel lists for it (``getifaddrs()``'s
order, which slirp4netns takes), skipping what a source cannot be: loopback addresses
(``lo``'s), IPv6 link-local ones (they need a scope and reach only the link) and
addresses still tentative or whose duplicate address detection failed.  The text checks are sans-IO
(:func:`classify`, :func:`pick_interface_address`); the netlink dump is a few lines of
``struct``, like :mod:`.hostaddrs`'s, so the slirp4netns helper's start pays no import.
"""

from __future__ import annotations

import ipaddress
import os
import select
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from nsbridge.linux import rtaddr

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # <linux/in.h>
IFNAMSIZ = 16  # <linux/if.h>: names are at most 15 bytes

_DUMP_TIMEOUT = 5.0


class OutboundError(ValueError):
    """An outbound address that cannot be used; the text names the input and the fix."""


@dataclass(frozen=True)
class InterfaceAddress:
    """One address of an interface as the kernel lists it (``RTM_GETADDR``)."""

    index: int
    address: Address
    flags: int = 0  # IFA_F_*


@dataclass(frozen=True)
class OutboundAddresses:
    """The source address per family for outbound sockets (None: the kernel's choice)."""

    ipv4: ipaddress.IPv4Address | None = None
    ipv6: ipaddress.IPv6Address | None = None

    def __bool__(self) -> bool:
        return self.ipv4 is not None or self.ipv6 is not None

    def source_for(self, destination: str | bytes | Address) -> Address | None:
        """The address a socket towards ``destination`` (text, packed or an address) is
        bound to, or None: no outbound address for its family, or the host's loopback."""
        if isinstance(destination, (str, bytes)):
            text = destination.partition("%")[0] if isinstance(destination, str) else destination
            destination = ipaddress.ip_address(text)
        if destination.version == 6:
            mapped = destination.ipv4_mapped  # type: ignore[union-attr]
            if destination.is_loopback or (mapped is not None and mapped.is_loopback):
                return None
            return self.ipv6
        return None if destination.is_loopback else self.ipv4

    def bind(self, sock: socket.socket, destination: str | bytes | Address) -> None:
        """Bind ``sock`` (not yet connected) to the source for ``destination``; nothing
        when there is none.  Raises OSError as ``bind()`` does (the address was removed
        from the host while we run: ``EADDRNOTAVAIL``), which callers count as the
        flow's connect failure."""
        if self.ipv4 is None and self.ipv6 is None:
            return  # the default: nothing to bind, and nothing parsed per flow
        source = self.source_for(destination)
        if source is None or (sock.family == socket.AF_INET6) != (source.version == 6):
            return
        if sock.type == socket.SOCK_STREAM:
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((str(source), 0))

    def describe(self) -> str:
        """For the start-up log: ``IPv4 192.0.2.7, IPv6 the kernel's choice``."""
        kernel = "the kernel's choice"
        return ", ".join(f"IPv{version} {kernel if address is None else address}"
                         for version, address in ((4, self.ipv4), (6, self.ipv6)))


NONE = OutboundAddresses()


# ---- sans-IO: the text, and the choice among an interface's addresses --------------------


def classify(text: str, version: int, what: str) -> Address | str:
    """``text`` as an address of IP ``version``, or an interface name to look up;
    :class:`OutboundError` for what is neither, or an address no source can be."""
    other = 6 if version == 4 else 4
    hint = f"give an IPv{version} address of this host or an interface name"
    try:  # no zone index ("%eth0"): a source address is one of the host's, global
        address = None if "%" in text else ipaddress.ip_address(text)
    except ValueError:
        address = None
    if address is not None:
        if address.version != version:
            flag = "--outbound-addr6" if other == 6 else "--outbound-addr"
            raise OutboundError(f"{what} {text!r}: an IPv{other} address; {hint} "
                                f"(IPv{other} goes to {flag})")
        if address.is_unspecified or address.is_multicast or address.is_loopback:
            kind = ("an unspecified" if address.is_unspecified else
                    "a multicast" if address.is_multicast else "a loopback")
            raise OutboundError(f"{what} {text!r}: {kind} address cannot be the source of "
                                f"outbound traffic; {hint}")
        if address.version == 6 and address.is_link_local:
            raise OutboundError(f"{what} {text!r}: a link-local address reaches only its "
                                f"link; {hint}")
        return address
    if (not text or len(text.encode()) >= IFNAMSIZ or "/" in text or ":" in text or "%" in text
            or any(char.isspace() for char in text) or text in (".", "..")):
        raise OutboundError(f"{what} {text!r}: not an IPv{version} address or an "
                            f"interface name; {hint}")
    return text


def pick_interface_address(addresses: Iterable[InterfaceAddress], index: int,
                           version: int) -> Address | None:
    """The first usable address of ``version`` on interface ``index``, in the kernel's
    order (module doc), or None."""
    for entry in addresses:
        if entry.index != index or entry.address.version != version:
            continue
        if entry.flags & (rtaddr.IFA_F_TENTATIVE | rtaddr.IFA_F_DADFAILED):
            continue
        if entry.address.is_loopback or (entry.address.version == 6
                                         and entry.address.is_link_local):
            continue
        return entry.address
    return None


# ---- resolving, in the host side's namespace ---------------------------------------------


def resolve(outbound_addr: str | None, outbound_addr6: str | None) -> OutboundAddresses:
    """``--outbound-addr``/``--outbound-addr6`` as addresses of this namespace's host, or
    :class:`OutboundError` naming the input and what to give instead."""
    return OutboundAddresses(
        ipv4=_resolve_one(outbound_addr, 4, "--outbound-addr"),  # type: ignore[arg-type]
        ipv6=_resolve_one(outbound_addr6, 6, "--outbound-addr6"))  # type: ignore[arg-type]


def _resolve_one(text: str | None, version: int, what: str) -> Address | None:
    if text is None:
        return None
    found = classify(text, version, what)
    if isinstance(found, str):
        try:
            index = socket.if_nametoindex(found)
        except OSError:
            raise OutboundError(f"{what} {found!r}: no such interface (and not an "
                                f"IPv{version} address); see `ip -br addr` for this "
                                "host's interfaces and addresses") from None
        address = pick_interface_address(interface_addresses(version), index, version)
        if address is None:
            usable = "global " if version == 6 else ""
            raise OutboundError(f"{what} {found!r}: the interface has no usable {usable}"
                                f"IPv{version} address; give an address or another "
                                "interface")
        found = address
    _check_local(found, what, text)
    return found


def _check_local(address: Address, what: str, text: str) -> None:
    """A test bind: the address must be one this host can send from, now."""
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((str(address), 0))
        except OSError as exc:
            name = os.strerror(exc.errno or 0)
            shown = text if text == str(address) else f"{text} ({address})"
            raise OutboundError(f"{what} {shown}: cannot be bound ({name}): it is not an "
                                "address of this host; give one of its addresses "
                                "(`ip -br addr`) or an interface name") from None


def interface_addresses(version: int) -> list[InterfaceAddress]:
    """Every address of IP ``version`` in this namespace, in the kernel's dump order."""
    family = socket.AF_INET6 if version == 6 else socket.AF_INET
    found: list[InterfaceAddress] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                       socket.NETLINK_ROUTE) as sock:
        sock.send(rtaddr.dump_request(family, 1))
        while True:
            if not select.select([sock], [], [], _DUMP_TIMEOUT)[0]:
                raise TimeoutError("netlink: the address dump did not finish")
            data = sock.recv(1 << 16)
            if _parse_dump(data, family, found):
                return found


def _parse_dump(data: bytes, family: int, found: list[InterfaceAddress]) -> bool:
    """Append the addresses in one datagram of the dump; True at its end."""
    for kind, _seq, body in rtaddr.messages(data):
        if kind == rtaddr.NLMSG_DONE:
            return True
        if kind == rtaddr.NLMSG_ERROR:
            code = rtaddr.error_code(body)
            raise OSError(code, f"netlink address dump: {os.strerror(code)}")
        if kind == rtaddr.RTM_NEWADDR:
            message = rtaddr.parse_ifaddr(body)
            if message is not None and message.family == family and message.local:
                found.append(InterfaceAddress(message.index,
                                              ipaddress.ip_address(message.local),
                                              message.flags))
    return False
