"""Network setup *inside* a user-mode namespace: the tun device, addresses, routes, DNS file.

Everything here runs in a process that already lives in the target network namespace (the
forked helper of :mod:`nsbridge.usernet.inside.sandbox`).  It is kept apart from the fork/namespace
plumbing so each half can be read on its own: this file says *what* the namespace looks
like, ``sandbox.py`` says *how* we get into it and hand the results back.

Errors are raised as :class:`SetupError` with a message a user can act on; the helper sends
that text to the parent, which turns it into a :class:`~nsbridge.errors.UserError`.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass, replace
from typing import Any

from nsbridge.defaults import MAX_MTU, MIN_MTU, TUN_IFNAME
from nsbridge.errors import SetupError, UserError, describe_oserror
from nsbridge.usernet.proto.addresses import UsernetAddresses

TUN_PATH = "/dev/net/tun"

# <linux/if_tun.h>: _IOW('T', 202, int) and friends.
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_TUN_EXCL = 0x8000  # fail with EBUSY rather than silently reuse an existing device

TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_USO4 = 0x20
TUN_F_USO6 = 0x40
OFFLOAD_NAMES = {
    TUN_F_CSUM: "csum",
    TUN_F_TSO4: "tso4",
    TUN_F_TSO6: "tso6",
    TUN_F_USO4: "uso4",
    TUN_F_USO6: "uso6",
}
# Tried in order, richest first: UDP segmentation offload (USO) needs Linux 6.2, TSO and
# checksum offload are much older.  TSO_ECN is never asked for: it would make the engine
# split segments on CWR, for no gain.
_OFFLOAD_CHOICES = (
    TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_USO4 | TUN_F_USO6,
    TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6,
    TUN_F_CSUM,
    0,
)

# struct virtio_net_hdr (no mergeable buffers): flags, gso_type, hdr_len, gso_size,
# csum_start, csum_offset.  Every frame read from or written to the tun starts with it.
VNET_HDR_SIZE = 10

IFA_F_NODAD = 0x02  # <linux/if_addr.h>: the address is usable at once, no DAD wait
IFNAMSIZ = 16

@dataclass(frozen=True, init=False)
class NetConfig:
    """How the namespace's side of user-mode networking looks: the tun device (its name and
    offloads) carrying the one address model, :class:`UsernetAddresses`, with or without
    IPv6.

    The addresses are the same value the policy and the engine use, so the namespace
    cannot be configured with one gateway while the host side answers for another.  Their
    defaults are slirp4netns's plan (:mod:`nsbridge.defaults`).
    ``mtu`` replaces the addresses' MTU (the library's shortcut; :meth:`validate` checks
    it), and ``ipv6=False`` (or None) gives an IPv4-only namespace.  The properties below
    are the views the set-up reads: the namespace's address with its prefix, gateway and
    DNS address per family.
    """

    addresses: UsernetAddresses
    ifname: str
    dual_stack: bool
    offload: bool

    def __init__(self, addresses: UsernetAddresses | None = None, *, ifname: str = TUN_IFNAME,
                 mtu: int | None = None, ipv6: bool | None = True,
                 offload: bool = True) -> None:
        chosen = UsernetAddresses() if addresses is None else addresses
        if mtu is not None and mtu != chosen.mtu:
            chosen = replace(chosen, mtu=mtu)
        object.__setattr__(self, "addresses", chosen)
        object.__setattr__(self, "ifname", ifname)
        object.__setattr__(self, "dual_stack", bool(ipv6))
        object.__setattr__(self, "offload", offload)

    @property
    def mtu(self) -> int:
        return self.addresses.mtu

    @property
    def ipv4(self) -> ipaddress.IPv4Interface:
        return self.addresses.interface

    @property
    def gateway4(self) -> ipaddress.IPv4Address:
        return self.addresses.gateway

    @property
    def dns4(self) -> ipaddress.IPv4Address:
        return self.addresses.dns

    @property
    def ipv6(self) -> ipaddress.IPv6Interface | None:
        """The namespace's IPv6 address with its prefix; None in an IPv4-only namespace."""
        return self.addresses.interface6 if self.dual_stack else None

    @property
    def gateway6(self) -> ipaddress.IPv6Address:
        return self.addresses.gateway6

    @property
    def dns6(self) -> ipaddress.IPv6Address:
        return self.addresses.dns6

    def validate(self) -> None:
        """Refuse a bad configuration in the parent, before any process is forked."""
        name = self.ifname
        if (
            not name
            or len(name) >= IFNAMSIZ
            or "/" in name
            or any(c.isspace() for c in name)
            or name in (".", "..")
        ):
            raise UserError(f"bad interface name {name!r}: 1-15 characters, no '/' or spaces")
        if not MIN_MTU <= self.mtu <= MAX_MTU:  # the bounds --mtu is checked against
            raise UserError(f"bad MTU {self.mtu}: must be between {MIN_MTU} and {MAX_MTU}")
        if self.gateway4 not in self.ipv4.network:
            raise UserError(f"gateway {self.gateway4} is not inside {self.ipv4.network}")
        if self.ipv6 is not None and self.gateway6 not in self.ipv6.network:
            raise UserError(f"gateway {self.gateway6} is not inside {self.ipv6.network}")

    def resolv_conf(self) -> str:
        """The namespace's /etc/resolv.conf: only our DNS addresses, which the engine serves."""
        lines = [
            "# written by nsbridge: DNS is answered by the host side of nsbridge",
            f"nameserver {self.dns4}",
        ]
        if self.ipv6 is not None:
            lines.append(f"nameserver {self.dns6}")
        return "\n".join(lines) + "\n"


@dataclass
class Tun:
    """An open tun device: the fd, its name and the offloads the kernel accepted."""

    fd: int
    ifname: str
    offloads: tuple[str, ...]
    vnet_hdr_size: int = VNET_HDR_SIZE


def open_tun(config: NetConfig, path: str = TUN_PATH, *, ifname: str | None = None,
             vnet: bool = True) -> Tun:
    """Create the tun device in the *calling thread's* network namespace.

    The device lands in the namespace current at ``open()`` time (the kernel records it
    when /dev/net/tun is opened), so this must run after entering the namespace.
    ``ifname`` defaults to the config's; ``vnet=False`` makes a plain device (no virtio
    header, no offloads), as the native relay reads it.
    """
    ifname = config.ifname if ifname is None else ifname
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SetupError(
            f"{path} does not exist: load the tun module (`modprobe tun`) or, in a "
            "container, give it the device (e.g. `--device /dev/net/tun`)"
        ) from None
    except PermissionError:
        raise SetupError(
            f"permission denied opening {path}: it must be readable and writable by your "
            f"user (most systems ship it mode 0666; `chmod 0666 {path}`) or run as root"
        ) from None
    except OSError as exc:
        if exc.errno in (errno.ENODEV, errno.ENXIO):
            raise SetupError(
                f"{path} has no driver behind it: load the tun module (`modprobe tun`)"
            ) from None
        raise SetupError(f"cannot open {path}: {describe_oserror(exc)}") from None
    try:
        flags = IFF_TUN | IFF_NO_PI | IFF_TUN_EXCL | (IFF_VNET_HDR if vnet else 0)
        ifr = struct.pack("16sH22x", ifname.encode(), flags)
        try:
            result = fcntl.ioctl(fd, TUNSETIFF, ifr)
        except OSError as exc:
            hint = ""
            if exc.errno == errno.EPERM:
                hint = " (no CAP_NET_ADMIN over this network namespace)"
            elif exc.errno == errno.EBUSY:
                hint = (
                    " (a device of that name already exists in the namespace: is "
                    "nsbridge already attached to it?)"
                )
            raise SetupError(
                f"cannot create tun device {ifname}: {describe_oserror(exc)}{hint}"
            ) from None
        ifname = result[:IFNAMSIZ].split(b"\0", 1)[0].decode()
        if not vnet:
            return Tun(fd, ifname, (), 0)
        try:
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_SIZE))
        except OSError as exc:
            raise SetupError(
                f"tun device {ifname}: TUNSETVNETHDRSZ failed: {describe_oserror(exc)}"
            ) from None
        flags = _set_offloads(fd, config.offload)
        names = tuple(name for bit, name in OFFLOAD_NAMES.items() if flags & bit)
        return Tun(fd, ifname, names)
    except BaseException:
        os.close(fd)
        raise


def _set_offloads(fd: int, wanted: bool) -> int:
    """Ask for the richest offload set this kernel accepts; return the flags in force."""
    choices = _OFFLOAD_CHOICES if wanted else (0,)
    for flags in choices:
        try:
            fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
            return flags
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise SetupError(f"TUNSETOFFLOAD failed: {describe_oserror(exc)}") from None
    return 0


def configure(config: NetConfig, ifname: str) -> bool:
    """Bring ``lo`` and ``ifname`` up with addresses, MTU and default routes, over netlink.

    Returns whether IPv6 is configured: a namespace whose kernel has IPv6 switched off
    (``ipv6.disable=1``, ``disable_ipv6``) still gets working IPv4 rather than an error.
    """
    # Imported by the parent before fork (see sandbox.py), so this is only a lookup here.
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    ipv6 = config.ipv6 is not None
    with IPRoute() as ipr:
        lo = _step("find lo", ipr.link_lookup, ifname="lo")
        if lo:
            _step("bring lo up", ipr.link, "set", index=lo[0], state="up")
        found = _step(f"find {ifname}", ipr.link_lookup, ifname=ifname)
        if not found:
            raise SetupError(f"tun device {ifname} vanished before it could be configured")
        index = found[0]
        _step(f"set MTU {config.mtu} on {ifname}", ipr.link, "set", index=index, mtu=config.mtu)
        _step(f"bring {ifname} up", ipr.link, "set", index=index, state="up")
        _step(
            f"add {config.ipv4} to {ifname}",
            ipr.addr,
            "add",
            index=index,
            address=str(config.ipv4.ip),
            prefixlen=config.ipv4.network.prefixlen,
        )
        if config.ipv6 is not None:
            what = f"add {config.ipv6} to {ifname}"
            try:
                ipr.addr(
                    "add",
                    index=index,
                    address=str(config.ipv6.ip),
                    prefixlen=config.ipv6.network.prefixlen,
                    flags=IFA_F_NODAD,
                    family=socket.AF_INET6,
                )
            except (NetlinkError, OSError) as exc:
                if getattr(exc, "code", None) not in _IPV6_OFF:
                    raise _netlink_error(what, exc) from None
                ipv6 = False
        _step(
            f"add default route via {config.gateway4}",
            ipr.route,
            "add",
            dst="0.0.0.0/0",
            gateway=str(config.gateway4),
            oif=index,
        )
        if ipv6:
            _step(
                f"add default route via {config.gateway6}",
                ipr.route,
                "add",
                family=socket.AF_INET6,
                dst="::/0",
                gateway=str(config.gateway6),
                oif=index,
            )
    return ipv6


# What adding an IPv6 address fails with when IPv6 is off in this namespace or kernel.
_IPV6_OFF = (errno.EACCES, errno.EAFNOSUPPORT, errno.EOPNOTSUPP)


def _step(what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run one netlink request, turning its error into a message naming the step."""
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        return fn(*args, **kwargs)
    except (NetlinkError, OSError) as exc:
        raise _netlink_error(what, exc) from None


def _netlink_error(what: str, exc: Exception) -> SetupError:
    """pyroute2's NetlinkError carries ``.code``; a plain OSError carries ``.errno``."""
    code = getattr(exc, "code", None) or getattr(exc, "errno", None)
    text = os.strerror(code) if isinstance(code, int) and code > 0 else str(exc)
    hint = ""
    if code == errno.EEXIST and "route" in what:
        hint = " (the namespace already has a default route)"
    elif code == errno.EEXIST:
        hint = " (already present: is nsbridge already attached to this namespace?)"
    elif code == errno.EPERM:
        hint = " (no CAP_NET_ADMIN over this network namespace)"
    return SetupError(f"netlink: cannot {what}: {text}{hint}")


# The native relay's device (see flowrelay.py): a second tun, and routing rules that send
# the namespace's ICMP and UDP (both IP versions) to it through a table of its own, except
# DNS (UDP to port 53, which the engine answers from its own device).  The priorities put
# the rules after "local" (traffic to the namespace's own addresses stays inside) and
# before "main".
RELAY_IFNAME = "nsb-relay"
RELAY_TABLE = 0x6E73  # "ns"
# A UDP sender in the namespace writes bursts faster than one thread reads them; the
# default 500-packet queue dropped ~1% at 1 Gbit/s of 1400-byte datagrams, this none.
RELAY_TXQLEN = 4096
RELAY_RULES = (  # (priority, IP protocol, destination port or None, table), both families
    (100, "icmp", None, RELAY_TABLE),
    (101, 17, 53, 254),  # main
    (102, 17, None, RELAY_TABLE),
)
_ICMP = {socket.AF_INET: 1, socket.AF_INET6: 58}


def configure_relay_device(config: NetConfig, ifname: str, icmp: bool = True,
                           ipv6: bool = True) -> None:
    """Route the namespace's UDP but DNS, and ICMP echo with ``icmp``, to ``ifname``, the
    native relay's device; IPv6 too with ``ipv6`` (the namespace has it configured).

    The device has no address of its own: a second copy of the namespace's address
    would make the kernel pick it for broadcasts, which find their device by source
    address.  Reverse-path filtering is switched off for it, which would drop whatever
    arrives on an address-less interface, and for the main device, where DNS answers
    arrive for queries whose reverse route (ports swapped) is this device; "all" too
    when set, since the stricter value applies.  Every packet on this namespace's
    devices comes from nsbridge, so the filter protects nothing here.  Without
    ``ipv6``, IPv6 is switched off on the device.
    """
    from pyroute2 import IPRoute

    conf = "/proc/sys/net/ipv4/conf"
    try:
        for device in (ifname, config.ifname, "all"):
            if _read_sysctl(f"{conf}/{device}/rp_filter") != "0":
                _write_sysctl(f"{conf}/{device}/rp_filter", "0")
    except OSError as exc:
        raise SetupError(f"cannot switch off rp_filter for {ifname}: "
                         f"{describe_oserror(exc)}") from None
    if not ipv6:
        try:  # no IPv6 in this kernel or namespace: nothing to switch off
            _write_sysctl(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6", "1")
        except OSError:
            pass
    with IPRoute() as ipr:
        found = _step(f"find {ifname}", ipr.link_lookup, ifname=ifname)
        if not found:
            raise SetupError(f"tun device {ifname} vanished before it could be configured")
        index = found[0]
        _step(f"set MTU {config.mtu} and queue length on {ifname}", ipr.link, "set",
              index=index, mtu=config.mtu, txqlen=RELAY_TXQLEN)
        address = str(config.ipv4.ip)
        _step(f"bring {ifname} up", ipr.link, "set", index=index, state="up")
        _step(f"route table {RELAY_TABLE} to {ifname}", ipr.route, "add", table=RELAY_TABLE,
              dst="0.0.0.0/0", oif=index, prefsrc=address)
        families = [socket.AF_INET]
        if ipv6 and config.ipv6 is not None:
            families.append(socket.AF_INET6)
            _step(f"route table {RELAY_TABLE} to {ifname} (IPv6)", ipr.route, "add",
                  family=socket.AF_INET6, table=RELAY_TABLE, dst="::/0", oif=index,
                  prefsrc=str(config.ipv6.ip))
        for family in families:
            for priority, proto, dport, table in RELAY_RULES:
                if proto == "icmp" and not icmp:
                    continue
                number = _ICMP[family] if proto == "icmp" else proto
                ports = {} if dport is None else {"dport_range": f"{dport}:{dport}"}
                _step(f"add routing rule {priority} (ipproto {number}, lookup {table})",
                      ipr.rule, "add", family=family, priority=priority, table=table,
                      ip_proto=number, **ports)


def _write_sysctl(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read_sysctl(path: str) -> str:
    with open(path) as f:
        return f.read().strip()
