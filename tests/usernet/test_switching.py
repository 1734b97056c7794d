"""``nsbridge run --bypass`` (socket switching) end to end: allowed outbound TCP leaves on
sockets of the host's namespace, everything else keeps its path.

The world (helpers.switching): nsbridge in a host namespace, servers in an outside one
that answer with the client address they saw.  A switched connection shows it twice:
the program's own socket has the host's address (``getsockname``: 198.51.100.1, not the
namespace's 10.0.2.100), and the server sees the host's address.  Cases: blocking and
asyncio (non-blocking) connects, IPv4 and IPv6, curl and iperf3; denied destinations,
the host's loopback and the host's own addresses refused with ECONNREFUSED, counted and
logged; the same with host access on; the namespace's own loopback, DNS (UDP and TCP),
UDP and ping unchanged; 32 MiB checked by sha256 both ways and a half-close; 10,000
switched connections one after another (and 200 at once) leave the program's fd count as it
was; Unix sockets reach what the program sees; the Python API's ``bypass=True`` and
counters; nsbridge killed under a running program; ``attach --bypass`` refused with
one line.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from helpers.environment import REPO
from helpers.netns import in_netns
from helpers.switching import (
    DENIED_PORT,
    ECHO_PORT,
    HOST_LOOPBACK_PORT,
    OUT4,
    OUT6,
    PROBE,
    UDP_PORT,
    UP4,
    UP6,
    World,
    switching_world,
)

# Each test twice: the switcher's native core and its Python path (conftest.py).
BOTH_SWITCH_PATHS = True
pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("switch_path")]


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with switching_world() as made:
        yield made


@pytest.mark.parametrize(("target", "host_address"), [(OUT4, UP4), (OUT6, UP6)],
                         ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("case", ["connect", "nonblocking"])
def test_outbound_tcp_is_switched(world: World, case: str, target: str,
                                  host_address: str) -> None:
    result, log = world.probe(case, target, str(ECHO_PORT))
    assert result == {"result": "ok", "server_saw": host_address, "echo": "ping",
                      "sockname": host_address}
    assert "switched TCP connections: 1" in log
    assert "TCP connections: 0 " in log  # nothing took the fast path


@pytest.mark.parametrize("target", [OUT4, OUT6], ids=["ipv4", "ipv6"])
def test_transfer_checked_and_half_close(world: World, target: str) -> None:
    """32 MiB through a switched connection and back (sha256 both ways), then our FIN
    reaches the server, whose own FIN comes back: the kernel's TCP end to end."""
    result, _ = world.probe("transfer", target, str(ECHO_PORT), "32")
    assert result == {"same": True, "bytes": 32 << 20, "eof_after_half_close": True,
                      "server_saw": UP6 if ":" in target else UP4}


def test_without_bypass_the_fast_path_carries_it(world: World) -> None:
    """The control: the same probe without --bypass is relayed (the program's socket
    keeps the namespace's address)."""
    result, _ = world.probe("connect", OUT4, str(ECHO_PORT), options=())
    assert result["result"] == "ok" and result["sockname"] == "10.0.2.100"


def test_denied_and_host_access_refused(world: World) -> None:
    before = len(world.seen.get(HOST_LOOPBACK_PORT, []))
    for target, port, reason in ((OUT4, DENIED_PORT, "deny rule"),
                                 (OUT6, DENIED_PORT, "deny rule"),
                                 ("10.0.2.2", HOST_LOOPBACK_PORT, "host loopback disabled"),
                                 (UP4, ECHO_PORT, "host address")):
        result, log = world.probe("connect", target, str(port),
                                  options=("--bypass", "--deny", f"tcp:*:{DENIED_PORT}"))
        assert result == {"result": "ECONNREFUSED"}, (target, log)
        assert "denied: " in log and f"{reason} x1" in log, log
        assert "usernet tcp: bypass pid" in log
    assert len(world.seen.get(HOST_LOOPBACK_PORT, [])) == before
    assert not world.seen.get(DENIED_PORT)


def test_host_access_switches_to_the_hosts_loopback(world: World) -> None:
    result, _ = world.probe("connect", "10.0.2.2", str(HOST_LOOPBACK_PORT),
                            options=("--bypass", "--allow-host-access"))
    assert result == {"result": "ok", "server_saw": "127.0.0.1", "echo": "ping",
                      "sockname": "127.0.0.1"}


def test_loopback_dns_udp_and_ping_keep_their_paths(world: World) -> None:
    result, _ = world.probe("loopback")
    assert result == {"127.0.0.1": "x", "::1": "x", "0.0.0.0": "x", "10.0.2.100": "x"}
    script = (f"dig +short +time=5 +tries=1 www.nsbridge.test @10.0.2.3 && "
              f"dig +short +tcp +time=5 +tries=1 www.nsbridge.test @10.0.2.3 && "
              f"{sys.executable} -c 'import socket; s = socket.socket(socket.AF_INET, "
              f"socket.SOCK_DGRAM); s.settimeout(5); s.sendto(b\"udp-ok\", "
              f"(\"{OUT4}\", {UDP_PORT})); print(s.recv(100).decode())' && "
              f"ping -c 1 -W 5 {OUT4} >/dev/null && echo ping-ok")
    done = world.run("--bypass", command=["sh", "-c", script])
    assert done.returncode == 0, done.stderr
    lines = done.stdout.split()
    assert lines.count("192.0.2.53") == 2 and "udp-ok" in lines and "ping-ok" in lines


@pytest.mark.skipif(not shutil.which("curl") or not shutil.which("iperf3"),
                    reason="curl and iperf3 are needed")
def test_curl_and_iperf3(world: World, tmp_path) -> None:
    page = tmp_path / "page.txt"
    page.write_text("switched page\n")
    http = subprocess.Popen(["ip", "netns", "exec", world.outside, sys.executable, "-m",
                             "http.server", "-b", OUT4, "7310", "-d", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    iperf = subprocess.Popen(["ip", "netns", "exec", world.outside, "iperf3", "-s", "-1",
                              "-B", OUT4, "-p", "7311"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        script = (f"curl -s --retry 5 --retry-connrefused --retry-delay 1 "
                  f"http://{OUT4}:7310/page.txt && "
                  f"for i in 1 2 3 4 5; do iperf3 -c {OUT4} -p 7311 -t 1 -J > /tmp/iperf.$$ "
                  f"&& break; sleep 1; done && grep -c bits_per_second /tmp/iperf.$$ "
                  f"&& rm -f /tmp/iperf.$$")
        done = world.run("--bypass", command=["sh", "-c", script], timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("switched page\n")
        assert "switched TCP connections: 0" not in done.stderr
    finally:
        for process in (http, iperf):
            if process.poll() is None:
                process.terminate()
            process.wait(timeout=10)


def test_many_connections_leave_no_fds(world: World) -> None:
    result, log = world.probe("connect_many", OUT4, str(ECHO_PORT), "10000", timeout=240)
    assert result["ok"] == 10000
    assert result["fds_after"] == result["fds_before"]
    assert "switched TCP connections: 10000 (0 failed to connect)" in log


def test_attach_refuses_bypass_with_one_line(world: World) -> None:
    done = subprocess.run([sys.executable, "-m", "nsbridge", "attach", "--bypass", "1"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--bypass" in lines[0] and "nsbridge run --bypass" in lines[0]


def test_unix_sockets_reach_what_the_program_sees(world: World) -> None:
    """Unix connects are made by the host side on the program's socket: by path in the
    program's own mount namespace (a tmpfs only it has), relative to its working
    directory, and by abstract name in its network namespace."""
    result, _ = world.probe("unix")
    assert result == {"absolute": "u", "relative": "u", "abstract": "u"}


def test_connected_udp_keeps_the_namespace_path(world: World) -> None:
    result, _ = world.probe("udp_connected", OUT4, str(UDP_PORT))
    assert result == {"echo": "udp-connected", "sockname": "10.0.2.100"}


def test_python_api_counts_switching(world: World, tmp_path) -> None:
    """``api.run(bypass=True)``: the same switching, its counters in ``stats()``."""
    script = tmp_path / "api_driver.py"
    script.write_text(f"""
import json, os, sys
from nsbridge.usernet import api
read_end, write_end = os.pipe()
with api.run([sys.executable, {PROBE!r}, "connect", "{OUT4}", "{ECHO_PORT}"],
             bypass=True, deny=["tcp:*:{DENIED_PORT}"], dns=[("{OUT4}", 53)],
             stdout=write_end) as proc:
    os.close(write_end)
    output = os.read(read_end, 4096).decode()
    proc.wait()
    stats = proc.stats()
print(json.dumps({{"probe": json.loads(output), "bypass": stats["bypass"]}}))
""")
    done = subprocess.run(["ip", "netns", "exec", world.host, sys.executable, str(script)],
                          capture_output=True, text=True, timeout=90, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["probe"]["sockname"] == UP4 and result["probe"]["echo"] == "ping"
    assert result["bypass"]["switched"] == 1
    assert result["bypass"]["denied"] == {} and result["bypass"]["errors"] == 0


def test_program_outlives_nsbridge_cleanly(world: World) -> None:
    """nsbridge killed: the switched connection (the host kernel's) keeps working; a new
    connect fails at once (ENOSYS: no listener left) instead of hanging."""
    argv = ["ip", "netns", "exec", world.host, sys.executable, "-m", "nsbridge", "run",
            "--bypass", "--dns", OUT4, "--", sys.executable, PROBE, "outlive", OUT4,
            str(ECHO_PORT)]
    process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True, cwd=REPO)
    try:
        assert process.stdout is not None and process.stdin is not None
        assert process.stdout.readline().strip() == "connected"
        os.kill(process.pid, signal.SIGKILL)  # ip netns exec became nsbridge
        process.wait(timeout=10)
        process.stdin.write("go\n")
        process.stdin.flush()
        reader = threading.Thread(target=lambda: box.append(process.stdout.read()))
        box: list[str] = []
        reader.start()
        reader.join(timeout=30)
        assert box, "the program hung after nsbridge was killed"
        assert json.loads(box[0].strip().splitlines()[-1]) == {
            "first": "ping", "after": "after", "new_connect": "ENOSYS"}
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def test_switching_works_unprivileged(world: World) -> None:
    """As an ordinary user (uid 65534, no capabilities on the host): the host side can
    still take the program's socket (pidfd_getfd), tell a switched one from the
    namespace's (SIOCGSKNS is refused for the host's: that counts as the host's), read
    its memory and install sockets."""
    from helpers.unprivileged import as_nobody, unprivileged_checkout

    with unprivileged_checkout() as (tree, python, env):
        probe = str(tree / "tests" / "helpers" / "switch_probe.py")
        for case, expected in (
                (["connect", OUT4, str(ECHO_PORT)], {"result": "ok", "server_saw": UP4,
                                                     "echo": "ping", "sockname": UP4}),
                (["connect", OUT4, str(DENIED_PORT)], {"result": "ECONNREFUSED"}),
                (["loopback"], {"127.0.0.1": "x", "::1": "x", "0.0.0.0": "x", "10.0.2.100": "x"}),
                (["unix"], {"absolute": "u", "relative": "u", "abstract": "u"})):
            argv = ["ip", "netns", "exec", world.host, *as_nobody(
                *python, "-m", "nsbridge", "run", "--bypass", "--deny",
                f"tcp:*:{DENIED_PORT}", "--dns", OUT4, "--", *python, probe, *case)]
            done = subprocess.run(argv, capture_output=True, text=True, cwd=tree, env=env,
                                  timeout=90)
            assert done.returncode == 0, done.stderr
            assert json.loads(done.stdout.strip().splitlines()[-1]) == expected, case


def test_concurrent_nonblocking_connects(world: World) -> None:
    result, log = world.probe("concurrent", OUT4, str(ECHO_PORT), "200", timeout=180)
    assert result["count"] == 200 and result["socknames"] == [UP4]
    assert result["fds_after"] == result["fds_before"]
    assert "switched TCP connections: 200 (0 failed to connect)" in log


@pytest.mark.parametrize("case", ["connect", "nonblocking"])
def test_allowed_but_refused_target(world: World, case: str) -> None:
    """An allowed destination with nothing listening: the host's connect is refused and
    so is the program's (at once when blocking; through the socket's error when not)."""
    result, log = world.probe(case, OUT4, "7399")
    assert result == {"result": "ECONNREFUSED"}
    if case == "connect":
        assert "switched TCP connections: 0 (1 failed to connect)" in log
    else:  # switched before the answer came: the host socket carried the refusal
        assert "switched TCP connections: 1 (0 failed to connect)" in log


def test_connect_polled_until_eisconn(world: World) -> None:
    result, log = world.probe("connect_again", OUT4, str(ECHO_PORT))
    # Linux answers the first connect after completion with 0 (then EISCONN).
    assert result["answers"][0] == "EINPROGRESS" and result["answers"][-1] in ("0", "EISCONN")
    assert set(result["answers"]) <= {"EINPROGRESS", "EALREADY", "0", "EISCONN"}
    assert result["echo"] == "ping" and result["sockname"] == UP4
    assert "switched TCP connections: 1 (0 failed to connect)" in log


def test_split_form_switches_too(world: World, tmp_path) -> None:
    """``HostSide(bypass=True)`` + ``child_setup(fd)``: the runtime's own child (here made
    by unshare) gets the filter from child_setup and its connects are switched."""
    script = tmp_path / "split_driver.py"
    script.write_text(f"""
import json, subprocess, sys
from nsbridge.usernet import api
child_code = (
    "import subprocess, sys\\n"
    "from nsbridge.usernet import api\\n"
    "api.child_setup(int(sys.argv[1]))\\n"
    "sys.exit(subprocess.call([sys.executable, {PROBE!r}, 'connect', '{OUT4}', "
    "'{ECHO_PORT}']))\\n")
with api.HostSide(bypass=True, dns=[("{OUT4}", 53)]) as side:
    fd = side.child_fd()
    child = subprocess.Popen(["unshare", "-Urn", sys.executable, "-c", child_code, str(fd)],
                             pass_fds=(fd,), stdout=subprocess.PIPE, text=True)
    side.start(pid=child.pid)
    output, _ = child.communicate(timeout=60)
    side.wait(timeout=10)
    stats = side.stats()
print(json.dumps({{"probe": json.loads(output), "bypass": stats.get("bypass")}}))
""")
    done = subprocess.run(["ip", "netns", "exec", world.host, sys.executable, str(script)],
                          capture_output=True, text=True, timeout=90, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["probe"] == {"result": "ok", "server_saw": UP4, "echo": "ping",
                               "sockname": UP4}
    assert result["bypass"]["switched"] == 1


def test_published_port_reaches_a_listener_under_bypass(world: World) -> None:
    """``-p`` with ``--bypass``: the program's listen() is trapped and the publication's
    host listener handed to it (tests/usernet/test_switching_publish.py has the rest), so
    it accepts the client with its real address: the host's loopback, not the gateway
    the device path shows."""
    argv = ["ip", "netns", "exec", world.host, sys.executable, "-m", "nsbridge", "run",
            "--bypass", "--dns", OUT4, "-p", "127.0.0.1:7320:8080", "--", sys.executable,
            PROBE, "serve_once", "8080"]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=REPO)
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "listening"

        def fetch() -> str:
            with socket.create_connection(("127.0.0.1", 7320), timeout=10) as sock:
                return sock.recv(100).decode().strip()

        assert in_netns(world.host, fetch) == "127.0.0.1"
        out, err = process.communicate(timeout=30)
        assert process.returncode == 0, err
        assert json.loads(out.strip().splitlines()[-1]) == {"client": "127.0.0.1"}
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=10)


@pytest.mark.parametrize(("target", "option", "source"),
                         [(OUT4, "--outbound-addr", "198.51.100.9"),
                          (OUT6, "--outbound-addr6", "2001:db8:5::9")], ids=["ipv4", "ipv6"])
def test_switched_socket_leaves_from_the_outbound_address(world: World, target: str,
                                                          option: str, source: str) -> None:
    """``--outbound-addr(6)`` binds the host socket before it connects (the native core
    takes the sockaddr the switcher built): the server sees that second address of the
    host's, which the kernel would never have picked, and so does the program."""
    up = UP6 if ":" in target else UP4
    shown = subprocess.run(["ip", "-n", world.host, "-j", "addr", "show"], check=True,
                           capture_output=True, text=True).stdout
    device = next(link["ifname"] for link in json.loads(shown)
                  if any(a["local"] == up for a in link.get("addr_info", [])))
    prefix = "64" if ":" in source else "24"
    subprocess.run(["ip", "-n", world.host, "addr", "add", f"{source}/{prefix}", "dev", device,
                    *(["nodad"] if ":" in source else [])], check=True)
    try:
        result, log = world.probe("connect", target, str(ECHO_PORT),
                                  options=("--bypass", option, source))
    finally:
        subprocess.run(["ip", "-n", world.host, "addr", "del", f"{source}/{prefix}", "dev",
                        device], check=True)
    assert result == {"result": "ok", "server_saw": source, "echo": "ping",
                      "sockname": source}
    assert "switched TCP connections: 1" in log
