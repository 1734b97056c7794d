"""The tun engine on a TAP device: Ethernet frames in, IP packets to the engine.

slirp4netns's callers (rootlesskit, podman) give it a TAP device, whose frames are
Ethernet, not the L3 tun frames :class:`~.engine.TunEngine` reads.  :class:`TapEngine` is
that engine with its reader and writer replaced, chosen once when the engine is built,
so the tun path's per-frame code is untouched and no slower:

* **Reading**: one ``readv`` puts the 14-byte Ethernet header in a buffer of its own and
  the IP packet at the start of the engine's read buffer, exactly where the tun reader
  puts it, so the IPv4 ping fast path and :meth:`~.engine.TunEngine.handle_frame` work
  unchanged.  ARP, IPv6 neighbour discovery and DHCP requests are answered here
  (:mod:`~nsbridge.usernet.proto.arp`, :mod:`~nsbridge.usernet.proto.ndp`,
  :mod:`~nsbridge.usernet.proto.dhcp`); every other IPv4/IPv6 packet goes to the engine,
  and with it to the policy.  The guest's MAC is learned from the source of its frames
  (unless the caller fixed it, ``--macaddress``).
* **Writing**: every frame the engine, its flows and the tun TCP path write gets the
  Ethernet header for its IP version (prebuilt: guest MAC, host MAC, EtherType) in
  front, in the same ``writev``.  Until the guest's MAC is known nothing can be
  addressed to it: such frames are dropped and counted (the guest always speaks first).
* **Router advertisements** go out unsolicited right after start (a few, a second
  apart, so SLAAC completes within seconds even if the guest solicited before we were
  reading) and then every few minutes, as RFC 4861 routers and slirp4netns do.

A TAP has no virtio header, so no checksum or segmentation offload: the engine is built
with ``vnet_hdr_size`` 0 and computes checksums itself, and the tun TCP path sends
MSS-sized segments.  The native relay and the nftables fast path need devices and rules
inside the namespace and are not used on a TAP (see ``runner.Network``).

Counters: ``stats.link`` counts what the link layer answered and learned;
``stats.malformed``/``stats.unsupported`` the frames it dropped, by reason (``ethernet:``,
``arp:``, ``ndp:``, ``dhcp:`` prefixes).
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable, Iterable, Sequence

from nsbridge import defaults
from nsbridge.errors import errno_name
from nsbridge.relay.loop import EventLoop, Timer
from nsbridge.usernet.host.engine import Resolver, TunEngine
from nsbridge.usernet.host.outbound import NONE, OutboundAddresses
from nsbridge.usernet.host.replies import BATCH
from nsbridge.usernet.proto.addresses import UsernetAddresses
from nsbridge.usernet.proto.arp import answer_arp
from nsbridge.usernet.proto.dhcp import DhcpServer, is_dhcp_request
from nsbridge.usernet.proto.ethernet import (
    ETH_HLEN,
    ETH_P_ARP,
    ETH_P_IP,
    ETH_P_IPV6,
    format_mac,
    header,
    host_mac,
    is_unicast,
)
from nsbridge.usernet.proto.ndp import answer_ndp, is_ndp, router_advertisement
from nsbridge.usernet.proto.packets import Malformed, Parsed, Unsupported
from nsbridge.usernet.proto.policy import Policy

log = logging.getLogger("nsbridge")

INITIAL_ADVERTISEMENTS = 3  # unsolicited RAs right after start, one per second
MIN_ADVERTISEMENT_INTERVAL = 200.0  # then one every 200..600 s (RFC 4861 defaults)
MAX_ADVERTISEMENT_INTERVAL = 600.0

_NO_MAC = "guest MAC unknown"


class TapEngine(TunEngine):
    """:class:`~.engine.TunEngine` serving a TAP device (Ethernet frames, no vnet header).

    ``guest_mac`` is the guest's MAC when the caller knows it (``--macaddress``);
    otherwise it is learned from the guest's frames.  ``ipv6`` False sends no router
    advertisements and answers no neighbour discovery.
    """

    def __init__(
        self,
        loop: EventLoop,
        tap_fd: int,
        policy: Policy,
        addresses: UsernetAddresses,
        resolvers: Iterable[Resolver],
        idle_timeout: float = defaults.UDP_IDLE_TIMEOUT,
        max_flows: int = defaults.MAX_UDP_FLOWS,
        *,
        guest_mac: bytes | None = None,
        ipv6: bool = True,
        dns_timeout: float = 2.0,
        max_dns_pending: int = 256,
        tcp_handler: Callable[[Parsed], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
        outbound: OutboundAddresses = NONE,
    ) -> None:
        super().__init__(loop, tap_fd, 0, policy, addresses, resolvers, idle_timeout,
                         max_flows, dns_timeout=dns_timeout, max_dns_pending=max_dns_pending,
                         tcp_handler=tcp_handler, outbound=outbound)
        if guest_mac is not None and not is_unicast(guest_mac):
            raise ValueError(f"guest MAC {guest_mac.hex(':')}: not a unicast MAC address")
        self.our_mac = host_mac(addresses)
        self.ipv6 = ipv6
        self.dhcp = DhcpServer(addresses, self.our_mac)
        self._clock = clock
        self._gateway4 = addresses.gateway.packed
        self._eth = bytearray(ETH_HLEN)
        self._eth_view = memoryview(self._eth)
        self._fixed_mac = guest_mac is not None
        self.guest_mac: bytes | None = None
        self._headers: dict[int, bytes] = {}
        if guest_mac is not None:
            self._set_guest_mac(guest_mac)
        self._ra_timer: Timer | None = None
        self._ra_count = 0

    # ---- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        super().start()
        if self.ipv6:
            self._ra_timer = self._loop.call_later(0.0, self._advertise)

    def close(self) -> None:
        if self._ra_timer is not None:
            self._ra_timer.cancel()
            self._ra_timer = None
        super().close()

    def _advertise(self) -> None:
        """Send an unsolicited router advertisement and schedule the next one."""
        self._ra_timer = None
        if self._closed:
            return
        self._write_link(router_advertisement(self.addresses, self.our_mac))
        self.stats.link["router advertisements"] += 1
        self._ra_count += 1
        delay = 1.0 if self._ra_count < INITIAL_ADVERTISEMENTS else random.uniform(
            MIN_ADVERTISEMENT_INTERVAL, MAX_ADVERTISEMENT_INTERVAL)
        self._ra_timer = self._loop.call_later(delay, self._advertise)

    # ---- the guest's MAC ----------------------------------------------------------------

    def _set_guest_mac(self, mac: bytes) -> None:
        self.guest_mac = mac
        self._headers = {4: header(mac, self.our_mac, ETH_P_IP),
                         6: header(mac, self.our_mac, ETH_P_IPV6)}
        log.debug("tap: guest MAC %s", format_mac(mac))

    # ---- reading the TAP ----------------------------------------------------------------

    def _on_tun(self, _events: int) -> None:
        fd, bufs, eth, view = self._tun, [self._eth, self._rbuf], self._eth, self._rview
        echo4, fast_echo4 = self._echo.fast4, self._echo.fast_request4
        stats = self.stats
        for _ in range(BATCH):
            try:
                n = os.readv(fd, bufs)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("tap read failed: %s; no longer reading it (the TAP device is "
                            "gone: the namespace's networking stops)", errno_name(exc.errno))
                stats.errors += 1
                self._loop.remove(fd)
                return
            if n == 0:
                return
            if n < ETH_HLEN + 1:
                stats.frames_in += 1
                stats.malformed["ethernet: short"] += 1
                continue
            src = bytes(eth[6:12])
            if src != self.guest_mac:
                if not is_unicast(src):
                    stats.frames_in += 1
                    stats.malformed["ethernet: group source address"] += 1
                    continue
                if not self._fixed_mac:
                    self._set_guest_mac(src)
                    stats.link["guest MAC learned"] += 1
            ethertype = (eth[12] << 8) | eth[13]
            length = n - ETH_HLEN
            if ethertype == ETH_P_IP:
                if view[0] >> 4 == 4 and is_dhcp_request(view, length, self._gateway4):
                    self._link_answer(
                        self.dhcp.handle(src, bytes(view[:length]), self._clock()), "dhcp")
                    continue
                if echo4 and fast_echo4(length):
                    continue
                self.handle_frame(bytes(view[:length]))
            elif ethertype == ETH_P_IPV6:
                if is_ndp(view, length):
                    if self.ipv6:
                        self._link_answer(answer_ndp(src, bytes(view[:length]), self.addresses,
                                                     self.our_mac), "ndp")
                    else:
                        stats.frames_in += 1
                        stats.unsupported["ndp: IPv6 disabled"] += 1
                    continue
                self.handle_frame(bytes(view[:length]))
            elif ethertype == ETH_P_ARP:
                self._link_answer(answer_arp(bytes(view[:length]), self.addresses,
                                             self.our_mac), "arp")
            else:
                stats.frames_in += 1
                stats.unsupported[f"ethernet: type 0x{ethertype:04x}"
                                  if ethertype >= 0x0600 else "ethernet: 802.3 length"] += 1

    def _link_answer(self, result: bytes | Malformed | Unsupported, kind: str) -> None:
        """Count a link-layer message and write its answer, if it has one."""
        stats = self.stats
        stats.frames_in += 1
        if isinstance(result, Malformed):
            stats.malformed[result.reason] += 1
        elif isinstance(result, Unsupported):
            stats.unsupported[result.reason] += 1
        else:
            stats.link[f"{kind} answered"] += 1
            self._write_link(result)

    # ---- writing the TAP ----------------------------------------------------------------

    def _write_link(self, frame: bytes) -> None:
        """Write a whole Ethernet frame (an answer the link layer built): the engine's
        own writer, without the IP path's header in front."""
        TunEngine.write_parts(self, (frame,))

    def write_parts(self, parts: Sequence[bytes | memoryview]) -> None:
        """Write one IP packet given in parts, behind the guest's Ethernet header."""
        eth = self._headers.get(parts[0][0] >> 4) if parts and parts[0] else None
        if eth is None:
            self.stats.drops[_NO_MAC if self.guest_mac is None else "not IP"] += 1
            return
        super().write_parts((eth, *parts))
