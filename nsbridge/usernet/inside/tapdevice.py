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
  refuses to change a running TAP's address), then configured as :func:`.netconf.configure`
  configures ``nsbridge run``'s tun device: ``lo`` up, MTU, network+100, the default route
  via network+2, and IPv6 when the configuration has it.

Runs in the forked helper that entered the namespace (:mod:`.helper`), like :mod:`.netconf`.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
from dataclasses import dataclass

from nsbridge.errors import SetupError, describe_oserror
from nsbridge.usernet.inside.netconf import (
    IFF_NO_PI,
    IFF_VNET_HDR,
    IFNAMSIZ,
    OFFLOAD_NAMES,
    TUN_PATH,
    TUNSETIFF,
    TUNSETVNETHDRSZ,
    VNET_HDR_SIZE,
    NetConfig,
    Tun,
    _set_offloads,
    _step,
    configure,
)

IFF_TAP = 0x0002


@dataclass(frozen=True)
class TapRequest:
    """Which TAP device to serve: its name, whether to create and configure it (``-c``),
    and the MAC address to give it then (``--macaddress``, ``aa:bb:cc:dd:ee:ff``)."""

    name: str = "tap0"
    create: bool = False
    mac: str | None = None


def open_tap(request: TapRequest, offload: bool = True) -> Tun:
    """Open (and with ``create``, make) the TAP device in the calling thread's namespace,
    with the virtio-net header and offloads the engine reads tun devices with."""
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
        ifr = struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
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
        try:
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_SIZE))
        except OSError as exc:
            raise SetupError(f"TAP device {ifname}: TUNSETVNETHDRSZ failed: "
                             f"{describe_oserror(exc)}") from None
        flags = _set_offloads(fd, offload)
        names = tuple(label for bit, label in OFFLOAD_NAMES.items() if flags & bit)
        return Tun(fd, ifname, names)
    except BaseException:
        os.close(fd)
        raise


def configure_tap(config: NetConfig, request: TapRequest) -> bool:
    """``-c``: the MAC address first (while the device is down), then the addresses and
    routes.  Returns whether IPv6 is configured (see :func:`.netconf.configure`)."""
    if request.mac is not None:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            (index,) = _step(f"find {request.name}", ipr.link_lookup, ifname=request.name)
            _step(f"set MAC address {request.mac} on {request.name}", ipr.link, "set",
                  index=index, address=request.mac)
    return configure(config, request.name)


def mac_address(ifname: str) -> str:
    """The device's MAC address as ``aa:bb:cc:dd:ee:ff`` (SIOCGIFHWADDR)."""
    SIOCGIFHWADDR = 0x8927
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            result = fcntl.ioctl(sock.fileno(), SIOCGIFHWADDR,
                                 struct.pack("16s16x", ifname.encode()))
        except OSError as exc:
            raise SetupError(f"cannot read the MAC address of {ifname}: "
                             f"{describe_oserror(exc)}") from None
    return ":".join(f"{byte:02x}" for byte in result[18:24])


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
    tap = open_tap(request, config.offload)
    fds = [tap.fd]
    try:
        ipv6 = configure_tap(config, request) if request.create else config.ipv6 is not None
        fds.append(os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC))
        fds.append(os.open("/proc/self/ns/user", os.O_RDONLY | os.O_CLOEXEC))
        mac = mac_address(tap.ifname)
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
        "guest_mac": mac,
    }
    return header, fds
