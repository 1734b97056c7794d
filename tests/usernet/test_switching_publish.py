"""Published ports under ``nsbridge run --bypass -p``: the program's listener becomes the
publication's host listener (``usernet/host/switchbind.py``), end to end.

The world (helpers.switching): nsbridge in a "host" namespace, clients in it (the host's
loopback) and in an "outside" one (another machine: it reaches the host at
198.51.100.1 / 2001:db8:5::1 and comes from .2 / ::2).  The program
(helpers/publish_probe.py) answers each client with the address ``accept()`` gave it;
switched, that is the client's own ``getsockname()`` (a host-loopback client is
127.0.0.1, not the gateway 10.0.2.2 the device path shows), and the program's
``getsockname()`` after ``listen`` shows the host's port.  Cases: IPv4, the host's
loopback only, IPv6 and a dual-stack listener; 32 MiB sha256-checked both ways;
clients queued between bind and listen kept; 200 clients at once and 1,000 one after
another with the fd counts of the program and of nsbridge unchanged; curl and iperf3;
the listener closed and made again (clients refused in between, never hanging; the
device path back meanwhile); two publications reaching one listener (not switched);
the doors from inside (connect, AF_UNSPEC and bind on the listener; second binds;
IPv6-only, loopback, other port, SO_BINDTODEVICE and UDP not switched; bind then
connect; bind after AF_UNSPEC on a switched socket); a thread rewriting the sockaddr
during bind; the listener passed to a child; a low port without CAP_NET_BIND_SERVICE;
Unix bind and connect through a symlink that would lead out of the program's view; and
the same publication without ``--bypass`` as the control.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from helpers.environment import REPO
from helpers.netns import in_netns
from helpers.processes import process_tree
from helpers.switching import ECHO_PORT, OUT4, OUT6, UP4, UP6, World, switching_world

pytestmark = pytest.mark.timeout(300)

PROBE = str(REPO / "tests" / "helpers" / "publish_probe.py")
GUEST_PORT, OTHER_PORT = 8080, 8081
HOST_PORT = 7340


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with switching_world() as made:
        yield made


class Program:
    """``nsbridge run -v [--bypass] -p ... -- publish_probe.py CASE ...`` in the host
    namespace (``ip netns exec`` becomes nsbridge: ``pid`` is nsbridge's)."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.process = process
        self.stderr = ""

    @property
    def pid(self) -> int:
        return self.process.pid

    def line(self) -> dict:
        assert self.process.stdout is not None
        text = self.process.stdout.readline()
        assert text, f"the program ended: {self.finish()}"
        return json.loads(text)

    def tell(self, text: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(text + "\n")
        self.process.stdin.flush()

    def finish(self, timeout: float = 60) -> str:
        """Wait for the end; nsbridge's log (and the program's stderr)."""
        if self.process.returncode is None:
            _, self.stderr = self.process.communicate(timeout=timeout)
        return self.stderr

    def __enter__(self) -> Program:
        return self

    def __exit__(self, *exc: object) -> None:
        """A test that failed midway: nsbridge and the program (which outlives a killed
        nsbridge by design) and its children, each by PID."""
        if self.process.poll() is None:
            try:
                tree = process_tree(self.process.pid)
            except OSError:
                tree = [self.process.pid]
            for pid in reversed(tree):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.process.communicate(timeout=30)


@contextmanager
def program(world: World, publish: list[str], case: str, *args: str,
            bypass: bool = True, command: list[str] | None = None,
            extra: tuple[str, ...] = ()) -> Iterator[Program]:
    options = ["--bypass", *extra] if bypass else [*extra]
    for spec in publish:
        options += ["-p", spec]
    argv = ["ip", "netns", "exec", world.host, sys.executable, "-m", "nsbridge", "run", "-v",
            "--dns", OUT4, *options, "--",
            *(command or [sys.executable, PROBE, case, *args])]
    process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=REPO)
    with Program(process) as made:
        yield made


def settled_fds(pid: int) -> list[str]:
    """nsbridge's open files, the fewest of a few looks (its check for handed-over
    listeners holds a netlink socket for a moment every half second)."""
    looks = []
    for _ in range(5):
        names = []
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                names.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except OSError:
                pass
        looks.append(names)
        time.sleep(0.05)
    return sorted(min(looks, key=len))


def visit(netns: str, address: str, port: int, payload: bytes = b"") -> tuple[str, str, bytes]:
    """Connect from ``netns``: (the line the program answered, our own address, the echo
    of ``payload``)."""
    def run() -> tuple[str, str, bytes]:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(15)
            sock.connect((address, port))
            mine = sock.getsockname()
            got = b""
            while not got.endswith(b"\n"):
                chunk = sock.recv(100)
                assert chunk, f"closed after {got!r}"
                got += chunk
            echo = b""
            if payload:
                sock.sendall(payload)
                while len(echo) < len(payload):
                    echo += sock.recv(65536)
            return got.decode().strip(), f"{mine[0]} {mine[1]}", echo
    return in_netns(netns, run)  # type: ignore[return-value]


@pytest.mark.parametrize(("spec", "client_ns", "target"), [
    (f"{HOST_PORT}:{GUEST_PORT}", "outside", UP4),
    (f"127.0.0.1:{HOST_PORT}:{GUEST_PORT}", "host", "127.0.0.1"),
    (f"[::]:{HOST_PORT}:{GUEST_PORT}", "outside", UP6),
], ids=["every-address", "host-loopback", "ipv6"])
def test_the_program_accepts_the_clients_real_address(world: World, spec: str,
                                                        client_ns: str, target: str) -> None:
    family = "6" if ":" in target else "4"
    address = "::" if family == "6" else "0.0.0.0"
    netns = world.outside if client_ns == "outside" else world.host
    with program(world, [spec], "serve", family, address, str(GUEST_PORT), "2") as run:
        assert run.line()["listening"][1] == HOST_PORT  # the host's socket now
        for _ in range(2):
            seen, mine, echo = visit(netns, target, HOST_PORT, b"hello")
            assert seen == mine and echo == b"hello"
        result = run.line()
        log = run.finish()
    assert run.process.returncode == 0, log
    assert len(result["peers"]) == 2
    assert "listener handed to the program" in log


def test_dual_stack_listener_through_an_ipv4_publication(world: World) -> None:
    with program(world, [f"{HOST_PORT}:{GUEST_PORT}"], "serve", "dual", "::",
                 str(GUEST_PORT), "1") as run:
        assert run.line()["listening"] == ["0.0.0.0", HOST_PORT]
        seen, mine, _ = visit(world.outside, UP4, HOST_PORT)
        assert seen == mine
        run.line()


def test_asyncio_server_with_a_nonblocking_listener(world: World) -> None:
    with program(world, [f"127.0.0.1:{HOST_PORT}:{GUEST_PORT}"], "serve_async",
                 str(GUEST_PORT), "3") as run:
        assert run.line()["listening"] == ["127.0.0.1", HOST_PORT]
        for _ in range(3):
            seen, mine, echo = visit(world.host, "127.0.0.1", HOST_PORT, b"async")
            assert seen == mine and echo == b"async"
        assert len(run.line()["peers"]) == 3


def test_splice_mode_is_not_switched(world: World) -> None:
    """``--publish-mode=splice`` dials the namespace's loopback from inside: no host
    listener of the device path to hand over, so the program keeps its own."""
    with program(world, [f"127.0.0.1:{HOST_PORT}:{GUEST_PORT}"], "serve", "4", "0.0.0.0",
                 str(GUEST_PORT), "1", extra=("--publish-mode=splice",)) as run:
        assert run.line()["listening"] == ["0.0.0.0", GUEST_PORT]
        seen, _, echo = visit(world.host, "127.0.0.1", HOST_PORT, b"s")
        assert seen.split()[0] == "127.0.0.1" and echo == b"s"
        run.line()
        assert "handed" not in run.finish()


def test_without_bypass_the_device_path_is_the_control(world: World) -> None:
    with program(world, [f"127.0.0.1:{HOST_PORT}:{GUEST_PORT}"], "serve", "4", "0.0.0.0",
                 str(GUEST_PORT), "1", bypass=False) as run:
        assert run.line()["listening"] == ["0.0.0.0", GUEST_PORT]
        seen, _, echo = visit(world.host, "127.0.0.1", HOST_PORT, b"x")
        assert seen.split()[0] == "10.0.2.2" and echo == b"x"
        run.line()
        assert "handed" not in run.finish()


@pytest.mark.parametrize(("spec", "target"), [
    (f"{HOST_PORT}:{GUEST_PORT}", UP4), (f"[::]:{HOST_PORT}:{GUEST_PORT}", UP6)],
    ids=["ipv4", "ipv6"])
def test_32_mib_both_ways_checked(world: World, spec: str, target: str) -> None:
    payload = os.urandom(32 << 20)
    family = "6" if ":" in target else "4"
    with program(world, [spec], "serve", family, "::" if family == "6" else "0.0.0.0",
                 str(GUEST_PORT), "1") as run:
        run.line()

        def transfer() -> tuple[str, str]:
            sock = socket.create_connection((target, HOST_PORT), timeout=30)
            sock.recv(100)  # the address line (short: the program sends it first)
            received = hashlib.sha256()
            total = 0

            def read() -> None:
                nonlocal total
                while total < len(payload):
                    chunk = sock.recv(1 << 20)
                    if not chunk:
                        return
                    received.update(chunk)
                    total += len(chunk)

            reader = threading.Thread(target=read)
            reader.start()
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            reader.join(timeout=120)
            sock.close()
            return received.hexdigest(), str(total)

        digest, total = in_netns(world.outside, transfer)  # type: ignore[misc]
        run.line()
    assert int(total) == len(payload) and digest == hashlib.sha256(payload).hexdigest()


def test_clients_queued_between_bind_and_listen_reach_the_program(world: World) -> None:
    """The program binds, waits, then listens: clients that came meanwhile wait in the
    publication's queue (nsbridge holds off accepting) and the program gets them all."""
    with program(world, [f"{HOST_PORT}:{GUEST_PORT}"], "serve", "4", "0.0.0.0",
                 str(GUEST_PORT), "5", "wait=1.5") as run:
        assert "bound" in run.line()
        results: list[tuple[str, str, bytes]] = []
        threads = [threading.Thread(target=lambda: results.append(
            visit(world.outside, UP4, HOST_PORT, b"q"))) for _ in range(5)]
        for thread in threads:
            thread.start()
        assert run.line()["listening"][1] == HOST_PORT
        for thread in threads:
            thread.join(timeout=30)
        run.line()
    assert len(results) == 5 and all(seen == mine for seen, mine, _ in results)


def test_many_clients_leave_no_fds_behind(world: World) -> None:
    """200 clients at once, then 1,000 one after another: every one served with its own
    address; the fd counts of the program and of nsbridge are what they were."""
    with program(world, [f"{HOST_PORT}:{GUEST_PORT}"], "serve", "4", "0.0.0.0",
                 str(GUEST_PORT), "1200", "hold=1") as run:
        run.line()
        time.sleep(0.5)
        nsbridge_before = settled_fds(run.pid)

        def burst() -> list[bool]:
            socks = [socket.create_connection((UP4, HOST_PORT), timeout=30)
                     for _ in range(200)]
            ok = []
            for sock in socks:
                line = sock.recv(100).decode().strip()
                ok.append(line == "{} {}".format(*sock.getsockname()[:2]))
                sock.close()
            for _ in range(1000):
                with socket.create_connection((UP4, HOST_PORT), timeout=30) as sock:
                    line = sock.recv(100).decode().strip()
                    ok.append(line == "{} {}".format(*sock.getsockname()[:2]))
            return ok

        ok = in_netns(world.outside, burst)
        result = run.line()
        nsbridge_after = settled_fds(run.pid)
        run.tell("done")
    assert ok.count(True) == 1200  # type: ignore[union-attr]
    assert result["fds_after"] == result["fds_before"]
    assert nsbridge_after == nsbridge_before


def test_restarted_listener_and_the_port_between(world: World) -> None:
    """The program closes its listener: clients are refused or reset, never left hanging,
    and nsbridge serves the port the old way again; the program listens again and gets
    it back."""
    with program(world, [f"{HOST_PORT}:{GUEST_PORT}"], "restart", str(GUEST_PORT)) as run:
        run.line()
        first, mine, _ = visit(world.outside, UP4, HOST_PORT)
        assert first == mine
        assert run.line() == {"closed": True}

        def knock() -> str:
            try:
                with socket.create_connection((UP4, HOST_PORT), timeout=10) as sock:
                    sock.settimeout(10)
                    return "eof" if sock.recv(100) == b"" else "data"
            except ConnectionError as exc:
                return type(exc).__name__
            except TimeoutError:
                return "hung"

        before_check = in_netns(world.outside, knock)
        time.sleep(1.5)  # the hand-over check runs: nsbridge listens again
        after_check = in_netns(world.outside, knock)
        run.tell("go")
        assert run.line()["listening"][1] == HOST_PORT
        second, mine, _ = visit(world.outside, UP4, HOST_PORT)
        assert second == mine
        run.line()
        log = run.finish()
    assert before_check in ("ConnectionRefusedError", "ConnectionResetError", "eof")
    assert after_check in ("ConnectionResetError", "eof")  # the device path: nobody inside
    assert "the program's listener is gone; served through the device again" in log
    assert log.count("listener handed to the program") == 2


def test_two_publications_reaching_one_listener_are_not_switched(world: World) -> None:
    """A dual-stack listener reached by an IPv4 and an IPv6 publication of the same port:
    one fd cannot be two host sockets, so both stay on the device path."""
    with program(world, [f"{HOST_PORT}:{GUEST_PORT}", f"[::]:{HOST_PORT}:{GUEST_PORT}"],
                 "serve", "dual", "::", str(GUEST_PORT), "2") as run:
        assert run.line()["listening"] == ["::", GUEST_PORT]
        assert visit(world.outside, UP4, HOST_PORT)[0].split()[0] == OUT4
        assert visit(world.outside, UP6, HOST_PORT)[0].split()[0] == OUT6
        run.line()


@pytest.mark.skipif(not shutil.which("curl") or not shutil.which("iperf3"),
                    reason="curl and iperf3 are needed")
def test_curl_and_iperf3(world: World, tmp_path) -> None:
    (tmp_path / "page.txt").write_text("published page\n")
    script = (f"{sys.executable} -m http.server --bind 0.0.0.0 {GUEST_PORT} "
              f"-d {tmp_path} & iperf3 -s -1 -p {OTHER_PORT}; kill $!")
    with program(world, [f"127.0.0.1:{HOST_PORT}:{GUEST_PORT}",
                         f"{HOST_PORT + 1}:{OTHER_PORT}"], "",
                 command=["sh", "-c", script]) as run:
        page = in_netns(world.host, lambda: subprocess.run(
            ["curl", "-s", "--retry", "10", "--retry-connrefused", "--retry-delay", "1",
             "--retry-all-errors", f"http://127.0.0.1:{HOST_PORT}/page.txt"],
            capture_output=True, text=True, timeout=60).stdout)
        iperf = in_netns(world.outside, lambda: subprocess.run(
            ["sh", "-c", f"for i in 1 2 3 4 5 6 7 8 9 10; do iperf3 -c {UP4} -p "
             f"{HOST_PORT + 1} -t 1 -J && break; sleep 1; done"],
            capture_output=True, text=True, timeout=90).stdout)
        log = run.finish(timeout=60)
    assert page == "published page\n"
    assert "127.0.0.1 - - [" in log  # http.server's log: the client's real address
    assert "bits_per_second" in iperf  # type: ignore[operator]
    assert log.count("listener handed to the program") >= 2


def test_doors_around_bind_switching(world: World) -> None:
    with program(world, [f"{HOST_PORT}:{GUEST_PORT}"], "doors", str(GUEST_PORT),
                 str(OTHER_PORT), OUT4, str(ECHO_PORT), str(HOST_PORT)) as run:
        result = run.line()
        log = run.finish()
    assert result == {
        "listener": ["0.0.0.0", HOST_PORT],
        "listener_connect": "EOPNOTSUPP", "listener_unspec": "EOPNOTSUPP",
        "listener_bind": "EINVAL", "listener_listen_again": "ok",
        "second_bind": "EADDRINUSE", "second_bind_reuseport": "EADDRINUSE",
        "second_bind_own_address": "EADDRINUSE", "second_bind_loopback": "EADDRINUSE",
        "second_bind_dual": "EADDRINUSE",
        "ipv6_only": ["::", GUEST_PORT],
        "after_close": HOST_PORT,
        "loopback": ["127.0.0.1", GUEST_PORT], "other_port": ["0.0.0.0", OTHER_PORT],
        "bound_to_device": ["0.0.0.0", GUEST_PORT], "udp": GUEST_PORT,
        "other_namespace": str(GUEST_PORT),
        "bind_then_connect": [UP4, True, UP4],
        "switched_bind": "EINVAL", "unspec": "ok", "unspec_bind": "EINVAL",
        "unspec_bind_published": "EINVAL", "unspec_listen": "EOPNOTSUPP",
    }, log
    assert "published port in use" in log and "bind on a host socket" in log


def test_thread_rewriting_the_sockaddr_during_bind(world: World) -> None:
    """Each listener is switched exactly when the bind the kernel made was the published
    port (never a switched listener for the other port, never a published-port
    listener left in the namespace)."""
    with program(world, [f"{HOST_PORT}:{GUEST_PORT}"], "race", str(GUEST_PORT),
                 str(OTHER_PORT), "200") as run:
        seen = run.line()
    assert set(seen) <= {f"{GUEST_PORT}->{HOST_PORT}", f"{OTHER_PORT}->{OTHER_PORT}"}, seen
    assert sum(seen.values()) == 200 and len(seen) == 2, seen


def test_listener_passed_to_a_child(world: World) -> None:
    with program(world, [f"{HOST_PORT}:{GUEST_PORT}"], "hand_to_child",
                 str(GUEST_PORT)) as run:
        run.line()
        seen, mine, _ = visit(world.outside, UP4, HOST_PORT)
        result = run.line()
    assert seen == mine
    assert result["child"] == {"connect": "EOPNOTSUPP", "bind": "EINVAL", "peer": OUT4}, result


def test_low_port_needs_the_programs_own_capability(world: World) -> None:
    with program(world, [], "low_port", "81") as run:
        result = run.line()
    assert result == {"with_cap": "ok", "without_cap": "EACCES",
                      "high_port_without_cap": "ok"}


def test_unix_bind_and_connect_stay_in_the_programs_view(world: World, tmp_path) -> None:
    """A symlink ``esc -> DIR`` inside the program's tmpfs over DIR: followed through
    ``/proc/PID/root`` in nsbridge's view it would lead to the host's DIR (where a host
    socket listens).  Bind and connect stay in the program's view."""
    directory = tmp_path / "u"
    directory.mkdir()
    host_server = socket.socket(socket.AF_UNIX)
    host_server.bind(str(directory / "host.sock"))
    host_server.listen(1)
    try:
        with program(world, [], "unix_escape", str(directory)) as run:
            result = run.line()
    finally:
        host_server.close()
    assert result == {"bind": "ok", "bound_here": True, "connect_host_socket": "ENOENT",
                      "bind_relative": "ok", "relative_here": True}
    assert sorted(os.listdir(directory)) == ["host.sock"]


def test_bad_bind_arguments_get_the_kernels_errors(world: World) -> None:
    answers = []
    for bypass in (True, False):
        with program(world, [], "bad_binds", bypass=bypass) as run:
            answers.append(run.line())
    assert answers[0] == answers[1]
    assert answers[0]["bad_pointer"] == "EFAULT" and answers[0]["ok"] == "0"


@pytest.mark.skipif(not os.stat("/dev/net/tun").st_mode & 0o006 if os.path.exists(
    "/dev/net/tun") else True, reason="/dev/net/tun is not open to other users here "
    "(mode 0600 by default): uid 65534 could not make the namespace's device")
def test_hand_over_and_back_unprivileged(world: World) -> None:
    """As uid 65534 (no capabilities on the host; /dev/net/tun must be mode 0666, as on
    this machine, else skipped): the hand-over (ADDFD of nsbridge's listener), the
    namespace check (SIOCGSKNS on the program's socket), the listener list
    (sock_diag) that notices the program closed it, and the second hand-over."""
    from helpers.unprivileged import as_nobody, unprivileged_checkout

    with unprivileged_checkout() as (tree, python, env):
        probe = str(tree / "tests" / "helpers" / "publish_probe.py")
        argv = ["ip", "netns", "exec", world.host, *as_nobody(
            *python, "-m", "nsbridge", "run", "-v", "--bypass", "--dns", OUT4, "-p",
            f"{HOST_PORT}:{GUEST_PORT}", "--", *python, probe, "restart", str(GUEST_PORT))]
        process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, cwd=tree, env=env)
        with Program(process) as run:
            assert run.line()["listening"][1] == HOST_PORT
            first, mine, _ = visit(world.outside, UP4, HOST_PORT)
            assert first == mine
            assert run.line() == {"closed": True}
            time.sleep(1.5)
            run.tell("go")
            assert run.line()["listening"][1] == HOST_PORT
            second, mine, _ = visit(world.outside, UP4, HOST_PORT)
            assert second == mine
            run.line()
            log = run.finish()
    assert process.returncode == 0, log
    assert "served through the device again" in log
    assert log.count("listener handed to the program") == 2
