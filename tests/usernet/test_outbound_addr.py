"""``--outbound-addr`` / ``--outbound-addr6`` end to end: the source address outbound
sockets leave from, seen by the servers they reach.

A "host" namespace has an uplink (``up0``: 198.51.100.1/24, 2001:db8:51::1/64) to an
"outside" namespace (``out0``: 198.51.100.10, 2001:db8:51::10), and a second interface
(``side0``: 192.0.2.77/32, 2001:db8:77::1/128) whose addresses the kernel would never
pick towards the outside, which routes them back through the uplink.  ``side1`` (its
veth peer) has no IPv4 address and only a link-local IPv6 one.  Servers outside answer
with the source address they saw: TCP and UDP (their reply is the address), and DNS over
UDP and TCP and raw ICMP sockets seeing echo requests (recorded).

Cases: every path (TCP on the fast path and the tun path, UDP and ping on the native
relay and the engine, ping through raw sockets when ping sockets are closed, DNS over
UDP and both TCP paths) for IPv4 and IPv6, by address and by interface name, through
``nsbridge run``, ``nsbridge attach``, the Python API and ``nsbridge-slirp4netns``; one
family given (the other keeps the kernel's choice) and none; the address removed while
running (new flows fail, nsbridge carries on and binds again once it is back);
the policy unchanged (a denied destination stays denied, the host's loopback stays
closed without host access and is reached from loopback with it); and every bad value
refused at start with one line, by ``run`` (exit 2) and the helper (exit 1, the ready fd
closed without a byte).
"""

from __future__ import annotations

import ipaddress
import json
import os
import selectors
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers.environment import REPO
from helpers.netns import delete_netns, in_netns, ip, new_netns
from helpers.servers import dual_stack_socket

UP4, UP6 = "198.51.100.1", "2001:db8:51::1"
OUT4, OUT6 = "198.51.100.10", "2001:db8:51::10"
SIDE4, SIDE6 = "192.0.2.77", "2001:db8:77::1"
TCP_PORT, UDP_PORT, LOOPBACK_PORT = 7201, 7202, 7203
DNS_NAME, DNS_ANSWER = "www.nsbridge.test.", "192.0.2.53"

# In the sandbox: a TCP connection and a UDP datagram to each address given; both
# servers answer with the source address they saw.  One JSON line.
PROBE = r"""
import json, socket, sys
seen = {}
for ip in sys.argv[1:]:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect((ip, TCP_PORT))
            seen["tcp " + ip] = s.recv(100).decode()
    except OSError as exc:
        seen["tcp " + ip] = type(exc).__name__
    with socket.socket(family, socket.SOCK_DGRAM) as u:
        u.settimeout(2)
        for _ in range(3):
            u.sendto(b"who", (ip, UDP_PORT))
            try:
                seen["udp " + ip] = u.recv(100).decode()
                break
            except OSError as exc:
                seen["udp " + ip] = type(exc).__name__
print(json.dumps(seen))
""".replace("TCP_PORT", str(TCP_PORT)).replace("UDP_PORT", str(UDP_PORT))


def _plain(address: str) -> str:
    """An address as text, an IPv4-mapped one (a dual-stack server's view) as IPv4."""
    parsed = ipaddress.ip_address(address.partition("%")[0])
    mapped = getattr(parsed, "ipv4_mapped", None)
    return str(mapped or parsed)


class Outside:
    """The servers in the outside namespace (module doc), on one selector thread;
    ``seen`` records "KIND SOURCE" for every DNS query and echo request."""

    def __init__(self, netns: str) -> None:
        self.seen: list[str] = []
        self._selector = selectors.DefaultSelector()
        self._sockets: list[socket.socket] = []
        self._stop = threading.Event()
        in_netns(netns, self._open)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _open(self) -> None:
        self._add(dual_stack_socket(socket.SOCK_STREAM, TCP_PORT), self._on_tcp)
        self._add(dual_stack_socket(socket.SOCK_DGRAM, UDP_PORT), self._on_udp)
        self._add(dual_stack_socket(socket.SOCK_DGRAM, 53), self._on_dns_udp)
        self._add(dual_stack_socket(socket.SOCK_STREAM, 53), self._on_dns_tcp)
        self._add(socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP),
                  self._on_icmp)
        self._add(socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6),
                  self._on_icmp)

    def _add(self, sock: socket.socket, handler) -> None:
        sock.setblocking(False)
        self._sockets.append(sock)
        self._selector.register(sock, selectors.EVENT_READ, handler)

    def _serve(self) -> None:
        while not self._stop.is_set():
            for key, _events in self._selector.select(timeout=0.1):
                try:
                    key.data(key.fileobj)
                except OSError:
                    pass

    def _on_tcp(self, listener: socket.socket) -> None:
        conn, peer = listener.accept()
        with conn:
            conn.setblocking(True)
            conn.sendall(_plain(peer[0]).encode())

    def _on_udp(self, sock: socket.socket) -> None:
        _data, peer = sock.recvfrom(100)
        sock.sendto(_plain(peer[0]).encode(), peer)

    def _on_dns_udp(self, sock: socket.socket) -> None:
        from helpers.servers import dns_answer

        data, peer = sock.recvfrom(4096)
        self.seen.append(f"dns-udp {_plain(peer[0])}")
        sock.sendto(dns_answer(data), peer)

    def _on_dns_tcp(self, listener: socket.socket) -> None:
        from helpers.servers import dns_answer

        conn, peer = listener.accept()
        with conn:
            conn.setblocking(True)
            conn.settimeout(5)
            self.seen.append(f"dns-tcp {_plain(peer[0])}")
            length = int.from_bytes(_read(conn, 2), "big")
            answer = dns_answer(_read(conn, length))
            conn.sendall(len(answer).to_bytes(2, "big") + answer)

    def _on_icmp(self, sock: socket.socket) -> None:
        data, peer = sock.recvfrom(65536)
        if sock.family == socket.AF_INET:
            is_request = data[(data[0] & 0x0F) * 4] == 8  # after the IP header
        else:
            is_request = data[0] == 128  # IPv6 raw sockets start at the ICMPv6 header
        if is_request:
            self.seen.append(f"ping {_plain(peer[0])}")

    def expect(self, records: list[str]) -> None:
        """``seen`` holds exactly ``records`` (in any order) once the server thread has
        read what arrived: an echo request is recorded by our raw socket while the
        kernel answers it, so the reply may reach the client first."""
        from helpers.waiting import wait_until

        try:
            wait_until(lambda: sorted(self.seen) == sorted(records), timeout=5)
        except AssertionError:
            pass  # compared below, with both lists in the message
        assert sorted(self.seen) == sorted(records)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for sock in self._sockets:
            sock.close()


def _read(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("short read")
        data += chunk
    return data


@dataclass
class World:
    host: str
    outside: str
    servers: Outside
    loopback: socket.socket  # a listener on the host's 127.0.0.1:LOOPBACK_PORT


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    host = new_netns("nsbo")
    outside = ""
    servers = None
    loopback = None
    try:
        outside = new_netns("nsbx")
        ip("-n", host, "link", "add", "up0", "type", "veth", "peer", "name", "out0",
           "netns", outside)
        ip("-n", host, "link", "add", "side0", "type", "veth", "peer", "name", "side1")
        for ns, dev, addresses in ((host, "up0", (f"{UP4}/24", f"{UP6}/64")),
                                   (outside, "out0", (f"{OUT4}/24", f"{OUT6}/64")),
                                   (host, "side0", (f"{SIDE4}/32", f"{SIDE6}/128"))):
            for address in addresses:
                ip("-n", ns, "addr", "add", address, "dev", dev,
                   *(["nodad"] if ":" in address else []))
            ip("-n", ns, "link", "set", dev, "up")
        ip("-n", host, "link", "set", "side1", "up")
        ip("-n", outside, "route", "add", f"{SIDE4}/32", "via", UP4)
        ip("-n", outside, "-6", "route", "add", f"{SIDE6}/128", "via", UP6)
        subprocess.run(["ip", "netns", "exec", host, "sysctl", "-qw",
                        "net.ipv4.ping_group_range=0 2147483647"], check=True)
        servers = Outside(outside)

        def listen() -> socket.socket:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", LOOPBACK_PORT))
            sock.listen(8)
            return sock

        loopback = in_netns(host, listen)
        yield World(host, outside, servers, loopback)  # type: ignore[arg-type]
    finally:
        if loopback is not None:
            loopback.close()  # type: ignore[attr-defined]
        if servers is not None:
            servers.close()
        delete_netns(host)
        if outside:
            delete_netns(outside)


def in_host(world: World, *argv: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", world.host, *argv], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


def sandbox_script(*targets: str, ping: bool = True, dns: bool = True) -> str:
    """The commands the sandbox runs: the probe, then ping each target, then DNS over
    UDP and TCP through the namespace's resolver address."""
    quoted = " ".join(targets)
    lines = [f"{sys.executable} -c '{PROBE}' {quoted}"]
    if ping:
        lines += [f"ping -c 1 -W 5 {target} >/dev/null || echo ping-failed {target}"
                  for target in targets]
    if dns:
        lines += [f"dig +short +time=5 +tries=1 {flag} {DNS_NAME} || echo dig-failed"
                  for flag in ("+notcp", "+tcp")]
    return "\n".join(lines)


def probe_result(stdout: str) -> dict[str, str]:
    return json.loads(next(line for line in stdout.splitlines() if line.startswith("{")))


def nsbridge_run(world: World, *args: str, script: str) -> subprocess.CompletedProcess:
    return in_host(world, sys.executable, "-m", "nsbridge", "run", *args, "--",
                   "sh", "-c", script)


# ---- every path, both families, by address and by interface name -------------------------


@pytest.mark.parametrize(("how", "tcp", "relay", "v4", "v6"), [
    ("cli", "redirect", "native", SIDE4, SIDE6),
    ("cli", "tun", "engine", "side0", "side0"),
    ("api", "auto", "auto", "side0", SIDE6),
], ids=["fast-path+native-relay+by-address", "tun-path+engine+by-interface",
        "api+by-interface-and-address"])
def test_every_outbound_path_leaves_from_the_given_address(world: World, how: str, tcp: str,
                                                           relay: str, v4: str,
                                                           v6: str) -> None:
    """TCP, UDP, ping and DNS (UDP and TCP; an IPv4 resolver, then an IPv6 one) leave
    from side0's addresses, which the kernel would never choose towards the outside."""
    for resolver in (OUT4, OUT6):
        world.servers.seen.clear()
        script = sandbox_script(OUT4, OUT6)
        if how == "cli":
            result = nsbridge_run(world, "-v", "--tcp", tcp, "--relay", relay,
                                  "--dns", f"[{resolver}]:53" if ":" in resolver else resolver,
                                  "--outbound-addr", v4, "--outbound-addr6", v6,
                                  script=script)
        else:
            driver = ("import sys\nfrom nsbridge.usernet import api\n"
                      f"p = api.run(['sh', '-c', {script!r}], dns=[({resolver!r}, 53)], "
                      f"outbound_addr={v4!r}, outbound_addr6={v6!r})\n"
                      "sys.exit(p.wait())\n")
            result = in_host(world, sys.executable, "-c", driver)
        assert result.returncode == 0, result.stderr
        assert probe_result(result.stdout) == {
            f"tcp {OUT4}": SIDE4, f"udp {OUT4}": SIDE4,
            f"tcp {OUT6}": SIDE6, f"udp {OUT6}": SIDE6}, result.stderr
        assert "failed" not in result.stdout, result.stdout + result.stderr
        assert result.stdout.count(DNS_ANSWER) == 2, result.stdout
        source = SIDE6 if ":" in resolver else SIDE4
        world.servers.expect([
            f"ping {SIDE4}", f"ping {SIDE6}", f"dns-udp {source}", f"dns-tcp {source}"])
        if how == "cli":
            assert f"outbound sockets bound to: IPv4 {SIDE4}, IPv6 {SIDE6}" in result.stderr
            if tcp == "redirect":
                assert "kernel fast path" in result.stderr
            if relay == "native":
                assert "native relay" in result.stderr


@pytest.mark.parametrize("flags", [[], ["--outbound-addr", SIDE4], ["--outbound-addr6", "side0"]],
                         ids=["none", "ipv4-only", "ipv6-only"])
def test_a_family_without_an_outbound_address_keeps_the_kernels_choice(
        world: World, flags: list[str]) -> None:
    world.servers.seen.clear()
    result = nsbridge_run(world, "--dns", OUT4, *flags,
                          script=sandbox_script(OUT4, OUT6, dns=False))
    assert result.returncode == 0, result.stderr
    v4 = SIDE4 if "--outbound-addr" in flags else UP4
    v6 = SIDE6 if "--outbound-addr6" in flags else UP6
    assert probe_result(result.stdout) == {f"tcp {OUT4}": v4, f"udp {OUT4}": v4,
                                           f"tcp {OUT6}": v6, f"udp {OUT6}": v6}
    world.servers.expect([f"ping {v4}", f"ping {v6}"])


# ---- the policy is unchanged --------------------------------------------------------------


def test_binding_never_changes_what_is_allowed(world: World) -> None:
    """A denied destination stays denied (nothing reaches it), the host's loopback stays
    closed without host access (nothing reaches its listener: on the fast path the
    namespace's own kernel may complete the handshake before nsbridge resets it, so the
    listener's queue is what counts), and with host access it is reached from loopback
    (not bound: such traffic never leaves the host)."""
    world.servers.seen.clear()
    world.loopback.setblocking(False)
    check_loopback = (f"{sys.executable} -c 'import socket; s = socket.create_connection("
                      f"(\"10.0.2.2\", {LOOPBACK_PORT}), timeout=5); s.sendall(b\"x\")' "
                      "|| echo loopback-refused")
    script = sandbox_script(OUT4, OUT6, dns=False) + "\n" + check_loopback
    outbound = ["--outbound-addr", SIDE4, "--outbound-addr6", SIDE6]
    for tcp in ("redirect", "tun"):
        denied = nsbridge_run(world, "-v", "--tcp", tcp, "--deny", f"{OUT4}/32", "--deny",
                              f"[{OUT6}]/128", *outbound, script=script)
        assert denied.returncode == 0, denied.stderr
        assert set(probe_result(denied.stdout).values()) <= {
            "ConnectionRefusedError", "ConnectionResetError", "TimeoutError"}
        assert denied.stdout.count("ping-failed") == 2, denied.stdout
        assert "10.0.2.2:7203 denied: host address" in denied.stderr or \
            "10.0.2.2:7203 denied: host loopback" in denied.stderr or \
            "-> 10.0.2.2:7203 denied" in denied.stderr, denied.stderr
        with pytest.raises(BlockingIOError):
            world.loopback.accept()  # nothing reached the host's loopback
        assert world.servers.seen == []

    opened = nsbridge_run(world, "--allow-host-access", *outbound, script=check_loopback)
    assert "loopback-refused" not in opened.stdout, opened.stderr
    # The connection waits in the listener's queue (already closed by then).
    world.loopback.settimeout(5)
    conn, peer = world.loopback.accept()
    conn.close()
    assert peer[0] == "127.0.0.1"


# ---- bad values: refused at start, one line --------------------------------------------

BAD_VALUES = [
    (["--outbound-addr=198.51.100.99"], "--outbound-addr 198.51.100.99: cannot be bound"),
    (["--outbound-addr6=2001:db8:51::99"], "not an address of this host"),
    (["--outbound-addr=nosuch0"], "'nosuch0': no such interface"),
    (["--outbound-addr=side1"], "'side1': the interface has no usable IPv4 address"),
    (["--outbound-addr6=side1"], "has no usable global IPv6 address"),
    (["--outbound-addr=2001:db8:77::1"], "an IPv6 address; give an IPv4 address"),
    (["--outbound-addr6=192.0.2.77"], "an IPv4 address; give an IPv6 address"),
    (["--outbound-addr=a/b"], "'a/b': not an IPv4 address or an interface name"),
    (["--outbound-addr=waytoolonginterfacename"], "not an IPv4 address or an interface name"),
    (["--outbound-addr=127.0.0.1"], "a loopback address cannot be the source"),
    (["--outbound-addr6=fe80::1"], "a link-local address reaches only its link"),
    (["--outbound-addr=0.0.0.0"], "an unspecified address"),
]


@pytest.mark.parametrize(("args", "message"), BAD_VALUES, ids=[a[0] for a, _m in BAD_VALUES])
def test_bad_value_refused_by_run(world: World, args: list[str], message: str) -> None:
    result = in_host(world, sys.executable, "-m", "nsbridge", "run", *args, "--", "true")
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.fixture
def target() -> Iterator[str]:
    name = new_netns("nsbt")
    try:
        yield name
    finally:
        delete_netns(name)


def start_helper(world: World, target: str, *args: str,
                 stderr: object = subprocess.PIPE) -> tuple[subprocess.Popen, int]:
    """nsbridge-slirp4netns on ``target`` (-c, IPv6) in the host namespace; its process
    and the read end of its ready pipe."""
    ready_r, ready_w = os.pipe()
    proc = subprocess.Popen(
        ["ip", "netns", "exec", world.host, sys.executable, "-m", "nsbridge.cli.slirp4netns",
         "-r", str(ready_w), *args, "-6", "-c", "--netns-type=path", f"/run/netns/{target}",
         "tap0"], pass_fds=(ready_w,), stdout=subprocess.PIPE, stderr=stderr,
        text=True, cwd=REPO)
    os.close(ready_w)
    return proc, ready_r


def read_ready(fd: int) -> bytes:
    data = b""
    while chunk := os.read(fd, 16):
        data += chunk
    os.close(fd)
    return data


@pytest.mark.parametrize(("args", "message"), BAD_VALUES, ids=[a[0] for a, _m in BAD_VALUES])
def test_bad_value_refused_by_the_helper(world: World, target: str, args: list[str],
                                         message: str) -> None:
    proc, ready = start_helper(world, target, *args)
    try:
        assert read_ready(ready) == b""
        _out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1, err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert "tap0" not in subprocess.run(["ip", "-n", target, "-br", "link"],
                                        capture_output=True, text=True).stdout


# ---- the slirp4netns-compatible helper ----------------------------------------------------


@pytest.fixture
def host_resolv_conf(world: World) -> Iterator[None]:
    """The host namespace's /etc/resolv.conf (``ip netns exec`` binds /etc/netns/HOST/*),
    naming the outside's resolver: the helper reads the host's resolvers from it."""
    etc = Path("/etc/netns") / world.host
    etc.mkdir(parents=True)
    try:
        (etc / "resolv.conf").write_text(f"nameserver {OUT4}\n")
        yield
    finally:
        (etc / "resolv.conf").unlink(missing_ok=True)
        etc.rmdir()


def test_helper_binds_every_path(world: World, target: str, host_resolv_conf: None,
                                 tmp_path: Path) -> None:
    """nsbridge-slirp4netns (TAP; TCP on the fast path it adds after ready, UDP, ping and
    DNS in the engine): by interface name for IPv4 and by address for IPv6; its start-up
    summary names both, as slirp4netns's."""
    from helpers.waiting import wait_until

    world.servers.seen.clear()
    log = tmp_path / "helper.log"
    with log.open("w") as log_file:
        proc, ready = start_helper(world, target, "--outbound-addr=side0",
                                   f"--outbound-addr6={SIDE6}", stderr=log_file)
    try:
        assert read_ready(ready) == b"1", log.read_text()
        # The fast path is added just after ready: probe once it serves, so the TCP
        # checked is the fast path's (the tun path's is run's --tcp=tun case above).
        wait_until(lambda: "TCP: kernel fast path" in log.read_text(), timeout=20,
                   what="the helper's TCP fast path")
        script = sandbox_script(OUT4, OUT6, dns=False) + "\n" + "\n".join(
            f"dig +short +time=5 +tries=1 {flag} @10.0.2.3 {DNS_NAME} || echo dig-failed"
            for flag in ("+notcp", "+tcp"))
        result = subprocess.run(["ip", "netns", "exec", target, "sh", "-c", script],
                                capture_output=True, text=True, timeout=90)
        assert probe_result(result.stdout) == {
            f"tcp {OUT4}": SIDE4, f"udp {OUT4}": SIDE4,
            f"tcp {OUT6}": SIDE6, f"udp {OUT6}": SIDE6}, result.stderr
        assert "failed" not in result.stdout, result.stdout
        assert result.stdout.count(DNS_ANSWER) == 2
        world.servers.expect([
            f"ping {SIDE4}", f"ping {SIDE6}", f"dns-udp {SIDE4}", f"dns-tcp {SIDE4}"])
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=15)
    assert proc.returncode == 0, log.read_text()
    assert f"* Outbound IPv4:    {SIDE4}\n" in out and f"* Outbound IPv6:    {SIDE6}\n" in out


# ---- the address leaves the host while flows are being opened ------------------------------


@pytest.mark.parametrize("tcp", ["redirect", "tun"])
def test_an_outbound_address_removed_while_running_fails_flows_not_nsbridge(
        world: World, tcp: str, tmp_path: Path) -> None:
    """New flows fail (reset, no reply) while the address is gone, nsbridge carries on,
    and binds again once it is back."""
    probe = f"{sys.executable} -c '{PROBE}' {OUT4}"
    steps = "\n".join(
        f"{probe}; touch {tmp_path}/done{n}; "
        f"while [ ! -e {tmp_path}/go{n} ]; do sleep 0.05; done" for n in (1, 2))
    proc = subprocess.Popen(
        ["ip", "netns", "exec", world.host, sys.executable, "-m", "nsbridge", "run", "-v",
         "--tcp", tcp, "--outbound-addr", SIDE4, "--", "sh", "-c", f"{steps}\n{probe}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    removed = False
    try:
        from helpers.waiting import wait_until

        wait_until(lambda: (tmp_path / "done1").exists(), timeout=30, what="first probe")
        ip("-n", world.host, "addr", "del", f"{SIDE4}/32", "dev", "side0")
        removed = True
        (tmp_path / "go1").touch()
        wait_until(lambda: (tmp_path / "done2").exists(), timeout=60, what="second probe")
        ip("-n", world.host, "addr", "add", f"{SIDE4}/32", "dev", "side0")
        removed = False
        (tmp_path / "go2").touch()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        if removed:
            ip("-n", world.host, "addr", "add", f"{SIDE4}/32", "dev", "side0")
    assert proc.returncode == 0, err
    first, gone, back = (json.loads(line) for line in out.splitlines() if line.startswith("{"))
    assert first == back == {f"tcp {OUT4}": SIDE4, f"udp {OUT4}": SIDE4}
    assert gone[f"tcp {OUT4}"] in ("ConnectionResetError", "ConnectionRefusedError"), gone
    assert gone[f"udp {OUT4}"] in ("TimeoutError", "ConnectionRefusedError"), gone
    assert "Traceback" not in err


def test_attach_binds_too(world: World) -> None:
    """``nsbridge attach`` takes the same flags: a namespace someone else made leaves
    from side0's addresses (by interface name for both families)."""
    from helpers.waiting import wait_until

    target = subprocess.Popen(["unshare", "-Urn", "sleep", "60"])
    attach = None
    try:
        wait_until(lambda: os.path.basename(os.readlink(f"/proc/{target.pid}/exe"))
                   .startswith("sleep"), what="the target to unshare")
        attach = subprocess.Popen(
            ["ip", "netns", "exec", world.host, sys.executable, "-m", "nsbridge", "attach",
             "--outbound-addr", "side0", "--outbound-addr6", "side0", str(target.pid)],
            stderr=subprocess.PIPE, text=True, cwd=REPO)
        inside = ["nsenter", "-t", str(target.pid), "-U", "-n", "--preserve-credentials"]
        seen: dict[str, str] = {}

        def probed() -> bool:
            result = subprocess.run([*inside, sys.executable, "-c", PROBE, OUT4, OUT6],
                                    capture_output=True, text=True, timeout=60)
            seen.update(probe_result(result.stdout) if result.stdout.startswith("{") else {})
            return seen.get(f"tcp {OUT4}") == SIDE4  # once the attachment serves

        wait_until(probed, timeout=30, what="the attached namespace to reach outside")
        assert seen == {f"tcp {OUT4}": SIDE4, f"udp {OUT4}": SIDE4,
                        f"tcp {OUT6}": SIDE6, f"udp {OUT6}": SIDE6}
        target.kill()  # by PID: the process this test started
        target.wait(timeout=10)
        _out, err = attach.communicate(timeout=15)
        assert attach.returncode == 0 and "Traceback" not in err, err
    finally:
        for proc in (attach, target):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


def test_ping_through_raw_sockets_is_bound_too(world: World) -> None:
    """With ping sockets closed (``ping_group_range`` "1 0"), root's engine pings through
    raw sockets: their echo requests leave from the outbound address as well."""
    subprocess.run(["ip", "netns", "exec", world.host, "sysctl", "-qw",
                    "net.ipv4.ping_group_range=1 0"], check=True)
    try:
        world.servers.seen.clear()
        result = nsbridge_run(world, "-vv", "--relay", "engine", "--outbound-addr", "side0",
                              "--outbound-addr6", "side0",
                              script=f"ping -c 1 -W 5 {OUT4} && ping -c 1 -W 5 {OUT6}")
    finally:
        subprocess.run(["ip", "netns", "exec", world.host, "sysctl", "-qw",
                        "net.ipv4.ping_group_range=0 2147483647"], check=True)
    assert result.returncode == 0, result.stdout + result.stderr
    world.servers.expect([f"ping {SIDE4}", f"ping {SIDE6}"])
    for version in (4, 6):  # -vv names the kind of socket each family uses
        assert f"icmp echo for IPv{version} through raw sockets" in result.stderr
