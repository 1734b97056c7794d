"""TCP from a user-mode namespace, one suite for both paths: ``redirect`` and ``tun``.

The fast path (nftables redirect, kernel relay) and the tun path (TCP terminated by
:mod:`nsbridge.usernet.host.tuntcp` on the host side) must behave alike, so they are tested
with the same suite: every test here runs once per path (``tcp_mode``).  The host side is the
real Python API (:func:`nsbridge.usernet.api.run`), started with ``ip netns exec HOST``
in a "host" namespace the test made (conftest ``host``: 192.0.2.1 and 2001:db8::1 on
an interface of its own), so nothing can leave the machine; it prints the command's
exit status and the TCP counters as JSON.  The programs inside are real: curl, iperf3,
and the plain-socket client of helpers/redirect_driver.py (sha256-checked transfers,
half-close, resets).

/dev/net/tun is mode 0600 on this machine: the namespace creator runs as root here
(mapped to root inside its user namespace, too).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.environment import REPO, have
from helpers.netns import free_port, in_netns, listen_in
from helpers.servers import echo, reply_after_fin

pytestmark = [
    pytest.mark.skipif(not os.path.exists("/dev/net/tun"), reason="no /dev/net/tun"),
]

HOST4 = "192.0.2.1"
HOST6 = "2001:db8::1"
DRIVER = str(REPO / "tests" / "helpers" / "redirect_driver.py")
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
MODES = ["redirect", "tun"]

# The host side: the API, in the host namespace; one JSON line with code and counters.
# HOST4/HOST6 are the host namespace's own addresses, standing for the outside: host
# access opens them (closing them is usernet/test_host_access.py's).
HOST_SIDE = """
import json, sys
from nsbridge.usernet import api
config = json.loads(sys.argv[1])
with open(config["out"], "w") as out, open(config["err"], "w") as err:
    proc = api.run(config["command"], tcp=config["tcp"], deny=config.get("deny", ()),
                   allow_host_access=True,
                   mtu=config.get("mtu", 65520), stdout=out.fileno(), stderr=err.fileno())
code = proc.wait(timeout=config["timeout"])
stats = proc.stats()
proc.close()
resets = stats["engine"]["tcp_resets"]
print(json.dumps({"code": code, "tcp": stats["tcp"], "engine_resets": resets}))
"""


@pytest.fixture(params=MODES)
def tcp_mode(request: pytest.FixtureRequest) -> str:
    return request.param


def run_inside(host: str, tmp_path: Path, mode: str, command: list[str], *,
               timeout: float = 120, **config: object) -> tuple[dict, str, str]:
    """Run ``command`` with ``nsbridge`` networking (TCP path ``mode``) inside ``host``;
    (report, its stdout, its stderr)."""
    out, err = tmp_path / "cmd.out", tmp_path / "cmd.err"
    settings = {"command": command, "tcp": mode, "out": str(out), "err": str(err),
                "timeout": timeout, **config}
    proc = subprocess.run(["ip", "netns", "exec", host, sys.executable, "-c", HOST_SIDE,
                           json.dumps(settings)], capture_output=True, text=True,
                          timeout=timeout + 60, cwd=REPO, env=ENV)
    cmd_out, cmd_err = out.read_text(), err.read_text()
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\nCMD:\n{cmd_out}\n{cmd_err}"
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return report, cmd_out, cmd_err


def client(*args: object) -> list[str]:
    return [sys.executable, DRIVER, "client", *map(str, args)]


def results(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def assert_all_closed(tcp: dict, connections: int) -> None:
    """Every connection was accepted, none is left, and each ended as counted."""
    assert tcp["accepted"] == connections, tcp
    assert tcp["active"] == 0, tcp
    assert tcp["closed"] + tcp["reset"] + tcp["connect_failed"] >= connections, tcp


# ---- data integrity -----------------------------------------------------------------------


@pytest.mark.parametrize("address", [HOST4, HOST6])
def test_bulk_both_ways_sha256(host: str, tmp_path: Path, stream_server, tcp_mode: str,
                               address: str) -> None:
    size = 48 << 20
    server = stream_server(listen_in(host, address), echo)
    report, out, err = run_inside(host, tmp_path, tcp_mode,
                                  client("bulk", address, server.port, size))
    assert report["code"] == 0, err
    [result] = results(out)
    assert result["bytes"] == size
    assert result["received"] == result["sent"]
    tcp = report["tcp"]
    assert tcp["bytes_up"] == size and tcp["bytes_down"] == size, tcp
    assert tcp["closed"] == 1 and tcp["reset"] == 0, tcp


@pytest.mark.skipif(not have("curl"), reason="needs curl")
def test_curl_download_sha256(host: str, tmp_path: Path, tcp_mode: str) -> None:
    root = tmp_path / "www"
    root.mkdir()
    blob = os.urandom(6 << 20)
    (root / "blob.bin").write_bytes(blob)
    port = free_port(host, host=HOST4)
    server = subprocess.Popen(["ip", "netns", "exec", host, sys.executable, "-m",
                               "http.server", "--bind", HOST4, "-d", str(root), str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_port(host, HOST4, port)
        report, out, err = run_inside(host, tmp_path, tcp_mode, [
            "sh", "-c", f"curl -sS -m 30 http://{HOST4}:{port}/blob.bin | sha256sum"])
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert report["code"] == 0, err
    assert out.split()[0] == hashlib.sha256(blob).hexdigest()


@pytest.mark.skipif(not have("iperf3"), reason="needs iperf3")
def test_iperf3_both_directions(host: str, tmp_path: Path, tcp_mode: str) -> None:
    port = free_port(host, host=HOST4)
    server = subprocess.Popen(["ip", "netns", "exec", host, "iperf3", "-s", "-B", HOST4, "-p",
                               str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_port(host, HOST4, port)
        report, out, err = run_inside(host, tmp_path, tcp_mode, [
            "sh", "-c", f"iperf3 -J -c {HOST4} -p {port} -n 64M && "
                        f"iperf3 -J -c {HOST4} -p {port} -n 64M -R"])
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert report["code"] == 0, out + err
    decoder, position, runs = json.JSONDecoder(), 0, []
    text = out.strip()
    while position < len(text):
        value, position = decoder.raw_decode(text, position)
        runs.append(value)
        position = len(text) - len(text[position:].lstrip())
    assert len(runs) == 2
    for run in runs:  # -n counts what was sent; the receiver's tally stops early
        assert run["end"]["sum_sent"]["bytes"] >= 64 << 20
        assert run["end"]["sum_received"]["bytes"] > 0


# ---- connection semantics -------------------------------------------------------------------


@pytest.mark.parametrize("address", [HOST4, HOST6])
def test_half_close_from_the_namespace(host: str, tmp_path: Path, stream_server,
                                       tcp_mode: str, address: str) -> None:
    server = stream_server(listen_in(host, address), reply_after_fin)
    report, out, err = run_inside(host, tmp_path, tcp_mode, client("halfclose", address,
                                                                   server.port))
    assert report["code"] == 0, err
    assert results(out)[0]["reply"] == "after-fin:100000"
    assert report["tcp"]["closed"] == 1, report


def _talk_after_our_fin(conn: socket.socket) -> None:
    """The server half-closes first, then still reads what the client sends."""
    conn.sendall(b"server-done")
    conn.shutdown(socket.SHUT_WR)
    total = 0
    while data := conn.recv(65536):
        total += len(data)
    _RECEIVED.append(total)


_RECEIVED: list[int] = []

CLIENT_AFTER_SERVER_FIN = """
import socket, sys
sock = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
got = b""
while data := sock.recv(65536):
    got += data
sock.sendall(b"y" * 300000)
sock.shutdown(socket.SHUT_WR)
print(got.decode())
"""


def test_half_close_from_the_host(host: str, tmp_path: Path, stream_server,
                                  tcp_mode: str) -> None:
    _RECEIVED.clear()
    server = stream_server(listen_in(host, HOST4), _talk_after_our_fin)
    report, out, err = run_inside(host, tmp_path, tcp_mode, [
        sys.executable, "-c", CLIENT_AFTER_SERVER_FIN, HOST4, str(server.port)])
    assert report["code"] == 0, err
    assert out.strip() == "server-done"
    deadline = time.monotonic() + 10
    while not _RECEIVED and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _RECEIVED == [300000]


def _abort(conn: socket.socket) -> None:
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    conn.close()


def _abort_once_established(conn: socket.socket) -> None:
    """Reset a connection the program has seen established.  Aborting at once races the
    tun path's handshake: its SYN-ACK waits for the host side's connect, and a reset
    that arrives first is, faithfully, a refused connect (the case below)."""
    time.sleep(0.3)
    _abort(conn)


def test_server_reset_reaches_the_program(host: str, tmp_path: Path, stream_server,
                                          tcp_mode: str) -> None:
    server = stream_server(listen_in(host, HOST4), _abort_once_established)
    report, out, err = run_inside(host, tmp_path, tcp_mode,
                                  client("expect-reset", HOST4, server.port))
    assert report["code"] == 0, err
    assert results(out)[0]["result"] == "reset", out
    assert report["tcp"]["reset"] == 1, report


CLIENT_RESET = """
import socket, struct, sys, time
sock = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
sock.sendall(b"z" * 1000)
time.sleep(0.3)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
sock.close()
time.sleep(0.5)
"""


def test_program_reset_reaches_the_server(host: str, tmp_path: Path, stream_server,
                                          tcp_mode: str) -> None:
    seen: list[str] = []

    def read_until_reset(conn: socket.socket) -> None:
        try:
            while conn.recv(65536):
                pass
            seen.append("eof")
        except ConnectionResetError:
            seen.append("reset")

    server = stream_server(listen_in(host, HOST4), read_until_reset)
    report, _out, err = run_inside(host, tmp_path, tcp_mode, [
        sys.executable, "-c", CLIENT_RESET, HOST4, str(server.port)])
    assert report["code"] == 0, err
    deadline = time.monotonic() + 10
    while not seen and time.monotonic() < deadline:
        time.sleep(0.05)
    assert seen == ["reset"]


def test_refused_target_is_refused_at_once(host: str, tmp_path: Path, tcp_mode: str) -> None:
    closed = free_port(host, host=HOST4)
    report, out, err = run_inside(host, tmp_path, tcp_mode,
                                  client("expect-reset", HOST4, closed))
    assert report["code"] == 0, err
    [result] = results(out)
    assert result["result"] in ("refused", "reset"), result
    assert result["seconds"] < 5
    assert report["tcp"]["connect_failed"] == 1, report


def test_denied_flow_is_reset_at_once_and_counted(host: str, tmp_path: Path, stream_server,
                                                  tcp_mode: str) -> None:
    server = stream_server(listen_in(host, HOST4), echo)
    report, out, err = run_inside(host, tmp_path, tcp_mode,
                                  client("expect-reset", HOST4, server.port),
                                  deny=["192.0.2.0/24"])
    assert report["code"] == 0, err
    [result] = results(out)
    assert result["result"] in ("refused", "reset") and result["seconds"] < 5, result
    assert sum(report["tcp"]["denied"].values()) == 1, report
    assert server.accepted == []


CONCURRENT = """
import hashlib, os, socket, sys, threading
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
bad = []
def one(i):
    data = os.urandom(1000 + i * 37)
    try:
        sock = socket.create_connection((host, port), timeout=30)
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := sock.recv(65536):
            got += chunk
        sock.close()
        if got != data:
            bad.append(i)
    except OSError as exc:
        bad.append((i, str(exc)))
threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
for t in threads: t.start()
for t in threads: t.join()
print("bad", bad)
"""


def test_many_concurrent_connections(host: str, tmp_path: Path, stream_server,
                                     tcp_mode: str) -> None:
    count = 200
    server = stream_server(listen_in(host, HOST4, backlog=1024), echo)
    report, out, err = run_inside(host, tmp_path, tcp_mode, [
        sys.executable, "-c", CONCURRENT, HOST4, str(server.port), str(count)])
    assert report["code"] == 0, err
    assert out.strip() == "bad []", out + err
    assert_all_closed(report["tcp"], count)
    assert report["tcp"]["reset"] == 0, report


def test_tun_mode_really_uses_the_tun(host: str, tmp_path: Path, stream_server) -> None:
    """--tcp=tun carries TCP through the tun device: the engine, not a redirect."""
    server = stream_server(listen_in(host, HOST4), echo)
    report, _out, err = run_inside(host, tmp_path, "tun",
                                   client("halfclose", HOST4, server.port))
    assert report["code"] == 0, err
    assert "retransmits" in report["tcp"]  # TunTcp's counters, not the redirector's
    assert report["engine_resets"] == 0


@pytest.mark.parametrize(("address", "mtu"), [(HOST4, 1500), (HOST6, 1280)])
def test_small_mtu_sha256(host: str, tmp_path: Path, stream_server, tcp_mode: str,
                          address: str, mtu: int) -> None:
    """A namespace with an Ethernet-sized (or IPv6-minimum) MTU: on the tun path the
    host side writes 64 KiB GSO frames that the kernel cuts to the namespace's MSS."""
    size = 16 << 20
    server = stream_server(listen_in(host, address), echo)
    report, out, err = run_inside(host, tmp_path, tcp_mode,
                                  client("bulk", address, server.port, size), mtu=mtu)
    assert report["code"] == 0, err
    [result] = results(out)
    assert result["bytes"] == size and result["received"] == result["sent"]


LOSSY = ("nft add table inet lossy && "
         "nft add chain inet lossy in '{{ type filter hook input priority 0; }}' && "
         "nft add chain inet lossy out '{{ type filter hook output priority 0; }}' && "
         "nft add rule inet lossy in tcp sport {port} numgen random mod 20 == 0 drop && "
         "nft add rule inet lossy out tcp dport {port} numgen random mod 20 == 0 drop && ")


@pytest.mark.skipif(not have("nft"), reason="needs nft (to drop packets inside)")
def test_tun_path_recovers_from_loss_both_ways(host: str, tmp_path: Path,
                                               stream_server) -> None:
    """5% of segments dropped each way inside the namespace (nftables ``numgen random``;
    this kernel has no netem): the echoed transfer still arrives intact, and our side
    really retransmitted (the namespace lost some of what we sent)."""
    size = 32 << 20
    server = stream_server(listen_in(host, HOST4), echo)
    command = LOSSY.format(port=server.port) + " ".join(client("bulk", HOST4, server.port,
                                                               size))
    report, out, err = run_inside(host, tmp_path, "tun", ["sh", "-c", command])
    assert report["code"] == 0, err
    [result] = results(out)
    assert result["bytes"] == size and result["received"] == result["sent"]
    tcp = report["tcp"]
    assert tcp["retransmits"] > 0, tcp
    assert tcp["bytes_up"] == size and tcp["bytes_down"] == size, tcp


def _wait_port(netns: str, address: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET

    def probe() -> bool:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            return sock.connect_ex((address, port)) == 0

    deadline = time.monotonic() + 15
    while not in_netns(netns, probe):
        if time.monotonic() > deadline:
            raise AssertionError(f"nothing listens on {address}:{port} in {netns}")
        time.sleep(0.05)

