"""The world the socket-switching tests (``nsbridge run --bypass``) run in.

A "host" namespace (where nsbridge runs) joined to an "outside" one
(:func:`helpers.usernet_host.new_outside_netns`: the host is 198.51.100.1 /
2001:db8:5::1 there, the outside .2 / ::2).  Outside: a TCP
server on every address at :data:`ECHO_PORT` and :data:`DENIED_PORT` that first writes
the address it saw the client come from (one line) and then echoes lines; a DNS server
(UDP and TCP, port 53; :func:`helpers.servers.dns_answer`); a UDP echo server at
:data:`UDP_PORT`.  In the host namespace: the same TCP server on its loopback
(127.0.0.1:HOST_LOOPBACK_PORT), counting what reaches it.  Everything is removed at the
end, even when a test fails.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from helpers.environment import REPO
from helpers.netns import delete_netns, in_netns, new_netns
from helpers.servers import dual_stack_socket
from helpers.usernet_host import (
    HOST_OUTSIDE_V4,
    HOST_OUTSIDE_V6,
    OUTSIDE_V4,
    OUTSIDE_V6,
    new_outside_netns,
)

UP4, UP6 = HOST_OUTSIDE_V4, HOST_OUTSIDE_V6  # the host's addresses towards the outside
OUT4, OUT6 = OUTSIDE_V4, OUTSIDE_V6
ECHO_PORT, DENIED_PORT, UDP_PORT, HOST_LOOPBACK_PORT = 7301, 7302, 7304, 7303
PROBE = str(REPO / "tests" / "helpers" / "switch_probe.py")


@dataclass
class World:
    host: str
    outside: str
    seen: dict[int, list[str]] = field(default_factory=dict)  # port -> client addresses
    _sockets: list[socket.socket] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self, *options: str, command: list[str],
            timeout: float = 90) -> subprocess.CompletedProcess:
        """``nsbridge run -v OPTIONS -- COMMAND`` in the host namespace."""
        argv = ["ip", "netns", "exec", self.host, sys.executable, "-m", "nsbridge", "run",
                "-v", "--dns", OUT4, *options, "--", *command]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              cwd=REPO)

    def probe(self, case: str, *args: str, options: tuple[str, ...] = ("--bypass",),
              timeout: float = 90) -> tuple[dict, str]:
        """Run the probe program's ``case``: (its JSON, nsbridge's stderr)."""
        done = self.run(*options, command=[sys.executable, PROBE, case, *args],
                        timeout=timeout)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def _peer_then_echo(world: World, port: int, conn: socket.socket, peer: str) -> None:
    world.seen.setdefault(port, []).append(peer)
    with conn:
        conn.settimeout(10)
        try:
            conn.sendall(peer.encode() + b"\n")
            while data := conn.recv(65536):
                conn.sendall(data)
        except OSError:
            pass


def _tcp_server(world: World, sock: socket.socket, port: int) -> None:
    def serve() -> None:
        while not world._stop.is_set():
            try:
                conn, peer = sock.accept()
            except OSError:
                return
            address = peer[0].removeprefix("::ffff:")
            threading.Thread(target=_peer_then_echo, args=(world, port, conn, address),
                             daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()


def _udp_and_dns(world: World, udp: socket.socket, dns_udp: socket.socket,
                 dns_tcp: socket.socket) -> None:
    from helpers.servers import dns_answer

    def serve_udp(sock: socket.socket, dns: bool) -> None:
        while not world._stop.is_set():
            try:
                data, peer = sock.recvfrom(4096)
                if world._stop.is_set():
                    return
                sock.sendto(dns_answer(data) if dns else data, peer)
            except Exception:  # a broken query: no answer, the server carries on
                if world._stop.is_set():
                    return

    def serve_dns_tcp() -> None:
        while not world._stop.is_set():
            try:
                conn, _ = dns_tcp.accept()
            except OSError:
                return
            with conn:
                try:
                    conn.settimeout(5)
                    length = int.from_bytes(conn.recv(2), "big")
                    query = b""
                    while len(query) < length:
                        chunk = conn.recv(length - len(query))
                        if not chunk:
                            break
                        query += chunk
                    answer = dns_answer(query)
                    conn.sendall(len(answer).to_bytes(2, "big") + answer)
                except OSError:
                    pass

    for target, args in ((serve_udp, (udp, False)), (serve_udp, (dns_udp, True)),
                         (serve_dns_tcp, ())):
        threading.Thread(target=target, args=args, daemon=True).start()


def _dual(kind: int, port: int) -> socket.socket:
    sock = dual_stack_socket(kind, port)
    if kind == socket.SOCK_STREAM:
        sock.listen(512)  # a deeper queue: 200 clients connect at once
    return sock


@contextmanager
def switching_world() -> Iterator[World]:
    host = new_netns("nsbs")
    outside = ""
    world = None
    try:
        outside = new_outside_netns(host, prefix="nsbx")
        subprocess.run(["ip", "netns", "exec", host, "sysctl", "-qw",
                        "net.ipv4.ping_group_range=0 2147483647"], check=True)
        world = World(host, outside)

        def open_outside() -> list[socket.socket]:
            return [_dual(socket.SOCK_STREAM, ECHO_PORT), _dual(socket.SOCK_STREAM, DENIED_PORT),
                    _dual(socket.SOCK_DGRAM, UDP_PORT), _dual(socket.SOCK_DGRAM, 53),
                    _dual(socket.SOCK_STREAM, 53)]

        def open_loopback() -> socket.socket:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", HOST_LOOPBACK_PORT))
            sock.listen(64)
            return sock

        echo, denied, udp, dns_udp, dns_tcp = in_netns(outside, open_outside)  # type: ignore[misc]
        loopback = in_netns(host, open_loopback)
        world._sockets += [echo, denied, udp, dns_udp, dns_tcp, loopback]  # type: ignore[list-item]
        _tcp_server(world, echo, ECHO_PORT)
        _tcp_server(world, denied, DENIED_PORT)
        _tcp_server(world, loopback, HOST_LOOPBACK_PORT)  # type: ignore[arg-type]
        _udp_and_dns(world, udp, dns_udp, dns_tcp)
        yield world
    finally:
        if world is not None:
            world._stop.set()
            for sock in world._sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
        delete_netns(host)
        if outside:
            delete_netns(outside)
