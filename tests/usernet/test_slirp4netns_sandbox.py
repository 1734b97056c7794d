"""``nsbridge-slirp4netns --enable-sandbox --enable-seccomp`` end to end, in namespaces of
the test's own (the unprivileged PID mode under rootlesskit is in test_rootlesskit.py,
whose every case runs with both flags).

* Locked down once ready: getpcaps shows CAP_NET_BIND_SERVICE alone, the bounding set
  holds nothing else, ``Seccomp: 2`` with no_new_privs, and the process's root holds
  ``/etc`` and ``/run`` only, every mount read-only.
* Every serving path still works afterwards: TCP to the host's address and (through
  10.0.2.2) its loopback, IPv6 TCP (on the kernel fast path, whose set-up helper was
  forked before the lock-down), UDP, ping, DNS through 10.0.2.3, the API socket's
  add/list/remove_hostfwd for TCP and UDP with clients through the published ports, the
  exit fd, SIGTERM, PID mode ending with its target; nothing in the helper's log says a
  module could not be loaded.
* podman's call from inside the namespace's owning user namespace; ``--enable-seccomp``
  alone (the file system and capabilities stay); a lock-down that fails exits 1 with
  one line and no ready byte.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from helpers.environment import REPO
from helpers.netns import connect_in, free_port, in_netns, listen_in, podman_style_namespace
from helpers.processes import processes_mentioning
from helpers.servers import DNS_ADDRESS, DNS_NAME, dns_answer, recv_all, udp_roundtrip
from helpers.usernet_host import HOST_V4, HOST_V6
from helpers.waiting import wait_until

OURS = [sys.executable, "-m", "nsbridge.cli.slirp4netns"]
LOCKED = ["--enable-sandbox", "--enable-seccomp"]
CAP_NET_BIND_SERVICE = 1 << 10

pytestmark = pytest.mark.skipif(shutil.which("getpcaps") is None,
                                reason="getpcaps (libcap2-bin) needed")


class Running:
    """One nsbridge-slirp4netns with a ready pipe and an exit pipe."""

    def __init__(self, argv: list[str]) -> None:
        self.ready_r, ready_w = os.pipe()
        exit_r, self.exit_w = os.pipe()
        self.proc = subprocess.Popen(
            [*argv[:-2], "-r", str(ready_w), "-e", str(exit_r), *argv[-2:]],
            pass_fds=(ready_w, exit_r), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, cwd=REPO)
        os.close(ready_w)
        os.close(exit_r)

    @property
    def pid(self) -> int:
        """The serving process: ours is exec'd by ``ip netns exec`` (same pid)."""
        return self.proc.pid

    def ready(self) -> bytes:
        data = b""
        while chunk := os.read(self.ready_r, 16):
            data += chunk
        return data

    def close_exit_fd(self) -> None:
        if self.exit_w >= 0:
            os.close(self.exit_w)
            self.exit_w = -1

    def finish(self, timeout: float = 10) -> tuple[int, str]:
        _out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, err

    def end(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()
        self.close_exit_fd()
        os.close(self.ready_r)


@pytest.fixture
def started() -> Iterator[Callable[[list[str]], Running]]:
    running: list[Running] = []

    def start(argv: list[str]) -> Running:
        helper = Running(argv)
        running.append(helper)
        return helper

    try:
        yield start
    finally:
        for helper in running:
            helper.end()


@pytest.fixture
def host_resolver(host: str, udp_server: Callable[..., object]) -> Iterator[None]:
    """A DNS server on the host namespace's address, named in the resolv.conf that
    ``ip netns exec HOST`` binds over /etc/resolv.conf (so the sandboxed helper reads
    it from the /etc it keeps)."""
    udp_server(host, dns_answer, host=HOST_V4, port=53)
    directory = Path("/etc/netns") / host
    directory.mkdir(parents=True)
    try:
        (directory / "resolv.conf").write_text(f"nameserver {HOST_V4}\n")
        yield
    finally:
        shutil.rmtree(directory)


def in_host(host: str, *args: str) -> list[str]:
    return ["ip", "netns", "exec", host, *OURS, *args]


def status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def assert_locked_down(pid: int) -> None:
    """Capabilities, filter and file system of a sandboxed, filtered helper."""
    caps = subprocess.run(["getpcaps", str(pid)], capture_output=True, text=True,
                          check=True).stdout
    assert caps.strip() == f"{pid}: cap_net_bind_service=eip", caps
    fields = status(pid)
    for name in ("CapEff", "CapPrm", "CapInh", "CapBnd"):
        assert int(fields[name], 16) == CAP_NET_BIND_SERVICE, (name, fields[name])
    assert int(fields["CapAmb"], 16) == 0
    assert fields["Seccomp"].strip() == "2" and fields["NoNewPrivs"].strip() == "1"
    assert int(fields["Seccomp_filters"]) >= 1
    assert sorted(os.listdir(f"/proc/{pid}/root")) == ["etc", "run"]
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        mount_point, options = line.split()[4], line.split()[5].split(",")
        assert mount_point == "/" or re.match(r"^/(etc|run)(/|$)", mount_point), line
        assert "ro" in options, line


def assert_clean_log(err: str) -> None:
    """Nothing the helper logged says a path broke under the lock-down."""
    for sign in ("Traceback", "No module named", "ModuleNotFoundError", "ImportError",
                 "imported after the sandbox", "Operation not permitted",
                 "Read-only file system"):
        assert sign not in err, err


def fast_path_syns(netns: str) -> int | None:
    """The SYNs the fast path's output rule redirected in ``netns`` (None: no table)."""
    listing = subprocess.run(["ip", "netns", "exec", netns, "nft", "list", "chain", "inet",
                              "nsbridge", "output"], capture_output=True, text=True)
    found = re.search(r"counter packets (\d+)", listing.stdout)
    return int(found.group(1)) if listing.returncode == 0 and found else None


def api(path: Path, request: dict) -> dict:
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(10)
        client.connect(str(path))
        client.sendall(json.dumps(request).encode())
        client.shutdown(socket.SHUT_WR)
        return json.loads(recv_all(client))


def echo_once(conn: socket.socket) -> None:
    conn.sendall(recv_all(conn))


def tcp_echo(host: str | None, address: tuple, payload: bytes) -> bytes:
    sock = connect_in(host, address)
    with sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return recv_all(sock)


def test_locked_down_and_every_path_works(host: str, netns: str, tmp_path: Path,
                                          stream_server: Callable[..., object],
                                          udp_server: Callable[..., object],
                                          host_resolver: None,
                                          started: Callable[[list[str]], Running]) -> None:
    servers = [stream_server(listen_in(host, address), echo_once)
               for address in (HOST_V4, "127.0.0.1", HOST_V6)]
    udp = udp_server(host, host=HOST_V4)
    sock = tmp_path / "api.sock"
    helper = started(in_host(host, *LOCKED, "-a", str(sock), "-6", "-c",
                             "--netns-type=path", f"/run/netns/{netns}", "tap0"))
    assert helper.ready() == b"1"
    assert_locked_down(helper.pid)
    # The TCP fast path's helper was forked before the lock-down; its redirect follows
    # the ready byte.
    wait_until(lambda: fast_path_syns(netns) is not None, timeout=10,
               what="the helper's nftables table")

    # Out of the namespace: TCP (IPv4, the host's loopback through the gateway, IPv6),
    # UDP, ping, DNS.
    for (address, server) in zip((HOST_V4, "10.0.2.2", HOST_V6), servers, strict=True):
        assert tcp_echo(netns, (address, server.port), b"tcp " + address.encode()) == \
            b"tcp " + address.encode()
    assert fast_path_syns(netns) == 3  # every SYN took the kernel fast path
    assert in_netns(netns, lambda: udp_roundtrip((HOST_V4, udp.port), b"udp")) == b"udp"
    ping = subprocess.run(["ip", "netns", "exec", netns, "ping", "-c", "1", "-W", "5",
                           HOST_V4], capture_output=True, text=True)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    dig = subprocess.run(["ip", "netns", "exec", netns, "dig", "+short", "+time=2",
                          "+tries=3", "@10.0.2.3", DNS_NAME, "A"], capture_output=True,
                         text=True, timeout=30)
    assert dig.stdout.strip() == DNS_ADDRESS, dig.stdout + dig.stderr

    # In through the API socket: ports published, used, listed and removed at run time.
    inner = stream_server(listen_in(netns, "0.0.0.0"), echo_once)
    inner_udp = udp_server(netns, host="0.0.0.0")
    tcp_port, udp_port = free_port(host), free_port(host, socket.SOCK_DGRAM)
    added = api(sock, {"execute": "add_hostfwd", "arguments": {
        "proto": "tcp", "host_addr": "127.0.0.1", "host_port": tcp_port,
        "guest_port": inner.port}})
    assert added == {"return": {"id": 1}}
    assert api(sock, {"execute": "add_hostfwd", "arguments": {
        "proto": "udp", "host_addr": "127.0.0.1", "host_port": udp_port,
        "guest_port": inner_udp.port}}) == {"return": {"id": 2}}
    assert tcp_echo(host, ("127.0.0.1", tcp_port), b"published") == b"published"
    assert in_netns(host, lambda: udp_roundtrip(("127.0.0.1", udp_port), b"dgram")) == \
        b"dgram"
    listed = api(sock, {"execute": "list_hostfwd"})
    assert [entry["id"] for entry in listed["entries"]] == [1, 2]
    assert api(sock, {"execute": "remove_hostfwd", "arguments": {"id": 1}}) == {"return": {}}
    with pytest.raises(ConnectionRefusedError):
        connect_in(host, ("127.0.0.1", tcp_port))
    # A port in use is refused with slirp4netns's text, not with a crash.
    busy = api(sock, {"execute": "add_hostfwd", "arguments": {
        "proto": "udp", "host_addr": "127.0.0.1", "host_port": udp_port,
        "guest_port": 9}})
    assert busy == {"error": {"desc": "bad request: add_hostfwd: slirp_add_hostfwd failed"}}

    assert_locked_down(helper.pid)  # still, after every path ran
    helper.close_exit_fd()
    code, err = helper.finish()
    assert code == 0, err
    assert_clean_log(err)


def test_sigterm_and_pid_mode(host: str, netns: str,
                              started: Callable[[list[str]], Running]) -> None:
    """PID mode (the mode rootlesskit uses) ends when its target exits, SIGTERM with 0."""
    target = subprocess.Popen(["ip", "netns", "exec", netns, "sleep", "60"])
    try:
        helper = started(in_host(host, *LOCKED, "-c", str(target.pid), "tap0"))
        assert helper.ready() == b"1"
        assert_locked_down(helper.pid)
        target.kill()
        target.wait()
        code, err = helper.finish()
        assert code == 0, err
        assert_clean_log(err)
    finally:
        if target.poll() is None:
            target.kill()
            target.wait()
    helper = started(in_host(host, *LOCKED, "-c", "--netns-type=path",
                             f"/run/netns/{netns}", "tap0"))
    assert helper.ready() == b"1"
    helper.proc.send_signal(signal.SIGTERM)
    code, err = helper.finish()
    assert code == 0, err
    assert_clean_log(err)


def test_seccomp_alone_keeps_files_and_capabilities(
        host: str, netns: str, stream_server: Callable[..., object],
        started: Callable[[list[str]], Running]) -> None:
    server = stream_server(listen_in(host, HOST_V4), echo_once)
    helper = started(in_host(host, "--enable-seccomp", "-c", "--netns-type=path",
                             f"/run/netns/{netns}", "tap0"))
    assert helper.ready() == b"1"
    fields = status(helper.pid)
    assert fields["Seccomp"].strip() == "2"
    assert int(fields["CapEff"], 16) != CAP_NET_BIND_SERVICE  # root's, untouched
    assert "usr" in os.listdir(f"/proc/{helper.pid}/root")
    assert tcp_echo(netns, (HOST_V4, server.port), b"x") == b"x"
    helper.close_exit_fd()
    code, err = helper.finish()
    assert code == 0, err
    assert_clean_log(err)


@pytest.mark.skipif(shutil.which("nsenter") is None, reason="util-linux nsenter needed")
def test_podman_call_from_inside_the_owning_user_namespace(
        host: str, tmp_path: Path, started: Callable[[list[str]], Running]) -> None:
    """podman runs us inside the namespace's user namespace already: no namespace is
    joined, and the capabilities dropped are those of that namespace."""
    mount = tmp_path / "netns"
    with podman_style_namespace(host, mount) as (_holder, userns):
        helper = started(["nsenter", f"--user={userns}", "--preserve-credentials", "--",
                          *OURS, *LOCKED, "-c", "-6", "--netns-type=path", str(mount),
                          "tap0"])
        assert helper.ready() == b"1"
        assert os.readlink(f"/proc/{helper.pid}/ns/user") == os.readlink(userns)
        assert_locked_down(helper.pid)
        helper.close_exit_fd()
        code, err = helper.finish()
        assert code == 0, err
        assert_clean_log(err)


def test_a_failed_lock_down_exits_1_before_ready(
        host: str, netns: str, started: Callable[[list[str]], Running]) -> None:
    """Without CAP_SETPCAP the capabilities cannot be dropped: the caller gets EOF on
    the ready fd and one line, and the namespace loses the device we made; no helper
    of ours stays."""
    argv = in_host(host, *LOCKED, "-c", "--netns-type=path", f"/run/netns/{netns}", "tap0")
    at = argv.index(sys.executable)
    argv[at:at] = ["setpriv", "--bounding-set=-setpcap", "--"]
    helper = started(argv)
    assert helper.ready() == b""
    code, err = helper.finish()
    assert code == 1
    last = err.strip().splitlines()[-1]
    assert "--enable-sandbox: cannot drop capabilities" in last, err
    assert err.count("--enable-sandbox") == 1, err
    wait_until(lambda: "tap0" not in subprocess.run(
        ["ip", "-n", netns, "-br", "link"], capture_output=True, text=True).stdout,
        timeout=5)
    # The fast path's helper, forked just before the lock-down, went too.
    wait_until(lambda: not processes_mentioning(netns), timeout=5)


PIVOT = r"""
import errno, json, os, sys
from nsbridge.linux import lockdown
keep = sys.argv[1:]
lockdown.pivot_to_empty_root(keep)
out = {"root": sorted(os.listdir("/")), "file": open(keep[2]).read(),
       "cwd": os.getcwd()}
for path in ("/etc/nsbridge-test-write", keep[2], "/run/x", "/x"):
    try:
        open(path, "w").close()
        out[path] = "written"
    except OSError as exc:
        out[path] = errno.errorcode[exc.errno]
print(json.dumps(out))
"""


def test_pivot_keeps_only_what_it_is_told_read_only(tmp_path: Path) -> None:
    """The lock-down's file system step on its own (in a child: it changes the
    caller's mounts for good): a file kept from under /tmp (where the new root is
    built) is still the caller's file, and nothing anywhere can be written."""
    kept = tmp_path / "daemon" / "resolv.conf"
    kept.parent.mkdir()
    kept.write_text("nameserver 192.0.2.1\n")
    result = subprocess.run([sys.executable, "-c", PIVOT, "/etc", "/run", str(kept),
                             "/nonexistent-nsbridge-test"], capture_output=True, text=True,
                            timeout=30, cwd=REPO)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["root"] == ["etc", "run", "tmp"] and out["cwd"] == "/"
    assert out["file"] == "nameserver 192.0.2.1\n"
    assert out["/etc/nsbridge-test-write"] == "EROFS" and out[str(kept)] == "EROFS"
    assert out["/run/x"] == "EROFS" and out["/x"] == "EROFS"
    assert not Path("/etc/nsbridge-test-write").exists()


@pytest.mark.parametrize("locked", [True, False], ids=["locked", "control"])
def test_unprivileged_pid_mode_still_dies_with_its_parent(host: str, locked: bool) -> None:
    """rootlesskit's way, by hand: an unprivileged helper in PID mode whose parent gave
    it PR_SET_PDEATHSIG=SIGKILL. Locked down, it has joined the namespace's user
    namespace, and SIGKILL to the parent still ends it while its target lives on (the
    control shows the same without the flags)."""
    from helpers.rootlesskit import tun_open_to_users
    from helpers.unprivileged import as_nobody, system_python

    target = subprocess.Popen(as_nobody("unshare", "-Ur", "--net", "sleep", "60"))
    parent = None
    try:
        wait_until(lambda: os.readlink(f"/proc/{target.pid}/ns/net") !=
                   os.readlink("/proc/self/ns/net"), timeout=5)
        sleeper = int(subprocess.run(["pgrep", "-P", str(target.pid)], capture_output=True,
                                     text=True).stdout.split()[0]) \
            if os.readlink(f"/proc/{target.pid}/exe").endswith("unshare") else target.pid
        flags = LOCKED if locked else []
        command = as_nobody("--pdeathsig=KILL", system_python(), "-m",
                            "nsbridge.cli.slirp4netns", *flags, "-c", str(sleeper), "tap0")
        ready_r, ready_w = os.pipe()
        with tun_open_to_users():
            # bash is the parent the helper watches; its SIGKILL is what is tested.
            parent = subprocess.Popen(
                ["ip", "netns", "exec", host, "bash", "-c", f'"$@" & exec {ready_w}>&-; wait',
                 "sh",
                 *command[:-2], "-r", str(ready_w), *command[-2:]],
                pass_fds=(ready_w,), cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            os.close(ready_w)
            with os.fdopen(ready_r, "rb") as ready:
                assert ready.read() == b"1", parent.stderr.read() if parent.stderr else ""
        helper = int(subprocess.run(["pgrep", "-P", str(parent.pid)], capture_output=True,
                                    text=True).stdout.split()[0])
        if locked:
            assert_locked_down(helper)
            assert os.readlink(f"/proc/{helper}/ns/user") == \
                os.readlink(f"/proc/{sleeper}/ns/user")
        parent.kill()
        parent.wait()
        wait_until(lambda: not os.path.exists(f"/proc/{helper}") or
                   Path(f"/proc/{helper}/stat").read_text().split(")")[1].split()[0] == "Z",
                   timeout=5)
        assert target.poll() is None  # the target lives: the parent's death ended it
    finally:
        if parent is not None and parent.poll() is None:
            parent.kill()
            parent.wait()
        target.kill()
        target.wait()


def test_locked_down_with_outbound_addresses(host: str, netns: str,
                                             stream_server: Callable[..., object],
                                             started: Callable[[list[str]], Running]) -> None:
    """--outbound-addr(6) (podman passes them from containers.conf, an interface name
    too) are resolved before the lock-down, and connections bound to them still work
    after it (which source a bind picks is test_outbound_addr.py's subject: here the
    host namespace has one address per family)."""
    servers = [stream_server(listen_in(host, address), echo_once)
               for address in (HOST_V4, HOST_V6)]
    helper = started(in_host(host, *LOCKED, f"--outbound-addr={HOST_V4}",
                             "--outbound-addr6=d0", "-6", "-c", "--netns-type=path",
                             f"/run/netns/{netns}", "tap0"))
    assert helper.ready() == b"1"
    assert_locked_down(helper.pid)
    for address, server in zip((HOST_V4, HOST_V6), servers, strict=True):
        assert tcp_echo(netns, (address, server.port), b"bound") == b"bound"
        assert server.accepted[-1][0] == address
    helper.close_exit_fd()
    code, err = helper.finish()
    assert code == 0, err
    assert_clean_log(err)
