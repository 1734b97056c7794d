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
