"""Shared fixtures: real namespaces, sockets made inside them, and nsbridge processes.

Every namespace is created with a unique name and deleted in a finalizer, even when the
test fails.  Every process a test starts is ended by PID in a finalizer.  Traffic goes
only to loopback addresses inside namespaces created here or in the caller's namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from nsbridge.relay.loop import EventLoop

REPO = Path(__file__).resolve().parent.parent
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def pytest_configure(config: pytest.Config) -> None:
    if os.geteuid() != 0:
        raise pytest.UsageError("nsbridge's tests create network namespaces: run them as root")
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# ---- namespaces ---------------------------------------------------------------------


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def make_netns() -> Iterator[Callable[[], str]]:
    """Factory fixture: each call creates a fresh named namespace with ``lo`` up."""
    created: list[str] = []

    def make() -> str:
        name = f"nsbt-{uuid.uuid4().hex[:10]}"
        _ip("netns", "add", name)
        created.append(name)
        _ip("-n", name, "link", "set", "lo", "up")
        return name

    try:
        yield make
    finally:
        for name in created:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.fixture
def netns(make_netns: Callable[[], str]) -> str:
    """One fresh namespace (its name; the file is /run/netns/NAME)."""
    return make_netns()


# The TCP paths of `nsbridge run --tcp=MODE` that the usernet bypass and soak tests run
# every TCP case through: the nftables fast path and the tun path (TCP terminated by
# nsbridge.usernet.host.tuntcp), so both paths face the same suite.
USERNET_TCP_MODES: list[str] = ["redirect", "tun"]


@pytest.fixture
def host() -> Iterator[str]:
    """The "host" namespace for user-mode networking tests: lo, and d0 with 192.0.2.1/24
    and 2001:db8::1/64 (a veth pair whose both ends stay inside it: this kernel has no
    dummy link type).  Deleted even when the test fails."""
    name = f"nsbh-{uuid.uuid4().hex[:10]}"
    _ip("netns", "add", name)
    try:
        _ip("-n", name, "link", "set", "lo", "up")
        _ip("-n", name, "link", "add", "d0", "type", "veth", "peer", "name", "d1")
        _ip("-n", name, "link", "set", "d1", "up")
        _ip("-n", name, "addr", "add", "192.0.2.1/24", "dev", "d0")
        _ip("-n", name, "addr", "add", "2001:db8::1/64", "dev", "d0", "nodad")
        _ip("-n", name, "link", "set", "d0", "up")
        subprocess.run(["ip", "netns", "exec", name, "sysctl", "-qw",
                        "net.ipv4.ping_group_range=0 2147483647"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def in_netns(name: str, fn: Callable[[], object]) -> object:
    """Run ``fn`` in a short-lived thread that entered namespace ``name``.

    Deliberately independent of nsbridge's own code, so tests do not trust what they test.
    """
    box: dict[str, object] = {}

    def run() -> None:
        fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc
        finally:
            os.close(fd)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]


def listen_in(name: str | None, host: str = "127.0.0.1", port: int = 0,
              backlog: int = 1024) -> socket.socket:
    """A listening TCP socket inside namespace ``name`` (None: the test's own)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET

    def make() -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        return sock

    return make() if name is None else in_netns(name, make)  # type: ignore[return-value]


def connect_in(name: str | None, address: tuple) -> socket.socket:
    """A TCP connection made from inside namespace ``name``."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET

    def make() -> socket.socket:
        return socket.create_connection(address, timeout=10) if family == socket.AF_INET \
            else _connect6(address)

    return make() if name is None else in_netns(name, make)  # type: ignore[return-value]


def _connect6(address: tuple) -> socket.socket:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(address)
    return sock


# ---- servers ------------------------------------------------------------------------


def serve_in_thread(listener: socket.socket, handle: Callable[[socket.socket], None],
                    ) -> threading.Thread:
    """Accept forever on ``listener`` (until it is closed), one thread per connection."""

    def accept_loop() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=_handle_and_close, args=(handle, conn), daemon=True).start()

    thread = threading.Thread(target=accept_loop, daemon=True)
    thread.start()
    return thread


def _handle_and_close(handle: Callable[[socket.socket], None], conn: socket.socket) -> None:
    try:
        conn.settimeout(60)
        handle(conn)
    except OSError:
        pass
    finally:
        conn.close()


def echo(conn: socket.socket) -> None:
    """Echo until EOF, then half-close back."""
    while data := conn.recv(1 << 16):
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)


def loopback_tcp_pair() -> tuple[socket.socket, socket.socket]:
    """(the connecting end, the accepted end) of a loopback TCP connection, for tests
    that drive a relay session by hand."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        outer = socket.create_connection(listener.getsockname())
        inner, _ = listener.accept()
    return outer, inner


@contextlib.contextmanager
def loop_running(loop: EventLoop) -> Iterator[None]:
    """Run ``loop`` in a thread for the with-block, then stop, join and close it, also
    when the test fails.  Register sessions before entering: the loop's handler table
    is not shared between threads."""
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        loop.stop()
        thread.join(10)
        loop.close()


def recv_all(sock: socket.socket, limit: int = 1 << 30) -> bytes:
    chunks = []
    total = 0
    while total < limit and (data := sock.recv(1 << 16)):
        chunks.append(data)
        total += len(data)
    return b"".join(chunks)


# ---- nsbridge processes -------------------------------------------------------------


@dataclass
class Forwarder:
    """A running ``nsbridge forward`` (or ``netns-tcp-bridge``) process."""

    proc: subprocess.Popen
    log_path: Path
    port: int | None = None
    extra: dict = field(default_factory=dict)

    def log(self) -> str:
        return self.log_path.read_text()

    def wait(self, timeout: float = 20) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(timeout=timeout)


def nsbridge_command(*args: str, compat: bool = False) -> list[str]:
    """Run the checkout's package (works without installing)."""
    module = "nsbridge.cli.compat" if compat else "nsbridge"
    return [sys.executable, "-m", module, *args]


def run_nsbridge(*args: str, timeout: float = 30, **kwargs) -> subprocess.CompletedProcess:
    """Run nsbridge to completion (for commands expected to fail fast)."""
    return subprocess.run(nsbridge_command(*args), capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, **kwargs)


@pytest.fixture
def forwarder(tmp_path: Path) -> Iterator[Callable[..., Forwarder]]:
    """Start nsbridge in the background; returns once it listens (or has exited).

    With ``-l ...:0`` the chosen port is parsed from the -v log and set as ``.port``.
    """
    started: list[Forwarder] = []

    def start(*args: str, compat: bool = False, wait_ready: bool = True,
              pass_fds: tuple[int, ...] = (), prefix: tuple[str, ...] = ()) -> Forwarder:
        log_path = tmp_path / f"nsbridge-{len(started)}.log"
        argv = [*prefix, *nsbridge_command(*args, compat=compat)]
        with open(log_path, "w") as log_file:
            proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT,
                                    cwd=REPO, pass_fds=pass_fds)
        fwd = Forwarder(proc, log_path)
        started.append(fwd)
        if wait_ready:
            _wait_listening(fwd)
        return fwd

    try:
        yield start
    finally:
        for fwd in started:
            if fwd.proc.poll() is None:
                fwd.proc.kill()
            fwd.proc.wait(timeout=10)


_LISTEN_RE = re.compile(r"forwarding (\S+?):(\d+) ")


def _wait_listening(fwd: Forwarder, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = fwd.log()
        match = _LISTEN_RE.search(text)
        if match:
            fwd.port = int(match.group(2))
            return
        if fwd.proc.poll() is not None:
            raise AssertionError(f"nsbridge exited with {fwd.proc.returncode}:\n{text}")
        time.sleep(0.02)
    raise AssertionError(f"nsbridge did not start listening:\n{fwd.log()}")


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen]]:
    """Background processes a test started: killed by PID and reaped at the end, even if
    the test fails."""
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def reachable_in(netns: str, address: tuple) -> bool:
    """Whether a TCP connection to ``address`` succeeds from inside ``netns`` (1 s)."""
    def probe() -> bool:
        try:
            socket.create_connection(address, timeout=1).close()
            return True
        except OSError:
            return False

    return bool(in_netns(netns, probe))


def processes_mentioning(word: str) -> set[int]:
    """PIDs whose command line contains ``word`` (a marker only one run uses)."""
    found = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if word.encode() in f.read():
                        found.add(int(pid))
            except OSError:
                pass
    return found


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (nsbridge's supervisor and its workers)."""
    pids = [pid]
    for current in pids:
        for task in os.listdir(f"/proc/{current}/task"):
            try:
                with open(f"/proc/{current}/task/{task}/children") as f:
                    pids.extend(int(x) for x in f.read().split())
            except OSError:
                pass
    return pids


def open_fds(pid: int) -> int:
    """Open fds summed over the process tree of ``pid``."""
    return sum(len(os.listdir(f"/proc/{p}/fd")) for p in process_tree(pid))


def wait_until(condition: Callable[[], bool], timeout: float = 10, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what or condition}")


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


# ---- daemon helpers (endpoints, daemon, control socket, serve) ----------------------

_FORWARDING_RE = re.compile(r"forwarding (\S+) \(netns")


def wait_forwarding(fwd: Forwarder, count: int = 1, timeout: float = 15) -> list[str]:
    """Wait for ``count`` ``forwarding ADDR (netns …)`` lines (-v) and return the ADDRs.

    The supervisor logs that line once a listener is bound, for every kind of endpoint
    (the ``forwarder`` fixture's own wait only understands HOST:PORT listeners).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = fwd.log()
        found = _FORWARDING_RE.findall(text)
        if len(found) >= count:
            return found
        if fwd.proc.poll() is not None:
            raise AssertionError(f"nsbridge exited with {fwd.proc.returncode}:\n{text}")
        time.sleep(0.02)
    raise AssertionError(f"nsbridge did not log {count} forwards:\n{fwd.log()}")


def host_port(text: str) -> tuple[str, int]:
    """``127.0.0.1:80`` / ``[::1]:80`` (as nsbridge logs them) to a sockaddr tuple."""
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def free_port(netns: str | None = None, kind: int = socket.SOCK_STREAM,
              host: str = "127.0.0.1") -> int:
    """A port nobody uses right now (bound, noted, closed) in ``netns``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET

    def pick() -> int:
        with socket.socket(family, kind) as sock:
            sock.bind((host, 0))
            return sock.getsockname()[1]

    return pick() if netns is None else in_netns(netns, pick)  # type: ignore[return-value]


@dataclass
class StreamServer:
    """A stream server (TCP or Unix) that records every connection it accepted."""

    listener: socket.socket
    accepted: list[object] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.listener.getsockname()[1]


@pytest.fixture
def stream_server() -> Iterator[Callable[..., StreamServer]]:
    """Factory fixture: ``stream_server(listener, handle=echo)`` serves in threads and
    records each accepted peer (so a test can prove a refused client never got through);
    every listener is closed at the end."""
    servers: list[StreamServer] = []

    def start(listener: socket.socket,
              handle: Callable[[socket.socket], None] = echo) -> StreamServer:
        server = StreamServer(listener)
        servers.append(server)

        def recording(conn: socket.socket) -> None:
            try:
                server.accepted.append(conn.getpeername())
            except OSError:
                server.accepted.append(None)
            handle(conn)

        serve_in_thread(listener, recording)
        return server

    try:
        yield start
    finally:
        for server in servers:
            try:
                server.listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            server.listener.close()


DNS_NAME = "www.nsbridge.test."
DNS_ADDRESS = "192.0.2.53"


def dns_answer(wire: bytes) -> bytes:
    """A one-record authoritative server: A for DNS_NAME, NXDOMAIN for the rest (for
    ``udp_server(..., answer=dns_answer)``; needs dnspython, imported here only)."""
    import dns.message
    import dns.name
    import dns.rcode
    import dns.rdatatype
    import dns.rrset

    query = dns.message.from_wire(wire)
    response = dns.message.make_response(query)
    question = query.question[0]
    if question.name == dns.name.from_text(DNS_NAME) and question.rdtype == dns.rdatatype.A:
        response.answer.append(dns.rrset.from_text(question.name, 60, "IN", "A", DNS_ADDRESS))
    else:
        response.set_rcode(dns.rcode.NXDOMAIN)
    return response.to_wire()


def reply_after_fin(conn: socket.socket) -> None:
    """A server for half-close tests: read until the client's FIN, then answer on the
    direction that is still open with how many bytes came."""
    total = 0
    while data := conn.recv(65536):
        total += len(data)
    time.sleep(0.2)
    conn.sendall(f"after-fin:{total}".encode())


def echo_listener(netns: str | None, host: str = "127.0.0.1") -> socket.socket:
    """A TCP listener for an echo server in ``netns`` (see ``stream_server``)."""
    return listen_in(netns, host)


class UdpServer:
    """A UDP server bound inside a namespace, answering from its own thread.

    ``answer(data)`` returns the reply (None: no reply); every peer is recorded and
    datagrams are counted in ``received``.
    """

    def __init__(self, netns: str, answer: Callable[[bytes], bytes | None],
                 host: str = "127.0.0.1", port: int = 0) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET

        def bind() -> socket.socket:
            sock = socket.socket(family, socket.SOCK_DGRAM)
            # 8 MiB (SO_RCVBUFFORCE, root may exceed rmem_max): tests send bursts that the
            # kernel's 208 KiB default would drop before this thread reads them.
            sock.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), 8 << 20)
            sock.bind((host, port))
            return sock

        self.sock: socket.socket = in_netns(netns, bind)  # type: ignore[assignment]
        self.sock.settimeout(0.1)  # lets the thread notice close() without a wake-up trick
        self.port: int = self.sock.getsockname()[1]
        self.answer = answer
        self.peers: set[tuple] = set()
        self.received = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        buf = bytearray(1 << 16)
        while not self._stop.is_set():
            try:
                n, peer = self.sock.recvfrom_into(buf)
            except TimeoutError:
                continue
            except OSError:
                return
            self.received += 1
            self.peers.add(peer)
            reply = self.answer(bytes(buf[:n]))
            if reply is not None:
                self.sock.sendto(reply, peer)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.sock.close()


@pytest.fixture
def udp_server() -> Iterator[Callable[..., UdpServer]]:
    """Factory fixture: ``udp_server(netns, answer=..., host=..., port=...)`` (echo by
    default); all closed at the end."""
    servers: list[UdpServer] = []

    def start(netns: str, answer: Callable[[bytes], bytes | None] = bytes,
              host: str = "127.0.0.1", port: int = 0) -> UdpServer:
        server = UdpServer(netns, answer, host, port)
        servers.append(server)
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.close()


def tcp_roundtrip(address: tuple | str | bytes, payload: bytes) -> bytes:
    """Send ``payload`` through a forward (TCP or Unix listener), half-close, read all."""
    family = (socket.AF_UNIX if isinstance(address, (str, bytes))
              else socket.AF_INET6 if ":" in address[0] else socket.AF_INET)
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(address)
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return recv_all(sock)


def udp_roundtrip(address: tuple, payload: bytes, sock: socket.socket | None = None,
                  attempts: int = 5) -> bytes:
    """One datagram and its reply; UDP may drop, so a lost one is sent again."""
    own = sock is None
    if sock is None:
        sock = socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET,
                             socket.SOCK_DGRAM)
    try:
        sock.settimeout(2)
        for _ in range(attempts):
            sock.sendto(payload, address)
            try:
                data, _peer = sock.recvfrom(1 << 16)
                return data
            except TimeoutError:
                continue
        raise AssertionError(f"no UDP reply from {address} after {attempts} tries")
    finally:
        if own:
            sock.close()


def ctl(control: str | Path, *args: str) -> subprocess.CompletedProcess:
    """``nsbridge ctl --control PATH ARGS...`` as a user would type it."""
    return run_nsbridge("ctl", "--control", str(control), *args)


def ctl_json(control: str | Path, *args: str) -> dict:
    """``nsbridge ctl ... ARGS --json``, parsed (asserting it succeeded)."""
    result = ctl(control, *args, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    import json

    return json.loads(result.stdout)


def stats_by_name(control: str | Path) -> dict[str, dict]:
    """The daemon's counters per forward name, via ``nsbridge ctl stats --json``."""
    return {row["name"]: row for row in ctl_json(control, "stats")["stats"]}


def wait_stats(control: str | Path, condition: Callable[[dict[str, dict]], bool],
               what: str, timeout: float = 10) -> dict[str, dict]:
    """Poll ``ctl stats`` until ``condition`` holds: workers report every 0.5 s."""
    box: dict[str, dict[str, dict]] = {}

    def check() -> bool:
        box["stats"] = stats_by_name(control)
        return condition(box["stats"])

    try:
        wait_until(check, timeout=timeout, what=what)
    except AssertionError:
        raise AssertionError(f"timed out waiting for {what}: {box.get('stats')}") from None
    return box["stats"]
