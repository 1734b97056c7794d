"""``nsbridge run`` end to end, with no packet able to leave the machine.

Each test first creates a "host" namespace of its own: loopback plus a dummy interface
with TEST-NET addresses (192.0.2.1/24, 2001:db8::1/64) that exist only there.  The
servers run in it, and nsbridge itself runs in it (``ip netns exec HOST nsbridge run``),
so every socket the host side opens is opened in that namespace.

/dev/net/tun is mode 0600 on this machine: these tests run the namespace creator as
root (inside the new user namespace it is mapped to root too); .ci/run makes the device
0666 as on normal systems, which the unprivileged sandbox test in test_sandbox.py uses.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.environment import REPO
from helpers.nested import nested_script
from helpers.netns import in_netns, reachable_in
from helpers.processes import processes_mentioning
from helpers.waiting import wait_until

HTTP_PORT = 8000


@pytest.fixture
def web(host: str, tmp_path: Path) -> Iterator[Path]:
    """An HTTP server in the host namespace on 192.0.2.1, [2001:db8::1] and 127.0.0.1."""
    root = tmp_path / "www"
    root.mkdir()
    (root / "index.html").write_text("hello from the host namespace\n")
    procs = [subprocess.Popen(["ip", "netns", "exec", host, sys.executable, "-m", "http.server",
                               str(HTTP_PORT), "--bind", bind, "-d", str(root)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for bind in ("192.0.2.1", "2001:db8::1", "127.0.0.1")]
    try:
        for address in (("192.0.2.1", HTTP_PORT), ("127.0.0.1", HTTP_PORT)):
            wait_until(lambda a=address: reachable_in(host, a), what=f"http server {address}")
        yield root
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=10)



# The host namespace's own addresses (192.0.2.1, 2001:db8::1) stand for the outside in
# these tests: they need host access, which closes them by default (that is tested in
# usernet/test_host_access.py).
HOST_ACCESS = "--allow-host-access"


def nsbridge_run(host: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", host, sys.executable, "-m", "nsbridge", "run",
                           *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_exit_status_of_the_command_is_ours(host):
    result = nsbridge_run(host, "--", "sh", "-c", "exit 7")
    assert result.returncode == 7, result.stderr


@pytest.fixture(params=["redirect", "tun"])
def tcp(request: pytest.FixtureRequest) -> str:
    """The TCP path option: every TCP test here runs over both paths."""
    return f"--tcp={request.param}"


def test_tcp_to_the_host_network_with_curl(host, web, tcp):
    result = nsbridge_run(host, tcp, HOST_ACCESS, "--", "curl", "-sS", "--max-time", "10",
                          f"http://192.0.2.1:{HTTP_PORT}/index.html")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello from the host namespace\n"


def test_tcp_over_ipv6(host, web, tcp):
    result = nsbridge_run(host, tcp, HOST_ACCESS, "--", "curl", "-sS", "-g", "--max-time", "10",
                          f"http://[2001:db8::1]:{HTTP_PORT}/index.html")
    assert result.returncode == 0, result.stderr
    assert "hello" in result.stdout


def test_tcp_forwarded_from_a_nested_namespace(host, web, tcp):
    """Carried on both paths: the fast path's prerouting redirect takes it (its counter
    shows the SYN), the tun path terminates it like any other."""
    script = nested_script("nsb0", [f"curl -sS --max-time 10 http://192.0.2.1:{HTTP_PORT}/"
                                    "index.html"])
    result = nsbridge_run(host, tcp, HOST_ACCESS, "--", "sh", "-c", script)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "hello from the host namespace", result.stdout + result.stderr
    if tcp == "--tcp=redirect":
        assert lines[1:] == ["counter packets 1"], result.stdout
    else:
        assert lines[1:] == [], result.stdout  # no table: --tcp=tun has no fast path


def test_host_loopback_is_off_by_default_and_on_by_option(host, web, tcp):
    url = f"http://10.0.2.2:{HTTP_PORT}/index.html"
    denied = nsbridge_run(host, tcp, "--", "curl", "-sS", "--max-time", "10", url)
    assert denied.returncode != 0
    allowed = nsbridge_run(host, tcp, "--allow-host-loopback", "--", "curl", "-sS", "--max-time",
                           "10", url)
    assert allowed.returncode == 0, allowed.stderr
    assert "hello" in allowed.stdout


def test_deny_rule_resets_at_once(host, web, tcp):
    started = time.monotonic()
    result = nsbridge_run(host, tcp, "--deny", "192.0.2.0/24", "--", "curl", "-sS", "--max-time",
                          "10", f"http://192.0.2.1:{HTTP_PORT}/")
    assert result.returncode != 0
    assert time.monotonic() - started < 8  # refused, not timed out


def test_dns_through_the_resolver_address(host):
    pytest.importorskip("dns.message")
    import dns.message
    import dns.rrset

    server = in_netns(host, lambda: _bind_udp("127.0.0.1"))
    stop = threading.Event()

    def answer() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                data, peer = server.recvfrom(4096)
            except TimeoutError:
                continue
            query = dns.message.from_wire(data)
            reply = dns.message.make_response(query)
            reply.answer.append(dns.rrset.from_text(query.question[0].name, 60, "IN", "A",
                                                    "192.0.2.77"))
            server.sendto(reply.to_wire(), peer)

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        port = server.getsockname()[1]
        result = nsbridge_run(host, "--dns", f"127.0.0.1:{port}", "--", "dig", "+short",
                              "+time=5", "+tries=1", "@10.0.2.3", "example.test")
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "192.0.2.77"
    finally:
        stop.set()
        thread.join(timeout=5)
        server.close()


def _bind_udp(host_ip: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host_ip, 0))
    return sock


def test_ping_the_host_network(host):
    result = nsbridge_run(host, HOST_ACCESS, "--", "ping", "-c", "2", "-W", "5", "192.0.2.1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 received" in result.stdout


@pytest.mark.parametrize(("mode", "bind"), [("device", "0.0.0.0"), ("splice", "127.0.0.1")])
def test_published_port_reached_from_the_host(host, tmp_path, mode, bind):
    """Device mode (the default) dials the namespace's interface address, so the server
    listens on it; splice mode dials its loopback, so a server bound there is reached."""
    (tmp_path / "page.txt").write_text("served from inside the sandbox\n")
    proc = subprocess.Popen(
        ["ip", "netns", "exec", host, sys.executable, "-m", "nsbridge", "run", "-v",
         f"--publish-mode={mode}", "-p", "127.0.0.1:18080:8000", "--", sys.executable,
         "-m", "http.server", "8000", "--bind", bind, "-d", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        def fetch() -> bytes | None:
            def get() -> bytes | None:
                try:
                    with socket.create_connection(("127.0.0.1", 18080), timeout=5) as sock:
                        sock.sendall(b"GET /page.txt HTTP/1.0\r\n\r\n")
                        data = b""
                        while chunk := sock.recv(65536):
                            data += chunk
                        return data
                except OSError:
                    return None

            return in_netns(host, get)  # type: ignore[return-value]

        wait_until(lambda: (fetch() or b"").endswith(b"served from inside the sandbox\n"),
                   timeout=20, what="published port")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode in (0, 128 + signal.SIGTERM, -signal.SIGTERM), proc.stderr.read()


def test_nothing_left_behind(host):
    """The helper processes (sandbox set-up, the in-namespace socket factory) all end."""
    marker = f"127.0.0.{2 + os.getpid() % 250}:{20000 + uuid.uuid4().int % 20000}:80"
    result = nsbridge_run(host, "-p", marker, "--", "true")
    assert result.returncode == 0, result.stderr
    wait_until(lambda: not processes_mentioning(marker), timeout=5,
               what="every process of that run to end")


def test_udp_and_icmp_denials_are_logged_at_v(host):
    """-v names every denied flow, whatever its protocol (TCP's line is tested with the
    bypass table)."""
    send = ("import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
            "s.sendto(b'x', ('192.0.2.1', 5353))")
    result = nsbridge_run(host, "-v", "--deny", "192.0.2.0/24", "--", "sh", "-c",
                          f"{sys.executable} -c \"{send}\"; ping -c 1 -W 2 192.0.2.1; true")
    assert result.returncode == 0, result.stderr
    assert "usernet udp: 10.0.2.100 -> 192.0.2.1:5353 denied: " in result.stderr
    assert "usernet icmp: 10.0.2.100 -> 192.0.2.1 denied: " in result.stderr
    # and one summary line at the end, with the denials by reason
    [summary] = [line for line in result.stderr.splitlines() if "UDP flows:" in line]
    assert "UDP flows: 0" in summary and "echo requests: 1" in summary
    assert "denials: deny rule x2" in summary
    # the start-up line says what the policy is, so a user reading -v knows the rules
    assert "policy: host access denied; deny 192.0.2.0/24" in result.stderr, result.stderr


@pytest.mark.parametrize("by", ["pid", "path"])
def test_attach_cli_serves_and_ends_with_the_target(host, web, tcp, by):
    """``nsbridge attach PID|PATH`` for a namespace someone else made: curl works inside
    (on this TCP path); given a PID it exits 0 by itself when that process ends; given
    a path it runs until SIGTERM."""
    target = subprocess.Popen(["unshare", "-Urn", "sleep", "60"])
    attach = None
    try:
        wait_until(lambda: os.path.basename(os.readlink(f"/proc/{target.pid}/exe"))
                   .startswith("sleep"), what="the target to unshare")
        which = str(target.pid) if by == "pid" else f"/proc/{target.pid}/ns/net"
        attach = subprocess.Popen(["ip", "netns", "exec", host, sys.executable, "-m",
                                   "nsbridge", "attach", tcp, HOST_ACCESS, which],
                                  stderr=subprocess.PIPE, text=True, cwd=REPO)
        inside = ["nsenter", "-t", str(target.pid), "-U", "-n", "--preserve-credentials"]
        url = f"http://192.0.2.1:{HTTP_PORT}/index.html"

        def curl_works() -> bool:
            result = subprocess.run([*inside, "curl", "-sS", "--max-time", "5", url],
                                    capture_output=True, text=True)
            return result.stdout == "hello from the host namespace\n"

        wait_until(curl_works, timeout=20, what="curl through the attached namespace")
        if by == "pid":
            target.kill()  # by PID: the process this test started
            target.wait(timeout=10)
        else:
            attach.send_signal(signal.SIGTERM)
        _, err = attach.communicate(timeout=15)
        assert attach.returncode in ((0,) if by == "pid" else (0, 128 + signal.SIGTERM)), err
        assert "Traceback" not in err
    finally:
        for proc in (attach, target):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


def test_addresses_follow_cidr(host):
    """--cidr/--cidr6 move every inside address, and the policy and DNS follow."""
    result = nsbridge_run(host, "--cidr", "172.30.5.0/24", "--cidr6", "fd12:3456::/64",
                          "--allow-host-loopback", "--", "sh", "-c",
                          "ip -br addr show nsb0; ip route; cat /etc/resolv.conf; "
                          "ping -c 1 -W 5 172.30.5.2 >/dev/null && echo gateway-answers")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "172.30.5.100/24" in out and "fd12:3456::100/64" in out
    assert "default via 172.30.5.2" in out
    assert "nameserver 172.30.5.3" in out and "nameserver fd12:3456::3" in out
    assert "gateway-answers" in out


def test_unprivileged_creator_in_a_user_namespace(host, web, tcp):
    """Rootless for real: nsbridge runs as root of a user namespace of its own
    (``unshare -U -r``), so it holds no capability over the host namespace — yet TCP
    over this path, ping and the exit status work.  (/dev/net/tun is 0600 here: the
    mapped uid 0 still owns it, which is how this machine's device lets it open; a uid
    without the mapping is tested in test_sandbox.py where the interpreter allows.)"""
    unprivileged = ["ip", "netns", "exec", host, "unshare", "-U", "-r", "--"]
    probe = subprocess.run([*unprivileged, "ip", "link", "add", "nsbx", "type", "veth"],
                           capture_output=True, text=True)
    assert probe.returncode != 0  # no CAP_NET_ADMIN over the host namespace
    result = subprocess.run(
        [*unprivileged, sys.executable, "-m", "nsbridge", "run", tcp, HOST_ACCESS, "--",
         "sh", "-c",
         f"curl -sS -m 10 http://192.0.2.1:{HTTP_PORT}/index.html && "
         "ping -c 1 -W 5 192.0.2.1 >/dev/null && exit 3"],
        capture_output=True, text=True, timeout=60, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 3, result.stderr
    assert result.stdout == "hello from the host namespace\n"


@pytest.mark.parametrize("relay", ["engine", "auto"])
def test_ping_without_ping_sockets_says_why(host, relay):
    """Ping sockets closed (``net.ipv4.ping_group_range`` = "1 0") and no CAP_NET_RAW over
    the host namespace (nsbridge runs as root of a user namespace of its own, as in the
    rootless test above; /dev/net/tun is handled the same way): ping fails, and ``-v`` says
    why and how to fix it at start and in the summary, instead of "nothing denied" alone."""
    subprocess.run(["ip", "netns", "exec", host, "sysctl", "-qw",
                    "net.ipv4.ping_group_range=1 0"], check=True)
    result = subprocess.run(
        ["ip", "netns", "exec", host, "unshare", "-U", "-r", "--", sys.executable, "-m",
         "nsbridge", "run", "-v", f"--relay={relay}", HOST_ACCESS, "--", "ping", "-c", "1",
         "-W", "3",
         "192.0.2.1"],
        capture_output=True, text=True, timeout=60, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode != 0, result.stdout  # no reply
    start = [line for line in result.stderr.splitlines()
             if "ping from the namespace cannot work" in line]
    assert len(start) == 1 and "net.ipv4.ping_group_range" in start[0], result.stderr
    assert "0 2147483647" in start[0], start
    summary = [line for line in result.stderr.splitlines() if "echo requests refused x" in line]
    assert len(summary) == 1 and "ping_group_range" in summary[0], result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("args", "needle"), [
    (["-p", "80"], "-p '80'"),
    (["-p", "8080:99999"], "namespace port"),
    (["-p", "8080:80/sctp"], "protocol 'sctp'"),
    (["--deny", "10.0.0.300/8"], "10.0.0.300"),
    (["--dns", "not-an-ip"], "--dns 'not-an-ip': not an IP address"),
    (["--dns", "1.2.3.4:0"], "port 0"),
    (["--mtu", "100"], "--mtu '100'"),
    (["--mtu", "abc"], "invalid int value"),
    (["--tcp", "quic"], "invalid choice: 'quic'"),
    (["--publish-mode", "fast"], "invalid choice: 'fast'"),
    (["--allow", "tcp:192.0.2.1:99999"], "port '99999'"),
    (["--deny", "*/8"], "--deny */8: '*' stands alone for every address of both families"),
    (["--allow", "tcp:[*]:443"], "--allow tcp:[*]:443: '*' stands alone"),
    (["--nat64-prefix", "64:ff9b:1::/80"], "--nat64-prefix 64:ff9b:1::/80: a NAT64 prefix is "
                                           "/32, /40, /48, /56, /64 or /96 (RFC 6052), not /80"),
    (["--nat64-prefix", "64:ff9b:1::"], "--nat64-prefix 64:ff9b:1::: give the prefix with its "
                                        "length"),
    (["--nat64-prefix", "10.64.0.0/16"], "--nat64-prefix 10.64.0.0/16: not an IPv6 prefix"),
    (["--nat64-prefix", "64:ff9b:1:0:100::/96"], "bits 64-71 of a /96 NAT64 prefix must be "
                                                  "zero"),
    (["-p", "70000:80"], "port 70000"),
    (["--cidr", "10.0.0.0/31"], "--cidr 10.0.0.0/31: too small"),
    (["--cidr", "2001:db8::/64"], "--cidr 2001:db8::/64: not an IPv4 network"),
    (["--cidr", "10.0.2.300/24"], "10.0.2.300"),
    (["--cidr6", "fd00::/125"], "--cidr6 fd00::/125: too small"),
    ([], "run: no command given"),
])
def test_bad_run_input(host, args, needle):
    """Each bad option: exit 2, one line naming it, before any namespace exists."""
    result = nsbridge_run(host, *args, "--", *([] if not args else ["true"]))
    if not args:
        result = nsbridge_run(host)
    assert result.returncode == 2, result.stderr
    assert needle in result.stderr
    assert "Traceback" not in result.stderr
    if not args:  # a missing command also shows how to give one
        assert result.stderr.splitlines()[0] == "usage: nsbridge run [OPTIONS] -- CMD [ARGS...]"


@pytest.mark.parametrize(("target", "needle"), [
    ("999999999", "no such process"),
    ("/etc/hostname", "not a namespace file"),
    ("/nonexistent/ns", "does not exist"),
    ("pid:abc", "pid:abc"),
])
def test_bad_attach_input(host, target, needle):
    """attach names the bad target in one line, exit 2."""
    result = subprocess.run(["ip", "netns", "exec", host, sys.executable, "-m", "nsbridge",
                             "attach", target], capture_output=True, text=True, timeout=30,
                            cwd=REPO)
    assert result.returncode == 2, result.stderr
    assert needle in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
