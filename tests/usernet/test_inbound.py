"""Published TCP ports that keep the client's address (device mode), end to end.

nsbridge runs (through the Python API, so the test can read its counters and fds) in a
host namespace of the test's own; an "outside" namespace behind a veth from it stands
for a client on another machine.  Inside, a server on 0.0.0.0/[::] port 8000 answers
one command per connection: who it saw, an echo, a sink or source of N bytes, a
half-close of its own first, a reset mid-transfer.  Every case runs on both TCP paths:
the fast path (where a TunTcp serves only the inbound flows) and the tun path.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from helpers.environment import REPO
from helpers.netns import delete_netns, free_port, in_netns
from helpers.usernet_host import (
    HOST_OUTSIDE_V4,
    HOST_OUTSIDE_V6,
    HOST_V4,
    OUTSIDE_V4,
    OUTSIDE_V6,
    USERNET_TCP_MODES,
    new_host_netns,
    new_outside_netns,
)

SERVER_PORT, CLOSED_PORT, SILENT_PORT = 8000, 8001, 8002
MIB = 1 << 20

# The sandboxed command: a firewall that drops SYNs to SILENT_PORT (a guest that never
# answers), then the command server.
SERVER = textwrap.dedent(f"""
    import hashlib, os, socket, struct, subprocess, sys, threading
    subprocess.run(["nft", "add table inet t; add chain inet t in "
                    "{{ type filter hook input priority 0; }}; "
                    "add rule inet t in tcp dport {SILENT_PORT} drop"], check=True)
    out = sys.argv[1]
    def pattern(n):
        return (bytes(range(251)) * (n // 251 + 1))[:n]
    def handle(conn, peer):
        try:
            command(conn, peer)
        except OSError:
            pass  # a client that resets mid-transfer (tested)
    def command(conn, peer):
        with conn:
            f = conn.makefile("rb")
            words = f.readline().decode().split() or [""]
            cmd = words[0]
            if cmd == "who":
                conn.sendall(f"{{peer[0]}} {{peer[1]}}\\n".encode())
            elif cmd == "echo":
                while data := f.read1(65536):
                    conn.sendall(data)
            elif cmd == "sink":
                h, got = hashlib.sha256(), 0
                while data := f.read1(65536):
                    h.update(data)
                    got += len(data)
                    if got >= int(words[1]):
                        break
                conn.sendall(f"{{got}} {{h.hexdigest()}}\\n".encode())
            elif cmd == "source":
                conn.sendall(pattern(int(words[1])))
            elif cmd == "first":
                conn.sendall(b"bye\\n")
                conn.shutdown(socket.SHUT_WR)
                data = b"".join(iter(lambda: f.read1(65536), b""))
                with open(os.path.join(out, "first.tmp"), "wb") as w:
                    w.write(data)
                os.rename(os.path.join(out, "first.tmp"), os.path.join(out, "first"))
            elif cmd == "reset":
                conn.sendall(b"x" * 100000)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            elif cmd == "forwarding":  # the guest routes what is not its own
                with open("/proc/sys/net/ipv4/ip_forward", "w") as knob:
                    knob.write("1")
                conn.sendall(b"on\\n")
            elif cmd == "forge":
                forge(int(words[1]))
                conn.sendall(b"forged\\n")
    def forge(port):
        # A SYN-ACK for no flow and one acknowledging nothing we sent, by raw socket.
        from nsbridge.usernet.proto.packetbuild import build_tcp_head
        raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        for ack in (12345, 999):
            frame = build_tcp_head("10.0.2.100", "10.0.2.2", {SERVER_PORT}, port, 777, ack,
                                   0x12, 1000, vnet=False)
            raw.sendto(frame, ("10.0.2.2", 0))
        raw.close()
    def serve(family, address):
        srv = socket.socket(family, socket.SOCK_STREAM)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        srv.bind((address, {SERVER_PORT}))
        srv.listen(256)
        while True:
            conn, peer = srv.accept()
            threading.Thread(target=handle, args=(conn, peer), daemon=True).start()
    def udp(family, address):
        srv = socket.socket(family, socket.SOCK_DGRAM)
        if family == socket.AF_INET6:
            srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        srv.bind((address, {SERVER_PORT}))
        while True:
            data, peer = srv.recvfrom(65535)
            srv.sendto(f"{{peer[0]}} {{peer[1]}} ".encode() + data, peer)
    threading.Thread(target=udp, args=(socket.AF_INET6, "::"), daemon=True).start()
    threading.Thread(target=udp, args=(socket.AF_INET, "0.0.0.0"), daemon=True).start()
    threading.Thread(target=serve, args=(socket.AF_INET6, "::"), daemon=True).start()
    serve(socket.AF_INET, "0.0.0.0")
""")

# Runs nsbridge in the host namespace; answers "stats" and "fds" on stdin, ends at EOF.
DRIVER = textwrap.dedent("""
    import json, os, sys
    from nsbridge.usernet import api
    config = json.loads(sys.argv[1])
    proc = api.run([sys.executable, "-c", config["server"], config["out"]],
                   publish=config["publish"], publish_mode=config["mode"], tcp=config["tcp"],
                   relay=config["relay"], api_socket=config["api"])
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "stats":
            print(json.dumps(proc.stats()), flush=True)
        elif line.strip() == "fds":
            print(len(os.listdir("/proc/self/fd")), flush=True)
    proc.terminate()
    proc.wait()
    proc.close()
    print("closed", flush=True)
""")


class Sandbox:
    """The driver's process, its ports (host address -> host port) and what it says."""

    def __init__(self, host: str, proc: subprocess.Popen, ports: dict[str, int], out: Path):
        self.host, self.proc, self.ports, self.out = host, proc, ports, out

    def ask(self, what: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(what + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def stats(self) -> dict:
        return json.loads(self.ask("stats"))

    def inbound_stats(self) -> dict:
        stats = self.stats()
        return stats.get("tun_tcp") or stats["tcp"]

    def fds(self) -> int:
        return int(self.ask("fds"))


@pytest.fixture
def world() -> Iterator[tuple[str, str]]:
    """(host, outside): the host namespace and one behind a veth from it."""
    host = new_host_netns(prefix="nsih")
    outside = ""
    try:
        outside = new_outside_netns(host, "nsio")
        yield host, outside
    finally:
        if outside:
            delete_netns(outside)
        delete_netns(host)


@contextmanager
def sandbox(host: str, tmp_path: Path, tcp: str, mode: str = "device",
            guest_ports: dict[str, int] | None = None, relay: str = "auto",
            udp: tuple[str, ...] = ()) -> Iterator[Sandbox]:
    """nsbridge with ports published from each host address (``guest_ports``: the
    namespace port per host address, SERVER_PORT by default; ``udp``: host addresses
    whose SERVER_PORT is published for UDP too, as ``ports["udp " + address]``)."""
    guest_ports = guest_ports or {"127.0.0.1": SERVER_PORT, "::1": SERVER_PORT,
                                  "0.0.0.0": SERVER_PORT, "::": SERVER_PORT}
    ports = {address: free_port(host, host="::1" if ":" in address else "127.0.0.1")
             for address in guest_ports}
    publish = [(f"[{a}]" if ":" in a else a) + f":{ports[a]}:{guest_ports[a]}"
               for a in guest_ports]
    for address in udp:
        ports["udp " + address] = free_port(host, socket.SOCK_DGRAM,
                                            "::1" if ":" in address else "127.0.0.1")
        publish.append((f"[{address}]" if ":" in address else address)
                       + f":{ports['udp ' + address]}:{SERVER_PORT}/udp")
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    config = {"server": SERVER, "out": str(out), "publish": publish, "mode": mode, "tcp": tcp,
              "relay": relay, "api": str(tmp_path / "api.sock")}
    proc = subprocess.Popen(["ip", "netns", "exec", host, sys.executable, "-c", DRIVER,
                             json.dumps(config)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n", \
            proc.stderr.read() if proc.stderr else ""
        box = Sandbox(host, proc, ports, out)
        warm = next(a for a, port in guest_ports.items() if port == SERVER_PORT)
        deadline = time.monotonic() + 15
        while True:  # the server starts with the sandbox
            try:
                talk(host, ("::1" if ":" in warm else "127.0.0.1", ports[warm]), b"who\n")
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    proc.kill()
                    raise AssertionError(proc.stderr.read() if proc.stderr else "") from None
                time.sleep(0.1)
        yield box
        assert proc.stdin is not None
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0, proc.stderr.read() if proc.stderr else ""
        assert proc.stdout.read().strip() == "closed"
        assert "Traceback" not in (proc.stderr.read() if proc.stderr else "")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def talk(ns: str, address: tuple, request: bytes, *, timeout: float = 10,
         source: str | None = None) -> bytes:
    """Connect from namespace ``ns``, send ``request``, shut our side, read to EOF."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET

    def run() -> bytes:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            if source is not None:
                sock.bind((source, 0))
            sock.connect(address)
            sock.sendall(request)
            sock.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
            return data

    return in_netns(ns, run)  # type: ignore[return-value]


def who(ns: str, address: tuple, source: str | None = None) -> str:
    return talk(ns, address, b"who\n", source=source).decode().split()[0]


def pattern(n: int) -> bytes:
    return (bytes(range(251)) * (n // 251 + 1))[:n]


@pytest.mark.parametrize("tcp", USERNET_TCP_MODES)
def test_the_server_sees_the_gateway_for_loopback_and_the_real_client_otherwise(
        world, tmp_path, tcp):
    host, outside = world
    with sandbox(host, tmp_path, tcp) as box:
        p = box.ports
        assert who(host, ("127.0.0.1", p["127.0.0.1"])) == "10.0.2.2"
        assert who(host, ("::1", p["::1"])) == "fd00::2"
        assert who(outside, (HOST_OUTSIDE_V4, p["0.0.0.0"])) == OUTSIDE_V4
        assert who(outside, (HOST_OUTSIDE_V6, p["::"])) == OUTSIDE_V6
        # the host's own non-loopback address is a real client address too
        assert who(host, (HOST_V4, p["0.0.0.0"]), source=HOST_V4) == HOST_V4

        def client_port_kept() -> tuple[int, str]:
            with socket.create_connection((HOST_OUTSIDE_V4, p["0.0.0.0"]), timeout=10) as s:
                s.sendall(b"who\n")
                return s.getsockname()[1], s.makefile().readline()

        mine, seen = in_netns(outside, client_port_kept)  # type: ignore[misc]
        assert seen.split() == [OUTSIDE_V4, str(mine)]
        stats = box.inbound_stats()
        assert stats["inbound"] >= 6, stats


def test_splice_mode_shows_every_client_as_the_namespace_loopback(world, tmp_path):
    host, outside = world
    with sandbox(host, tmp_path, "redirect", mode="splice",
                 guest_ports={"127.0.0.1": SERVER_PORT, "0.0.0.0": SERVER_PORT}) as box:
        assert who(host, ("127.0.0.1", box.ports["127.0.0.1"])) == "127.0.0.1"
        assert who(outside, (HOST_OUTSIDE_V4, box.ports["0.0.0.0"])) == "127.0.0.1"
        assert all("mode" not in entry for entry in box.stats()["published"])


@pytest.mark.parametrize("tcp", USERNET_TCP_MODES)
def test_data_both_ways_half_close_and_resets(world, tmp_path, tcp):
    host, _outside = world
    with sandbox(host, tmp_path, tcp) as box:
        v4, v6 = ("127.0.0.1", box.ports["127.0.0.1"]), ("::1", box.ports["::1"])
        big = os.urandom(MIB)
        for address in (v4, v6):
            # 1 MiB each way, byte-exact
            got = talk(host, address, b"sink %d\n" % MIB + big).decode().split()
            assert got == [str(MIB), hashlib.sha256(big).hexdigest()]
            assert talk(host, address, b"source %d\n" % MIB) == pattern(MIB)
            # the client half-closes first: the guest's echo still comes back after
            assert talk(host, address, b"echo\n" + big) == big

        # the guest half-closes first: the client still sends, and the guest gets it all
        def guest_first() -> bytes:
            with socket.create_connection(v4, timeout=10) as sock:
                sock.sendall(b"first\n")
                assert sock.makefile("rb").read() == b"bye\n"  # EOF from the guest
                sock.sendall(b"after the guest's FIN" * 1000)
                sock.shutdown(socket.SHUT_WR)
                return sock.recv(10)

        assert in_netns(host, guest_first) == b""
        wait = time.monotonic() + 10
        while not (box.out / "first").exists() and time.monotonic() < wait:
            time.sleep(0.05)
        assert (box.out / "first").read_bytes() == b"after the guest's FIN" * 1000

        # the guest resets mid-transfer: the client sees the reset
        with pytest.raises(ConnectionResetError):
            talk(host, v4, b"reset\n")

        # the client resets mid-transfer: the next client is served, nothing is left over
        def client_reset() -> None:
            sock = socket.create_connection(v4, timeout=10)
            sock.sendall(b"source %d\n" % (64 * MIB))
            sock.recv(65536)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()

        before = box.fds()
        in_netns(host, client_reset)
        assert who(host, v4) == "10.0.2.2"
        wait = time.monotonic() + 10
        while box.inbound_stats()["active"] and time.monotonic() < wait:
            time.sleep(0.1)
        assert box.inbound_stats()["active"] == 0
        assert box.fds() <= before


@pytest.mark.parametrize("tcp", USERNET_TCP_MODES)
def test_many_concurrent_clients_each_get_their_own_answer(world, tmp_path, tcp):
    host, _outside = world
    with sandbox(host, tmp_path, tcp) as box:
        address = ("127.0.0.1", box.ports["127.0.0.1"])
        results: list[bytes] = []
        errors: list[BaseException] = []

        def one(i: int) -> None:
            payload = b"%d " % i * 2000
            try:
                echoed = talk(host, address, b"echo\n" + payload)
                results.append(b"ok" if echoed == payload else b"wrong")
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(64)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors[:3]
        assert results == [b"ok"] * 64


def test_a_closed_guest_port_resets_at_once_and_a_silent_one_after_the_syn_retries(
        world, tmp_path):
    host, _outside = world
    ports = {"127.0.0.1": CLOSED_PORT, "0.0.0.0": SILENT_PORT, "::1": SERVER_PORT}
    with sandbox(host, tmp_path, "redirect", guest_ports=ports) as box:
        started = time.monotonic()
        with pytest.raises(ConnectionResetError):
            talk(host, ("127.0.0.1", box.ports["127.0.0.1"]), b"who\n")
        assert time.monotonic() - started < 2

        before = box.fds()
        outcomes: list[object] = []

        def silent() -> None:
            began = time.monotonic()
            try:
                talk(host, (HOST_V4, box.ports["0.0.0.0"]), b"who\n", timeout=40)
                outcomes.append("answered")
            except OSError as exc:
                outcomes.append((type(exc).__name__, time.monotonic() - began))

        threads = [threading.Thread(target=silent) for _ in range(5)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert all(isinstance(o, tuple) and o[0] == "ConnectionResetError" and 5 < o[1] < 30
                   for o in outcomes), outcomes
        stats = box.inbound_stats()
        assert stats["inbound_refused"] >= 1 and stats["inbound_timeout"] == 5, stats
        assert stats["active"] == 0
        assert box.fds() <= before


def test_hostile_guest_segments_are_reset_and_counted(world, tmp_path):
    """A SYN-ACK for no flow is a stray the engine resets; a SYN-ACK that acknowledges
    what our SYN was not (sans-IO: tests/unit/test_tcpstate.py) cannot open anything."""
    host, _outside = world
    with sandbox(host, tmp_path, "redirect", guest_ports={"::1": SERVER_PORT}) as box:
        before = box.stats()
        assert talk(host, ("::1", box.ports["::1"]), b"forge 40000\n") == b"forged\n"
        wait = time.monotonic() + 5
        while (box.stats()["engine"]["tcp_resets"] < before["engine"]["tcp_resets"] + 2
               and time.monotonic() < wait):
            time.sleep(0.1)
        after = box.stats()
        assert after["engine"]["tcp_resets"] >= before["engine"]["tcp_resets"] + 2, after
        assert after["tun_tcp"]["inbound"] == before["tun_tcp"]["inbound"] + 1
        assert after["tun_tcp"]["active"] == 0


def test_a_client_port_used_again_at_once_is_served_at_once(world, tmp_path):
    """The guest closed first, so it holds the last connection's four-tuple in TIME-WAIT
    when the same client port comes again: our SYN must still be taken promptly."""
    host, outside = world
    with sandbox(host, tmp_path, "redirect", guest_ports={"0.0.0.0": SERVER_PORT}) as box:
        port = box.ports["0.0.0.0"]

        def again() -> list[float]:
            times = []
            for _ in range(20):
                began = time.monotonic()
                with socket.socket() as sock:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.settimeout(10)
                    sock.bind((OUTSIDE_V4, 40123))
                    sock.connect((HOST_OUTSIDE_V4, port))
                    sock.sendall(b"who\n")
                    seen = sock.makefile().readline().split()
                    assert seen[0] == OUTSIDE_V4, seen
                    sock.shutdown(socket.SHUT_WR)
                    assert sock.recv(10) == b""
                times.append((time.monotonic() - began, seen[1]))  # (seconds, port)
                time.sleep(0.05)
            return times

        times = in_netns(outside, again)
        assert max(times)[0] < 0.15, times  # type: ignore[call-overload]


@pytest.mark.parametrize("relay", ["native", "engine"])
def test_udp_ports_keep_the_client_address_too(world, tmp_path, relay):
    """Through the engine's UDP flows (and handed to the native relay when it serves
    UDP): the answers come back from the published port, a flow per client."""
    host, outside = world
    with sandbox(host, tmp_path, "redirect", relay=relay, guest_ports={"::1": SERVER_PORT},
                 udp=("127.0.0.1", "::1", "0.0.0.0")) as box:
        def exchange(address: tuple) -> list[tuple[bytes, tuple]]:
            family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
            with socket.socket(family, socket.SOCK_DGRAM) as sock:
                sock.settimeout(5)
                answers = []
                for n in range(3):  # the first makes the flow, the others use it
                    sock.sendto(b"ping %d" % n, address)
                    data, source = sock.recvfrom(65535)
                    answers.append((data.replace(b"%d" % sock.getsockname()[1], b"PORT"),
                                    source[:2]))
                return answers

        def answers_for(ns: str, address: tuple, seen: str) -> None:
            deadline = time.monotonic() + 15
            while True:
                try:
                    got = in_netns(ns, lambda: exchange(address))
                    break
                except TimeoutError:
                    if time.monotonic() > deadline:
                        raise
            assert got == [(b"%s PORT ping %d" % (seen.encode(), n), address)
                           for n in range(3)], got

        p = box.ports
        answers_for(host, ("127.0.0.1", p["udp 127.0.0.1"]), "10.0.2.2")
        answers_for(host, ("::1", p["udp ::1"]), "fd00::2")
        answers_for(outside, (HOST_OUTSIDE_V4, p["udp 0.0.0.0"]), OUTSIDE_V4)
        stats = box.stats()
        assert stats["engine"]["udp_flows_inbound"] == 3, stats["engine"]
        if relay == "native":  # the guest's first answer handed each flow to the relay
            assert stats["engine"]["native"]["udp_flows_opened"] == 3, stats["engine"]
        assert [e["protocol"] for e in stats["published"]].count("udp") == 3


def call(path: Path, **arguments: object) -> dict:
    """One add_hostfwd on the API socket (slirp4netns's protocol)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(json.dumps({"execute": "add_hostfwd", "arguments": arguments}).encode())
        sock.shutdown(socket.SHUT_WR)
        return json.loads(b"".join(iter(lambda: sock.recv(65536), b"")))


@pytest.mark.parametrize("tcp", USERNET_TCP_MODES)
def test_a_port_to_another_address_of_the_network_cannot_be_bounced_out(world, tmp_path, tcp):
    """Bypass attempt: a hostfwd to an address of the namespace's network that is not the
    guest's, with the guest forwarding.  Our SYN (from the outside client's address) is
    routed by the guest back out of the device; there it is a foreign-source packet (tun
    path) or a SYN nobody opened (fast path): dropped or reset, never dialed out."""
    host, outside = world
    with sandbox(host, tmp_path, tcp, guest_ports={"::1": SERVER_PORT}) as box:
        assert talk(host, ("::1", box.ports["::1"]), b"forwarding\n") == b"on\n"
        port = free_port(host)
        assert call(tmp_path / "api.sock", proto="tcp", host_addr="0.0.0.0", host_port=port,
                    guest_addr="10.0.2.50", guest_port=SERVER_PORT) == {"return": {"id": 1}}
        before = box.stats()

        def attempt() -> bytes:
            try:
                with socket.create_connection((HOST_OUTSIDE_V4, port), timeout=10) as sock:
                    sock.settimeout(2)
                    sock.sendall(b"who\n")
                    return sock.recv(100)
            except (TimeoutError, ConnectionResetError, BrokenPipeError):
                return b""  # reset (fast path), or never answered (tun path)

        assert in_netns(outside, attempt) == b""
        after = box.stats()
        engine, was = after["engine"], before["engine"]
        if tcp == "tun":
            assert (engine["drops"].get("foreign source address", 0)
                    > was["drops"].get("foreign source address", 0)), engine
        else:
            assert engine["tcp_resets"] > was["tcp_resets"], engine
        tcp_now = after.get("tun_tcp") or after["tcp"]
        assert tcp_now.get("connect_failed", 0) == (before.get("tun_tcp") or before["tcp"]).get(
            "connect_failed", 0)  # nothing was dialed from the host for it
