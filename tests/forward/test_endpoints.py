"""The endpoint grammar end to end: ``nsbridge forward LISTEN CONNECT [LISTEN CONNECT...]``
with real namespaces, real servers and real clients (curl, dig, sockets).

Why end to end: each endpoint kind is a different socket family, namespace and file
system interplay (an abstract name belongs to a network namespace, a socket file to the
file system), and only the real command line shows they are wired together right.
Also here: client ACLs (``allow=``/``deny=``, ``--allow``/``--deny``) and the PROXY
protocol header a target receives.
"""

from __future__ import annotations

import functools
import http.server
import os
import socket
import stat
import subprocess
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from helpers.control import wait_stats
from helpers.environment import have
from helpers.netns import in_netns, listen_in
from helpers.processes import Forwarder, host_port, run_nsbridge, wait_forwarding
from helpers.servers import (
    DNS_ADDRESS,
    DNS_NAME,
    StreamServer,
    UdpServer,
    dns_answer,
    recv_all,
    tcp_roundtrip,
    udp_roundtrip,
)
from nsbridge.forward import proxy_protocol

BOTH_RELAYS = True  # conftest.py: each test runs on the native and the Python relay
pytestmark = pytest.mark.usefixtures("relay")

try:
    import dns.message
    import dns.name
    import dns.rcode
    import dns.rdatatype
    import dns.rrset
except ImportError:  # the `test` extra installs dnspython
    dns = None  # type: ignore[assignment]

StartForwarder = Callable[..., Forwarder]
StartStream = Callable[..., StreamServer]
StartUdp = Callable[..., UdpServer]


def start(forwarder: StartForwarder, *args: str, count: int = 1,
          pass_fds: tuple[int, ...] = ()) -> tuple[Forwarder, list[str]]:
    """``nsbridge forward -v ARGS``; returns it and its listen addresses once bound."""
    fwd = forwarder("forward", "-v", "--workers", "1", *args, wait_ready=False,
                    pass_fds=pass_fds)
    return fwd, wait_forwarding(fwd, count)


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2 and exactly one ``nsbridge: error:`` line naming the input."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nsbridge: error:"), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def abstract_name() -> str:
    """A unique abstract socket name (abstract names are global per namespace)."""
    return f"nsbt-{uuid.uuid4().hex[:12]}"


def unix_listener(address: str | bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(address)
    sock.listen(64)
    return sock


def unix_connect(address: str | bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(address)
    return sock


# ---- TCP, both IP versions ----------------------------------------------------------------


def test_tcp_v4_and_v6_pairs_in_one_process(netns, forwarder, stream_server):
    """Two LISTEN CONNECT pairs, one per IP version, each reaching its own server."""
    v4 = stream_server(listen_in(netns, "127.0.0.1"))
    v6 = stream_server(listen_in(netns, "::1"))
    _fwd, listening = start(forwarder, "tcp:127.0.0.1:0", f"tcp:127.0.0.1:{v4.port},netns={netns}",
                            "tcp:[::1]:0", f"tcp:[::1]:{v6.port},netns={netns}", count=2)
    assert tcp_roundtrip(host_port(listening[0]), b"four" * 1000) == b"four" * 1000
    assert tcp_roundtrip(host_port(listening[1]), b"six" * 1000) == b"six" * 1000
    assert [peer[0] for peer in v4.accepted] == ["127.0.0.1"]
    assert [peer[0] for peer in v6.accepted] == ["::1"]


# ---- Unix sockets -------------------------------------------------------------------------


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """Keep pytest's output clean."""


@pytest.fixture
def http_in(tmp_path: Path):
    """Factory: an HTTP server on 127.0.0.1 inside a namespace serving ``tmp_path/www``."""
    servers: list[http.server.ThreadingHTTPServer] = []
    root = tmp_path / "www"
    root.mkdir()

    def start_http(netns: str) -> tuple[int, Path]:
        handler = functools.partial(QuietHandler, directory=str(root))
        server: http.server.ThreadingHTTPServer = in_netns(  # type: ignore[assignment]
            netns, lambda: http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler))
        servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server.server_address[1], root

    yield start_http
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.mark.skipif(not have("curl"), reason="curl is not installed")
def test_unix_listener_to_tcp_target_with_curl(netns, forwarder, http_in, tmp_path):
    """curl --unix-socket reaches an HTTP server that only exists inside the namespace."""
    port, root = http_in(netns)
    body = os.urandom(300_000)
    (root / "blob.bin").write_bytes(body)
    path = tmp_path / "web.sock"
    start(forwarder, f"unix:{path}", f"tcp:127.0.0.1:{port},netns={netns}")
    result = subprocess.run(["curl", "-sS", "--fail", "--max-time", "20", "--unix-socket",
                             str(path), "http://nsbridge.test/blob.bin"],
                            capture_output=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout == body


def test_tcp_listener_to_unix_target(forwarder, stream_server, tmp_path):
    """A socket file served here becomes a TCP port."""
    path = tmp_path / "app.sock"
    server = stream_server(unix_listener(str(path)))
    _fwd, listening = start(forwarder, "tcp:127.0.0.1:0", f"unix:{path}")
    payload = os.urandom(1 << 20)
    assert tcp_roundtrip(host_port(listening[0]), payload) == payload
    assert len(server.accepted) == 1


def test_abstract_target_that_exists_only_inside_the_namespace(netns, forwarder,
                                                               stream_server):
    """An abstract name belongs to its network namespace: unreachable from here except
    through the forward."""
    name = abstract_name()
    server = stream_server(in_netns(netns, lambda: unix_listener(b"\0" + name.encode())))
    with pytest.raises(ConnectionRefusedError):
        unix_connect(b"\0" + name.encode())
    _fwd, listening = start(forwarder, "tcp:127.0.0.1:0",
                            f"unix-abstract:{name},netns={netns}")
    assert tcp_roundtrip(host_port(listening[0]), b"hello abstract") == b"hello abstract"
    assert len(server.accepted) == 1


def test_abstract_listener_created_inside_a_namespace(netns, forwarder, stream_server):
    """``unix-abstract:x,netns=NS`` as a listener: clients in NS reach a server here."""
    server = stream_server(listen_in(None))
    name = abstract_name()
    start(forwarder, f"unix-abstract:{name},netns={netns}", f"tcp:127.0.0.1:{server.port}")
    address = b"\0" + name.encode()
    with pytest.raises(ConnectionRefusedError):  # not in the namespace nsbridge runs in
        unix_connect(address)
    reply = in_netns(netns, lambda: tcp_roundtrip(address, b"from inside"))
    assert reply == b"from inside"
    assert len(server.accepted) == 1


def test_unix_listener_mode_and_owner(netns, forwarder, stream_server, tmp_path):
    """mode= and owner= set the socket file's permissions and owner, and it still works."""
    server = stream_server(listen_in(netns))
    path = tmp_path / "owned.sock"
    start(forwarder, f"unix:{path},mode=0660,owner=65534:65534",
          f"tcp:127.0.0.1:{server.port},netns={netns}")
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert (st.st_uid, st.st_gid) == (65534, 65534)
    assert tcp_roundtrip(str(path), b"owned") == b"owned"


def test_stale_socket_file_is_replaced(netns, forwarder, stream_server, tmp_path):
    """A socket file nobody listens on (a crashed predecessor's) is taken over."""
    server = stream_server(listen_in(netns))
    path = tmp_path / "stale.sock"
    unix_listener(str(path)).close()  # the file stays behind, nobody listens
    start(forwarder, f"unix:{path}", f"tcp:127.0.0.1:{server.port},netns={netns}")
    assert tcp_roundtrip(str(path), b"fresh") == b"fresh"


def test_live_socket_file_is_refused(netns, stream_server, tmp_path):
    """Someone else's live socket is never unlinked: exit 2, and it keeps working."""
    path = tmp_path / "live.sock"
    stream_server(unix_listener(str(path)))
    target = stream_server(listen_in(netns))
    result = run_nsbridge("forward", f"unix:{path}",
                          f"tcp:127.0.0.1:{target.port},netns={netns}")
    assert_one_line_error(result, str(path), "another process is listening")
    assert tcp_roundtrip(str(path), b"still mine") == b"still mine"
    assert target.accepted == []


def test_regular_file_in_the_way_is_refused(netns, tmp_path):
    """A regular file where the socket should go is left alone: exit 2."""
    path = tmp_path / "precious.txt"
    path.write_text("keep me")
    result = run_nsbridge("forward", f"unix:{path}", f"tcp:127.0.0.1:9,netns={netns}")
    assert_one_line_error(result, str(path), "not a socket")
    assert path.read_text() == "keep me"


# ---- UDP ----------------------------------------------------------------------------------


def dig(port: int, name: str) -> subprocess.CompletedProcess:
    return subprocess.run(["dig", "@127.0.0.1", "-p", str(port), name, "A", "+time=3",
                           "+tries=3"], capture_output=True, text=True, timeout=30)


@pytest.mark.skipif(dns is None or not have("dig"), reason="needs dnspython and dig")
def test_udp_forward_answers_dig(netns, forwarder, udp_server):
    """A real resolver client (dig) asks a DNS server living inside the namespace."""
    server = udp_server(netns, answer=dns_answer)
    _fwd, listening = start(forwarder, "udp:127.0.0.1:0",
                            f"udp:127.0.0.1:{server.port},netns={netns}")
    port = host_port(listening[0])[1]
    found = dig(port, DNS_NAME)
    assert found.returncode == 0, found.stdout + found.stderr
    assert "status: NOERROR" in found.stdout
    answer = found.stdout.split("ANSWER SECTION:")[1].split()
    assert answer[:5] == [DNS_NAME, "60", "IN", "A", DNS_ADDRESS], found.stdout
    missing = dig(port, "nope.nsbridge.test.")
    assert "status: NXDOMAIN" in missing.stdout


def test_udp_echo_with_several_clients(netns, forwarder, udp_server):
    """Each client gets its own replies; the server sees one source port per client."""
    server = udp_server(netns)
    _fwd, listening = start(forwarder, "udp:127.0.0.1:0",
                            f"udp:127.0.0.1:{server.port},netns={netns}")
    address = host_port(listening[0])
    clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(5)]
    try:
        for round_ in range(3):
            for index, client in enumerate(clients):
                payload = b"client %d round %d" % (index, round_)
                assert udp_roundtrip(address, payload, client) == payload
    finally:
        for client in clients:
            client.close()
    assert len(server.peers) == 5


def test_tcp_udp_and_unix_forwards_at_once(netns, forwarder, stream_server, udp_server,
                                           tmp_path):
    """Three kinds of forward in one process, with connections open on all of them."""
    tcp = stream_server(listen_in(netns))
    udp = udp_server(netns)
    path = tmp_path / "multi.sock"
    _fwd, listening = start(
        forwarder,
        "tcp:127.0.0.1:0", f"tcp:127.0.0.1:{tcp.port},netns={netns}",
        "udp:127.0.0.1:0", f"udp:127.0.0.1:{udp.port},netns={netns}",
        f"unix:{path}", f"tcp:127.0.0.1:{tcp.port},netns={netns}", count=3)
    assert listening[2] == str(path)
    tcp_client = socket.create_connection(host_port(listening[0]), timeout=10)
    unix_client = unix_connect(str(path))
    with tcp_client, unix_client:
        for round_ in range(3):
            tcp_client.sendall(b"tcp %d;" % round_)
            unix_client.sendall(b"unix %d;" % round_)
            assert udp_roundtrip(host_port(listening[1]), b"udp %d" % round_) == b"udp %d" % round_
            assert tcp_client.recv(100) == b"tcp %d;" % round_
            assert unix_client.recv(100) == b"unix %d;" % round_
    assert len(tcp.accepted) == 2


@pytest.mark.parametrize("listen, connect", [
    ("udp:127.0.0.1:0", "tcp:127.0.0.1:9"),
    ("tcp:127.0.0.1:0", "udp:127.0.0.1:9"),
    ("unix:/tmp/nsbt-never.sock", "udp:127.0.0.1:9"),
])
def test_mixing_udp_with_streams_is_refused(listen: str, connect: str) -> None:
    """A datagram cannot become a stream: the pair is refused before anything listens."""
    result = run_nsbridge("forward", listen, connect)
    assert_one_line_error(result, listen, connect, "cannot mix udp")


# ---- client ACLs --------------------------------------------------------------------------


def refused_or_closed(address: tuple) -> str:
    """Connect and talk; a denied client sees a reset or an EOF, never a reply."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        try:
            sock.connect(address)
            sock.sendall(b"let me in")
            data = sock.recv(100)
        except (ConnectionResetError, BrokenPipeError):
            return "reset"
        assert data == b"", f"a denied client got {data!r}"
        return "closed"


def test_deny_and_allow_endpoint_options(netns, forwarder, stream_server, tmp_path):
    """deny=127.0.0.0/8 resets a 127.0.0.1 client before the server hears of it; an
    allow= rule matching the client lets it through; ``ctl stats`` counts the denial."""
    server = stream_server(listen_in(netns))
    control = tmp_path / "ctl.sock"
    target = f"tcp:127.0.0.1:{server.port},netns={netns}"
    _fwd, listening = start(forwarder, "--control", str(control),
                            "tcp:127.0.0.1:0,deny=127.0.0.0/8", target,
                            "tcp:127.0.0.1:0,allow=10.0.0.0/8,allow=127.0.0.1", target, count=2)
    denied, allowed = host_port(listening[0]), host_port(listening[1])
    assert refused_or_closed(denied) in ("reset", "closed")
    assert tcp_roundtrip(allowed, b"welcome") == b"welcome"
    assert refused_or_closed(denied) in ("reset", "closed")
    assert len(server.accepted) == 1  # only the allowed client ever reached it
    stats = wait_stats(control, lambda s: s["forward-1"]["denied"] == 2
                       and s["forward-2"]["accepted"] == 1, what="counters")  # every 0.5 s
    assert stats["forward-1"]["accepted"] == 0 and stats["forward-2"]["denied"] == 0


def test_allow_and_deny_flags_with_ipv6(netns, forwarder, stream_server, tmp_path):
    """--allow ::1 admits the IPv6 loopback client and refuses 127.0.0.1; --deny ::1
    refuses it."""
    v6 = stream_server(listen_in(netns, "::1"))
    v4 = stream_server(listen_in(netns, "127.0.0.1"))
    control = tmp_path / "ctl.sock"
    _fwd, allowing = start(forwarder, "--control", str(control), "--allow", "::1",
                           "tcp:[::1]:0", f"tcp:[::1]:{v6.port},netns={netns}",
                           "tcp:127.0.0.1:0", f"tcp:127.0.0.1:{v4.port},netns={netns}", count=2)
    assert tcp_roundtrip(host_port(allowing[0]), b"v6 ok") == b"v6 ok"
    assert refused_or_closed(host_port(allowing[1])) in ("reset", "closed")
    _fwd2, denying = start(forwarder, "--deny", "::1", "tcp:[::1]:0",
                           f"tcp:[::1]:{v6.port},netns={netns}")
    assert refused_or_closed(host_port(denying[0])) in ("reset", "closed")
    assert len(v6.accepted) == 1 and v4.accepted == []
    stats = wait_stats(control, lambda s: s["forward-1"]["accepted"] == 1
                       and s["forward-2"]["denied"] == 1, what="counters")  # every 0.5 s
    assert stats["forward-1"]["denied"] == 0 and stats["forward-2"]["accepted"] == 0


# ---- PROXY protocol -----------------------------------------------------------------------


def proxy_reader(seen: list[proxy_protocol.ProxyInfo]) -> Callable[[socket.socket], None]:
    """A target that parses the PROXY header, records it, then echoes the client's data."""

    def handle(conn: socket.socket) -> None:
        buffered = b""
        while True:
            chunk = conn.recv(4096)
            if not chunk:
                return
            buffered += chunk
            info, consumed = proxy_protocol.parse(buffered)
            if info is not None:
                break
        seen.append(info)
        rest = buffered[consumed:]
        if rest:
            conn.sendall(rest)
        while data := conn.recv(65536):
            conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)

    return handle


def talk(address: tuple) -> tuple[bytes, tuple]:
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(address)
        sock.sendall(b"after the header")
        sock.shutdown(socket.SHUT_WR)
        return recv_all(sock), sock.getsockname()


def test_proxy_protocol_v1_flag_and_v2_option(netns, forwarder, stream_server):
    """The target learns the real client address and port, not nsbridge's."""
    seen: list[proxy_protocol.ProxyInfo] = []
    server = stream_server(listen_in(netns), proxy_reader(seen))
    target = f"tcp:127.0.0.1:{server.port},netns={netns}"
    _fwd, v1 = start(forwarder, "--proxy-protocol", "v1", "tcp:127.0.0.1:0", target)
    _fwd2, v2 = start(forwarder, "tcp:[::1]:0", target + ",proxy=v2")

    reply, client = talk(host_port(v1[0]))
    assert reply == b"after the header"
    info = seen[-1]
    assert info.version == 1 and info.command == "PROXY"
    assert info.source == client[:2]
    assert info.destination == host_port(v1[0])

    reply, client = talk(host_port(v2[0]))
    assert reply == b"after the header"
    info = seen[-1]
    assert info.version == 2 and info.command == "PROXY" and info.family == socket.AF_INET6
    assert info.source == client[:2] and info.source[0] == "::1"
    assert info.destination == host_port(v2[0])
    # nsbridge itself connected from the namespace's loopback: the header is the only
    # place the real client appears
    assert all(peer[0] == "127.0.0.1" for peer in server.accepted)
