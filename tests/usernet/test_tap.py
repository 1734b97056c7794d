"""nsbridge on a TAP device, with the guest namespace's own kernel as the client.

slirp4netns's callers hand it a TAP (rootlesskit makes a persistent ``tap0`` and
configures IPv4 itself); so does this test: it opens ``tap0`` with ``IFF_TAP|IFF_NO_PI``
inside a guest namespace of its own, builds the :class:`SandboxHandle` a caller would
(``link="tap"``), and runs :class:`~nsbridge.usernet.runner.Network` on it from a
"host" namespace (helpers.usernet_host) where the servers live.  Everything the guest
does is real: its ARP, its SLAAC from our router advertisements, ``ping``, ``curl``,
``dig`` and ``udhcpc``.  Malformed frames reach the TAP through a packet socket on
``tap0`` inside the guest, so they travel the same way as the kernel's own.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dns.message
import pytest

from helpers.netns import CLONE_NEWNET, in_netns, listen_in
from helpers.usernet_host import HOST_V4, HOST_V6
from nsbridge.linux.netns import Netns
from nsbridge.usernet.inside.netconf import NetConfig
from nsbridge.usernet.inside.sandbox import SandboxHandle
from nsbridge.usernet.proto.addresses import UsernetAddresses
from nsbridge.usernet.runner import Network, UsernetOptions

_libc = ctypes.CDLL(None, use_errno=True)
TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000
HOST_MAC = "52:55:0a:00:02:02"


def open_tap(guest: str, name: str = "tap0") -> int:
    """A TAP device made inside ``guest`` (the namespace current at TUNSETIFF)."""
    def make() -> int:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
        return fd

    return in_netns(guest, make)  # type: ignore[return-value]


def gexec(guest: str, *argv: str, timeout: float = 30,
          check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", "netns", "exec", guest, *argv], capture_output=True,
                            text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, (argv, result.stdout, result.stderr)
    return result


def configure_static(guest: str) -> None:
    """What rootlesskit does to tap0: address .100/24, up, default route via .2."""
    for args in (("addr", "add", "10.0.2.100/24", "dev", "tap0"),
                 ("link", "set", "tap0", "up"),
                 ("route", "add", "default", "via", "10.0.2.2")):
        subprocess.run(["ip", "-n", guest, *args], check=True)


@contextmanager
def tap_network(host: str, guest: str, fd: int,
                options: UsernetOptions) -> Iterator[Network]:
    """``Network`` serving the TAP ``fd``, started and run from a thread in ``host``
    (so every socket it makes is the host's); closed, and the fds released, at the end."""
    netns_fd = os.open(f"/run/netns/{guest}", os.O_RDONLY | os.O_CLOEXEC)
    handle = SandboxHandle(tun=fd, netns=Netns(netns_fd, guest), userns=-1, ifname="tap0",
                           offloads=(), vnet_hdr_size=0, ipv6=options.ipv6,
                           config=NetConfig(UsernetAddresses(), ipv6=options.ipv6),
                           link="tap")
    box: dict[str, Any] = {}

    def start() -> None:
        host_fd = os.open(f"/run/netns/{host}", os.O_RDONLY)
        try:
            if _libc.setns(host_fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
            network = Network(handle, options)
            network.start()
            network.start_thread()  # a thread made here is in the host namespace too
            box["network"] = network
        except BaseException as exc:
            box["error"] = exc
        finally:
            os.close(host_fd)

    thread = threading.Thread(target=start)
    thread.start()
    thread.join()
    try:
        if "error" in box:
            raise box["error"]
        yield box["network"]
    finally:
        if "network" in box:
            box["network"].close()
        handle.close()


@pytest.fixture
def guest(make_netns: Callable[[], str]) -> str:
    return make_netns()


def http_hello(conn: socket.socket) -> None:
    with conn:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(4096)
            if not chunk:
                return
            data += chunk
        conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello")


def dns_answer(query: bytes) -> bytes:
    message = dns.message.from_wire(query)
    reply = dns.message.make_response(message)
    reply.answer.append(dns.rrset.from_text(message.question[0].name, 60, "IN", "A",
                                            "198.51.100.7"))
    return reply.to_wire()


def wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def test_arp_ping_curl_udp_and_dig_with_static_config(host: str, guest: str, stream_server: Any,
                                                      udp_server: Any) -> None:
    web = stream_server(listen_in(host, HOST_V4), http_hello)
    echo = udp_server(host, host=HOST_V4)
    resolver = udp_server(host, dns_answer)
    fd = open_tap(guest)
    configure_static(guest)
    options = UsernetOptions(allow_host_access=True, dns=[("127.0.0.1", resolver.port)])
    with tap_network(host, guest, fd, options) as network:
        gexec(guest, "ping", "-c", "2", "-W", "3", "10.0.2.2")
        neigh = gexec(guest, "ip", "neigh", "show", "10.0.2.2", "dev", "tap0").stdout
        assert HOST_MAC in neigh, neigh
        out = gexec(guest, "curl", "-sS", "--max-time", "10",
                    f"http://{HOST_V4}:{web.port}/").stdout
        assert out == "hello"
        probe = (f"import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
                 f"s.settimeout(5); s.sendto(b'ping-udp', ('{HOST_V4}', {echo.port})); "
                 f"print(s.recv(100).decode())")
        assert gexec(guest, "python3", "-c", probe).stdout.strip() == "ping-udp"
        dig = gexec(guest, "dig", "+short", "+time=3", "+tries=2", "@10.0.2.3",
                    "example.test").stdout
        assert dig.strip() == "198.51.100.7"
        stats = network.stats()
    engine = stats["engine"]
    assert engine["link"]["arp answered"] >= 1
    assert engine["dns_answers"] >= 1 and engine["udp_flows_total"] >= 1
    assert stats["tcp"] is not None  # the tun TCP path carried curl
    assert resolver.received >= 1 and echo.received == 1


def test_bulk_tcp_both_ways_over_a_small_mtu_tap(host: str, guest: str,
                                                 stream_server: Any) -> None:
    """MSS-sized segments with Python's checksums, both ways, byte-exact (a TAP has no
    offloads: every segment nsbridge writes must fit the guest's 1500-byte MTU)."""
    blob = os.urandom(4 << 20)

    def serve(conn: socket.socket) -> None:
        with conn:
            got = hashlib.sha256()
            remaining = len(blob)
            while remaining:
                chunk = conn.recv(1 << 16)
                assert chunk
                got.update(chunk)
                remaining -= len(chunk)
            conn.sendall(got.hexdigest().encode() + blob)

    server = stream_server(listen_in(host, HOST_V4), serve)
    fd = open_tap(guest)
    configure_static(guest)
    probe = ("import hashlib, socket, sys; blob = sys.stdin.buffer.read(); "
             f"s = socket.create_connection(('{HOST_V4}', {server.port}), timeout=20); "
             "s.sendall(blob); got = b''\n"
             "while True:\n c = s.recv(1 << 16)\n if not c: break\n got += c\n"
             "print(got[:64].decode(), hashlib.sha256(got[64:]).hexdigest())")
    with tap_network(host, guest, fd, UsernetOptions(allow_host_access=True)):
        result = subprocess.run(["ip", "netns", "exec", guest, "python3", "-c", probe],
                                input=blob, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    digest = hashlib.sha256(blob).hexdigest()
    assert result.stdout.decode().split() == [digest, digest]


def test_slaac_from_router_advertisements_then_ipv6_tcp(host: str, guest: str,
                                                        stream_server: Any) -> None:
    web = stream_server(listen_in(host, HOST_V6), http_hello)
    fd = open_tap(guest)
    subprocess.run(["ip", "-n", guest, "link", "set", "tap0", "up"], check=True)
    with tap_network(host, guest, fd, UsernetOptions(allow_host_access=True)) as network:
        started = time.monotonic()

        def global_address() -> bool:
            out = gexec(guest, "ip", "-6", "addr", "show", "dev", "tap0", "scope", "global",
                        check=False).stdout
            return "inet6 fd00::" in out and "tentative" not in out

        assert wait_for(global_address, 8), gexec(guest, "ip", "-6", "addr").stdout
        assert time.monotonic() - started < 8
        route = gexec(guest, "ip", "-6", "route", "show", "default").stdout
        assert "via fe80::2 dev tap0" in route, route
        out = gexec(guest, "curl", "-sS", "--max-time", "10",
                    f"http://[{HOST_V6}]:{web.port}/").stdout
        assert out == "hello"
        # On-link (the prefix's L flag): the guest asks for fd00::2 by neighbour solicitation.
        gexec(guest, "ping", "-6", "-c", "1", "-W", "3", "fd00::2")
        neigh = gexec(guest, "ip", "-6", "neigh", "show", "dev", "tap0").stdout
        assert f"fe80::2 lladdr {HOST_MAC} router" in neigh, neigh
        assert f"fd00::2 lladdr {HOST_MAC}" in neigh, neigh
        engine = network.stats()["engine"]
    assert engine["link"]["router advertisements"] >= 1
    assert engine["link"]["ndp answered"] >= 1


def test_dhcp_with_udhcpc(host: str, guest: str, tmp_path: Path,
                          processes: list[subprocess.Popen]) -> None:
    script = tmp_path / "udhcpc.sh"
    record = tmp_path / "lease"
    script.write_text(  # records the lease and puts the address on, so a release can go out
        f'#!/bin/sh\necho "$1 $ip $subnet $router $dns $mtu $lease" >> {record}\n'
        '[ "$1" = bound ] && ip addr add "$ip/24" dev "$interface"\nexit 0\n')
    script.chmod(0o755)
    record.touch()
    fd = open_tap(guest)
    subprocess.run(["ip", "-n", guest, "link", "set", "tap0", "up"], check=True)
    options = UsernetOptions(ipv6=False, mtu=1500)
    with tap_network(host, guest, fd, options) as network:
        client = subprocess.Popen(["ip", "netns", "exec", guest, "udhcpc", "-i", "tap0", "-f",
                                   "-t", "5", "-T", "1", "-s", str(script)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        processes.append(client)
        assert wait_for(lambda: "bound" in record.read_text(), 15), record.read_text()
        gexec(guest, "ping", "-c", "1", "-W", "3", "10.0.2.2")  # the leased address works
        client.send_signal(signal.SIGUSR2)  # udhcpc: release the lease
        assert wait_for(lambda: "dhcp: released" in network.stats()["engine"]["unsupported"],
                        5), record.read_text()
        client.terminate()
        client.wait(10)
        engine = network.stats()["engine"]
    bound = [line for line in record.read_text().split("\n") if line.startswith("bound")]
    assert bound == ["bound 10.0.2.15 255.255.255.0 10.0.2.2 10.0.2.3 1500 86400"], bound
    assert engine["link"]["dhcp answered"] == 2  # OFFER and ACK
    assert engine["unsupported"]["dhcp: released"] == 1


def test_policy_still_decides_on_a_tap(host: str, guest: str, stream_server: Any) -> None:
    web = stream_server(listen_in(host, HOST_V4), http_hello)
    other = stream_server(listen_in(host, "127.0.0.1"), http_hello)
    fd = open_tap(guest)
    configure_static(guest)
    options = UsernetOptions(allow_host_access=True, deny=[f"tcp:{HOST_V4}:{web.port}"])
    with tap_network(host, guest, fd, options) as network:
        refused = gexec(guest, "curl", "-sS", "--max-time", "10",
                        f"http://{HOST_V4}:{web.port}/", check=False)
        assert refused.returncode != 0
        ok = gexec(guest, "curl", "-sS", "--max-time", "10",
                   f"http://10.0.2.2:{other.port}/").stdout  # the host's loopback, allowed
        assert ok == "hello"
        stats = network.stats()
    assert not web.accepted
    assert sum(stats["tcp"]["denied"].values()) >= 1, stats["tcp"]


def test_tcp_and_relay_modes_a_tap_cannot_serve_are_refused(host: str, guest: str) -> None:
    from nsbridge.errors import UserError

    for options, word in ((UsernetOptions(tcp="redirect"), "--tcp=redirect"),
                          (UsernetOptions(relay="native"), "--relay=native")):
        fd = open_tap(guest)
        with pytest.raises(UserError, match=word), tap_network(host, guest, fd, options):
            pass


def raw_frames(guest: str, frames: list[bytes]) -> None:
    """Send ``frames`` out of the guest's tap0 through a packet socket (to nsbridge)."""
    def send() -> None:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
            sock.bind(("tap0", 0))
            for frame in frames:
                sock.send(frame)

    in_netns(guest, send)


def test_malformed_frames_are_counted_and_the_engine_keeps_working(host: str,
                                                                   guest: str) -> None:
    fd = open_tap(guest)
    configure_static(guest)
    with tap_network(host, guest, fd, UsernetOptions()) as network:
        gexec(guest, "ping", "-c", "1", "-W", "3", "10.0.2.2")
        mac = bytes.fromhex(gexec(guest, "cat", "/sys/class/net/tap0/address")
                            .stdout.strip().replace(":", ""))
        to_us = bytes.fromhex(HOST_MAC.replace(":", "")) + mac
        udp_67 = (bytes.fromhex("4500002c000000004011") + b"\0\0" + bytes(4) + b"\xff" * 4
                  + b"\x00\x44\x00\x43\x00\x18\x00\x00" + b"garbage!" * 2)
        frames = [
            to_us + b"\x88\xb5" + b"x" * 46,  # an EtherType nobody serves
            to_us + b"\x08\x06" + b"\x00\x01\x08\x00\x06" + b"\0" * 40,  # ARP, bad sizes
            to_us + b"\x08\x06" + b"\x00\x01",  # ARP cut short
            b"\xff" * 6 + mac + b"\x08\x00" + udp_67,  # DHCP garbage (bad IPv4 checksum)
            to_us + b"\x86\xdd" + bytes.fromhex("6000000000083aff") + bytes(32)
            + b"\x85\x00\x00\x00\x00\x00\x00\x00",  # a router solicitation, bad checksum
            to_us + b"\x08\x00" + b"\x45" + b"\0" * 30,  # IPv4 garbage for the engine
            b"\x01\x00\x5e\x00\x00\x01" + b"\x01" + mac[1:] + b"\x08\x00" + b"\0" * 40,
        ]
        raw_frames(guest, frames)
        gexec(guest, "ping", "-c", "1", "-W", "3", "10.0.2.2")  # still answered
        engine = network.stats()["engine"]
    malformed = engine["malformed"]
    for reason in ("arp: not Ethernet/IPv4", "arp: short",
                   "dhcp: bad IPv4 header", "ndp: bad checksum",
                   "ethernet: group source address"):
        assert malformed.get(reason) == 1, (reason, engine)
    assert engine["unsupported"].get("ethernet: type 0x88b5") == 1, engine
    assert engine["errors"] == 0


def test_tap_engine_on_a_socketpair_short_frames_and_the_guest_mac() -> None:
    """What the kernel never sends but a TAP fd could carry: a frame shorter than its
    header; and nothing is written to the guest before its MAC is known."""
    from nsbridge.relay.loop import EventLoop
    from nsbridge.usernet.host.tap import TapEngine
    from nsbridge.usernet.proto.policy import Policy

    test_end, tap_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    loop = EventLoop()
    engine = TapEngine(loop, tap_end.fileno(), Policy(), UsernetAddresses(), [], ipv6=False)
    try:
        engine.start()
        engine.write(bytes.fromhex("4500001c00000000400100000a0002020a000264") + bytes(8))
        assert engine.stats.drops["guest MAC unknown"] == 1
        guest_mac = bytes.fromhex("0242ac110002")
        arp = (b"\xff" * 6 + guest_mac + b"\x08\x06"
               + struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, guest_mac,
                             bytes([10, 0, 2, 100]), bytes(6), bytes([10, 0, 2, 2])))
        for frame in (b"\x01\x02\x03\x04\x05", arp):
            test_end.send(frame)
        loop.call_later(0.2, loop.stop)
        loop.run()
        assert engine.stats.malformed["ethernet: short"] == 1
        assert engine.guest_mac == guest_mac
        test_end.settimeout(1)
        reply = test_end.recv(100)
        assert reply[:6] == guest_mac and reply[12:14] == b"\x08\x06"
        engine.write(bytes.fromhex("4500001c00000000400100000a0002020a000264") + bytes(8))
        assert test_end.recv(100)[:14] == guest_mac + bytes.fromhex(HOST_MAC.replace(":", "")) \
            + b"\x08\x00"
    finally:
        engine.close()
        loop.close()
        test_end.close()
        tap_end.close()
