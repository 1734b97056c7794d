"""The control socket (``--control PATH``) through ``nsbridge ctl`` and raw JSON lines.

Why: the control socket changes a running daemon that carries other people's traffic,
so besides "add/remove/list/stats work" these tests insist that nothing a client does --
garbage, huge lines, floods, too many clients, the wrong user -- disturbs the forwards
already running.  After every hostile case an existing forward must still carry data
and the daemon must still be alive.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers.control import ctl, ctl_json, stats_by_name, wait_stats
from helpers.netns import listen_in
from helpers.processes import Forwarder, host_port, wait_forwarding
from helpers.servers import StreamServer, tcp_roundtrip
from helpers.waiting import wait_until
from nsbridge.forward.control import MAX_CLIENTS, MAX_LINE

BOTH_RELAYS = True  # conftest.py: each test runs on the native and the Python relay
pytestmark = pytest.mark.usefixtures("relay")


@dataclass
class Daemon:
    """A running ``nsbridge forward --control`` with one forward ("forward-1") into
    ``netns``, whose echo server is ``server``."""

    fwd: Forwarder
    control: Path
    address: tuple[str, int]
    netns: str
    server: StreamServer

    @property
    def target(self) -> str:
        return f"tcp:127.0.0.1:{self.server.port},netns={self.netns}"

    def assert_healthy(self) -> None:
        """The daemon lives, forward-1 carries data, and the control socket answers."""
        assert self.fwd.proc.poll() is None, self.fwd.log()
        payload = os.urandom(50_000)
        assert tcp_roundtrip(self.address, payload) == payload
        names = [f["name"] for f in ctl_json(self.control, "list")["forwards"]]
        assert names[0] == "forward-1"

    def listening_on(self, name: str) -> tuple[str, int]:
        for forward in ctl_json(self.control, "list")["forwards"]:
            if forward["name"] == name:
                return host_port(forward["listening_on"])
        raise AssertionError(f"no forward {name}")


def start_daemon(forwarder: Callable[..., Forwarder], stream_server: Callable[..., StreamServer],
                 netns: str, control: Path, *extra: str) -> Daemon:
    server = stream_server(listen_in(netns))
    fwd = forwarder("forward", "-v", "--workers", "2", "--control", str(control), *extra,
                    "tcp:127.0.0.1:0", f"tcp:127.0.0.1:{server.port},netns={netns}",
                    wait_ready=False)
    listening = wait_forwarding(fwd)
    wait_until(lambda: "control socket at" in fwd.log(), what="control socket")
    return Daemon(fwd, control, host_port(listening[0]), netns, server)


@pytest.fixture
def daemon(netns: str, forwarder, stream_server, tmp_path: Path) -> Daemon:
    return start_daemon(forwarder, stream_server, netns, tmp_path / "ctl.sock")


def connect_control(path: Path) -> socket.socket:
    """A raw control client; connect blocks (no timeout) so a full backlog waits."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    sock.settimeout(10)
    return sock


def read_line(sock: socket.socket) -> bytes:
    """One reply line; b"" if the daemon closed the connection first."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    return data


def ask(sock: socket.socket, line: bytes) -> dict:
    sock.sendall(line + b"\n")
    reply = read_line(sock)
    assert reply, "the daemon closed the connection instead of answering"
    return json.loads(reply)


def is_closed(sock: socket.socket) -> bool:
    """The daemon closed this client (EOF or reset when reading)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


# ---- basics ---------------------------------------------------------------------------------


def test_socket_mode_list_and_stats(daemon: Daemon):
    """The control socket is 0600; list/stats in text and --json agree."""
    assert stat.S_IMODE(os.stat(daemon.control).st_mode) == 0o600
    text = ctl(daemon.control, "list")
    assert text.returncode == 0, text.stderr
    header, row = text.stdout.splitlines()
    assert header.split() == ["NAME", "PROTOCOL", "LISTENING_ON", "CONNECT"]
    host, port = daemon.address
    assert row.split() == ["forward-1", "stream", f"{host}:{port}", daemon.target]
    listed = ctl_json(daemon.control, "list")
    assert listed["ok"] is True
    assert listed["forwards"][0]["listen"] == "tcp:127.0.0.1:0"
    stats = ctl(daemon.control, "stats")
    assert stats.returncode == 0
    assert stats.stdout.split()[:3] == ["NAME", "PROTOCOL", "ACTIVE"]
    assert stats.stdout.splitlines()[1].split()[:2] == ["forward-1", "stream"]
    assert set(stats_by_name(daemon.control)["forward-1"]) >= {
        "accepted", "active", "closed", "reset", "denied", "bytes_up", "bytes_down"}


def test_stats_count_bytes_active_and_accepted(daemon: Daemon):
    """Workers report every 0.5 s: the counters catch up with real traffic."""
    held = socket.create_connection(daemon.address, timeout=10)
    with held:
        held.sendall(b"x" * 1000)
        assert len(held.recv(1000)) > 0
        wait_stats(daemon.control, lambda s: s["forward-1"]["active"] == 1,
                   "one active connection")
    payload = os.urandom(200_000)
    assert tcp_roundtrip(daemon.address, payload) == payload
    stats = wait_stats(daemon.control, lambda s: s["forward-1"]["closed"] == 2,
                       "two closed connections")["forward-1"]
    assert stats["accepted"] == 2 and stats["active"] == 0 and stats["reset"] == 0
    assert stats["bytes_up"] == stats["bytes_down"] >= 200_000 + 1


@pytest.mark.parametrize("accept", ["handoff", "reuseport"])
def test_stats_right_after_traffic_count_it(netns, forwarder, stream_server, tmp_path: Path,
                                            accept: str):
    """A stats request asks the workers first: a client that reads statistics right after
    its own round trip sees it (no STATS_INTERVAL wait), in both accept modes."""
    daemon = start_daemon(forwarder, stream_server, netns, tmp_path / "ctl.sock",
                          "--accept", accept)
    for held_count in (1, 2):
        held = socket.create_connection(daemon.address, timeout=10)
        held.sendall(b"x" * 1000)
        echoed = b""
        while len(echoed) < 1000:
            echoed += held.recv(1000)
        stats = stats_by_name(daemon.control)["forward-1"]
        assert stats["accepted"] == held_count and stats["active"] == 1, stats
        assert stats["bytes_up"] == stats["bytes_down"] == 1000 * held_count, stats
        held.close()
        wait_stats(daemon.control, lambda s: s["forward-1"]["active"] == 0, "closed")


def test_add_use_and_remove_while_another_connection_keeps_echoing(daemon: Daemon):
    """Adding and removing forward B leaves a long echo connection on forward A alone."""
    long_lived = socket.create_connection(daemon.address, timeout=10)

    def still_echoes(tag: bytes) -> None:
        long_lived.sendall(tag)
        got = b""
        while len(got) < len(tag):
            got += long_lived.recv(len(tag) - len(got))
        assert got == tag

    with long_lived:
        still_echoes(b"before add")
        added = ctl(daemon.control, "add", "b", "tcp:127.0.0.1:0", daemon.target)
        assert added.returncode == 0, added.stderr
        still_echoes(b"after add")
        b_address = daemon.listening_on("b")
        assert tcp_roundtrip(b_address, b"through b") == b"through b"
        still_echoes(b"while b is used")
        removed = ctl(daemon.control, "remove", "b")
        assert removed.returncode == 0, removed.stderr
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(b_address, timeout=10)
        still_echoes(b"after remove")
        assert [f["name"] for f in ctl_json(daemon.control, "list")["forwards"]] == ["forward-1"]
        removed_again = ctl(daemon.control, "remove", "b")
        assert removed_again.returncode == 2 and "no forward named 'b'" in removed_again.stderr
    daemon.assert_healthy()


def test_remove_lets_connections_finish_and_remove_kill_resets_them(daemon: Daemon):
    """``remove`` only closes the listener; ``remove --kill`` resets what is open."""
    for name in ("gentle", "harsh"):
        result = ctl(daemon.control, "add", name, "tcp:127.0.0.1:0", daemon.target)
        assert result.returncode == 0, result.stderr
    gentle = socket.create_connection(daemon.listening_on("gentle"), timeout=10)
    harsh = socket.create_connection(daemon.listening_on("harsh"), timeout=10)
    with gentle, harsh:
        for sock in (gentle, harsh):
            sock.sendall(b"hello")
            assert sock.recv(5) == b"hello"
        wait_stats(daemon.control, lambda s: s["gentle"]["active"] == 1
                   and s["harsh"]["active"] == 1, "both connections reported")
        assert ctl(daemon.control, "remove", "gentle").returncode == 0
        assert ctl(daemon.control, "remove", "harsh", "--kill").returncode == 0
        with pytest.raises(ConnectionResetError):
            harsh.sendall(b"are you there?")
            harsh.recv(100)
        gentle.sendall(b"still here")
        assert gentle.recv(100) == b"still here"
        gentle.shutdown(socket.SHUT_WR)
        assert gentle.recv(100) == b""  # the server's half-close arrives: a clean end
    daemon.assert_healthy()


def test_added_forward_can_use_udp(daemon: Daemon, udp_server):
    """A UDP forward added at run time is relayed by a worker, then removed cleanly."""
    server = udp_server(daemon.netns)
    result = ctl(daemon.control, "add", "dns", "udp:127.0.0.1:0",
                 f"udp:127.0.0.1:{server.port},netns={daemon.netns}")
    assert result.returncode == 0, result.stderr
    from helpers.servers import udp_roundtrip

    address = daemon.listening_on("dns")
    assert udp_roundtrip(address, b"ping") == b"ping"
    assert ctl(daemon.control, "remove", "dns").returncode == 0
    daemon.assert_healthy()


# ---- hostile and broken clients ---------------------------------------------------------------


HOSTILE = {
    "garbage": (b"this is not json", "not JSON"),
    "not an object": (b'["list"]', "a request is a JSON object"),
    "unknown command": (b'{"cmd": "reboot"}', "unknown command 'reboot'"),
    "no command": (b'{"name": "x"}', "unknown command None"),
    "add without listen": (b'{"cmd": "add", "name": "x", "connect": "tcp:127.0.0.1:9"}',
                           '"listen" is required'),
    "add with a number as listen": (
        b'{"cmd": "add", "name": "x", "listen": 8080, "connect": "tcp:127.0.0.1:9"}',
        '"listen" is required'),
    "add with an unknown key": (
        b'{"cmd": "add", "name": "x", "listen": "tcp:127.0.0.1:0", '
        b'"connect": "tcp:127.0.0.1:9", "colour": "red"}', "unknown key 'colour'"),
    "add with a bad endpoint": (
        b'{"cmd": "add", "name": "x", "listen": "tcp:127.0.0.1", '
        b'"connect": "tcp:127.0.0.1:9"}', "expected HOST:PORT"),
    "add with a wrong type": (
        b'{"cmd": "add", "name": "x", "listen": "tcp:127.0.0.1:0", '
        b'"connect": "tcp:127.0.0.1:9", "allow": 10}', '"allow" must be a list'),
    "add fd:3": (b'{"cmd": "add", "name": "x", "listen": "tcp:127.0.0.1:0", '
                 b'"connect": "fd:3"}', "cannot be added at run time"),
    "add systemd:": (b'{"cmd": "add", "name": "x", "listen": "systemd:web", '
                     b'"connect": "tcp:127.0.0.1:9"}', "cannot be added at run time"),
    "duplicate name": (b'{"cmd": "add", "name": "forward-1", "listen": "tcp:127.0.0.1:0", '
                       b'"connect": "tcp:127.0.0.1:9"}', "exists already"),
    "remove without name": (b'{"cmd": "remove"}', 'give the forward\'s "name"'),
    "remove unknown": (b'{"cmd": "remove", "name": "ghost"}', "no forward named 'ghost'"),
    "remove with kill not a bool": (b'{"cmd": "remove", "name": "forward-1", "kill": "yes"}',
                                    '"kill" must be true or false'),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_bad_request_gets_an_error_and_changes_nothing(daemon: Daemon, case: str):
    """Each bad request: one error reply, the same client can go on, nothing changed."""
    line, message = HOSTILE[case]
    with connect_control(daemon.control) as sock:
        reply = ask(sock, line)
        assert reply["ok"] is False and message in reply["error"], reply
        assert ask(sock, b'{"cmd": "list"}')["ok"] is True
    assert [f["name"] for f in ctl_json(daemon.control, "list")["forwards"]] == ["forward-1"]
    daemon.assert_healthy()


def test_ctl_duplicate_name_is_an_error_line(daemon: Daemon):
    """The command-line client reports a refused request as one line, exit 2."""
    result = ctl(daemon.control, "add", "forward-1", "tcp:127.0.0.1:0", daemon.target)
    assert result.returncode == 2
    assert result.stderr.strip() == ("nsbridge: error: add: a forward named 'forward-1' "
                                     "exists already; names must be unique")
    daemon.assert_healthy()


def test_ctl_names_the_request_once(daemon: Daemon):
    """A bad endpoint in `ctl add` is one line naming `add` once (the daemon's own error
    already starts with it) and the endpoint."""
    result = ctl(daemon.control, "add", "web2", "tcp:bad", daemon.target)
    assert result.returncode == 2
    line = result.stderr.strip()
    assert line.startswith("nsbridge: error: add: ") and "add: add:" not in line, line
    assert "'tcp:bad'" in line, line
    daemon.assert_healthy()


@pytest.mark.parametrize("with_newline", [False, True], ids=["unterminated", "terminated"])
def test_line_over_64k_ends_that_client(daemon: Daemon, with_newline: bool):
    """A line longer than MAX_LINE gets an error and the client is closed -- even when
    it is valid JSON and its newline arrives with it."""
    padding = "x" * (MAX_LINE + 1000)
    line = json.dumps({"cmd": "list", "pad": padding}).encode() + (b"\n" if with_newline
                                                                   else b"")
    with connect_control(daemon.control) as sock:
        sock.sendall(line)
        reply = json.loads(read_line(sock))
        assert reply == {"ok": False, "error": f"request line longer than {MAX_LINE} bytes"}
        assert is_closed(sock)
    daemon.assert_healthy()


def test_more_clients_than_allowed(daemon: Daemon):
    """40 clients at once: MAX_CLIENTS are served, the rest refused, nobody hangs."""
    clients = [connect_control(daemon.control) for _ in range(40)]
    try:
        answers = []
        for sock in clients:
            try:
                sock.sendall(b'{"cmd": "stats"}\n')
            except (BrokenPipeError, ConnectionResetError):
                pass  # refused already; its reply is waiting to be read
            answers.append(json.loads(read_line(sock)))
        served = [a for a in answers if a["ok"]]
        refused = [a for a in answers if not a["ok"]]
        assert len(served) == MAX_CLIENTS
        assert {a["error"] for a in refused} == {"too many control clients"}
        assert len(refused) == 40 - MAX_CLIENTS
        # while full: `nsbridge ctl` gets a clean refusal, and forwarding goes on
        full = ctl(daemon.control, "list")
        assert full.returncode == 2
        assert full.stderr.strip() == "nsbridge: error: list: too many control clients"
        payload = os.urandom(10_000)
        assert tcp_roundtrip(daemon.address, payload) == payload
    finally:
        for sock in clients:
            sock.close()
    wait_until(lambda: ctl(daemon.control, "list").returncode == 0, what="control serves")
    daemon.assert_healthy()


def test_client_that_never_reads_is_dropped(daemon: Daemon):
    """Flooding requests without reading replies: the daemon drops that client
    instead of buffering without bound."""
    with connect_control(daemon.control) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(20)
        batch = b'{"cmd": "list"}\n' * 200
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            for _ in range(10_000):
                sock.sendall(batch)
    wait_until(lambda: "dropping a client that does not read" in daemon.fwd.log(),
               what="the drop to be logged")
    daemon.assert_healthy()


def _python_for_others() -> str | None:
    """An interpreter uid 65534 may run (pyenv's under /root is not readable)."""
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        probe = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534",
                                "--clear-groups", candidate, "-c", "pass"],
                               capture_output=True, timeout=30)
        if probe.returncode == 0:
            return candidate
    return None


OTHER_USER_CLIENT = r"""
import socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.settimeout(10)
try:
    sock.connect(sys.argv[1])
except PermissionError:
    print("EACCES")
    sys.exit(0)
data = b""
while not data.endswith(b"\n"):
    chunk = sock.recv(4096)
    if not chunk:
        break
    data += chunk
print(data.decode().strip())
print("EOF" if sock.recv(1) == b"" else "OPEN")
"""


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory other users may enter (pytest's tmp_path is under a 0700 directory)."""
    path = Path(tempfile.mkdtemp(prefix="nsbt-ctl-", dir="/tmp"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv is not installed")
def test_other_uid_is_refused(netns, forwarder, stream_server, shared_dir: Path):
    """uid 65534 cannot connect (0600); with the mode opened up, SO_PEERCRED refuses it."""
    python = _python_for_others()
    if python is None:
        pytest.skip("no Python interpreter that uid 65534 may run")
    daemon = start_daemon(forwarder, stream_server, netns, shared_dir / "ctl.sock")

    def as_nobody() -> list[str]:
        result = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                 python, "-c", OTHER_USER_CLIENT, str(daemon.control)],
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        return result.stdout.splitlines()

    assert as_nobody() == ["EACCES"]  # the file system says no first
    os.chmod(daemon.control, 0o666)  # a careless admin: now the daemon must say no
    try:
        reply_line, end = as_nobody()
    finally:
        os.chmod(daemon.control, 0o600)
    reply = json.loads(reply_line)
    assert reply["ok"] is False and "permission denied: uid 65534" in reply["error"]
    assert end == "EOF"
    assert "refused a client with uid 65534" in daemon.fwd.log()
    daemon.assert_healthy()


def test_unnamed_adds_get_fresh_names_after_a_removal(daemon: Daemon):
    """A forward added without "name" is called forward-N; after a removal the next
    number may be taken already, and the add must not fail for that."""
    request = (b'{"cmd": "add", "listen": "tcp:127.0.0.1:0", "connect": "%s"}'
               % daemon.target.encode())
    with connect_control(daemon.control) as sock:
        assert ask(sock, request) == {"ok": True}  # forward-2
        assert ask(sock, request) == {"ok": True}  # forward-3
        assert ask(sock, b'{"cmd": "remove", "name": "forward-2"}') == {"ok": True}
        assert ask(sock, request) == {"ok": True}  # forward-3 is taken: forward-4
        names = [f["name"] for f in ask(sock, b'{"cmd": "list"}')["forwards"]]
    assert names == ["forward-1", "forward-3", "forward-4"]
    assert tcp_roundtrip(daemon.listening_on("forward-4"), b"four") == b"four"
    daemon.assert_healthy()


GARBLED_REPLIES = {
    "not json": (b"HTTP/1.1 400 Bad Request\r\n\r\n", "the reply is not JSON ('HTTP/1.1 400"),
    "not utf-8": (b"\xff\xfe\x00{\n", "the reply is not JSON"),
    "not an object": (b"[1, 2]\n", "the reply is not a JSON object ('[1, 2]')"),
    "cut short": (b'{"ok": true, "forw', "closed the connection in the middle of its reply"),
    "no forwards": (b'{"ok": true}\n', "no 'forwards' list of objects"),
}


@pytest.mark.parametrize("case", sorted(GARBLED_REPLIES))
def test_ctl_garbled_reply_is_one_error_line(case: str, tmp_path: Path):
    """A reply `nsbridge ctl` cannot use (another program's socket, a daemon dying
    mid-reply) is one `nsbridge: error:` line naming the socket, exit 2, no traceback."""
    import threading

    reply, needle = GARBLED_REPLIES[case]
    path = tmp_path / "not-nsbridge.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    server.settimeout(30)
    received: list[bytes] = []

    def answer_once() -> None:
        conn, _ = server.accept()
        with conn:
            received.append(conn.recv(65536))
            conn.sendall(reply)

    thread = threading.Thread(target=answer_once, daemon=True)
    thread.start()
    try:
        result = ctl(path, "list")
    finally:
        thread.join(timeout=30)
        server.close()
    assert json.loads(received[0]) == {"cmd": "list"}
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert needle in lines[0], lines[0]
    if case != "no forwards":  # that one is a well-formed reply missing its table
        assert lines[0].startswith(f"nsbridge: error: --control {path}: "), lines[0]
