"""The TAP (layer 2) device slirp4netns's callers expect, opened or created inside the namespace.

slirp4netns serves an Ethernet device, and its callers depend on that: rootlesskit
creates a persistent ``tap0`` itself and configures IPv4 on it, then starts slirp4netns
*without* ``-c`` to serve it; podman passes ``-c`` and lets slirp4netns create and
configure it.  So there are two requests, and they must not be confused:

* without ``create``, the device must already exist: opening a name that does not exist
  would silently make a fresh, unconfigured device that nobody routes through, and the
  caller would see a helper that is "ready" but carries nothing;
* with ``create``, the device is made (or, as slirp4netns does, a persistent one of that
  name is attached to), given the MAC address asked for before it goes up (the kernel
  refuses to change a running TAP's address), then configured with the addresses
  ``nsbridge run``'s tun device gets: ``lo`` up, MTU, network+100, the default route via
  network+2, and IPv6 when the configuration has it (:func:`configure_tap`).

Runs in the forked helper that entered the namespace (:mod:`.helper`), like :mod:`.netconf`.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass

from nsbridge.errors import SetupError, describe_oserror
from nsbridge.usernet.inside.netconf import (
    IFF_NO_PI,
    IFNAMSIZ,
    TUN_PATH,
    TUNSETIFF,
    NetConfig,
    Tun,
)

IFF_TAP = 0x0002
IFF_UP = 0x1
IFF_RUNNING = 0x40
ARPHRD_ETHER = 1
RTF_UP = 0x1
RTF_GATEWAY = 0x2
# <linux/sockios.h>
SIOCADDRT = 0x890B
SIOCSIFFLAGS = 0x8914
SIOCSIFADDR = 0x8916
SIOCSIFNETMASK = 0x891C
SIOCSIFMTU = 0x8922
SIOCSIFHWADDR = 0x8924
# What an IPv6 socket or address fails with when IPv6 is off in this namespace or kernel.
_IPV6_OFF = (errno.EACCES, errno.EAFNOSUPPORT, errno.EOPNOTSUPP)


@dataclass(frozen=True)
class TapRequest:
    """Which TAP device to serve: its name, whether to create and configure it (``-c``),
    and the MAC address to give it then (``--macaddress``, ``aa:bb:cc:dd:ee:ff``)."""

    name: str = "tap0"
    create: bool = False
    mac: str | None = None


def open_tap(request: TapRequest) -> Tun:
    """Open (and with ``create``, make) the TAP device in the calling thread's namespace:
    ``IFF_TAP | IFF_NO_PI``, whole Ethernet frames without a virtio header, as the
    engine's TAP link reads them (:mod:`nsbridge.usernet.host.tap`)."""
    name = request.name
    if not request.create and not _exists(name):
        raise SetupError(
            f"TAP device {name} does not exist in the namespace: create it first (e.g. "
            f"`ip tuntap add {name} mode tap`) or pass -c to let nsbridge create it")
    try:
        fd = os.open(TUN_PATH, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise SetupError(f"cannot open {TUN_PATH}: {describe_oserror(exc)}") from None
    try:
        ifr = struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI)
        try:
            result = fcntl.ioctl(fd, TUNSETIFF, ifr)
        except OSError as exc:
            hint = ""
            if exc.errno == errno.EINVAL:
                hint = " (a device of that name exists and is not a TAP device)"
            elif exc.errno == errno.EPERM:
                hint = " (no CAP_NET_ADMIN over this network namespace, or the device " \
                       "belongs to another user)"
            elif exc.errno == errno.EBUSY:
                hint = " (another program is already attached to it)"
            raise SetupError(f"cannot open TAP device {name}: "
                             f"{describe_oserror(exc)}{hint}") from None
        ifname = result[:IFNAMSIZ].split(b"\0", 1)[0].decode()
        return Tun(fd, ifname, (), 0)
    except BaseException:
        os.close(fd)
        raise


def configure_tap(config: NetConfig, request: TapRequest) -> bool:
    """``-c``: what slirp4netns does, with the same ioctls (no netlink library to load:
    podman pays this on every container start) — ``lo`` up, the MAC address while the
    device is still down (a running TAP refuses a new one), the device up, MTU, the
    address and netmask, the default route via the gateway; then IPv6 when configured:
    the address (duplicate detection switched off first, as ``nsbridge run`` adds its
    address with ``nodad``) and the default route.  Returns whether IPv6 is configured:
    a namespace whose kernel has IPv6 off still gets working IPv4."""
    name = request.name
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        fd = sock.fileno()
        _ioctl(fd, SIOCSIFFLAGS, _ifreq_flags("lo", IFF_UP | IFF_RUNNING), "bring lo up")
        if request.mac is not None:
            mac = bytes.fromhex(request.mac.replace(":", ""))
            _ioctl(fd, SIOCSIFHWADDR, struct.pack("16sH14s8x", name.encode(), ARPHRD_ETHER,
                                                  mac), f"set MAC address {request.mac}")
        if config.ipv6 is not None:
            _no_dad(name)  # before the device is up: its link-local address too
        _ioctl(fd, SIOCSIFFLAGS, _ifreq_flags(name, IFF_UP | IFF_RUNNING), f"bring {name} up")
        _ioctl(fd, SIOCSIFMTU, struct.pack("16si20x", name.encode(), config.mtu),
               f"set MTU {config.mtu} on {name}")
        interface = config.ipv4
        _ioctl(fd, SIOCSIFADDR, _ifreq_inet(name, interface.ip), f"add {interface} to {name}")
        _ioctl(fd, SIOCSIFNETMASK, _ifreq_inet(name, interface.netmask),
               f"set netmask {interface.netmask} on {name}")
        _ioctl(fd, SIOCADDRT, _rtentry_default_via(config.gateway4),
               f"add default route via {config.gateway4}")
    if config.ipv6 is None:
        return False
    return _configure_ipv6(config, name)


def _no_dad(name: str) -> None:
    """Duplicate address detection off for the device: its addresses are usable at once
    (nobody else is on this link but nsbridge)."""
    try:
        with open(f"/proc/sys/net/ipv6/conf/{name}/accept_dad", "w") as f:
            f.write("0")
    except OSError:
        pass  # no IPv6 here (found out below), or the sysctl is not ours: DAD then runs


def _configure_ipv6(config: NetConfig, name: str) -> bool:
    assert config.ipv6 is not None
    index = socket.if_nametoindex(name)
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    except OSError as exc:
        if exc.errno in _IPV6_OFF:
            return False
        raise SetupError(f"cannot open an IPv6 socket: {describe_oserror(exc)}") from None
    with sock:
        address = struct.pack("16sIi", config.ipv6.ip.packed, config.ipv6.network.prefixlen,
                              index)
        try:
            fcntl.ioctl(sock.fileno(), SIOCSIFADDR, address)
        except OSError as exc:
            if exc.errno in _IPV6_OFF:
                return False
            raise _failed(f"add {config.ipv6} to {name}", exc) from None
        # struct in6_rtmsg: dst, src, gateway, type, dst_len, src_len, metric, info,
        # flags, ifindex.
        route = struct.pack("16s16s16sIHHI4xQIi", bytes(16), bytes(16),
                            config.gateway6.packed, 0, 0, 0, 1, 0, RTF_UP | RTF_GATEWAY,
                            index)
        _ioctl(sock.fileno(), SIOCADDRT, route, f"add default route via {config.gateway6}")
    return True


# struct rtentry (<net/route.h>, 64-bit): pad, dst, gateway, genmask (struct sockaddr
# each), flags, pad, pad, pad, metric, dev (NULL: the kernel finds the device by the
# gateway), mtu, window, irtt.
_RTENTRY = struct.Struct("Q16s16s16sHh4xQQh6xQQQH6x")


def _rtentry_default_via(gateway: ipaddress.IPv4Address) -> bytes:
    return _RTENTRY.pack(0, _sockaddr_in(ipaddress.IPv4Address(0)), _sockaddr_in(gateway),
                         _sockaddr_in(ipaddress.IPv4Address(0)), RTF_UP | RTF_GATEWAY, 0,
                         0, 0, 0, 0, 0, 0, 0)


def _sockaddr_in(address: ipaddress.IPv4Address) -> bytes:
    return struct.pack("=HH4s8x", socket.AF_INET, 0, address.packed)


def _ifreq_inet(name: str, address: ipaddress.IPv4Address) -> bytes:
    return struct.pack("16sHH4s8x8x", name.encode(), socket.AF_INET, 0, address.packed)


def _ifreq_flags(name: str, flags: int) -> bytes:
    return struct.pack("16sH22x", name.encode(), flags)


def _ioctl(fd: int, request: int, data: bytes, what: str) -> None:
    try:
        fcntl.ioctl(fd, request, data)
    except OSError as exc:
        raise _failed(what, exc) from None


def _failed(what: str, exc: OSError) -> SetupError:
    hint = ""
    if exc.errno == errno.EEXIST:
        hint = " (already present: is the device already configured?)"
    elif exc.errno == errno.EPERM:
        hint = " (no CAP_NET_ADMIN over this network namespace)"
    return SetupError(f"cannot {what}: {describe_oserror(exc)}{hint}")


def _exists(name: str) -> bool:
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


def tap_here(config: NetConfig, request: TapRequest) -> tuple[dict, list[int]]:
    """The helper's work for a TAP: open (and with ``create`` configure) the device in the
    namespace we are in.  (header, [tap, netns, userns]), as :func:`.childsetup._configure_here`
    returns for a tun device, plus ``link`` and ``guest_mac`` for the engine."""
    tap = open_tap(request)
    fds = [tap.fd]
    try:
        ipv6 = configure_tap(config, request) if request.create else config.ipv6 is not None
        fds.append(os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC))
        fds.append(os.open("/proc/self/ns/user", os.O_RDONLY | os.O_CLOEXEC))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    header = {
        "ifname": tap.ifname,
        "offloads": list(tap.offloads),
        "vnet_hdr_size": tap.vnet_hdr_size,
        "ipv6": ipv6,
        "extra": 0,
        "link": "tap",
        # Known in advance only when the caller fixed it; else the engine learns it from
        # the guest's frames (a caller may still change it after we are ready).
        "guest_mac": request.mac,
    }
    return header, fds
