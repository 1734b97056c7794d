"""``-p [HOSTIP:]HOSTPORT:NSPORT[/tcp|/udp]``: publish a port of the namespace on the host.

The docker/podman syntax, so users know it.  How the port reaches the namespace is the
publish mode's (``--publish-mode``): through the device to its interface address, as the
client (:mod:`nsbridge.usernet.host.inbound`), or an ordinary forward whose connect side
is created inside the namespace (by the sandbox's socket factory process) and dials its
own loopback.
"""

from __future__ import annotations

from dataclasses import dataclass

from nsbridge.errors import UserError
from nsbridge.net.addresses import HostPort, parse_host_port


@dataclass(frozen=True)
class Publish:
    host: HostPort  # where the host side listens
    ns_port: int  # the port inside the namespace (its interface address, or its loopback)
    protocol: str  # "tcp" or "udp"

    def __str__(self) -> str:
        return f"{self.host} -> namespace port {self.ns_port}/{self.protocol}"


def parse_publish(text: str) -> Publish:
    what = f"-p {text!r}"
    spec, _, proto = text.partition("/")
    proto = proto or "tcp"
    if proto not in ("tcp", "udp"):
        raise UserError(f"{what}: protocol {proto!r}: expected tcp or udp")
    head, sep, ns_port_text = spec.rpartition(":")
    if not sep or not head:
        raise UserError(f"{what}: expected [HOSTIP:]HOSTPORT:NSPORT[/tcp|/udp], e.g. 8080:80")
    if not (ns_port_text.isascii() and ns_port_text.isdigit()) or not (
        1 <= int(ns_port_text) <= 65535
    ):
        raise UserError(f"{what}: namespace port {ns_port_text!r} is not a port (1-65535)")
    if head.isascii() and head.isdigit():  # like docker and podman: every host address
        host = parse_host_port(f"0.0.0.0:{head}", what=what + ":", allow_port_zero=True)
    else:
        host = parse_host_port(head, what=what + ":", allow_port_zero=True)
    return Publish(host, int(ns_port_text), proto)
