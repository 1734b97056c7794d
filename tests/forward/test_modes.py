"""Every way of giving nsbridge its two sides, each checked with real sockets.

Listen side: -l ADDR, -L FD (inherited listener), -S FD (one pre-accepted client).
Connect side: -c ADDR, -C FD (one pre-connected target).  All six combinations carry
data both ways and half-close; the one-shot ones (-S, -C) exit 0 when their connection
ends, and -l/-L with -C stop listening after the first client.  -S with -c and -l/-L
with -C were broken in the original netns_tcp_bridge, so they are tested like the rest.

Then every way of naming a namespace (name, path, pid:N, fd:N, -f/-F/-t/-T), the
original README's example session through the compat entry point, and its reverse.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from helpers.environment import REPO, have
from helpers.netns import connect_in, listen_in
from helpers.processes import Forwarder
from helpers.servers import recv_all
from helpers.waiting import wait_until

BOTH_RELAYS = True  # conftest.py: each test runs on the native and the Python relay
pytestmark = pytest.mark.usefixtures("relay")

PAYLOAD_UP = os.urandom(1 << 20)  # big enough to take many reads and fill socket buffers
PAYLOAD_DOWN = os.urandom(1 << 20)
AFTER_FIN = b"the target still talks after the client's FIN"


# ---- helpers ------------------------------------------------------------------------


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected loopback TCP pair: (the connecting end, the accepted end)."""
    with listen_in(None) as listener:
        connecting = socket.create_connection(listener.getsockname(), timeout=10)
        accepted, _ = listener.accept()
    accepted.settimeout(10)
    return connecting, accepted


def unix_pair() -> tuple[socket.socket, socket.socket]:
    """A connected AF_UNIX stream pair (what a parent process might hand to nsbridge)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.settimeout(10)
    b.settimeout(10)
    return a, b


def recv_exact(sock: socket.socket, size: int) -> bytes:
    """Read exactly ``size`` bytes (or fail on early EOF), however the relay chunks them."""
    chunks = []
    got = 0
    while got < size:
        data = sock.recv(min(1 << 16, size - got))
        assert data, f"EOF after {got} of {size} bytes"
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)


def send_in_thread(sock: socket.socket, data: bytes) -> threading.Thread:
    """Send in the background: 1 MiB may not fit in socket buffers before the peer reads."""
    thread = threading.Thread(target=sock.sendall, args=(data,), daemon=True)
    thread.start()
    return thread


def talk(client: socket.socket, server: socket.socket) -> None:
    """1 MiB each way, checked byte for byte, with both directions in flight at once."""
    up = send_in_thread(client, PAYLOAD_UP)
    down = send_in_thread(server, PAYLOAD_DOWN)
    assert recv_exact(server, len(PAYLOAD_UP)) == PAYLOAD_UP
    assert recv_exact(client, len(PAYLOAD_DOWN)) == PAYLOAD_DOWN
    up.join(10)
    down.join(10)
    assert not up.is_alive() and not down.is_alive()


def half_close(client: socket.socket, server: socket.socket) -> None:
    """The client's FIN reaches the target, which can still answer; then the target's FIN."""
    client.shutdown(socket.SHUT_WR)
    assert server.recv(1) == b"", "the client's half-close did not reach the target"
    server.sendall(AFTER_FIN)
    server.shutdown(socket.SHUT_WR)
    assert recv_all(client) == AFTER_FIN


def assert_refused(address: tuple, netns: str | None = None) -> None:
    """Nothing listens at ``address`` any more (a connect is refused)."""
    with pytest.raises(ConnectionRefusedError):
        connect_in(netns, address).close()


def addr(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


# ---- the six mode combinations ----------------------------------------------------------


@dataclass
class Running:
    """A forward started in one of the modes, and the test's ends of its connection."""

    fwd: Forwarder
    client: socket.socket  # the test's end on the client side
    server: Callable[[], socket.socket]  # the test's end on the target side
    listen_address: tuple | None  # where -l/-L listen (None for -S)
    target_listener: socket.socket | None  # the -c target (None for -C)

    def close(self) -> None:
        if self.target_listener is not None:
            self.target_listener.close()


def start_mode(forwarder, listen_mode: str, connect_mode: str, unix: str = "",
               extra: tuple[str, ...] = ()) -> Running:
    """Start nsbridge with ``-<listen_mode> … -<connect_mode> …`` over real sockets.

    ``unix`` names the side ("S" or "C") whose inherited socket is an AF_UNIX stream
    socketpair instead of TCP.  Every fd nsbridge inherits is closed here afterwards, so
    nsbridge holds the only copy: when it closes a socket, the socket is really gone.
    """
    passed: list[socket.socket] = []
    args: list[str] = ["forward", "-v", *extra]

    target_listener = None
    if connect_mode == "c":
        target_listener = listen_in(None)
        args += ["-c", addr(target_listener)]
    else:
        server_end, nsbridge_end = unix_pair() if unix == "C" else tcp_pair()
        passed.append(nsbridge_end)
        args += ["-C", str(nsbridge_end.fileno())]

    client: socket.socket | None = None
    listener = None
    if listen_mode == "l":
        args += ["-l", "127.0.0.1:0"]
    elif listen_mode == "L":
        listener = listen_in(None)
        passed.append(listener)
        args += ["-L", str(listener.fileno())]
    else:
        client, nsbridge_end = unix_pair() if unix == "S" else tcp_pair()
        passed.append(nsbridge_end)
        args += ["-S", str(nsbridge_end.fileno())]

    # -l and -L log "forwarding ADDR:PORT" with -v; -S has no address to report.
    fwd = forwarder(*args, wait_ready=listen_mode != "S",
                    pass_fds=tuple(s.fileno() for s in passed))
    for sock in passed:
        sock.close()

    listen_address = None
    if listen_mode != "S":
        listen_address = ("127.0.0.1", fwd.port)
        client = socket.create_connection(listen_address, timeout=10)
    assert client is not None

    def server() -> socket.socket:
        if target_listener is None:
            return server_end
        target_listener.settimeout(10)
        conn, _ = target_listener.accept()
        conn.settimeout(10)
        return conn

    return Running(fwd, client, server, listen_address, target_listener)


MODES = [
    pytest.param("l", "c", id="-l/-c"),
    pytest.param("L", "c", id="-L/-c"),
    pytest.param("S", "c", id="-S/-c(broken-in-original)"),
    pytest.param("l", "C", id="-l/-C(broken-in-original)"),
    pytest.param("L", "C", id="-L/-C(broken-in-original)"),
    pytest.param("S", "C", id="-S/-C"),
]


@pytest.mark.parametrize(("listen_mode", "connect_mode"), MODES)
def test_mode_combination(forwarder, listen_mode: str, connect_mode: str) -> None:
    """Data both ways and half-close in every combination; one-shot modes exit 0 after."""
    run = start_mode(forwarder, listen_mode, connect_mode)
    try:
        check_mode(run, listen_mode, connect_mode)
    finally:
        run.close()


def check_mode(run: Running, listen_mode: str, connect_mode: str) -> None:
    """The checks shared by the TCP and the Unix socketpair variants."""
    server = run.server()
    with run.client, server:
        talk(run.client, server)
        if connect_mode == "C" and run.listen_address is not None:
            # -C carries exactly one connection: the listener is gone while it still runs.
            assert run.fwd.proc.poll() is None
            assert_refused(run.listen_address)
        half_close(run.client, server)

    if listen_mode == "S" or connect_mode == "C":
        assert run.fwd.wait(20) == 0, run.fwd.log()
        assert "closed" in run.fwd.log()
    else:
        # -l/-L with -c keeps serving: a second client is forwarded too.
        assert run.fwd.proc.poll() is None
        assert run.listen_address is not None
        with socket.create_connection(run.listen_address, timeout=10) as second, \
                run.server() as second_server:
            second.sendall(b"second client")
            assert recv_exact(second_server, 13) == b"second client"
        assert run.fwd.stop() == 0, run.fwd.log()


@pytest.mark.parametrize(("listen_mode", "connect_mode"), [("l", "c"), ("L", "c")])
def test_mode_in_a_single_process(forwarder, listen_mode: str, connect_mode: str) -> None:
    """The multi-connection modes run in worker processes by default; --workers 1 keeps
    them in one process, which must behave the same."""
    run = start_mode(forwarder, listen_mode, connect_mode, extra=("--workers", "1"))
    try:
        check_mode(run, listen_mode, connect_mode)
    finally:
        run.close()


@pytest.mark.parametrize(("listen_mode", "connect_mode", "unix"), [
    pytest.param("S", "c", "S", id="-S(unix)/-c"),
    pytest.param("l", "C", "C", id="-l/-C(unix)"),
    pytest.param("S", "C", "S", id="-S(unix)/-C(tcp)"),
    pytest.param("S", "C", "C", id="-S(tcp)/-C(unix)"),
])
def test_mode_with_unix_socketpair(forwarder, listen_mode: str, connect_mode: str,
                                   unix: str) -> None:
    """-S/-C take any connected stream socket: an AF_UNIX socketpair end works too."""
    run = start_mode(forwarder, listen_mode, connect_mode, unix=unix)
    try:
        check_mode(run, listen_mode, connect_mode)
    finally:
        run.close()


# ---- namespace selectors ------------------------------------------------------------------


@pytest.fixture
def process_in() -> Iterator[Callable[[str], int]]:
    """Factory: start ``sleep 60`` inside a namespace, return its PID (killed afterwards).

    ``ip netns exec`` execs the command in place, so the Popen PID is the sleeper's.
    """
    procs: list[subprocess.Popen] = []

    def start(netns: str) -> int:
        proc = subprocess.Popen(["ip", "netns", "exec", netns, "sleep", "60"])
        procs.append(proc)
        wanted = os.stat(f"/run/netns/{netns}").st_ino
        wait_until(lambda: _netns_inode(proc.pid) == wanted, what=f"pid {proc.pid} in {netns}")
        return proc.pid

    try:
        yield start
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=10)


def _netns_inode(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def open_netns_fd(netns: str) -> int:
    """An fd of /run/netns/NAME, for -F/-T/fd:N (inheritable only through pass_fds)."""
    return os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)


@pytest.fixture
def netns_fd(netns: str) -> Iterator[int]:
    """An fd of the test's namespace (``open_netns_fd``), closed after the test."""
    fd = open_netns_fd(netns)
    try:
        yield fd
    finally:
        os.close(fd)


def check_forward_into(forwarder, netns: str, *selector: str, pass_fds: tuple[int, ...] = ()
                       ) -> None:
    """Listen here, connect from inside ``netns`` (named by ``selector``) to a server there.

    The target listens only on the namespace's own loopback, so an accepted connection
    proves nsbridge dialled from inside the namespace.
    """
    target = listen_in(netns)
    try:
        fwd = forwarder("forward", "-v", "-l", "127.0.0.1:0", *selector,
                        "-c", addr(target), pass_fds=pass_fds)
        target.settimeout(10)
        with socket.create_connection(("127.0.0.1", fwd.port), timeout=10) as client:
            server, _ = target.accept()
            with server:
                server.settimeout(10)
                talk(client, server)
                half_close(client, server)
        assert fwd.stop() == 0, fwd.log()
    finally:
        target.close()


def check_forward_from(forwarder, netns: str, *selector: str, pass_fds: tuple[int, ...] = ()
                       ) -> None:
    """Listen inside ``netns`` (named by ``selector``), connect to a server here.

    The client connects from inside the fresh namespace to its loopback, where nothing
    but nsbridge can be listening; the target is on the test's own 127.0.0.1.
    """
    target = listen_in(None)
    try:
        fwd = forwarder("forward", "-v", *selector, "-l", "127.0.0.1:0",
                        "-c", addr(target), pass_fds=pass_fds)
        target.settimeout(10)
        with connect_in(netns, ("127.0.0.1", fwd.port)) as client:
            server, _ = target.accept()
            with server:
                server.settimeout(10)
                talk(client, server)
                half_close(client, server)
        assert fwd.stop() == 0, fwd.log()
    finally:
        target.close()


@pytest.mark.parametrize("form", ["name", "path"])
def test_connect_netns_name_and_path(forwarder, netns, form: str) -> None:
    spec = netns if form == "name" else f"/run/netns/{netns}"
    check_forward_into(forwarder, netns, "--connect-netns", spec)


def test_connect_netns_pid(forwarder, netns, process_in) -> None:
    pid = process_in(netns)
    check_forward_into(forwarder, netns, "--connect-netns", f"pid:{pid}")


def test_connect_netns_fd(forwarder, netns, netns_fd) -> None:
    check_forward_into(forwarder, netns, "--connect-netns", f"fd:{netns_fd}",
                       pass_fds=(netns_fd,))


def test_connect_netns_file_t(forwarder, netns) -> None:
    check_forward_into(forwarder, netns, "-t", f"/run/netns/{netns}")


def test_connect_netns_fd_T(forwarder, netns, netns_fd) -> None:
    check_forward_into(forwarder, netns, "-T", str(netns_fd), pass_fds=(netns_fd,))


def test_listen_netns_file_f(forwarder, netns) -> None:
    check_forward_from(forwarder, netns, "-f", f"/run/netns/{netns}")


def test_listen_netns_fd_F(forwarder, netns, netns_fd) -> None:
    check_forward_from(forwarder, netns, "-F", str(netns_fd), pass_fds=(netns_fd,))


def test_listen_netns_name(forwarder, netns) -> None:
    check_forward_from(forwarder, netns, "--listen-netns", netns)


def test_both_sides_in_other_namespaces(forwarder, make_netns) -> None:
    """Listen in namespace A, connect from namespace B: neither is the caller's."""
    a, b = make_netns(), make_netns()
    target = listen_in(b)
    try:
        fwd = forwarder("forward", "-v", "--listen-netns", a, "-l", "127.0.0.1:0",
                        "--connect-netns", b, "-c", addr(target))
        target.settimeout(10)
        with connect_in(a, ("127.0.0.1", fwd.port)) as client:
            server, _ = target.accept()
            with server:
                server.settimeout(10)
                talk(client, server)
                half_close(client, server)
        assert fwd.stop() == 0, fwd.log()
    finally:
        target.close()


# ---- the original README's session, through the compat entry point -------------------------


@dataclass
class HttpServer:
    port: int
    pid: int  # for /proc/PID/ns/net


@pytest.fixture
def http_server(tmp_path) -> Iterator[Callable[[str | None], HttpServer]]:
    """Factory: ``python3 -m http.server`` on 127.0.0.1, in a namespace or here.

    Port 0 lets the server pick a free port and report it, so there is no guess-and-race.
    Every server is killed by PID afterwards.
    """
    (tmp_path / "index.html").write_text("hello through nsbridge\n")
    procs: list[subprocess.Popen] = []

    def start(netns: str | None) -> HttpServer:
        prefix = ["ip", "netns", "exec", netns] if netns else []
        proc = subprocess.Popen(
            [*prefix, sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1",
             "-d", str(tmp_path)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "Serving HTTP on 127.0.0.1 port 41234 (...) ..."
        match = re.search(r" port (\d+) ", line)
        assert match, f"http.server did not start: {line!r}"
        return HttpServer(int(match.group(1)), proc.pid)

    try:
        yield start
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=10)
            if proc.stdout is not None:
                proc.stdout.close()


def curl_head(url: str, netns: str | None = None) -> subprocess.CompletedProcess:
    """``curl --head URL``, from inside ``netns`` if given; never through a proxy."""
    prefix = ["ip", "netns", "exec", netns] if netns else []
    return subprocess.run([*prefix, "curl", "-sS", "--noproxy", "*", "--max-time", "10",
                           "--head", url], capture_output=True, text=True, timeout=30)


def can_connect(netns: str | None, port: int) -> bool:
    try:
        connect_in(netns, ("127.0.0.1", port)).close()
        return True
    except OSError:
        return False


@pytest.mark.skipif(not have("curl"), reason="needs curl")
def test_readme_example_session(forwarder, netns, process_in, http_server) -> None:
    """netns_tcp_bridge -l 127.0.0.1:80 -f /proc/PID/ns/net -c SERVER, as in its README.

    A process in a new namespace (PID) gets an HTTP server of the caller's namespace on
    its own 127.0.0.1:80; curl inside that namespace fetches the page.
    """
    pid = process_in(netns)
    port = http_server(None).port
    assert curl_head("http://127.0.0.1/", netns).returncode != 0  # nothing there yet
    fwd = forwarder("-l", "127.0.0.1:80", "-f", f"/proc/{pid}/ns/net",
                    "-c", f"127.0.0.1:{port}", compat=True, wait_ready=False)
    wait_until(lambda: can_connect(netns, 80) or fwd.proc.poll() is not None,
               what="nsbridge listening on port 80 in the namespace")
    assert fwd.proc.poll() is None, fwd.log()
    out = curl_head("http://127.0.0.1/", netns)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("HTTP/1.0 200 OK"), out.stdout
    assert "Server: SimpleHTTP" in out.stdout
    assert fwd.stop() == 0, fwd.log()
    assert fwd.log() == ""  # quiet by default, like the original


@pytest.mark.skipif(not have("curl"), reason="needs curl")
def test_reverse_of_readme_example(forwarder, netns, http_server) -> None:
    """The project issue's direction: listen in the caller's namespace, connect from another
    namespace (-t /proc/PID/ns/net of the server process) to a server on its loopback."""
    server = http_server(netns)
    with listen_in(None) as probe:  # a port free here, for the compat CLI's fixed -l
        port = probe.getsockname()[1]
    fwd = forwarder("-l", f"127.0.0.1:{port}", "-t", f"/proc/{server.pid}/ns/net",
                    "-c", f"127.0.0.1:{server.port}", compat=True, wait_ready=False)
    wait_until(lambda: can_connect(None, port) or fwd.proc.poll() is not None,
               what="nsbridge listening here")
    assert fwd.proc.poll() is None, fwd.log()
    out = curl_head(f"http://127.0.0.1:{port}/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("HTTP/1.0 200 OK"), out.stdout
    assert fwd.stop() == 0, fwd.log()


# ---- help ---------------------------------------------------------------------------


ORIGINAL_FLAGS = {
    ("-h", "--help"),
    ("-l", "--listen"),
    ("-L", "--listen-fd"),
    ("-S", "--preaccepted-fd"),
    ("-c", "--connect"),
    ("-C", "--connect-fd"),
    ("-f", "--listen-netns-file"),
    ("-F", "--listen-netns-fd"),
    ("-t", "--connect-netns-file"),
    ("-T", "--connect-netns-fd"),
}


def run_help(*argv: str) -> subprocess.CompletedProcess:
    """``--help`` at a fixed width, so option lines wrap the same on every terminal."""
    return subprocess.run([sys.executable, "-m", *argv, "--help"], capture_output=True,
                          text=True, timeout=30, cwd=REPO, env={**os.environ, "COLUMNS": "100"})


def listed_flags(help_text: str) -> set[tuple[str, str]]:
    """(short, long) pairs from argparse's option lines: ``  -l ADDR, --listen ADDR``."""
    return set(re.findall(r"^\s+(-\w)(?: \S+)?, (--[\w-]+)", help_text, re.MULTILINE))


def test_compat_help_lists_exactly_the_original_flags() -> None:
    out = run_help("nsbridge.cli.compat")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: netns_tcp_bridge")
    options = out.stdout.split("options:", 1)[1]
    assert listed_flags(options) == ORIGINAL_FLAGS
    # and no option beyond them (a long-only flag would not match the pattern above) but
    # --version, which the original lacked and scripts may use to tell the two apart
    every_flag = set(re.findall(r"^\s+(-{1,2}[\w-]+)", options, re.MULTILINE))
    assert every_flag == {short for short, _long in ORIGINAL_FLAGS} | {"--version"}


def test_forward_help() -> None:
    out = run_help("nsbridge", "forward")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: nsbridge forward")
    assert listed_flags(out.stdout) >= ORIGINAL_FLAGS  # the originals, same long names
    for extra in ("--listen-netns", "--connect-netns", "--connect-timeout"):
        assert extra in out.stdout
    assert "modes (" in out.stdout  # the epilog that explains the combinations
    # the multi-forward example keeps its line break (a shell continuation, one per line)
    assert "tcp:127.0.0.1:80,netns=web \\\n" in out.stdout, out.stdout



def test_preaccepted_to_refused_target_exits_one(netns, forwarder):
    """-S with -c: if the single connection cannot reach its target, the client is reset
    and the exit status says so (1), instead of a success that lost the connection."""
    free = listen_in(netns)
    port = free.getsockname()[1]
    free.close()  # nothing listens there now
    server = listen_in(None)
    client = socket.create_connection(server.getsockname(), timeout=10)
    accepted, _ = server.accept()
    fwd = forwarder("forward", "-v", "-S", str(accepted.fileno()), "--connect-netns", netns,
                    "-c", f"127.0.0.1:{port}", pass_fds=(accepted.fileno(),), wait_ready=False)
    accepted.close()
    with pytest.raises(ConnectionResetError):
        client.recv(10)
    assert fwd.wait() == 1
    assert "ECONNREFUSED" in fwd.log()
    client.close()
    server.close()
