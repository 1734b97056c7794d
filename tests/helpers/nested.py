"""A container behind a bridge inside a namespace, masqueraded out of one device: what
Docker, nerdctl and podman's rootless-netns make inside rootlesskit's namespace, or
anything nested inside ``nsbridge run``.  Its TCP is *forwarded* by the namespace's kernel,
so the fast path's output hook never sees it; the tests check it still gets out, and
read the prerouting redirect's counter to see which path carried it.
"""

from __future__ import annotations

from collections.abc import Sequence

# Counts the SYNs nsbridge's prerouting rule redirected; prints nothing without the table.
PREROUTING_COUNTER = ("nft list chain inet nsbridge prerouting 2>/dev/null "
                      "| grep -o 'counter packets [0-9]*' || true")


def nested_script(device: str, commands: Sequence[str], *, before: str = "") -> str:
    """A shell script (run as root inside the namespace) that puts a nested namespace
    on bridge br0 (10.88.0.0/24), masquerades it out of ``device``, runs ``before`` in the
    outer namespace, each of ``commands`` in the nested one, then prints
    :data:`PREROUTING_COUNTER`'s line (if any) and removes the nested namespace."""
    nested = "\n".join(f"in_nested {command}" for command in commands)
    return f"""
unshare -n sleep 60 & nested=$!
for i in $(seq 50); do
    [ "$(readlink /proc/$nested/ns/net)" != "$(readlink /proc/self/ns/net)" ] && break
    sleep 0.05
done
ip link add br0 type bridge
ip addr add 10.88.0.1/24 dev br0
ip link set br0 up
ip link add veth0 type veth peer name eth0 netns $nested
ip link set veth0 master br0 up
in_nested() {{ nsenter -t $nested -n "$@"; }}
in_nested ip link set lo up
in_nested ip addr add 10.88.0.2/24 dev eth0
in_nested ip link set eth0 up
in_nested ip route add default via 10.88.0.1
echo 1 > /proc/sys/net/ipv4/ip_forward
nft add table ip nat
nft 'add chain ip nat post {{ type nat hook postrouting priority 100; }}'
nft add rule ip nat post ip saddr 10.88.0.0/24 oifname {device} masquerade
{before}
{nested}
{PREROUTING_COUNTER}
kill $nested
"""
