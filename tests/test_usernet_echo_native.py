"""The native IPv4 ping relay (nsbridge/usernet/_echorelay.c, echorelay.py), no mocks.

Three layers:

* ``classify``: the relay's packet checks, sans-IO, on crafted bytes;
* the C ``Relay`` itself: a SOCK_DGRAM socketpair stands in for the tun device (one
  datagram per packet, as a tun gives), and the host side is real: ping sockets opened
  in a "host" namespace of the test's own, answered by its kernel;
* ``nsbridge run`` end to end inside that host namespace: real ping, through the
  device and routing rule the sandbox gets.

Packets are built and checked here by hand (struct + a checksum), not with nsbridge's
own packet code, so the tests do not trust what they test.

Runs as root (namespaces); the sandboxes map the caller to root inside.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest
from conftest import REPO, in_netns, wait_until

from nsbridge.usernet import echorelay

pytestmark = pytest.mark.skipif(echorelay._echorelay is None,
                                reason="the native module was not built (no C compiler)")

NS_IP = bytes([10, 0, 2, 100])
HOST_IP = bytes([192, 0, 2, 1])


def _sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _csum(data: bytes) -> int:
    return ~_sum(data) & 0xFFFF


def echo_packet(ident: int = 0x1234, seq: int = 1, payload: bytes = b"nsbridge-ping",
                *, src: bytes = NS_IP, dst: bytes = HOST_IP, icmp_type: int = 8,
                options: bytes = b"", frag: int = 0x4000, proto: int = 1) -> bytes:
    """An IPv4 packet carrying an ICMP echo request, checksums right."""
    icmp = struct.pack("!BBHHH", icmp_type, 0, 0, ident, seq) + payload
    icmp = icmp[:2] + struct.pack("!H", _csum(icmp)) + icmp[4:]
    ihl = 5 + len(options) // 4
    header = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, ihl * 4 + len(icmp), 7, frag, 64,
                         proto, 0, src, dst) + options
    header = header[:10] + struct.pack("!H", _csum(header)) + header[12:]
    return header + icmp


# ---- classify: the checks, sans-IO -------------------------------------------------------


def _flip(packet: bytes, index: int) -> bytes:
    return packet[:index] + bytes([packet[index] ^ 0x01]) + packet[index + 1 :]


@pytest.mark.parametrize(("packet", "verdict"), [
    (echo_packet(), "echo"),
    (echo_packet(options=b"\x01\x01\x01\x00"), "echo"),  # NOPs + end of options
    (echo_packet(payload=b""), "echo"),
    (b"", "not ipv4"),
    (b"\x60" + bytes(47), "not ipv4"),  # IPv6
    (echo_packet()[:27], "malformed"),  # shorter than header + ICMP header
    (b"\x44" + echo_packet()[1:], "malformed"),  # IHL 4
    (echo_packet() + b"x", "malformed"),  # the total length disagrees with the read
    (echo_packet(frag=0x2000), "fragment"),  # more fragments
    (echo_packet(frag=0x0001), "fragment"),  # an offset
    (echo_packet(proto=17), "not icmp"),
    (_flip(echo_packet(), 8), "bad checksum"),  # TTL changed, header sum not
    (_flip(echo_packet(), 30), "bad checksum"),  # ICMP payload changed, its sum not
    (echo_packet(icmp_type=0), "other icmp"),  # an echo reply
    (echo_packet(icmp_type=3), "other icmp"),  # an error the namespace sends
])
def test_classify(packet, verdict):
    assert echorelay._echorelay.classify(packet) == verdict


def test_classify_takes_only_bytes_like():
    with pytest.raises(TypeError):
        echorelay._echorelay.classify("not bytes")


def test_relay_refuses_bad_arguments():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with a, b:
        with pytest.raises(TypeError, match="callable"):
            echorelay._echorelay.Relay(b.fileno(), None, print)
        with pytest.raises(ValueError, match="max_flows"):
            echorelay._echorelay.Relay(b.fileno(), print, print, 60.0, 0)
        with pytest.raises(ValueError, match="idle_timeout"):
            echorelay._echorelay.Relay(b.fileno(), print, print, -1.0)


# ---- the C relay, with a socketpair for the device and real ping sockets ------------------


class Harness:
    """A Relay reading ``device``; ``ns`` is the namespace's end of the socketpair.

    ``sockets`` supplies what ``new_flow`` returns, one per call (a socket is detached:
    the relay owns it), or -1 when empty; every call's packet is kept in ``asked``."""

    def __init__(self, host: str, idle_timeout: float = 60.0, max_flows: int = 64) -> None:
        self.host = host
        self.ns, self.device = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.ns.settimeout(5)
        self.device.setblocking(False)
        self.sockets: list[Callable[[], int]] = []
        self.asked: list[bytes] = []
        self.errors: list[tuple[bytes, int]] = []
        self.relay = echorelay._echorelay.Relay(self.device.fileno(), self._new_flow,
                                                self._on_error, idle_timeout, max_flows)

    def _new_flow(self, packet: bytes) -> int:
        self.asked.append(packet)
        return self.sockets.pop(0)() if self.sockets else -1

    def _on_error(self, quote: bytes, err: int) -> None:
        self.errors.append((quote, err))

    def ping_socket(self, dst: str = "192.0.2.1") -> Callable[[], int]:
        def make() -> int:
            def inside() -> int:
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
                sock.connect((dst, 0))
                return sock.detach()
            return int(in_netns(self.host, inside))  # type: ignore[arg-type]
        return make

    def udp_socket_to_closed_port(self) -> Callable[[], int]:
        def make() -> int:
            def inside() -> int:
                probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
                probe.close()
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.connect(("127.0.0.1", port))
                return sock.detach()
            return int(in_netns(self.host, inside))  # type: ignore[arg-type]
        return make

    def close(self) -> None:
        self.relay.stop()
        self.ns.close()
        self.device.close()


@pytest.fixture
def harness(host: str) -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def make(**kwargs: float) -> Harness:
        h = Harness(host, **kwargs)  # type: ignore[arg-type]
        made.append(h)
        return h

    try:
        yield make
    finally:
        for h in made:
            h.close()


def check_reply(reply: bytes, request: bytes) -> None:
    """``reply`` is the echo reply to ``request``, as a host would have sent it."""
    assert len(reply) == len(request), (reply, request)
    assert reply[0] == 0x45 and reply[9] == 1 and reply[8] == 64
    assert struct.unpack("!H", reply[2:4])[0] == len(reply)
    assert _sum(reply[:20]) == 0xFFFF, "IPv4 header checksum"
    assert reply[12:16] == request[16:20] and reply[16:20] == request[12:16]
    assert reply[20] == 0 and reply[21] == 0, "ICMP echo reply"
    assert _sum(reply[20:]) == 0xFFFF, "ICMP checksum"
    assert reply[24:] == request[24:], "id, sequence number and data kept"


def fds_of_this_process() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_relay_answers_a_flow_and_asks_python_only_once(harness):
    h = harness()
    h.sockets.append(h.ping_socket())
    h.relay.start()
    for seq in range(1, 4):
        request = echo_packet(seq=seq, payload=bytes(range(seq * 20)))
        h.ns.send(request)
        check_reply(h.ns.recv(65536), request)
    assert len(h.asked) == 1 and h.asked[0] == echo_packet(seq=1, payload=bytes(range(20)))
    stats = h.relay.stats()
    assert stats["requests"] == 3 and stats["replies"] == 3
    assert stats["flows_total"] == 1 and stats["flows_active"] == 1
    assert stats["rejected"] == {} and stats["callback_errors"] == 0


def test_relay_large_echo(harness):
    h = harness()
    h.sockets.append(h.ping_socket())
    h.relay.start()
    request = echo_packet(payload=os.urandom(60000))
    h.ns.send(request)
    check_reply(h.ns.recv(65536), request)


def test_relay_keeps_flows_apart(harness):
    """Two ids are two flows with two host sockets; each reply carries its own id."""
    h = harness()
    h.sockets += [h.ping_socket(), h.ping_socket("127.0.0.1")]
    h.relay.start()
    first, second = echo_packet(ident=1), echo_packet(ident=2, dst=bytes([127, 0, 0, 1]))
    for request in (first, second, first, second):
        h.ns.send(request)
        check_reply(h.ns.recv(65536), request)
    assert len(h.asked) == 2 and h.relay.stats()["flows_active"] == 2


def test_relay_drops_what_python_refuses_and_bad_packets(harness):
    h = harness()
    h.relay.start()  # no sockets: new_flow answers -1 (a denial, written by Python)
    h.ns.send(echo_packet())
    h.ns.send(_flip(echo_packet(), 30))
    h.ns.send(echo_packet(proto=17))
    h.ns.send(b"\x60" + bytes(60))
    h.ns.send(b"\x45")
    wait_until(lambda: h.relay.stats()["frames_in"] == 5, what="the relay read all five")
    stats = h.relay.stats()
    assert len(h.asked) == 1  # only the well-formed request reached Python
    assert stats["flows_total"] == 0 and stats["replies"] == 0
    assert stats["rejected"] == {"bad checksum": 1, "not icmp": 1, "not ipv4": 1,
                                 "malformed": 1}
    h.ns.settimeout(0.3)
    with pytest.raises(TimeoutError):
        h.ns.recv(65536)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_relay_survives_a_failing_callback(harness):
    h = harness()

    def broken() -> int:
        raise RuntimeError("callback bug")

    h.sockets += [broken, h.ping_socket()]
    h.relay.start()
    h.ns.send(echo_packet(seq=1))
    wait_until(lambda: h.relay.stats()["callback_errors"] == 1, what="the error counted")
    request = echo_packet(seq=2)
    h.ns.send(request)  # the flow is asked about again, and works
    check_reply(h.ns.recv(65536), request)


def test_relay_evicts_the_least_recently_used_flow(harness):
    h = harness(max_flows=2)
    h.sockets += [h.ping_socket() for _ in range(4)]
    h.relay.start()
    for ident in (1, 2, 1, 3):  # 2 is the least recently used when 3 arrives
        request = echo_packet(ident=ident)
        h.ns.send(request)
        check_reply(h.ns.recv(65536), request)
    stats = h.relay.stats()
    assert stats["flows_evicted"] == 1 and stats["flows_active"] == 2
    h.ns.send(echo_packet(ident=1))  # still a flow: no new question
    h.ns.recv(65536)
    assert len(h.asked) == 3
    h.ns.send(echo_packet(ident=2))  # evicted: asked again
    h.ns.recv(65536)
    assert len(h.asked) == 4


def test_relay_expires_idle_flows_and_closes_their_sockets(harness):
    before = fds_of_this_process()
    h = harness(idle_timeout=0.3)
    with_harness = fds_of_this_process()
    h.sockets.append(h.ping_socket())
    h.relay.start()
    h.ns.send(echo_packet())
    h.ns.recv(65536)
    assert len(fds_of_this_process()) == len(with_harness) + 1  # the flow's ping socket
    wait_until(lambda: h.relay.stats()["flows_expired"] == 1, timeout=5, what="expiry")
    assert h.relay.stats()["flows_active"] == 0
    assert fds_of_this_process() == with_harness
    h.close()
    assert fds_of_this_process() == before


def test_relay_stop_closes_flow_sockets_and_is_idempotent(harness):
    h = harness()
    h.sockets += [h.ping_socket(), h.ping_socket()]
    with_harness = fds_of_this_process()
    h.relay.start()
    for ident in (1, 2):
        h.ns.send(echo_packet(ident=ident))
        h.ns.recv(65536)
    assert len(fds_of_this_process()) == len(with_harness) + 2
    h.relay.stop()
    h.relay.stop()
    assert len(fds_of_this_process()) == len(with_harness) - 2  # its epoll and eventfd too
    with pytest.raises(RuntimeError):
        h.relay.start()


def test_relay_reports_host_errors_with_the_request_quoted(harness):
    """An error queued on a flow's socket reaches on_error with the latest request (the
    namespace is then told by Python).  A UDP socket to a closed port makes a real one:
    the host's port unreachable comes back as ECONNREFUSED."""
    h = harness()
    h.sockets.append(h.udp_socket_to_closed_port())
    h.relay.start()
    request = echo_packet(seq=9)
    h.ns.send(request)
    wait_until(lambda: h.errors, what="the error reported")
    quote, err = h.errors[0]
    assert err == errno.ECONNREFUSED
    assert quote == request


# ---- the device and the routing rule ---------------------------------------------------


def test_setup_inside_routes_icmp_to_its_device_and_cleans_rp_filter(make_netns):
    """In a namespace whose rp_filter is strict (as a host may hand down), the setup
    switches it off for the relay's address-less device, adds the rule and the table;
    closing the device removes its routes."""
    from nsbridge.usernet.netconf import ECHO_TABLE, NetConfig

    name = make_netns()
    subprocess.run(["ip", "netns", "exec", name, "sysctl", "-qw",
                    "net.ipv4.conf.all.rp_filter=1"], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    # The sandbox's main device already holds the namespace's address at this step.
    subprocess.run(["ip", "-n", name, "addr", "add", "10.0.2.100/24", "dev", "lo"], check=True)
    (fd,) = in_netns(name, lambda: echorelay.setup_inside(NetConfig()))  # type: ignore[misc]
    try:
        def sysctl(key: str) -> str:
            return subprocess.run(["ip", "netns", "exec", name, "sysctl", "-n", key],
                                  capture_output=True, text=True, check=True).stdout.strip()

        assert sysctl("net.ipv4.conf.all.rp_filter") == "0"
        assert sysctl("net.ipv4.conf.nsb-ping.rp_filter") == "0"
        rules = subprocess.run(["ip", "-n", name, "rule"], capture_output=True, text=True,
                               check=True).stdout
        assert f"ipproto icmp lookup {ECHO_TABLE}" in rules
        routes = subprocess.run(["ip", "-n", name, "route", "show", "table", str(ECHO_TABLE)],
                                capture_output=True, text=True, check=True).stdout
        assert "default dev nsb-ping" in routes
        addresses = subprocess.run(["ip", "-n", name, "-4", "addr", "show", "nsb-ping"],
                                   capture_output=True, text=True, check=True).stdout
        assert "inet " not in addresses  # no second copy of the namespace's address
    finally:
        os.close(fd)
    wait_until(lambda: "nsb-ping" not in subprocess.run(
        ["ip", "-n", name, "link"], capture_output=True, text=True).stdout, what="device gone")


# ---- nsbridge run, end to end ----------------------------------------------------------


def nsbridge_run(host: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", host, sys.executable, "-m", "nsbridge", "run",
                           *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_run_pings_through_the_native_relay(host):
    result = nsbridge_run(host, "-v", "--icmp=native", "--", "ping", "-c", "3", "-i", "0.2",
                          "-W", "5", "192.0.2.1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 received" in result.stdout
    assert "ping: native relay" in result.stderr
    assert "echo requests: 3" in result.stderr


def test_run_with_icmp_engine_leaves_ping_to_the_engine(host):
    result = nsbridge_run(host, "-v", "--icmp=engine", "--", "sh", "-c",
                          "ping -c 2 -W 5 192.0.2.1 && ip rule")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 received" in result.stdout
    assert "ipproto icmp" not in result.stdout and "native relay" not in result.stderr


def test_run_ipv6_ping_stays_on_the_engine(host):
    result = nsbridge_run(host, "--icmp=native", "--", "ping", "-6", "-c", "2", "-W", "5",
                          "2001:db8::1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 received" in result.stdout


def test_run_native_denial_unreachable_and_gateway(host):
    """What the engine answers, the native path answers alike: a policy denial
    (filtered), a network the host cannot reach (net unreachable, from connect), and
    the gateway, which is the host's loopback when allowed.  (Errors reported later on
    a flow's socket are tested on the relay above.)"""
    script = ("ping -c 1 -W 3 192.0.2.1; ping -c 1 -W 3 198.51.100.1; "
              "ping -c 2 -W 3 10.0.2.2")
    result = nsbridge_run(host, "--icmp=native", "--deny", "icmp:192.0.2.1/32",
                          "--allow-host-loopback", "--", "sh", "-c", script)
    out = result.stdout
    blocks = out.split("--- ")
    assert "Packet filtered" in blocks[0] or "Communication prohibited" in blocks[0], out
    assert "Net Unreachable" in out.split("PING 198.51.100.1")[1].split("---")[0], out
    assert "2 received" in out.split("PING 10.0.2.2")[1], out


def test_native_is_refused_for_attach_with_a_reason(host):
    target = subprocess.Popen(["ip", "netns", "exec", host, "unshare", "-Urn", "sleep", "30"])
    try:
        ours = os.readlink("/proc/self/ns/user")

        def in_its_own_namespaces() -> bool:
            try:
                return os.readlink(f"/proc/{target.pid}/ns/user") != ours
            except OSError:
                return False

        wait_until(in_its_own_namespaces, what="the target's namespaces")
        result = subprocess.run(["ip", "netns", "exec", host, sys.executable, "-m", "nsbridge",
                                 "attach", "--icmp=native", str(target.pid)],
                                capture_output=True, text=True, timeout=60, cwd=REPO)
        assert result.returncode != 0
        assert "--icmp=native" in result.stderr and "nsbridge run" in result.stderr
        assert "Traceback" not in result.stderr
    finally:
        target.kill()
        target.wait()


def test_unknown_icmp_mode_is_a_one_line_error(host):
    result = nsbridge_run(host, "--icmp=fast", "--", "true")
    assert result.returncode == 2
    assert "--icmp" in result.stderr and "native" in result.stderr
    assert "Traceback" not in result.stderr


def test_api_stats_show_the_native_relay(host, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import json, os\n"
        "from nsbridge.usernet import api\n"
        "before = set(os.listdir('/proc/self/fd'))\n"
        "with api.run(['ping', '-c', '4', '-i', '0.2', '-W', '5', '192.0.2.1'],\n"
        "             stdout=os.open(os.devnull, os.O_WRONLY)) as p:\n"
        "    code = p.wait(timeout=30)\n"
        "    stats = p.stats()\n"
        "print(json.dumps({'code': code, 'engine': stats['engine']}))\n")
    result = subprocess.run(["ip", "netns", "exec", host, sys.executable, str(driver)],
                            capture_output=True, text=True, timeout=90, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    import json

    out = json.loads(result.stdout.strip().splitlines()[-1])
    engine = out["engine"]
    assert out["code"] == 0
    assert engine["icmp_native"]["requests"] == 4
    assert engine["icmp_native"]["replies"] == 4
    assert engine["icmp_echo_requests"] == 4 and engine["icmp_echo_replies"] == 4
    assert engine["icmp_flows_total"] == 1

