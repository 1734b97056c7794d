"""Host access end to end: ``nsbridge run`` in a sealed "host" namespace whose own
addresses (a veth, a second interface, IPv6 global and link-local, an address added
while nsbridge runs, the interface broadcast address, IPv4-mapped spellings) are closed
to the sandbox by default, on both TCP paths (nftables fast path and tun) and both
UDP/ping paths (native relay and engine); opened by ``--allow-host-access`` (and its
older name ``--allow-host-loopback``, and ``allow_host_access=``/``allow_host_loopback=``
in the API); opened one port at a time by a precise ``--allow``; the gateway answers
ping with host access off.

The in-sandbox side is ``helpers/bypass_attempt.py`` run as a program (one attempt, one
JSON line); the host side's servers listen on every address (``::``, dual-stack), so an
address added later is served too, and record every peer.
"""

from __future__ import annotations

import json
import os
import selectors
import shlex
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers.environment import REPO
from helpers.servers import dual_stack_socket

ATTEMPT = str(REPO / "tests" / "helpers" / "bypass_attempt.py")
HOST4, SECOND4, LATER4 = "10.250.0.1", "10.251.0.1", "10.250.0.7"
BROADCAST4 = "10.250.0.255"
HOST6, LINK_LOCAL6 = "2001:db8:250::1", "fe80::99"
TCP_PORT, OTHER_PORT, UDP_PORT = 7101, 7102, 7103
PROBE = "nsbridge-bypass-probe\n"  # what helpers/bypass_attempt.py's attempts send
TCP_REFUSED = ("ECONNRESET", "ECONNREFUSED", "EPIPE")


class Servers:
    """TCP echo on TCP_PORT and OTHER_PORT, UDP echo on UDP_PORT, every address of the
    host namespace (both families); ``hits`` records who reached what."""

    def __init__(self, netns: str) -> None:
        self.hits: list[str] = []
        self._selector = selectors.DefaultSelector()
        self._stop = threading.Event()
        self._sockets: list[socket.socket] = []
        fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
        box: dict[str, Any] = {}

        def make() -> None:  # sockets belong to the namespace of the thread making them
            try:
                os.setns(fd, os.CLONE_NEWNET)  # type: ignore[attr-defined]
            except AttributeError:  # Python 3.11: no os.setns
                import ctypes

                if ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) != 0:
                    box["error"] = OSError(ctypes.get_errno(), "setns")
                    return
            try:
                for port in (TCP_PORT, OTHER_PORT):
                    self._add(dual_stack_socket(socket.SOCK_STREAM, port), "tcp")
                self._add(dual_stack_socket(socket.SOCK_DGRAM, UDP_PORT), "udp")
            except OSError as exc:
                box["error"] = exc

        thread = threading.Thread(target=make)
        thread.start()
        thread.join()
        os.close(fd)
        if "error" in box:
            raise box["error"]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _add(self, sock: socket.socket, kind: str) -> None:
        sock.setblocking(False)
        self._sockets.append(sock)
        self._selector.register(sock, selectors.EVENT_READ, kind)

    def _serve(self) -> None:
        while not self._stop.is_set():
            for key, _events in self._selector.select(timeout=0.1):
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                try:
                    if key.data == "tcp":
                        conn, _peer = sock.accept()
                        self.hits.append(f"tcp {conn.getsockname()[0]}:{conn.getsockname()[1]}")
                        conn.setblocking(True)
                        conn.settimeout(2)
                        data = conn.recv(1024)
                        conn.sendall(data)
                        conn.close()
                    else:
                        data, peer = sock.recvfrom(65536)
                        self.hits.append(f"udp {peer[0]}")
                        sock.sendto(data, peer)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for sock in self._sockets:
            sock.close()
        self._selector.close()


@pytest.fixture(scope="module")
def host_ns() -> Iterator[tuple[str, Servers]]:
    """The sealed host namespace: lo; d0 (a veth whose peer stays inside: this kernel has
    no dummy links) with 10.250.0.1/24 (broadcast 10.250.0.255), 2001:db8:250::1/64 and
    the link-local fe80::99; a second interface e0 with 10.251.0.1/24; ping sockets
    allowed; the servers.  Removed at the end even when a test fails."""
    name = f"nsbha-{uuid.uuid4().hex[:10]}"
    servers: Servers | None = None
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for command in ("link set lo up", "link add d0 type veth peer name d1",
                        "link set d1 up", f"addr add {HOST4}/24 brd + dev d0",
                        f"addr add {HOST6}/64 dev d0 nodad",
                        f"addr add {LINK_LOCAL6}/64 dev d0 nodad", "link set d0 up",
                        "link add e0 type veth peer name e1", "link set e1 up",
                        f"addr add {SECOND4}/24 dev e0", "link set e0 up"):
            subprocess.run(["ip", "-n", name, *command.split()], check=True,
                           capture_output=True)
        subprocess.run(["ip", "netns", "exec", name, "sysctl", "-qw",
                        "net.ipv4.ping_group_range=0 2147483647"], check=True)
        servers = Servers(name)
        yield name, servers
    finally:
        if servers is not None:
            servers.close()
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def tcp(ip: str, port: int = TCP_PORT) -> dict[str, Any]:
    return {"kind": "tcp", "ip": ip, "port": port}


def udp(ip: str, **extra: Any) -> dict[str, Any]:
    return {"kind": "udp", "ip": ip, "port": UDP_PORT, **extra}


def ping(ip: str) -> dict[str, Any]:
    return {"kind": "ping", "ip": ip}


def script(attempts: list[dict[str, Any]], pause: Path | None = None,
           later: list[dict[str, Any]] = ()) -> str:  # type: ignore[assignment]
    """The sandbox's shell script: each attempt in turn; with ``pause``, then it says so
    (``pause``.ready), waits for ``pause``.go and runs ``later``."""
    def line(spec: dict[str, Any]) -> str:
        return shlex.join([sys.executable, ATTEMPT, json.dumps(spec)])
    lines = [line(spec) for spec in attempts]
    if pause is not None:
        lines += [f"touch {pause}.ready",
                  f"while [ ! -e {pause}.go ]; do sleep 0.02; done"]
        lines += [line(spec) for spec in later]
    return "; ".join(lines)


def run(netns: str, args: list[str], sandbox: str, *,
        meanwhile: Any = None, pause: Path | None = None) -> tuple[list[dict[str, Any]], str]:
    """``nsbridge run -v ARGS -- sh -c SANDBOX`` in ``netns``: the attempts' results in
    order, and the log.  ``meanwhile`` runs on the host side at the sandbox's pause."""
    proc = subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, "-m", "nsbridge", "run", "-v",
         "--dns", "127.0.0.1:53", *args, "--", "sh", "-c", sandbox],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        if pause is not None:
            deadline = time.monotonic() + 60
            while not Path(f"{pause}.ready").exists():
                assert proc.poll() is None and time.monotonic() < deadline, "no pause"
                time.sleep(0.02)
            meanwhile()
            Path(f"{pause}.go").touch()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out + err
    assert "Traceback" not in err, err
    results = [json.loads(line[len("NSB-ATTEMPT "):]) for line in out.splitlines()
               if line.startswith("NSB-ATTEMPT ")]
    return results, err


def denials(log: str) -> Counter[str]:
    """The -v summary's "denials: REASON xN, ..." as a Counter."""
    line = next(line for line in log.splitlines() if "usernet: " in line)
    if "denials: " not in line:
        return Counter()
    text = line.split("denials: ", 1)[1].split(";", 1)[0]
    return Counter({reason: int(count) for reason, _, count in
                    (part.rpartition(" x") for part in text.split(", "))})


def add_later(netns: str) -> Any:
    def add() -> None:
        subprocess.run(["ip", "-n", netns, "addr", "add", f"{LATER4}/32", "dev", "d0"],
                       check=True)
    return add


def remove_later(netns: str) -> None:
    subprocess.run(["ip", "-n", netns, "addr", "del", f"{LATER4}/32", "dev", "d0"],
                   capture_output=True)


# The host's IPv6 link-local address: the sandbox's kernel has no route to another
# link's, so the datagram is made by hand and written onto the tun device.
LINK_LOCAL_UDP = {"kind": "crafted", "proto": "udp", "ip": LINK_LOCAL6, "port": UDP_PORT}
ADMIN4 = ("icmp", [3, 13])
ADMIN6 = ("icmp", [1, 1])
PATHS = [("redirect", "native"), ("redirect", "engine"), ("tun", "native"), ("tun", "engine")]


@pytest.mark.parametrize(("mode", "relay"), PATHS)
def test_host_addresses_refused_and_counted_by_default(
        host_ns: tuple[str, Servers], tmp_path: Path, mode: str, relay: str) -> None:
    netns, servers = host_ns
    servers.hits.clear()
    attempts = [tcp(HOST4), tcp(SECOND4), tcp(HOST6), tcp(f"::ffff:{HOST4}"),
                LINK_LOCAL_UDP, udp(HOST4), udp(HOST6), udp(SECOND4),
                udp(BROADCAST4, broadcast=True, timeout=0.5), ping(HOST4), ping(HOST6),
                ping("10.0.2.2"), ping("fd00::2")]
    later = [tcp(LATER4), udp(LATER4)]
    try:
        results, log = run(netns, [f"--tcp={mode}", f"--relay={relay}"],
                           script(attempts, tmp_path / "pause", later),
                           meanwhile=add_later(netns), pause=tmp_path / "pause")
    finally:
        remove_later(netns)
    assert len(results) == len(attempts) + len(later), (results, log)
    by_target = dict(zip([json.dumps(a) for a in attempts + later], results, strict=True))

    def result(spec: dict[str, Any]) -> dict[str, Any]:
        return by_target[json.dumps(spec)]  # type: ignore[no-any-return]

    for spec in (tcp(HOST4), tcp(SECOND4), tcp(HOST6), tcp(f"::ffff:{HOST4}"), tcp(LATER4)):
        assert result(spec)["result"] in TCP_REFUSED, (spec, result(spec))
    for spec in (udp(HOST4), udp(SECOND4), udp(LATER4), ping(HOST4)):
        got = result(spec)
        assert (got["result"], got.get("icmp")) == ADMIN4 and got["from"] == "10.0.2.2", got
    for spec in (udp(HOST6), ping(HOST6), LINK_LOCAL_UDP):
        got = result(spec)
        assert (got["result"], got.get("icmp")) == ADMIN6 and got["from"] == "fd00::2", got
    assert result(udp(BROADCAST4, broadcast=True, timeout=0.5))["result"] in ("icmp", "timeout")
    # the gateway answers ping itself, host access off
    assert result(ping("10.0.2.2"))["result"] == "reply", result(ping("10.0.2.2"))
    assert result(ping("fd00::2"))["result"] == "reply", result(ping("fd00::2"))
    assert servers.hits == []
    assert denials(log) == Counter({"host address": 12, "link-local": 1}), log
    logged = Counter(line.split(": ")[1].split()[1] for line in log.splitlines()
                     if line.endswith(" denied: host address"))  # -v: each denial logged
    assert logged == Counter({"tcp": 5, "udp": 5, "icmp": 2}), log
    assert "host access: denied" in log, log


FLAGS = ["--allow-host-access", "--allow-host-loopback"]


@pytest.mark.parametrize(("mode", "relay", "flag"),
                         [(m, r, FLAGS[i % 2]) for i, (m, r) in enumerate(PATHS)])
def test_host_addresses_reachable_with_host_access(
        host_ns: tuple[str, Servers], tmp_path: Path, mode: str, relay: str,
        flag: str) -> None:
    netns, servers = host_ns
    servers.hits.clear()
    attempts = [tcp(HOST4), tcp(SECOND4), tcp(HOST6), tcp(f"::ffff:{HOST4}"), udp(HOST4),
                udp(HOST6), ping(HOST4), ping(HOST6), ping("10.0.2.2")]
    later = [tcp(LATER4)]
    try:
        results, log = run(netns, [f"--tcp={mode}", f"--relay={relay}", flag],
                           script(attempts, tmp_path / "pause", later),
                           meanwhile=add_later(netns), pause=tmp_path / "pause")
    finally:
        remove_later(netns)
    assert len(results) == len(attempts) + len(later), (results, log)
    for spec, got in zip(attempts + later, results, strict=True):
        wanted = "data" if spec["kind"] == "tcp" else "reply"
        assert got["result"] == wanted, (spec, got, log)
        if spec["kind"] != "ping":
            assert got["data"] == PROBE, (spec, got)
    assert sorted(servers.hits) == sorted(
        [f"tcp ::ffff:{HOST4}:{TCP_PORT}", f"tcp ::ffff:{SECOND4}:{TCP_PORT}",
         f"tcp {HOST6}:{TCP_PORT}", f"tcp ::ffff:{HOST4}:{TCP_PORT}",
         f"udp ::ffff:{HOST4}", f"udp {HOST6}", f"tcp ::ffff:{LATER4}:{TCP_PORT}"]), log
    assert denials(log) == Counter(), log
    assert "host access: allowed" in log, log


@pytest.mark.parametrize("mode", ["redirect", "tun"])
def test_a_precise_allow_opens_exactly_one_port(host_ns: tuple[str, Servers], mode: str) -> None:
    """``--allow '*' --allow tcp:10.250.0.1:PORT``: that port on that address and nothing
    else of the host (other port, other protocol, other address, ping)."""
    netns, servers = host_ns
    servers.hits.clear()
    attempts = [tcp(HOST4), tcp(HOST4, OTHER_PORT), tcp(SECOND4), udp(HOST4), ping(HOST4),
                tcp("10.0.2.2")]
    results, log = run(netns, [f"--tcp={mode}", "--allow=*",
                               f"--allow=tcp:{HOST4}:{TCP_PORT}"], script(attempts))
    assert [r["result"] for r in results[:1]] == ["data"], results
    for got in results[1:3] + results[5:]:
        assert got["result"] in TCP_REFUSED, (got, log)
    assert (results[3]["result"], results[3].get("icmp")) == ADMIN4, results[3]
    assert (results[4]["result"], results[4].get("icmp")) == ADMIN4, results[4]
    assert servers.hits == [f"tcp ::ffff:{HOST4}:{TCP_PORT}"]
    assert denials(log) == Counter({"host address": 4, "host loopback disabled": 1}), log


API = """
import json, sys
from nsbridge.usernet import api
options = json.loads(sys.argv[1])
proc = api.run(sys.argv[2:], dns=[("127.0.0.1", 53)], **options)
code = proc.wait(timeout=60)
stats = proc.stats()
proc.close()
print("NSB-API " + json.dumps({"code": code, "denied": stats["engine"]["denied"]}))
"""


@pytest.mark.parametrize(("options", "reachable"), [
    ({}, False), ({"allow_host_access": True}, True), ({"allow_host_loopback": True}, True)])
def test_api_switch_and_counters(host_ns: tuple[str, Servers], options: dict[str, Any],
                                 reachable: bool) -> None:
    netns, servers = host_ns
    servers.hits.clear()
    done = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-c", API, json.dumps(options),
         sys.executable, ATTEMPT, json.dumps(udp(HOST4))],
        capture_output=True, text=True, timeout=120, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stdout + done.stderr
    reply = json.loads(next(line for line in done.stdout.splitlines()
                            if line.startswith("NSB-API "))[len("NSB-API "):])
    attempt = json.loads(next(line for line in done.stdout.splitlines()
                              if line.startswith("NSB-ATTEMPT "))[len("NSB-ATTEMPT "):])
    assert reply["code"] == 0
    if reachable:
        assert attempt["result"] == "reply" and reply["denied"] == {}, (attempt, reply)
        assert servers.hits == [f"udp ::ffff:{HOST4}"]
    else:
        assert (attempt["result"], attempt.get("icmp")) == ADMIN4, attempt
        assert reply["denied"] == {"host address": 1}, reply
        assert servers.hits == []
