"""The "host" namespace user-mode networking tests run nsbridge in, and the TCP paths
every TCP case runs through.

A namespace of the test's own stands in for the host, so traffic to "the host's own
addresses" stays inside what the test created: lo, and d0 with 192.0.2.1/24 and
2001:db8::1/64 (a veth pair whose both ends stay inside it: this kernel has no dummy
link type), and ping sockets allowed for every group.
"""

from __future__ import annotations

import subprocess

from helpers.netns import delete_netns, ip, new_netns

# The TCP paths of `nsbridge run --tcp=MODE` that the usernet bypass and soak tests run
# every TCP case through: the nftables fast path and the tun path (TCP terminated by
# nsbridge.usernet.host.tuntcp), so both paths face the same suite.
USERNET_TCP_MODES: list[str] = ["redirect", "tun"]

HOST_V4 = "192.0.2.1"
HOST_V6 = "2001:db8::1"


def new_host_netns(extra_addresses: tuple[str, ...] = (), prefix: str = "nsbh") -> str:
    """A fresh host namespace as described above (``extra_addresses``: more ``ADDR/LEN``
    on d0, each family's after its first); the caller deletes it with ``delete_netns``."""
    name = new_netns(prefix)
    try:
        ip("-n", name, "link", "add", "d0", "type", "veth", "peer", "name", "d1")
        ip("-n", name, "link", "set", "d1", "up")
        v4 = [a for a in extra_addresses if ":" not in a]
        v6 = [a for a in extra_addresses if ":" in a]
        for address in (f"{HOST_V4}/24", *v4, f"{HOST_V6}/64", *v6):
            ip("-n", name, "addr", "add", address, "dev", "d0",
               *(["nodad"] if ":" in address else []))
        ip("-n", name, "link", "set", "d0", "up")
        subprocess.run(["ip", "netns", "exec", name, "sysctl", "-qw",
                        "net.ipv4.ping_group_range=0 2147483647"], check=True)
    except BaseException:
        delete_netns(name)
        raise
    return name


# An "outside" namespace behind a veth from the host namespace (o0 -- o1): a network the
# host reaches that is not the host itself (clients with their own addresses, servers
# that see the host's).
HOST_OUTSIDE_V4, OUTSIDE_V4 = "198.51.100.1", "198.51.100.2"
HOST_OUTSIDE_V6, OUTSIDE_V6 = "2001:db8:5::1", "2001:db8:5::2"


def new_outside_netns(host: str, prefix: str = "nsbo") -> str:
    """A fresh namespace joined to ``host`` by a veth (host o0: HOST_OUTSIDE_V4/V6,
    outside o1: OUTSIDE_V4/V6); the caller deletes it with ``delete_netns``."""
    outside = new_netns(prefix)
    try:
        ip("-n", host, "link", "add", "o0", "type", "veth", "peer", "name", "o1",
           "netns", outside)
        for ns, dev, v4, v6 in ((host, "o0", HOST_OUTSIDE_V4, HOST_OUTSIDE_V6),
                                (outside, "o1", OUTSIDE_V4, OUTSIDE_V6)):
            ip("-n", ns, "addr", "add", f"{v4}/24", "dev", dev)
            ip("-n", ns, "addr", "add", f"{v6}/64", "dev", dev, "nodad")
            ip("-n", ns, "link", "set", dev, "up")
    except BaseException:
        delete_netns(outside)
        raise
    return outside
