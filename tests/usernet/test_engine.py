"""nsbridge.usernet.host.engine: the tun engine against real clients in a real sandbox.

Run as root: /dev/net/tun may be mode 0600, and the tests create namespaces.

Network rule: no packet leaves the machine.  Each end-to-end test creates a "host"
namespace (``ip netns add``) with ``lo`` up, a veth pair whose both ends stay inside it
(192.0.2.1/24 and 2001:db8::1/64, documentation ranges, on ``v0``), a permissive
``net.ipv4.ping_group_range``, and its servers: UDP echo servers on its loopback and on
the veth address, and a dnspython DNS server on 127.0.0.1:53.  The engine's event loop
runs in a thread that entered that namespace, so every host socket the engine makes
lives there; the sandbox (a new user+network namespace with the tun device) runs a
real client — ``dig``, ``ping`` and a Python program — that reaches the host namespace
only through the engine.  Destinations without a route in the host namespace fail
there with ENETUNREACH.

Sans-IO checks of :func:`build_tcp_rst` and frame-level engine checks (malformed frames,
TCP resets, denials, DNS failures) use a datagram socketpair in place of the tun: the
same message-per-frame semantics, and the test can read exactly what the engine wrote.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import dns.update
import pytest

from helpers.environment import have
from helpers.netns import in_netns
from helpers.servers import UdpServer
from helpers.tun_engine import DNS4, GW4, NS4, NS6, EngineRunner, PairEngine
from helpers.waiting import wait_until
from nsbridge.usernet.host.engine import TunOutput
from nsbridge.usernet.inside.sandbox import Sandbox, SandboxHandle
from nsbridge.usernet.proto.checksum import l4_checksum
from nsbridge.usernet.proto.packetbuild import build_icmp_echo, build_tcp_rst, build_udp
from nsbridge.usernet.proto.packets import (
    PROTO_TCP,
    PROTO_UDP,
    TCP_ACK,
    TCP_FIN,
    TCP_RST,
    TCP_SYN,
    ICMPEcho,
    ICMPError,
    Parsed,
    parse_frame,
)
from nsbridge.usernet.proto.policy import Policy
from nsbridge.usernet.proto.rules import Rule

pytestmark = pytest.mark.skipif(
    not os.path.exists("/dev/net/tun"), reason="no /dev/net/tun on this machine"
)
needs_tools = pytest.mark.skipif(
    not (have("ip") and have("dig") and have("ping")), reason="needs ip, dig and ping"
)

DNS_NAME = "test.example."
DNS_A = "192.0.2.53"


# ---- sans-IO: build_tcp_rst -------------------------------------------------------------


def tcp_frame(src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int,
              flags: int, payload: bytes = b"") -> bytes:
    """A TCP segment as a tun frame (virtio header + IP + TCP), checksummed."""
    header = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, 65535, 0, 0)
    csum = l4_checksum(src, dst, PROTO_TCP, header + payload)
    header = header[:16] + struct.pack("!H", csum) + header[18:]
    segment = header + payload
    if len(src) == 4:
        ip = _ipv4(PROTO_TCP, segment, src, dst)
    else:
        ip = struct.pack("!IHBB16s16s", 0x60000000, len(segment), PROTO_TCP, 64, src, dst)
    return bytes(10) + ip + segment


def parsed_tcp(frame: bytes) -> Parsed:
    parsed = parse_frame(frame)
    assert isinstance(parsed, Parsed), parsed
    return parsed


@pytest.mark.parametrize("src, dst", [(NS4, b"\xc0\x00\x02\x01"),
                                      (NS6, ipaddress.IPv6Address("2001:db8::1").packed)])
def test_build_tcp_rst(src: bytes, dst: bytes) -> None:
    # A SYN (no ACK): RST|ACK, seq 0, ack = seq + 1 (the SYN counts one).
    syn = parsed_tcp(tcp_frame(src, dst, 40000, 443, 1000, 0, TCP_SYN))
    reply = parse_frame(build_tcp_rst(syn) or b"")  # parse_frame checks every checksum
    assert isinstance(reply, Parsed)
    assert (reply.ip.src, reply.ip.dst) == (dst, src)
    tcp = reply.l4
    assert (tcp.sport, tcp.dport, tcp.seq, tcp.ack) == (443, 40000, 0, 1001)
    assert tcp.flags == TCP_RST | TCP_ACK and tcp.window == 0 and tcp.payload == b""
    # Data with FIN and no ACK: ack covers payload + FIN, wrapping at 2**32.
    fin = parsed_tcp(tcp_frame(src, dst, 40000, 443, 0xFFFFFFFE, 0, TCP_FIN, b"abc"))
    reply = parse_frame(build_tcp_rst(fin) or b"")
    assert isinstance(reply, Parsed) and reply.l4.ack == (0xFFFFFFFE + 4) & 0xFFFFFFFF
    # A segment with ACK: plain RST whose seq is the ACK number.
    ack = parsed_tcp(tcp_frame(src, dst, 40000, 443, 5, 777, TCP_ACK, b"data"))
    reply = parse_frame(build_tcp_rst(ack, vnet=False), vnet=False)
    assert isinstance(reply, Parsed)
    assert (reply.l4.seq, reply.l4.ack, reply.l4.flags) == (777, 0, TCP_RST)
    # A reset is never answered.
    assert build_tcp_rst(parsed_tcp(tcp_frame(src, dst, 1, 2, 3, 4, TCP_RST))) is None
    udp = parse_frame(build_udp(src, dst, 1, 2, b"x"))
    assert isinstance(udp, Parsed)
    with pytest.raises(ValueError):
        build_tcp_rst(udp)


# ---- the engine on a socketpair (frames in, frames out) ---------------------------------


@pytest.fixture
def pair_engine() -> Iterator[Callable[..., PairEngine]]:
    made: list[PairEngine] = []

    def make(policy: Policy | None = None, resolvers: list[tuple[str, int]] | None = None,
             **kwargs: Any) -> PairEngine:
        engine = PairEngine(policy or Policy(), resolvers or [], **kwargs)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.close()


def ipv4_frame(proto: int, l4: bytes, src: bytes = NS4, dst: bytes = GW4) -> bytes:
    """A tun frame (empty virtio header) holding any IPv4 payload, header checksummed."""
    return bytes(10) + _ipv4(proto, l4, src, dst) + l4


def _ipv4(proto: int, l4: bytes, src: bytes, dst: bytes) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 0, 0x4000, 64, proto, 0,
                         src, dst)
    total = sum(struct.unpack("!10H", header))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return header[:10] + struct.pack("!H", ~total & 0xFFFF) + header[12:]


def test_engine_counts_bad_frames_and_keeps_working(pair_engine: Callable[..., PairEngine],
                                                    ) -> None:
    engine = pair_engine()  # host loopback off: the gateway is denied
    good = build_udp(NS4, GW4, 5000, 7, b"hello")
    bad_udp_csum = bytearray(good)
    bad_udp_csum[-1] ^= 0xFF
    bad_ip_csum = bytearray(good)
    bad_ip_csum[10 + 10] ^= 0xFF
    fragment = bytearray(good)
    fragment[10 + 6] |= 0x20  # MF
    frames = {
        "truncated virtio_net_hdr": b"\0" * 5,
        "empty packet": bytes(10),
        "bad ip version": bytes(10) + b"\x50" + bytes(30),
        "truncated ipv4 header": bytes(10) + b"\x45\0\0",
        "bad udp checksum": bytes(bad_udp_csum),
        "bad ipv4 header checksum": bytes(bad_ip_csum),
        "fragment": bytes(fragment),
        "truncated udp header": ipv4_frame(PROTO_UDP, b"\0\1\0"),
    }
    for frame in frames.values():
        engine.send(frame)
    engine.send(ipv4_frame(132, b"sctp"))  # well-formed, unsupported protocol
    # Still working: the denied datagram is answered with admin-prohibited from the
    # gateway, quoting it; an echo to the gateway is answered by the gateway itself.
    engine.send(good)
    reply = engine.receive()
    assert isinstance(reply.l4, ICMPError) and (reply.l4.type, reply.l4.code) == (3, 13)
    assert reply.ip.src == GW4 and reply.ip.dst == NS4
    assert reply.l4.quoted.startswith(good[10:38])
    engine.send(build_icmp_echo(NS4, GW4, 9, 1, b"ping", reply=False))
    reply = engine.receive()
    assert isinstance(reply.l4, ICMPEcho) and reply.l4.reply and reply.l4.payload == b"ping"
    assert reply.ip.src == GW4 and reply.ip.dst == NS4
    # TCP: every SYN gets a reset at once.
    engine.send(tcp_frame(NS4, b"\xc0\x00\x02\x01", 40000, 80, 100, 0, TCP_SYN))
    reset = engine.receive()
    assert reset.l4.flags == TCP_RST | TCP_ACK and reset.l4.ack == 101
    engine.send(tcp_frame(NS4, b"\xc0\x00\x02\x01", 40000, 80, 100, 0, TCP_RST))
    assert engine.nothing_pending()
    # A source that is not the namespace's does not open flows.
    engine.send(build_udp(b"\xc0\xa8\x01\x01", GW4, 5000, 7, b"spoofed"))
    assert engine.nothing_pending()

    stats = engine.runner.stats()
    assert stats["malformed"] == dict.fromkeys(frames, 1)
    assert stats["unsupported"] == {"ip protocol 132": 1}
    assert stats["denied"] == {"host loopback disabled": 1}
    assert stats["unreachable_sent"] == {"admin": 1}
    assert stats["icmp_echo_local"] == 1
    assert stats["tcp_resets"] == 1
    assert stats["drops"] == {"foreign source address": 1}
    assert stats["errors"] == 0
    assert stats["frames_in"] == len(frames) + 6 and stats["frames_out"] == 3


def test_engine_dns_servfail_and_malformed(pair_engine: Callable[..., PairEngine],
                                           netns: str) -> None:
    # Resolvers in a fresh namespace: one silent (times out), one refusing (no listener).
    def silent() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.2", 53))
        return sock

    sink = in_netns(netns, silent)
    try:
        engine = pair_engine(resolvers=[("127.0.0.2", 53), ("127.0.0.1", 53)], netns=netns,
                             dns_timeout=0.3)
        query = dns.message.make_query(DNS_NAME, "A")
        query.id = 0x1234
        engine.send(build_udp(NS4, DNS4, 5353, 53, query.to_wire()))
        response = b"\x12\x34\x80\0" + bytes(8) + b"garbage"  # a response, not a query
        engine.send(build_udp(NS4, DNS4, 5354, 53, response))
        reply = engine.receive()
        assert (reply.ip.src, reply.l4.sport, reply.l4.dport) == (DNS4, 53, 5353)
        answer = dns.message.from_wire(reply.l4.payload)
        assert answer.id == 0x1234 and answer.rcode() == dns.rcode.SERVFAIL
        assert str(answer.question[0].name) == DNS_NAME
        stats = engine.runner.stats()
        assert stats["dns_queries"] == 2 and stats["dns_malformed"] == 1
        assert stats["malformed"] == {"dns: not a query": 1}
        assert stats["dns_failures"] == 1 and stats["dns_retries"] == 2
    finally:
        sink.close()


# ---- end to end: a sandbox, a host namespace, real clients --------------------------------


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def host_ns(make_netns: Callable[[], str]) -> str:
    """The "host" namespace: lo, a veth pair with documentation addresses, ping sockets."""
    name = make_netns()
    _ip("-n", name, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
    _ip("-n", name, "addr", "add", "192.0.2.1/24", "dev", "v0")
    _ip("-n", name, "addr", "add", "2001:db8::1/64", "dev", "v0", "nodad")
    _ip("-n", name, "link", "set", "v0", "up")
    _ip("-n", name, "link", "set", "v1", "up")
    set_ping_range(name, "0 2147483647")
    return name


def set_ping_range(netns: str, value: str) -> None:
    subprocess.run(["ip", "netns", "exec", netns, "sysctl", "-w",
                    f"net.ipv4.ping_group_range={value}"], check=True, capture_output=True)


class DnsServer:
    """A dnspython answerer on 127.0.0.1:53 in a namespace: A and AAAA for one name."""

    def __init__(self, netns: str) -> None:
        def bind() -> socket.socket:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("127.0.0.1", 53))
            return sock

        self.sock: socket.socket = in_netns(netns, bind)  # type: ignore[assignment]
        self.sock.settimeout(0.1)
        self.queries = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(1 << 16)
            except TimeoutError:
                continue
            except OSError:
                return
            self.queries += 1
            query = dns.message.from_wire(data)
            response = dns.message.make_response(query)
            question = query.question[0]
            if str(question.name) == DNS_NAME and question.rdtype == dns.rdatatype.A:
                response.answer.append(dns.rrset.from_text(DNS_NAME, 60, "IN", "A", DNS_A))
            elif str(question.name) != DNS_NAME:
                response.set_rcode(dns.rcode.NXDOMAIN)
            self.sock.sendto(response.to_wire(), peer)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.sock.close()


# The program run inside the sandbox: steps in argv[1] (JSON), one result per step out.
CLIENT = textwrap.dedent(r"""
    import errno, json, socket, subprocess, sys, time

    def udp(step):
        host, port = step["host"], step["port"]
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.settimeout(2)
            if step.get("recverr"):  # see soft ICMP errors too (net/host unreachable)
                s.setsockopt(socket.IPPROTO_IP, 11, 1)  # IP_RECVERR
            s.connect((host, port))
            for _ in range(3):
                try:
                    s.send(step["data"].encode())
                    return {"reply": s.recv(65536).decode()}
                except TimeoutError:
                    continue
                except OSError as exc:
                    return {"error": errno.errorcode.get(exc.errno, str(exc.errno))}
        return {"error": "timeout"}

    def big_udp(step):
        host, port = step["host"], step["port"]
        data = bytes(range(256)) * (step["size"] // 256)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(2)
            s.connect((host, port))
            s.send(data)
            return {"same": s.recv(65536) == data}

    def tcp(step):
        family = socket.AF_INET6 if ":" in step["host"] else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            start = time.monotonic()
            try:
                s.connect((step["host"], step["port"]))
                return {"error": None}
            except OSError as exc:
                return {"error": errno.errorcode.get(exc.errno, str(exc.errno)),
                        "seconds": time.monotonic() - start}

    def run(argv):
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        return {"code": proc.returncode, "out": proc.stdout + proc.stderr}

    def dig(step):
        return run(["dig", "+tries=1", "+time=3", "@" + step["server"], step["name"],
                    step.get("type", "A")])

    def ping(step):
        return run(["ping", "-c", "2", "-i", "0.2", "-W", "3", step["host"]])

    def garbage(step):
        # Hostile frames straight onto the tun device, past the namespace's IP stack.
        with socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0800)) as s:
            for data in step["frames"]:
                s.sendto(bytes.fromhex(data), ("nsb0", 0x0800))
        return {}

    def send_only(step):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(bytes.fromhex(step["hex"]), (step["host"], step["port"]))
        return {}

    results = []
    for step in json.loads(sys.argv[1]):
        results.append(globals()[step["op"]](step))
    print(json.dumps(results))
""")


@pytest.fixture
def sandboxes() -> Iterator[list[SandboxHandle]]:
    handles: list[SandboxHandle] = []
    yield handles
    for handle in handles:
        if handle.pid is not None and handle.returncode is None and handle.started:
            handle.kill(9)
            handle.wait(timeout=10)
        handle.close()


def run_client(tmp_path: Path, host: str, steps: list[dict], policy: Policy,
               sandboxes: list[SandboxHandle], resolvers: list[tuple[str, int]] | None = None,
               after: Callable[[EngineRunner], None] | None = None, **kwargs: Any,
               ) -> tuple[list[dict], dict[str, Any]]:
    """Run CLIENT with ``steps`` in a new sandbox served by an engine in ``host``.

    Returns the client's results and the engine's stats (taken after ``after`` ran).
    """
    out_path = tmp_path / f"client-{uuid.uuid4().hex[:6]}.json"
    with open(out_path, "w") as out:
        handle = Sandbox.create([sys.executable, "-c", CLIENT, json.dumps(steps)],
                                hold=True, stdout=out.fileno())
    sandboxes.append(handle)
    runner = EngineRunner(handle.tun, handle.vnet_hdr_size, handle.offloads, policy,
                          resolvers if resolvers is not None else [("127.0.0.1", 53)],
                          host, **kwargs)
    try:
        handle.start()
        code = handle.wait(timeout=120)
        text = out_path.read_text()
        assert code == 0, text
        if after is not None:
            after(runner)
        stats = runner.stats()
    finally:
        runner.stop()
    return json.loads(text), stats


def test_dig_udp_and_ping_with_host_loopback(tmp_path: Path, host_ns: str, udp_server: Any,
                                             sandboxes: list[SandboxHandle]) -> None:
    lo4 = udp_server(host_ns, host="127.0.0.1")
    lo6 = udp_server(host_ns, host="::1")
    far4 = udp_server(host_ns, host="192.0.2.1")
    far6 = udp_server(host_ns, host="2001:db8::1")
    resolver = DnsServer(host_ns)
    try:
        steps = [
            {"op": "dig", "server": "10.0.2.3", "name": DNS_NAME},
            {"op": "dig", "server": "fd00::3", "name": "nothing.example."},
            {"op": "udp", "host": "10.0.2.2", "port": lo4.port, "data": "lo-v4"},
            {"op": "udp", "host": "fd00::2", "port": lo6.port, "data": "lo-v6"},
            {"op": "udp", "host": "192.0.2.1", "port": far4.port, "data": "far-v4"},
            {"op": "udp", "host": "2001:db8::1", "port": far6.port, "data": "far-v6"},
            {"op": "big_udp", "host": "192.0.2.1", "port": far4.port, "size": 30000},
            {"op": "ping", "host": "10.0.2.2"},
            {"op": "ping", "host": "fd00::2"},
            {"op": "ping", "host": "192.0.2.1"},
            {"op": "ping", "host": "2001:db8::1"},
            # Closed port: the host socket's ECONNREFUSED comes back as port unreachable.
            {"op": "udp", "host": "192.0.2.1", "port": 9, "data": "nobody"},
            # No route in the host namespace: net unreachable, nothing sent anywhere.
            # (A soft error: Linux reports it on a connected socket with IP_RECVERR.)
            {"op": "udp", "host": "198.51.100.1", "port": 9, "data": "x", "recverr": True},
            # TCP reaching the tun is reset at once.
            {"op": "tcp", "host": "192.0.2.1", "port": 80},
            {"op": "tcp", "host": "2001:db8::1", "port": 80},
            # Hostile frames and a garbage DNS query; then the engine still works.
            {"op": "garbage", "frames": [
                "50" + "00" * 30,
                "4500",
                (_ipv4(PROTO_UDP, b"\0\1\0", NS4, GW4) + b"\0\1\0").hex(),
            ]},
            {"op": "send_only", "host": "10.0.2.3", "port": 53, "hex": "00"},
            {"op": "udp", "host": "10.0.2.2", "port": lo4.port, "data": "still-working"},
        ]
        results, stats = run_client(tmp_path, host_ns, steps,
                                    Policy(allow_host_loopback=True), sandboxes)
    finally:
        resolver.close()
    digs, udps, big, pings = results[0:2], results[2:6], results[6], results[7:11]
    assert digs[0]["code"] == 0 and "status: NOERROR" in digs[0]["out"], digs[0]
    assert f"{DNS_NAME}\t\t60\tIN\tA\t{DNS_A}" in digs[0]["out"].replace(" ", "\t")
    assert "status: NXDOMAIN" in digs[1]["out"], digs[1]
    assert [r.get("reply") for r in udps] == ["lo-v4", "lo-v6", "far-v4", "far-v6"]
    assert big == {"same": True}
    for result in pings:
        assert result["code"] == 0 and "2 received" in result["out"], result
    assert results[11] == {"error": "ECONNREFUSED"}
    assert results[12] == {"error": "ENETUNREACH"}
    for result in results[13:15]:
        assert result["error"] == "ECONNREFUSED" and result["seconds"] < 2, result
    assert results[17] == {"reply": "still-working"}

    assert resolver.queries == 2
    assert stats["dns_answers"] == 2 and stats["dns_failures"] == 0
    assert stats["dns_queries"] == 3 and stats["dns_malformed"] == 1
    assert stats["icmp_echo_local"] == 4  # the gateway pings, v4 and v6
    assert stats["icmp_echo_replies"] >= 8
    assert stats["icmp_sockets"] == {"ping": 2}
    assert stats["tcp_resets"] >= 2
    assert stats["unreachable_sent"] == {"port": 1, "net": 1}
    assert stats["malformed"]["bad ip version"] == 1
    assert stats["malformed"]["truncated ipv4 header"] == 1
    assert stats["malformed"]["truncated udp header"] == 1
    assert stats["malformed"]["dns: truncated header"] == 1
    assert stats["udp_flows_total"] >= 7 and stats["errors"] == 0
    assert not stats["denied"]


def test_host_loopback_denied_but_gateway_ping_and_other_addresses_reachable(
        tmp_path: Path, host_ns: str, udp_server: Any,
        sandboxes: list[SandboxHandle]) -> None:
    lo4 = udp_server(host_ns, host="127.0.0.1")
    far4 = udp_server(host_ns, host="192.0.2.1")
    far6 = udp_server(host_ns, host="2001:db8::1")
    blocked = udp_server(host_ns, host="192.0.2.1")
    policy = Policy(rules=[Rule.parse("deny", f"udp:192.0.2.1:{blocked.port}")])
    steps = [
        {"op": "udp", "host": "10.0.2.2", "port": lo4.port, "data": "x"},
        {"op": "udp", "host": "fd00::2", "port": lo4.port, "data": "x"},
        {"op": "ping", "host": "10.0.2.2"},
        {"op": "udp", "host": "192.0.2.1", "port": far4.port, "data": "far-v4"},
        {"op": "udp", "host": "2001:db8::1", "port": far6.port, "data": "far-v6"},
        {"op": "udp", "host": "192.0.2.1", "port": blocked.port, "data": "x"},
        {"op": "ping", "host": "192.0.2.1"},
    ]
    results, stats = run_client(tmp_path, host_ns, steps, policy, sandboxes)
    # Admin-prohibited: EHOSTUNREACH for IPv4, EACCES for IPv6 (the kernel's mapping).
    assert results[0] == {"error": "EHOSTUNREACH"}
    assert results[1] == {"error": "EACCES"}
    # the gateway answers ping itself, host loopback or not (nothing reaches the host)
    assert results[2]["code"] == 0, results[2]
    assert results[3] == {"reply": "far-v4"} and results[4] == {"reply": "far-v6"}
    assert results[5] == {"error": "EHOSTUNREACH"}
    assert results[6]["code"] == 0, results[6]
    assert not lo4.peers and not blocked.peers  # nothing denied reached a server
    assert stats["denied"]["host loopback disabled"] >= 2
    assert stats["denied"]["deny rule"] >= 1
    assert stats["unreachable_sent"]["admin"] >= 3
    assert stats["icmp_echo_local"] >= 1


def test_raw_socket_fallback_idle_expiry_and_no_fd_leak(
        tmp_path: Path, host_ns: str, udp_server: Any,
        sandboxes: list[SandboxHandle]) -> None:
    set_ping_range(host_ns, "1 0")  # no ping sockets for anyone: root falls back to raw
    far4 = udp_server(host_ns, host="192.0.2.1")
    before = set(os.listdir("/proc/self/fd"))
    steps = [
        {"op": "udp", "host": "192.0.2.1", "port": far4.port, "data": "a"},
        {"op": "ping", "host": "192.0.2.1"},
        {"op": "ping", "host": "2001:db8::1"},
    ]
    def wait_for_expiry(runner: EngineRunner) -> None:
        wait_until(lambda: runner.stats()["udp_flows_active"] == 0
                   and runner.stats()["icmp_flows_active"] == 0, timeout=10,
                   what="idle flows to expire")

    results, stats = run_client(tmp_path, host_ns, steps, Policy(), sandboxes,
                                after=wait_for_expiry, idle_timeout=0.5)
    assert results[0] == {"reply": "a"}
    assert results[1]["code"] == 0 and results[2]["code"] == 0, results
    assert stats["icmp_sockets"] == {"raw": 2}
    assert stats["udp_flows_expired"] == 1 and stats["icmp_flows_expired"] == 2
    for handle in sandboxes:
        handle.close()
    assert set(os.listdir("/proc/self/fd")) == before


def test_echo_fast_path_writes_what_the_generic_path_writes(
        pair_engine: Callable[..., PairEngine], host_ns: str) -> None:
    """The first echo of a flow takes the generic path (parse, policy, a ping socket);
    later ones the IPv4 ping-socket fast path (icmpecho.EchoFlows.fast_request4 and
    _on_ping_reply4).  Both must write byte-identical replies, and the fast path must
    drop what parse_frame drops."""
    engine = pair_engine(netns=host_ns)
    far = socket.inet_aton("192.0.2.1")
    payloads = [b"first, generic", b"odd", b"even", b"", bytes(range(256)) * 4]
    for seq, payload in enumerate(payloads, 1):
        engine.send(build_icmp_echo(NS4, far, 77, seq, payload, reply=False))
        assert engine.test_end.recv(1 << 17) == build_icmp_echo(far, NS4, 77, seq, payload)
    # A bad ICMP checksum on the flow's next request: dropped and counted, no reply.
    bad = bytearray(build_icmp_echo(NS4, far, 77, 99, b"bad", reply=False))
    bad[10 + 20 + 2] ^= 0xFF
    engine.send(bytes(bad))
    assert engine.nothing_pending()
    stats = engine.runner.stats()
    assert stats["icmp_sockets"] == {"ping": 1} and stats["icmp_flows_total"] == 1
    assert stats["icmp_echo_requests"] == len(payloads)
    assert stats["icmp_echo_replies"] == len(payloads)
    assert sum(stats["malformed"].values()) == 1
    assert stats["frames_in"] == len(payloads) + 1


def test_native_relay_entry_points_decide_and_answer_through_its_output(
        pair_engine: Callable[..., PairEngine], host_ns: str, udp_server: Any) -> None:
    """The native relay decides each new flow by calling the engine (admit_udp,
    admit_echo, open_udp_socket, open_ping_socket, answer_host_error, with a TunOutput
    for its own device): the engine's decisions, answered on that device without a
    virtio header, never on the engine's tun, and sockets connected where the policy
    says.  Checked here without the C module, which only calls these."""
    echo = udp_server(host_ns, host="192.0.2.1")
    blocked = udp_server(host_ns, host="192.0.2.1")
    policy = Policy(allow_host_loopback=True,
                    rules=[Rule.parse("deny", f"udp:192.0.2.1:{blocked.port}")])
    engine = pair_engine(policy, netns=host_ns)
    runner = engine.runner
    assert runner.engine is not None
    tun_engine = runner.engine
    far = socket.inet_aton("192.0.2.1")
    written: list[bytes] = []
    out = TunOutput(written.append, False)

    def first(frame: bytes) -> Parsed:
        parsed = parse_frame(frame, vnet=False)
        assert isinstance(parsed, Parsed), parsed
        return parsed

    def decide() -> dict[str, Any]:
        denied = first(build_udp(NS4, far, 5000, blocked.port, b"no", vnet=False))
        allowed = first(build_udp(NS4, far, 5001, echo.port, b"yes", vnet=False))
        spoofed = first(build_udp(GW4, far, 5002, echo.port, b"spoof", vnet=False))
        gateway = first(build_icmp_echo(NS4, GW4, 7, 1, b"gw", reply=False, vnet=False))
        ping = first(build_icmp_echo(NS4, far, 8, 1, b"far", reply=False, vnet=False))
        allow = tun_engine.admit_udp(allowed, allowed.l4, out)
        ping_allow = tun_engine.admit_echo(ping, out)
        assert allow is not None and ping_allow is not None
        return {
            "denied": tun_engine.admit_udp(denied, denied.l4, out),
            "spoofed": tun_engine.admit_udp(spoofed, spoofed.l4, out),
            "gateway": tun_engine.admit_echo(gateway, out),
            "udp_fd": tun_engine.open_udp_socket(allowed, allow, out),
            "ping_fd": tun_engine.open_ping_socket(ping, ping_allow, out),
            "refused": tun_engine.answer_host_error(errno.ECONNREFUSED, allowed.packet,
                                                    far, out),
            "no_kind": tun_engine.answer_host_error(errno.EINVAL, allowed.packet, far, out),
        }

    decided = runner.call(decide)
    assert decided["denied"] is None and decided["spoofed"] is None
    assert decided["gateway"] is None
    assert decided["refused"] is True and decided["no_kind"] is False
    # The sockets are the relay's now, connected to the allowed destinations.
    with socket.socket(fileno=decided["udp_fd"]) as udp:
        udp.settimeout(5)
        udp.send(b"through the relay's socket")
        assert udp.recv(100) == b"through the relay's socket"
    with socket.socket(fileno=decided["ping_fd"]) as ping_sock:
        assert ping_sock.type == socket.SOCK_DGRAM and ping_sock.proto == socket.IPPROTO_ICMP
        ping_sock.settimeout(5)
        ping_sock.send(struct.pack("!BBHHH", 8, 0, 0, 0, 1) + b"relay")  # the kernel sums
        reply, source = ping_sock.recvfrom(100)
        assert reply[0] == 0 and reply[8:] == b"relay" and source[0] == "192.0.2.1"
    # Answers went to the relay's device (no virtio header): admin-prohibited from the
    # gateway, the gateway's own echo reply, port unreachable from the destination.
    answers = [parse_frame(frame, vnet=False) for frame in written]
    assert all(isinstance(answer, Parsed) for answer in answers), answers
    kinds = [(a.ip.src, type(a.l4).__name__, getattr(a.l4, "code", None))  # type: ignore[union-attr]
             for a in answers]
    assert kinds == [(GW4, "ICMPError", 13), (GW4, "ICMPEcho", None), (far, "ICMPError", 3)]
    assert engine.nothing_pending()  # nothing on the engine's own tun
    assert not blocked.peers
    stats = runner.stats()
    assert stats["denied"] == {"deny rule": 1}
    assert stats["drops"] == {"foreign source address": 1}
    assert stats["unreachable_sent"] == {"admin": 1, "port": 1}
    assert stats["udp_flows_total"] == 1 and stats["icmp_flows_total"] == 1
    assert stats["icmp_echo_local"] == 1 and stats["icmp_sockets"] == {"ping": 1}
    assert stats["udp_flows_active"] == 0 and stats["frames_out"] == 0


# ---- the tun engine, on a socketpair: refusals answered, covered resolvers skipped -----------


def test_engine_answers_refusals_and_skips_a_covered_resolver(
        netns: str, udp_server: Callable[..., UdpServer]) -> None:
    asked: list[str] = []

    def answer(data: bytes) -> bytes:
        query = dns.message.from_wire(data)
        asked.append(f"{query.question[0].name} {query.opcode()}")
        return dns.message.make_response(query).to_wire()  # type: ignore[no-any-return]

    good = udp_server(netns, answer, host="127.0.0.1")
    covered = udp_server(netns, answer, host="127.0.0.2")
    resolvers = [("127.0.0.2", covered.port), ("127.0.0.1", good.port)]
    policy = Policy(rules=[Rule.parse("deny", "127.0.0.2")], resolvers=resolvers)
    engine = PairEngine(policy, resolvers, netns=netns)
    try:
        query = dns.message.make_query("example.com.", "A")
        engine.send(build_udp(NS4, DNS4, 5353, 53, query.to_wire()))
        reply = dns.message.from_wire(engine.receive().l4.payload)
        assert reply.id == query.id and reply.rcode() == dns.rcode.NOERROR
        update = dns.update.UpdateMessage("example.com.")
        update.add("www", 60, "A", "192.0.2.1")
        engine.send(build_udp(NS4, DNS4, 5354, 53, update.to_wire()))
        refused_reply = engine.receive()
        assert refused_reply.l4.dport == 5354
        ident, flags = struct.unpack_from("!HH", refused_reply.l4.payload)
        assert (ident, flags >> 15, (flags >> 11) & 0xF, flags & 0xF) == (
            update.id, 1, 5, dns.rcode.NOTIMP)
        engine.send(build_udp(NS4, DNS4, 5355, 53, b"\x12\x34\x80\x00" + bytes(8)))
        assert engine.nothing_pending()  # a response sent to the resolver: silence
        stats = engine.runner.stats()
        assert stats["dns_queries"] == 3 and stats["dns_answers"] == 1
        assert stats["dns_refused"] == {"opcode UPDATE": 1} and stats["dns_retries"] == 0
        assert stats["dns_malformed"] == 1 and stats["malformed"] == {"dns: not a query": 1}
        assert asked == ["example.com. 0"] and covered.received == 0
    finally:
        engine.close()
