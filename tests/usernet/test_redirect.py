"""The TCP fast path of user-mode networking, end to end: nftables redirect + TcpRedirector.

Run these tests as root: /dev/net/tun is mode 0600 on the CI machine, so the sandbox's
creator must be root (inside the new user namespace it is mapped to root, and holds
CAP_NET_ADMIN there, which programming nf_tables needs).

Network rule: no packet may leave the machine.  Each test creates a "host" namespace
(``ip netns add``, unique name, always deleted) with an extra interface holding
192.0.2.1/24 and 2001:db8::1/64 (TEST-NET / documentation addresses), starts the
servers there, and runs the host side *inside it* (``ip netns exec HOST python3
helpers/redirect_driver.py host ...``): the sandbox's connections are redirected to the
driver, which dials from HOST — so every dial lands in HOST.  The sandbox's default
route is its tun device, which nothing reads here; redirected TCP never reaches it.

What is proven, with real programs (curl, a Python HTTP server, a 256 MiB sha256-checked
transfer):

* curl over IPv4 and IPv6 reaches servers through the redirect; ``nft list ruleset``
  inside shows exactly the rule :mod:`nsbridge.usernet.inside.nft` programs over netlink.
* half-close travels both ways; a refused target resets the client at once.
* policy: a deny rule, the gateway with host loopback off, and a direct connection to
  the listener are reset immediately and counted by reason, and never reach a server;
  with ``allow_host_loopback`` the gateway reaches HOST's own 127.0.0.1 and ::1.
* without CAP_NET_ADMIN over the namespace the setup fails with NftUnavailable (so the
  caller can fall back to the tun path), and ``optional=True`` yields no fds instead.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from helpers.environment import REPO, have
from helpers.netns import connect_in, free_port, in_netns, ip, listen_in
from helpers.servers import echo, reply_after_fin

pytestmark = [
    pytest.mark.skipif(not os.path.exists("/dev/net/tun"),
                       reason="no /dev/net/tun on this machine (modprobe tun)"),
    pytest.mark.skipif(not have("ip"), reason="needs iproute2"),
]

DRIVER = str(REPO / "tests" / "helpers" / "redirect_driver.py")
HOST4 = "192.0.2.1"
HOST6 = "2001:db8::1"
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


# ---- the host namespace and its servers ----------------------------------------------


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def host_ns(make_netns: Callable[[], str]) -> str:
    """A namespace standing in for "the host", with 192.0.2.1 and 2001:db8::1 on an
    interface of its own: a dummy, or a veth pair with both ends inside if this kernel
    has no dummy driver.  (Deleted by make_netns's finalizer, interfaces with it.)"""
    name = make_netns()
    try:
        _ip("-n", name, "link", "add", "d0", "type", "dummy")
        devices = ["d0"]
    except subprocess.CalledProcessError:
        _ip("-n", name, "link", "add", "d0", "type", "veth", "peer", "name", "d1")
        devices = ["d0", "d1"]
    _ip("-n", name, "addr", "add", f"{HOST4}/24", "dev", "d0")
    _ip("-n", name, "addr", "add", f"{HOST6}/64", "dev", "d0", "nodad")
    for device in devices:
        _ip("-n", name, "link", "set", device, "up")
    return name



def _wait_listening(netns: str, host: str, port: int, proc: subprocess.Popen) -> None:
    """Wait until ``host:port`` in ``netns`` accepts (``ss``-free: a probe connection)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET

    def probe() -> bool:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            return sock.connect_ex((host, port)) == 0

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server on {host}:{port} exited with {proc.returncode}")
        if in_netns(netns, probe):
            return
        time.sleep(0.05)
    raise AssertionError(f"server on {host}:{port} did not start")


@pytest.fixture
def http_servers(host_ns: str, tmp_path: Path,
                 processes: list[subprocess.Popen]) -> dict[str, int]:
    """``python3 -m http.server`` on 192.0.2.1 and on [2001:db8::1] in the host
    namespace, serving a directory with hello.txt; {address: port}."""
    root = tmp_path / "www"
    root.mkdir()
    (root / "hello.txt").write_text("hello through the redirect\n")
    ports = {}
    for host in (HOST4, HOST6):
        port = free_port(host_ns, host=host)
        log = open(tmp_path / f"http-{port}.log", "w")  # noqa: SIM115 - the child owns it
        proc = subprocess.Popen(
            ["ip", "netns", "exec", host_ns, sys.executable, "-m", "http.server",
             "--bind", host, "--directory", str(root), str(port)],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        processes.append(proc)
        _wait_listening(host_ns, host, port, proc)
        ports[host] = port
    return ports


def run_sandbox(host_ns: str, tmp_path: Path, command: list[str], timeout: float = 120,
                **config: object) -> tuple[dict, str, str]:
    """Run CMD in a sandbox whose TCP is redirected to a TcpRedirector living in
    ``host_ns``; (driver report, CMD's stdout, CMD's stderr)."""
    out, err = tmp_path / "cmd.out", tmp_path / "cmd.err"
    config = {"command": command, "stdout": str(out), "stderr": str(err),
              "timeout": timeout, **config}
    proc = subprocess.run(
        ["ip", "netns", "exec", host_ns, sys.executable, DRIVER, "host", json.dumps(config)],
        capture_output=True, text=True, timeout=timeout + 60, cwd=REPO, env=ENV)
    cmd_out, cmd_err = out.read_text(), err.read_text()
    assert proc.returncode == 0, (
        f"driver failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}\n"
        f"CMD stdout:\n{cmd_out}\nCMD stderr:\n{cmd_err}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return report, cmd_out, cmd_err


def client(*args: object) -> list[str]:
    """The driver's in-sandbox client (no nsbridge import: plain sockets)."""
    return [sys.executable, DRIVER, "client", *map(str, args)]


def shell(*commands: list[str]) -> list[str]:
    """One CMD running several commands in a row, whatever each one's exit status."""
    return ["sh", "-c", "; ".join(shlex.join(c) for c in commands)]


def client_results(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


# ---- through the redirect ----------------------------------------------------------------


@pytest.mark.skipif(not have("curl"), reason="needs curl")
@pytest.mark.skipif(not have("nft"), reason="needs nft (only to read the ruleset)")
def test_curl_ipv4_and_ipv6_through_the_redirect(host_ns: str, tmp_path: Path,
                                                 http_servers: dict[str, int]) -> None:
    port4, port6 = http_servers[HOST4], http_servers[HOST6]
    report, out, err = run_sandbox(host_ns, tmp_path, shell(
        ["nft", "list", "ruleset"],
        ["curl", "-sS", "-m", "20", f"http://{HOST4}:{port4}/hello.txt"],
        ["curl", "-sS", "-m", "20", "-g", f"http://[{HOST6}]:{port6}/hello.txt"],
    ))
    assert report["code"] == 0, err
    assert out.count("hello through the redirect\n") == 2, out + err
    assert report["families"] == ["AF_INET", "AF_INET6"]
    [port] = report["ports"]
    ruleset = out.split("hello")[0]
    assert "table inet nsbridge {" in ruleset
    assert "type nat hook output priority -100; policy accept;" in ruleset
    assert 'oifname "lo" return' in ruleset
    # Only a SYN opens a redirected connection (a connection conntrack picks up in
    # mid-stream keeps its path); nft prints the l4proto match folded into "tcp flags".
    # The rule counts the SYNs it redirects (listed before the curls: none yet).
    match = re.search(r"tcp flags syn / fin,syn,rst,ack counter packets (\d+) bytes \d+ "
                      rf"redirect to :{port}\b", ruleset)
    assert match, ruleset
    stats = report["stats"]
    assert stats["accepted"] == 2 and stats["closed"] == 2 and stats["active"] == 0
    assert stats["denied"] == {}
    assert stats["bytes_down"] > 2 * len("hello through the redirect\n")


@pytest.mark.slow
def test_bulk_transfer_sha256(host_ns: str, tmp_path: Path, stream_server) -> None:
    size = 256 << 20
    server = stream_server(listen_in(host_ns, HOST4), echo)
    report, out, err = run_sandbox(host_ns, tmp_path,
                                   client("bulk", HOST4, server.port, size), timeout=240)
    assert report["code"] == 0, err
    [result] = client_results(out)
    assert result["bytes"] == size
    assert result["received"] == result["sent"]
    stats = report["stats"]
    assert stats["bytes_up"] == size and stats["bytes_down"] == size
    assert stats["closed"] == 1 and stats["reset"] == 0


def test_half_close(host_ns: str, tmp_path: Path, stream_server) -> None:
    server = stream_server(listen_in(host_ns, HOST6), reply_after_fin)
    report, out, err = run_sandbox(host_ns, tmp_path, client("halfclose", HOST6, server.port))
    assert report["code"] == 0, err
    [result] = client_results(out)
    assert result["reply"] == "after-fin:100000"
    assert report["stats"]["closed"] == 1


def test_refused_target_resets_the_client_at_once(host_ns: str, tmp_path: Path) -> None:
    closed_port = free_port(host_ns, host=HOST4)
    report, out, err = run_sandbox(host_ns, tmp_path,
                                   client("expect-reset", HOST4, closed_port),
                                   connect_timeout=30)
    assert report["code"] == 0, err
    [result] = client_results(out)
    assert result["result"] in ("reset", "refused"), result
    # Far below the 30 s connect timeout: the refusal itself is passed on, no waiting.
    assert result["seconds"] < 10
    assert report["stats"]["connect_failed"] == 1


def test_policy_denials_reset_at_once_and_are_counted(host_ns: str, tmp_path: Path,
                                                      stream_server) -> None:
    denied = stream_server(listen_in(host_ns, HOST4), echo)
    host_loopback = stream_server(listen_in(host_ns, "127.0.0.1"), echo)
    allowed = stream_server(listen_in(host_ns, HOST4), reply_after_fin)
    # A direct connection to the listener (port read from the ruleset) has no original
    # destination but its own loopback address: it must be refused too, never relayed.
    direct = ("port=$(nft list ruleset | sed -n 's/.*redirect to :\\([0-9]*\\).*/\\1/p'); "
              f"{sys.executable} {DRIVER} client expect-reset 127.0.0.1 $port")
    command = shell(client("expect-reset", HOST4, denied.port),
                    client("expect-reset", "10.0.2.2", host_loopback.port),
                    client("halfclose", HOST4, allowed.port))
    command[-1] += "; " + direct if have("nft") else ""
    report, out, err = run_sandbox(host_ns, tmp_path, command,
                                   deny=[f"tcp:{HOST4}:{denied.port}"])
    results = client_results(out)
    assert [r["mode"] for r in results][:3] == ["expect-reset", "expect-reset", "halfclose"], \
        out + err
    for result in results[:2] + results[3:]:
        assert result["result"] == "reset", result
        assert result["seconds"] < 5, result
    assert results[2]["reply"] == "after-fin:100000"  # the rule is that narrow
    expected = {"deny rule": 1, "host loopback disabled": 1}
    if have("nft"):
        expected["not redirected"] = 1
    assert report["stats"]["denied"] == expected
    assert denied.accepted == [] and host_loopback.accepted == []
    assert len(allowed.accepted) == 1


def test_gateway_reaches_host_loopback_when_allowed(host_ns: str, tmp_path: Path,
                                                    stream_server) -> None:
    server4 = stream_server(listen_in(host_ns, "127.0.0.1"), reply_after_fin)
    server6 = stream_server(listen_in(host_ns, "::1"), reply_after_fin)
    report, out, err = run_sandbox(
        host_ns, tmp_path,
        shell(client("halfclose", "10.0.2.2", server4.port),
              client("halfclose", "fd00::2", server6.port)),
        allow_host_loopback=True)
    assert report["code"] == 0, err
    results = client_results(out)
    assert [r["reply"] for r in results] == ["after-fin:100000"] * 2, out + err
    assert len(server4.accepted) == 1 and len(server6.accepted) == 1
    assert report["stats"]["closed"] == 2 and report["stats"]["denied"] == {}


def dns_over_tcp_resolver(received: list[bytes]) -> Callable[[socket.socket], None]:
    """A stand-in resolver: answer each length-prefixed query with its id and question
    (NOERROR, no records) until EOF, recording every byte that reached it."""

    def serve(conn: socket.socket) -> None:
        data = b""
        while chunk := conn.recv(65536):
            received.append(chunk)
            data += chunk
            while len(data) >= 2 and len(data) >= 2 + int.from_bytes(data[:2], "big"):
                length = int.from_bytes(data[:2], "big")
                query, data = data[2:2 + length], data[2 + length:]
                answer = query[:2] + b"\x81\x80" + query[4:6] + bytes(6) + query[12:]
                conn.sendall(len(answer).to_bytes(2, "big") + answer)

    return serve


def test_dns_address_goes_to_the_host_resolver(host_ns: str, tmp_path: Path,
                                                stream_server) -> None:
    """TCP to the namespace's DNS address, port 53, is relayed to the first host
    resolver (a stand-in server here) as checked DNS messages; any other port there is
    denied; bytes that are not DNS never reach the resolver."""
    received: list[bytes] = []
    resolver = stream_server(listen_in(host_ns, HOST4), dns_over_tcp_resolver(received))
    report, out, err = run_sandbox(
        host_ns, tmp_path,
        shell(client("dns", "10.0.2.3", 53), client("dns", "fd00::3", 53),
              client("expect-reset", "10.0.2.3", 80), client("halfclose", "10.0.2.3", 53)),
        resolvers=[[HOST4, resolver.port], ["192.0.2.99", 53]])
    results = client_results(out)
    assert [(r.get("result"), r.get("id"), r.get("rcode")) for r in results[:2]] == [
        ("answer", 0xBEEF, 0)] * 2, out + err
    assert results[2]["result"] == "reset"
    assert results[3]["reply"] == "", results[3]  # 100000 bytes of "x": not DNS, no answer
    assert len(resolver.accepted) == 3
    # the two framed queries, byte for byte, and nothing of the "x" stream
    assert b"".join(received) == 2 * (b"\x00\x1d\xbe\xef\x01\x00\x00\x01" + bytes(6)
                                      + b"\x07example\x03com\x00\x00\x01\x00\x01")
    stats = report["stats"]
    assert stats["denied"] == {"dns address: port 53 only": 1}
    assert stats["dns_queries"] == 2 and stats["dns_refused"] == {"question count is not 1": 1}


# ---- nf_tables unavailable, and the pre-5.2 layout -----------------------------------------

_UNAVAILABLE_PROBE = """
import json
from nsbridge.usernet.inside import nft
from nsbridge.usernet.host.redirect import setup_inside
try:
    setup_inside()
    result = {"raised": None}
except nft.NftError as exc:
    result = {"raised": type(exc).__name__, "message": str(exc), "errno": exc.errno,
              "is_unavailable": nft.is_unavailable(exc)}
result["optional"] = len(setup_inside(optional=True))
print(json.dumps(result))
"""


@pytest.mark.skipif(not have("unshare"), reason="needs unshare (util-linux)")
def test_no_cap_net_admin_is_a_clear_unavailable_error(host_ns: str) -> None:
    # A new user namespace without a new network namespace: root in it has no
    # capability over the network namespace, which belongs to the initial user
    # namespace.  Run inside the throwaway host namespace, so that even a broken
    # check could only ever touch that.
    proc = subprocess.run(
        ["ip", "netns", "exec", host_ns, "unshare", "-U", sys.executable, "-c",
         _UNAVAILABLE_PROBE],
        capture_output=True, text=True, timeout=60, cwd=REPO, env=ENV)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["raised"] == "NftUnavailable", result
    assert result["errno"] == 1  # EPERM
    assert result["is_unavailable"] is True
    assert "nf_tables is unavailable" in result["message"]
    assert "CAP_NET_ADMIN" in result["message"]
    assert result["optional"] == 0
    listing = subprocess.run(["ip", "netns", "exec", host_ns, "nft", "list", "ruleset"],
                             capture_output=True, text=True) if have("nft") else None
    assert listing is None or "nsbridge" not in listing.stdout


_PER_FAMILY = """
from nsbridge.usernet.inside import nft
print(nft.program_redirect(4321))
print(nft.program_redirect(4321))  # replaces, does not add
print(nft.program_redirect(4322, per_family=True))
"""


@pytest.mark.skipif(not (have("unshare") and have("nft")), reason="needs unshare and nft")
def test_replacing_and_the_per_family_layout() -> None:
    """Programming twice replaces the table; the pre-5.2 fallback (ip + ip6 tables)
    is accepted by the kernel.  In a fresh user+network namespace: nothing else sees it."""
    script = f"{shlex.quote(sys.executable)} -c {shlex.quote(_PER_FAMILY)} && nft list ruleset"
    proc = subprocess.run(["unshare", "-Urn", "sh", "-c", script],
                          capture_output=True, text=True, timeout=60, cwd=REPO, env=ENV)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "families=('inet',)" in out and "families=('ip', 'ip6')" in out
    assert out.count("redirect to :4321") == 1
    for family in ("ip", "ip6"):
        assert f"table {family} nsbridge {{" in out
    assert out.count("redirect to :4322") == 2


def test_a_connection_open_before_the_rules_keeps_its_path(make_netns) -> None:
    """nsbridge-slirp4netns adds the fast path after its caller started using the
    namespace: a connection already open then must not be taken over (conntrack picks it
    up in mid-stream, from an ACK; only a SYN is redirected), while the next connection
    leaving by the device is.  Two namespaces joined by a veth stand for the namespace
    and the world behind its device; the kernel is the only other party."""
    from nsbridge.usernet.host.redirect import original_destination, setup_inside

    inner, outer = make_netns(), make_netns()
    ip("link", "add", "nsbv-in", "netns", inner, "type", "veth", "peer", "name", "nsbv-out",
       "netns", outer)
    ip("-n", inner, "addr", "add", "10.77.0.1/24", "dev", "nsbv-in")
    ip("-n", outer, "addr", "add", "10.77.0.2/24", "dev", "nsbv-out")
    for ns, dev in ((inner, "nsbv-in"), (outer, "nsbv-out")):
        ip("-n", ns, "link", "set", dev, "up")
        ip("-n", ns, "link", "set", "lo", "up")
    server = listen_in(outer, "10.77.0.2")
    before = connect_in(inner, server.getsockname())
    peer, _ = server.accept()
    listeners = in_netns(inner, lambda: setup_inside(device="nsbv-in", forwarded="nsbv-in"))
    try:
        before.sendall(b"still here")
        peer.settimeout(10)
        assert peer.recv(100) == b"still here"  # not reset, not redirected
        peer.sendall(b"and back")
        before.settimeout(10)
        assert before.recv(100) == b"and back"
        after = connect_in(inner, server.getsockname())  # the kernel accepts for us
        listener = listeners[0]  # type: ignore[index]
        listener.settimeout(10)
        redirected, _ = listener.accept()
        assert original_destination(redirected) == (ipaddress.IPv4Address("10.77.0.2"),
                                                    server.getsockname()[1])
        for sock in (after, redirected):
            sock.close()
    finally:
        for sock in (before, peer, server, *listeners):  # type: ignore[misc]
            sock.close()
