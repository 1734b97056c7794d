"""slirp4netns's API socket served by nsbridge, end to end, and compared with the real one.

A Python program embedding nsbridge (``api.run(..., api_socket=PATH)``) runs in a "host"
namespace of the test's own (the ``host`` fixture), its sandbox running TCP and UDP echo
servers.  The test publishes ports through the API socket, reaches the servers from the
host namespace, lists, removes and re-adds.  For conformance the same request bytes go to
ours and to ``/usr/bin/slirp4netns --api-socket`` (run as root, its host side in a second
host namespace, its tap in a namespace the test made) and the replies are compared byte
for byte.  Nothing leaves the namespaces the test made.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from helpers.environment import REPO
from helpers.netns import delete_netns, in_netns, new_netns
from helpers.usernet_host import new_host_netns
from helpers.waiting import wait_until

TCP_PORT, UDP_PORT, V6_PORT = 18080, 18053, 18081
ECHO_TCP, ECHO_UDP = 8000, 5353

# Runs inside the sandbox: echo servers that say who they saw.
ECHO = textwrap.dedent(f"""
    import socket, threading
    def tcp(address="0.0.0.0", family=socket.AF_INET):
        srv = socket.create_server((address, {ECHO_TCP}), family=family)
        while True:
            conn, peer = srv.accept()
            def serve(conn=conn, peer=peer):
                with conn:
                    while data := conn.recv(4096):
                        conn.sendall(peer[0].encode() + b" " + data)
            threading.Thread(target=serve, daemon=True).start()
    threading.Thread(target=tcp, daemon=True).start()
    threading.Thread(target=tcp, args=("::", socket.AF_INET6), daemon=True).start()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("0.0.0.0", {ECHO_UDP}))
    while True:
        data, peer = udp.recvfrom(4096)
        udp.sendto(b"udp " + data, peer)
""")

DRIVER = textwrap.dedent("""
    import sys
    from nsbridge.usernet import api
    proc = api.run([sys.executable, "-c", sys.argv[2]], api_socket=sys.argv[1],
                   allow_host_access=sys.argv[3:] == ["allow-host-access"])
    print("ready", flush=True)
    sys.stdin.readline()
    proc.terminate()
    proc.wait()
    proc.close()
    print("closed", flush=True)
""")


@contextmanager
def serving(host: str, tmp_path: Path, *options: str) -> Iterator[str]:
    """nsbridge's API socket path, served by a program in the host namespace; checks at
    the end that the program closed cleanly and removed the socket file."""
    path = str(tmp_path / "api.sock")
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    proc = subprocess.Popen(["ip", "netns", "exec", host, sys.executable, str(driver), path,
                             ECHO, *options], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n", proc.stderr
        yield path
        assert proc.stdin is not None
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0, proc.stderr.read() if proc.stderr else ""
        assert not os.path.exists(path), "the socket file outlived the network"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture
def ours(host: str, tmp_path: Path) -> Iterator[str]:
    with serving(host, tmp_path) as path:
        yield path


@pytest.fixture
def theirs(tmp_path: Path) -> Iterator[str]:
    """The real slirp4netns's API socket: its host side in a host namespace of its own
    (so its ports do not meet ours), its tap in a namespace made for it."""
    slirp_host = new_host_netns(prefix="nsbs")
    target = new_netns("nsbt")
    path = str(tmp_path / "slirp.sock")
    try:
        with open(tmp_path / "slirp4netns.log", "w") as log:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", slirp_host, "/usr/bin/slirp4netns", "--configure",
                 "--netns-type=path", "--api-socket", path, f"/run/netns/{target}", "tap0"],
                stdout=log, stderr=log)
        try:
            wait_until(lambda: os.path.exists(path), what="slirp4netns's API socket")
            yield path
            assert proc.poll() is None, "slirp4netns died"
        finally:
            proc.kill()
            proc.wait()
    finally:
        delete_netns(target)
        delete_netns(slirp_host)
        if os.path.exists(path):
            os.unlink(path)


def request(path: str, data: bytes) -> bytes:
    """One request as callers send it: write, shut our side, read to EOF."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return reply


def call(path: str, execute: str, **arguments: object) -> dict:
    message: dict = {"execute": execute}
    if arguments:
        message["arguments"] = arguments
    return json.loads(request(path, json.dumps(message).encode()))


def tcp_echo(host: str, address: tuple, message: bytes = b"hello") -> bytes:
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET

    def talk() -> bytes:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(address)
            sock.sendall(message)
            return sock.recv(4096)

    return in_netns(host, talk)  # type: ignore[return-value]


def eventually_echo(host: str, address: tuple) -> bytes:
    """The sandbox's servers start with it: retry until the first answer."""
    deadline = time.monotonic() + 15
    while True:
        try:
            return tcp_echo(host, address)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_ports_published_listed_and_removed_at_run_time(host, ours):
    assert call(ours, "list_hostfwd") == {"entries": []}
    assert call(ours, "add_hostfwd", proto="tcp", host_port=TCP_PORT,
                guest_port=ECHO_TCP) == {"return": {"id": 1}}
    reply = eventually_echo(host, ("127.0.0.1", TCP_PORT))
    # through the device, as slirp4netns: a client on the host's loopback is the gateway
    assert reply == b"10.0.2.2 hello"

    assert call(ours, "add_hostfwd", proto="udp", host_addr="192.0.2.1", host_port=UDP_PORT,
                guest_port=ECHO_UDP) == {"return": {"id": 2}}

    def udp_echo() -> bytes:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(5)
            sock.sendto(b"ping", ("192.0.2.1", UDP_PORT))
            return sock.recv(4096)

    assert in_netns(host, udp_echo) == b"udp ping"

    # IPv6 on the host side (slirp4netns cannot), to the namespace's IPv4 address.
    assert call(ours, "add_hostfwd", proto="tcp", host_addr="::1", host_port=V6_PORT,
                guest_port=ECHO_TCP) == {"return": {"id": 3}}
    # (an IPv6 client of an IPv4 guest address is shown as the IPv4 gateway)
    assert tcp_echo(host, ("::1", V6_PORT)) == b"10.0.2.2 hello"

    assert request(ours, b'{"execute":"list_hostfwd"}') == (
        b'{"entries":[{"id":1,"proto":"tcp","host_addr":"0.0.0.0","host_port":18080,'
        b'"guest_addr":"10.0.2.100","guest_port":8000},{"id":2,"proto":"udp","host_addr":'
        b'"192.0.2.1","host_port":18053,"guest_addr":"10.0.2.100","guest_port":5353},'
        b'{"id":3,"proto":"tcp","host_addr":"::1","host_port":18081,"guest_addr":'
        b'"10.0.2.100","guest_port":8000}]}')

    # A port in use: taken by our own forward, then by another program.
    assert call(ours, "add_hostfwd", proto="tcp", host_port=TCP_PORT, guest_port=1) == {
        "error": {"desc": "bad request: add_hostfwd: slirp_add_hostfwd failed"}}
    squatter = in_netns(host, lambda: socket.create_server(("127.0.0.1", TCP_PORT + 10)))
    try:
        assert call(ours, "add_hostfwd", proto="tcp", host_addr="127.0.0.1",
                    host_port=TCP_PORT + 10, guest_port=1)["error"]["desc"] == \
            "bad request: add_hostfwd: slirp_add_hostfwd failed"
    finally:
        squatter.close()  # type: ignore[attr-defined]

    # Removal: new clients are refused at once, a connection made before carries on.
    early = in_netns(host, lambda: socket.create_connection(("127.0.0.1", TCP_PORT), 5))
    try:
        early.sendall(b"before")  # type: ignore[attr-defined]
        assert early.recv(4096).endswith(b" before")  # type: ignore[attr-defined]
        assert call(ours, "remove_hostfwd", id=1) == {"return": {}}
        with pytest.raises(ConnectionRefusedError):
            tcp_echo(host, ("127.0.0.1", TCP_PORT))
        early.sendall(b"after")  # type: ignore[attr-defined]
        assert early.recv(4096).endswith(b" after")  # type: ignore[attr-defined]
    finally:
        early.close()  # type: ignore[attr-defined]
    assert call(ours, "remove_hostfwd", id=1) == {
        "error": {"desc": "bad request: remove_hostfwd: bad arguments.id"}}

    # Ids only grow, also after removals and failures; the port is free again.
    assert call(ours, "add_hostfwd", proto="tcp", host_port=TCP_PORT,
                guest_port=ECHO_TCP) == {"return": {"id": 4}}
    assert tcp_echo(host, ("127.0.0.1", TCP_PORT)).endswith(b" hello")
    assert [e["id"] for e in call(ours, "list_hostfwd")["entries"]] == [2, 3, 4]

    # A UDP port removed: new clients are refused; added again at once, it serves.
    def udp_from_new_socket() -> bytes:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(5)
            sock.connect(("192.0.2.1", UDP_PORT))
            sock.send(b"ping")
            try:
                return sock.recv(4096)
            except ConnectionRefusedError:
                return b"refused"

    assert call(ours, "remove_hostfwd", id=2) == {"return": {}}
    assert in_netns(host, udp_from_new_socket) == b"refused"
    assert call(ours, "add_hostfwd", proto="udp", host_addr="192.0.2.1", host_port=UDP_PORT,
                guest_port=ECHO_UDP) == {"return": {"id": 5}}
    assert in_netns(host, udp_from_new_socket) == b"udp ping"
    assert call(ours, "remove_hostfwd", id=5) == {"return": {}}

    # IPv6 both sides (slirp4netns cannot): the client on ::1 is the IPv6 gateway.
    assert call(ours, "add_hostfwd", proto="tcp", host_addr="::1", host_port=V6_PORT + 1,
                guest_addr="fd00::100", guest_port=ECHO_TCP) == {"return": {"id": 6}}
    assert tcp_echo(host, ("::1", V6_PORT + 1)) == b"fd00::2 hello"


@pytest.mark.parametrize("host_access", [False, True], ids=["host-access-off", "control"])
def test_a_hostfwd_cannot_reach_past_the_policy(host, tmp_path, host_access):
    """guest_addr is dialed from inside the namespace, so the policy decides it like any
    flow of the sandbox: the host's own address and its loopback behind the gateway stay
    closed while host access is off (the control opens it and the secret arrives); the
    namespace's own loopback is the namespace's."""
    import threading

    def secret_servers() -> list[socket.socket]:
        return [socket.create_server((address, 9000)) for address in ("192.0.2.1", "127.0.0.1")]

    servers: list[socket.socket] = in_netns(host, secret_servers)  # type: ignore[assignment]

    def serve(server: socket.socket) -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:  # read first: closing with unread bytes would send a reset
                try:
                    conn.recv(16)
                    conn.sendall(b"HOST SECRET")
                except OSError:
                    pass

    for server in servers:
        threading.Thread(target=serve, args=(server,), daemon=True).start()
    options = ["allow-host-access"] if host_access else []
    try:
        with serving(host, tmp_path, *options) as ours:
            assert call(ours, "add_hostfwd", proto="tcp", host_port=TCP_PORT,
                        guest_port=ECHO_TCP) == {"return": {"id": 1}}
            eventually_echo(host, ("127.0.0.1", TCP_PORT))  # the sandbox is up
            for number, guest in enumerate(("192.0.2.1", "10.0.2.2"), start=2):
                port = TCP_PORT + number
                assert call(ours, "add_hostfwd", proto="tcp", host_port=port,
                            guest_addr=guest, guest_port=9000) == {"return": {"id": number}}
                try:
                    reply = tcp_echo(host, ("127.0.0.1", port))
                except OSError:
                    reply = b""  # reset: refused by the policy
                assert (reply == b"HOST SECRET") is host_access, (guest, reply)
            assert call(ours, "add_hostfwd", proto="tcp", host_port=TCP_PORT + 9,
                        guest_addr="127.0.0.1", guest_port=ECHO_TCP) == {"return": {"id": 4}}
            assert tcp_echo(host, ("127.0.0.1", TCP_PORT + 9)).endswith(b" hello")
            assert os.stat(ours).st_mode & 0o777 == 0o600  # only its owner (and root)
    finally:
        for server in servers:
            server.shutdown(socket.SHUT_RDWR)  # wakes its accept()
            server.close()


def test_a_silent_client_does_not_block_the_others(ours):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.connect(ours)  # and says nothing
        assert request(ours, b'{"execute":"list_hostfwd"}') == b'{"entries":[]}'


def test_hostile_clients_get_an_error_or_nothing_and_the_socket_keeps_serving(ours):
    import random

    rng = random.Random(17)
    payloads = [b"\0" * 64, b"{" * 4095, b"[" * 3000, b"x" * 70000,
                b'{"execute":"add_hostfwd","arguments":{"proto":"tcp","host_port":1e999}}',
                b'{"execute":"add_hostfwd","arguments":"tcp"}',
                b'{"execute":"add_hostfwd","arguments":{"proto":null}}']
    payloads += [rng.randbytes(rng.randrange(1, 5000)) for _ in range(40)]
    for data in payloads:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(ours)
            try:
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
                reply = sock.recv(65536)
            except (BrokenPipeError, ConnectionResetError):
                continue  # a long request: answered "too large", the rest is not read
            assert reply.startswith(b'{"error":{"desc":"bad request: ') or reply == b"", data[:40]
        # half-open clients that vanish mid-request
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(ours)
    assert request(ours, b'{"execute":"list_hostfwd"}') == b'{"entries":[]}'


def test_bad_api_socket_paths_fail_at_start_with_one_line(host, tmp_path):
    too_long = str(tmp_path / ("x" * (108 - len(str(tmp_path)))))
    not_a_socket = tmp_path / "file"
    not_a_socket.write_text("mine")
    for path, words in ((too_long, "too long for a Unix socket"),
                        (str(tmp_path / "no" / "s"), "does not exist"),
                        (str(not_a_socket), "not a socket")):
        result = subprocess.run(
            ["ip", "netns", "exec", host, sys.executable, "-c",
             "import sys\nfrom nsbridge.usernet import api\nfrom nsbridge.errors import "
             "UserError\ntry:\n    api.run(['true'], api_socket=sys.argv[1])\nexcept "
             "UserError as exc:\n    print(exc)\n", path],
            capture_output=True, text=True, timeout=60, cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)})
        assert words in result.stdout and result.stdout.count("\n") == 1, result
    assert not_a_socket.read_text() == "mine"


ADD = b'{"execute":"add_hostfwd","arguments":'
# The same bytes to both; where slirp4netns crashes (a missing or non-string proto, or
# arguments that are not an object) or differs on purpose (IPv6, ports out of range) the
# request is left out here and covered in tests/unit/test_slirpapi.py.
CONFORMANCE = [
    b'{"execute":"list_hostfwd"}',
    ADD + b'{"proto":"tcp","host_port":18080,"guest_port":80}}',
    ADD + b'{"proto":"tcp","host_port":18080,"guest_port":80}}',
    ADD + b'{"proto":"udp","host_port":18080,"guest_port":80}}',
    ADD + b'{"proto":"udp","host_port":18080,"guest_port":80}}',
    ADD + b'{"proto":"tcp\\u0000x","host_addr":"127.0.0.1","host_port":18081.7,'
          b'"guest_addr":"0.0.0.0","guest_port":80}}',
    ADD + b'{"proto":"tcp","host_addr":"","host_port":18084,"guest_addr":"","guest_port":80}}',
    ADD + b'{"proto":"tcp","host_addr":1,"host_port":18085,"guest_addr":null,"guest_port":8}}',
    ADD + b'{"proto":"TCP","host_port":18086,"guest_port":80}}',
    ADD + b'{"proto":"tcp","host_addr":"1.2.3","host_port":18086,"guest_port":80}}',
    ADD + b'{"proto":"tcp","host_addr":"10.0.2.300","host_port":18086,"guest_port":80}}',
    ADD + b'{"proto":"tcp","host_port":"18086","guest_port":80}}',
    ADD + b'{"proto":"tcp","host_port":true,"guest_port":80}}',
    ADD + b'{"proto":"tcp","host_port":18086,"guest_addr":"x","guest_port":80}}',
    ADD + b'{"proto":"tcp","host_port":18086,"guest_port":0}}',
    ADD + b'{"proto":"tcp","host_port":18086,"guest_port":80}, "x":/*c*/1}',
    b'{"execute":"remove_hostfwd","arguments":{"id":1.9}}',
    b'{"execute":"remove_hostfwd","arguments":{"id":1}}',
    b'{"execute":"remove_hostfwd"}',
    b'{"execute":"remove_hostfwd","arguments":{"id":"2"}}',
    ADD + b'{"proto":"tcp","host_port":18082,"guest_port":80}}',
    b'{"execute":"list_hostfwd"}',
    b'', b' ' * 4095, b' ' * 4096, b'{', b'[]', b'"x"', b'{}', b'{"execute":1}',
    b'{"execute":"nope"}', b'{"execute":"list_hostfwd"}garbage',
    b'\x0b{"execute":"list_hostfwd"}', b'\xef\xbb\xbf{"execute":"list_hostfwd"}',
    b'{"execute":"list_hostfwd"}\x00{', b'{"execute":"list_hostfwd"}\n',
    b'{"execute":"list_hostfwd","execute":"x"}', b'{"execute":"list_hostfwd","a":NaN}',
    b'{"execute":"list_hostfwd","a":1e400}', b'{"execute":"list_hostfwd","a":1e-400}',
    b'{"execute":"list_hostfwd","a":"\\ud800"}', b'{"execute":"list_hostfwd","a":1.}',
    b'{"execute":"list_hostfwd","a":-.5}', b'{"execute":"list_hostfwd","a":01}',
    b'{"execute":"list_hostfwd","a":0x1}', b'{"execute":"list_hostfwd","a":-}',
    b'{"execute":"list_hostfwd","a":-inf}', b'{"execute":"list_hostfwd","a":[1,]}',
    b'{"execute":"list_hostfwd","a":"\x01"}', b'{"execute":"list_hostfwd","a":"\xff"}',
    b'{"execute" : "list_hostfwd\\u0000zz"}', b'{"execute\\u0000":"list_hostfwd"}',
    b'{"execute":"list_hostfwd","a":"\\ud83d\\ude00\\/\\q"}',
    b'{"execute":"list_hostfwd","a":' + b"[" * 2000 + b"]" * 2000 + b"}",  # deep, not too
    b'{"execute":"list_hostfwd","a":' + b"[" * 2000 + b"]" * 1999 + b"}",
    b'{"execute":"list_hostfwd"}',
]


def test_replies_match_the_real_slirp4netns_byte_for_byte(ours, theirs):
    differences = []
    for data in CONFORMANCE:
        mine, real = request(ours, data), request(theirs, data)
        if mine != real:
            differences.append((data[:80], mine, real))
    assert differences == []
    # Where nsbridge differs on purpose: an IPv6 host address (slirp4netns cannot).
    ipv6 = ADD + b'{"proto":"tcp","host_addr":"::1","host_port":18090,"guest_port":80}}'
    assert request(theirs, ipv6) == (
        b'{"error":{"desc":"bad request: add_hostfwd: bad arguments.host_addr"}}')
    assert request(ours, ipv6).startswith(b'{"return":{"id":')
