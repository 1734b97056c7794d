"""The host-address tracker in a real namespace of the test's own: the dump at start,
addresses added and removed afterwards seen by the very next lookup, broadcast
addresses, a second interface, and a resync after its event queue overflowed."""

from __future__ import annotations

import ipaddress
import subprocess
import time
from collections.abc import Callable

from helpers.netns import in_netns
from nsbridge.usernet.host.hostaddrs import HostAddresses


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def sh(name: str, *commands: str) -> None:
    for command in commands:
        subprocess.run(["ip", "-n", name, *command.split()], check=True, capture_output=True)


def announced(tracker: HostAddresses, address: str) -> bool:
    """Whether the tracker has an IPv6 address just added.  The kernel announces one
    (and routes it locally) from a work queue once DAD ends, ``nodad`` or not, a moment
    after ``ip addr add`` returns; IPv4 addresses are announced before it returns."""
    deadline = time.monotonic() + 5
    while ip(address) not in tracker:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def tracker_in(name: str, receive_buffer: int | None = None) -> HostAddresses:
    """A tracker whose socket belongs to namespace ``name``."""
    if receive_buffer is None:
        return in_netns(name, HostAddresses)  # type: ignore[return-value]
    return in_netns(name, lambda: HostAddresses(receive_buffer))  # type: ignore[return-value]


def test_dump_then_every_change_is_seen_by_the_next_lookup(netns: str) -> None:
    sh(netns, "link set lo up", "link add v0 type veth peer name v1",
       "addr add 10.250.0.1/24 dev v0", "addr add 2001:db8:250::1/64 dev v0 nodad",
       "link set v0 up")
    with tracker_in(netns) as tracker:
        assert {ip("10.250.0.1"), ip("10.250.0.255"), ip("2001:db8:250::1"),
                ip("127.0.0.1"), ip("::1")} <= tracker.snapshot()
        assert ip("10.250.0.2") not in tracker
        sh(netns, "addr add fe80::99/64 dev v0 nodad")  # IPv6 link-local
        assert announced(tracker, "fe80::99")
        # a second interface, after start, with a configured broadcast address
        sh(netns, "link add d0 type veth peer name d1",
           "addr add 10.251.0.1/16 broadcast 10.251.255.255 dev d0")
        assert ip("10.251.0.1") in tracker and ip("10.251.255.255") in tracker
        sh(netns, "addr add 2001:db8:251::7/64 dev d0 nodad")
        assert announced(tracker, "2001:db8:251::7")
        sh(netns, "addr del 10.250.0.1/24 dev v0")
        assert ip("10.250.0.1") not in tracker and ip("10.250.0.255") not in tracker
        sh(netns, "addr del 2001:db8:251::7/64 dev d0")
        assert ip("2001:db8:251::7") not in tracker
        # one address on two interfaces: removing one copy leaves it the host's
        sh(netns, "addr add 10.252.0.1/32 dev v0", "addr add 10.252.0.1/32 dev d0")
        sh(netns, "addr del 10.252.0.1/32 dev v0")
        assert ip("10.252.0.1") in tracker
        sh(netns, "link del d0")
        assert ip("10.252.0.1") not in tracker and ip("10.251.0.1") not in tracker
        assert tracker.resyncs == 0


def test_point_to_point_address_is_the_local_one(netns: str) -> None:
    sh(netns, "link add v0 type veth peer name v1",
       "addr add 10.250.0.1 peer 10.250.0.2 dev v0")
    with tracker_in(netns) as tracker:
        assert ip("10.250.0.1") in tracker and ip("10.250.0.2") not in tracker


def test_overflow_is_resynced(netns: str) -> None:
    """Events lost to a full queue (ENOBUFS) are recovered by a fresh dump."""
    sh(netns, "link add v0 type veth peer name v1")
    with tracker_in(netns, receive_buffer=1) as tracker:  # the kernel's minimum
        batch = "\n".join(f"addr add 10.9.{i // 200}.{i % 200 + 1}/32 dev v0"
                          for i in range(300))
        subprocess.run(["ip", "-n", netns, "-batch", "-"], input=batch, text=True,
                       check=True, capture_output=True)
        assert ip("10.9.1.100") in tracker
        assert tracker.resyncs >= 1
        assert sum(1 for a in tracker.snapshot() if str(a).startswith("10.9.")) == 300
        sh(netns, "addr del 10.9.0.1/32 dev v0")
        assert ip("10.9.0.1") not in tracker


def test_socket_belongs_to_its_namespace(make_netns: Callable[[], str]) -> None:
    one, other = make_netns(), make_netns()
    sh(other, "link add v0 type veth peer name v1", "addr add 10.250.0.1/24 dev v0")
    with tracker_in(one) as tracker:
        assert ip("10.250.0.1") not in tracker


def test_before_change_runs_before_an_event_is_applied(netns: str) -> None:
    """The hook the socket switcher's decision cache hangs on: called when an event
    waits, before it is applied (the set still without the new address), once per
    refresh; not at all while nothing is queued; no longer once discarded."""
    sh(netns, "link add v0 type veth peer name v1")
    with tracker_in(netns) as tracker:
        seen: list[bool] = []

        def before() -> None:
            seen.append(ip("10.250.0.9") in tracker._count)  # `in tracker` would refresh

        tracker.before_change(before)
        assert ip("10.250.0.9") not in tracker and seen == []
        sh(netns, "addr add 10.250.0.9/32 dev v0")
        assert ip("10.250.0.9") in tracker
        assert seen == [False]
        assert ip("10.250.0.9") in tracker and seen == [False]  # nothing new queued
        tracker.discard_before_change(before)
        sh(netns, "addr del 10.250.0.9/32 dev v0")
        assert ip("10.250.0.9") not in tracker and seen == [False]
