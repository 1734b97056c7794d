"""nsbridge-slirp4netns end to end: its command line against the real slirp4netns, and the
life cycle container runtimes rely on, in namespaces of the test's own.

* The same bad command lines go to ``/usr/bin/slirp4netns`` and to ours: same exit code,
  same error lines on stderr (only command lines that fail before slirp4netns forks).
* Ready and exit fds: "1" then EOF only once the TAP device is configured; EOF without a
  byte and exit 1 on failure; any event on the exit fd ends us with 0.
* ``--netns-type=path`` on a namespace nobody lives in (``ip netns add``), PID mode, and a
  podman-style call from inside the namespace's owning user namespace.
* SIGTERM ends it with 0; SIGKILL leaves no process of ours behind.
* Bad input: no such PID, not a namespace file, TAP missing without ``-c``, MTU out of
  range, ready fd not open.
* The API socket answers once ready; TCP through the TAP to the host's address, and to
  its loopback through 10.0.2.2 unless ``--disable-host-loopback``.

nsbridge-slirp4netns runs in a "host" namespace of the test's own (``ip netns exec``), so
whatever it dials stays inside what the test made.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.environment import REPO
from helpers.netns import ip, podman_style_namespace
from helpers.processes import processes_mentioning
from helpers.waiting import wait_until

REAL = "/usr/bin/slirp4netns"
OURS = [sys.executable, "-m", "nsbridge.cli.slirp4netns"]


def ours(*args: str, host: str | None = None) -> list[str]:
    prefix = ["ip", "netns", "exec", host] if host else []
    return [*prefix, *OURS, *args]


# ---- the command line against the real slirp4netns --------------------------------------

BAD_COMMAND_LINES = [
    ["--foo"], ["-x"], ["--mtu"], ["-r"], ["--configure=1"], ["--dis", "1", "t"],
    ["--e"], ["-m", "0", "1", "t"], ["-m", "65522", "1", "t"], ["--mtu=abc", "1", "t"],
    ["-e", "-1", "1", "t"], ["-r", "x", "1", "t"], ["abc", "t"], ["0", "t"], ["1"], [],
    ["-c6r3"], ["--macaddress=02:00:00:00:00:01", "1", "t"],
    ["--target-type=foo", "1", "t"], ["--userns-path=/nonexistent-s3", "1", "t"],
    ["--netns-type=path", "/nonexistent-s3", "t"], ["--cidr=foo", "1", "t"],
    ["--cidr=300.0.2.0/24", "1", "t"], ["--cidr=10.0.2.0/26", "1", "t"],
    ["--cidr=10.0.2.1/24", "1", "t"], ["-c", "--macaddress=zz", "1", "t"],
    ["--no-host-loopback", "1"],
    ["--outbound-addr"], ["--outbound-addr6=eth0", "1"], ["--outbound-a=lo", "1", "t"],
]


def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=REPO,
                          **kwargs)


@pytest.mark.skipif(not os.path.exists(REAL), reason="the real slirp4netns is not installed")
@pytest.mark.parametrize("argv", BAD_COMMAND_LINES, ids=" ".join)
def test_bad_command_line_like_slirp4netns(argv: list[str]) -> None:
    """Same exit code, same stderr lines (the program name aside), and the usage's first
    line on stdout where slirp4netns prints it."""
    real = run(["slirp4netns", *argv], executable=REAL)
    mine = run([*OURS, *argv])
    assert (mine.returncode, real.returncode) == (1, 1)

    def lines(text: str, prog: str) -> list[str]:
        # slirp4netns's "... is experimental" warnings are the one thing left out.
        return [line for line in text.replace(prog, "PROG").splitlines()
                if not line.endswith("experimental")]

    # Ours runs as `python -m`, so its argv[0] is the module's path.
    ours_prog = str(REPO / "nsbridge" / "cli" / "slirp4netns.py")
    assert lines(mine.stderr, ours_prog) == lines(real.stderr, "slirp4netns")
    assert lines(mine.stdout, ours_prog)[:1] == lines(real.stdout, "slirp4netns")[:1]


@pytest.mark.skipif(not os.path.exists(REAL), reason="the real slirp4netns is not installed")
def test_help_and_version_like_slirp4netns() -> None:
    real, mine = run([REAL, "--help"]), run([*OURS, "--help"])
    assert (real.returncode, mine.returncode) == (0, 0)
    listed = set(re.findall(r"--[a-z0-9-]+", mine.stdout))
    assert listed <= set(re.findall(r"--[a-z0-9-]+", real.stdout))
    assert {"--outbound-addr", "--outbound-addr6", "--enable-sandbox",
            "--enable-seccomp"} <= listed  # built: listed
    real, mine = run([REAL, "-v"]), run([*OURS, "--version"])
    assert (real.returncode, mine.returncode) == (0, 0)
    for output in (real.stdout, mine.stdout):
        assert re.search(r"^slirp4netns version \S+$", output, re.M)
        assert re.search(r"^SLIRP_CONFIG_VERSION_MAX: \d+$", output, re.M)


def test_nsbridge_subcommand() -> None:
    result = run([sys.executable, "-m", "nsbridge", "slirp4netns", "--help"])
    assert result.returncode == 0
    assert result.stdout.startswith("Usage: nsbridge slirp4netns [OPTION]... PID|PATH")


# ---- the life cycle -------------------------------------------------------------------


class Helper:
    """A running nsbridge-slirp4netns with a ready pipe and an exit pipe."""

    def __init__(self, args: list[str], host: str, ready: bool = True,
                 exit_fd: bool = True) -> None:
        self.ready_r, ready_w = os.pipe()
        self.exit_r, self.exit_w = os.pipe()
        fds = []
        extra = []
        if ready:
            extra += ["-r", str(ready_w)]
            fds.append(ready_w)
        if exit_fd:
            extra += ["-e", str(self.exit_r)]
            fds.append(self.exit_r)
        self.proc = subprocess.Popen(ours(*extra, *args, host=host), pass_fds=fds,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, cwd=REPO)
        os.close(ready_w)
        os.close(self.exit_r)

    def wait_ready(self, timeout: float = 20) -> bytes:
        """What the ready pipe carried before EOF ("1" when ready, "" on failure)."""
        os.set_blocking(self.ready_r, True)
        data = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            chunk = os.read(self.ready_r, 16)
            if not chunk:
                return data
            data += chunk
        raise TimeoutError("no EOF on the ready fd")

    def close_exit_fd(self) -> None:
        if self.exit_w >= 0:
            os.close(self.exit_w)
            self.exit_w = -1

    def finish(self, timeout: float = 10) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err

    def end(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for fd in (self.ready_r, self.exit_w):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.exit_w = -1


@pytest.fixture
def helpers() -> Iterator[list[Helper]]:
    started: list[Helper] = []
    try:
        yield started
    finally:
        for helper in started:
            helper.end()


def ip_out(*args: str) -> str:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=True).stdout


def podman_args(path: str) -> list[str]:
    return ["--disable-host-loopback", "--mtu=65520", "--enable-ipv6", "-c",
            "--netns-type=path", path, "tap0"]


def test_podman_style_call_on_a_namespace_nobody_lives_in(host: str, netns: str,
                                                          helpers: list[Helper]) -> None:
    helper = Helper(podman_args(f"/run/netns/{netns}"), host)
    helpers.append(helper)
    assert helper.wait_ready() == b"1"
    # Ready means configured: the device, its addresses, MTU and routes are there.
    addresses = ip_out("-n", netns, "-br", "addr", "show", "tap0")
    assert "10.0.2.100/24" in addresses and "fd00::100/64" in addresses
    assert "tentative" not in ip_out("-n", netns, "addr", "show", "tap0")  # usable at once
    link = ip_out("-n", netns, "-d", "link", "show", "tap0")
    assert "mtu 65520" in link and "tun type tap" in link and ",UP" in link
    assert "default via 10.0.2.2 dev tap0" in ip_out("-n", netns, "route")
    assert "default via fd00::2 dev tap0" in ip_out("-n", netns, "-6", "route")
    assert "state UP" in ip_out("-n", netns, "link", "show", "lo") or \
        "UNKNOWN" in ip_out("-n", netns, "link", "show", "lo")
    helper.close_exit_fd()
    code, out, err = helper.finish()
    assert code == 0, err
    assert "10.0.2.100" in out
    # The device we created ends with us.
    wait_until(lambda: "tap0" not in ip_out("-n", netns, "-br", "link"), timeout=5)


@pytest.mark.parametrize(("ready", "exit_"), [(3, 4), (4, 3)], ids=["podman", "swapped"])
def test_podman_fd_numbers(host: str, netns: str, ready: int, exit_: int) -> None:
    """Podman passes ``-r 3 -e 4`` literally (podman 5 the other way round): fds that sit
    where our own first fds would land if we opened anything before checking them."""
    ready_r, ready_w = os.pipe()
    exit_r, exit_w = os.pipe()
    command = ours("-r", str(ready), "-e", str(exit_), *podman_args(f"/run/netns/{netns}"),
                   host=host)
    shell = (f'exec {ready}>&{ready_w} {exit_}<&{exit_r} {ready_w}>&- {exit_r}<&-; '
             'exec "$0" "$@"')
    proc = subprocess.Popen(["bash", "-c", shell, *command], pass_fds=(ready_w, exit_r),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=REPO)
    os.close(ready_w)
    os.close(exit_r)
    try:
        assert os.read(ready_r, 2) == b"1"
        assert os.read(ready_r, 2) == b""
        assert "10.0.2.100/24" in ip_out("-n", netns, "-br", "addr", "show", "tap0")
        os.close(exit_w)
        exit_w = -1
        assert proc.wait(10) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        os.close(ready_r)
        if exit_w >= 0:
            os.close(exit_w)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


def test_macaddress_and_cidr(host: str, netns: str, helpers: list[Helper]) -> None:
    helper = Helper(["-c", "--macaddress=02:00:00:00:00:42", "--cidr=10.9.0.0/16", "-m",
                     "1500", "--netns-type=path", f"/run/netns/{netns}", "eth7"], host)
    helpers.append(helper)
    assert helper.wait_ready() == b"1"
    link = ip_out("-n", netns, "link", "show", "eth7")
    assert "02:00:00:00:00:42" in link and "mtu 1500" in link
    assert "10.9.0.100/16" in ip_out("-n", netns, "-br", "addr", "show", "eth7")
    assert "default via 10.9.0.2" in ip_out("-n", netns, "route")
    assert "inet6 fd00" not in ip_out("-n", netns, "addr", "show", "eth7")  # no -6
    helper.close_exit_fd()
    assert helper.finish()[0] == 0


def test_without_c_attaches_to_the_callers_tap_and_configures_nothing(
        host: str, netns: str, helpers: list[Helper]) -> None:
    """rootlesskit's way: it makes a persistent tap0 and configures IPv4 itself."""
    ip("-n", netns, "tuntap", "add", "tap0", "mode", "tap")
    helper = Helper(["--netns-type=path", f"/run/netns/{netns}", "tap0"], host)
    helpers.append(helper)
    assert helper.wait_ready() == b"1"
    assert "inet " not in ip_out("-n", netns, "addr", "show", "tap0")
    assert "default" not in ip_out("-n", netns, "route")
    helper.close_exit_fd()
    assert helper.finish()[0] == 0
    assert "tap0" in ip_out("-n", netns, "-br", "link")  # the caller's: still there


def test_tap_missing_without_c(host: str, netns: str, helpers: list[Helper]) -> None:
    helper = Helper(["--netns-type=path", f"/run/netns/{netns}", "tap0"], host)
    helpers.append(helper)
    assert helper.wait_ready() == b""  # EOF without a byte: the caller sees a failure
    code, _out, err = helper.finish()
    assert code == 1
    assert "TAP device tap0 does not exist in the namespace" in err
    assert len(err.strip().splitlines()) == 1
    assert "tap0" not in ip_out("-n", netns, "-br", "link")  # nothing made


def test_pid_mode_ends_with_the_target(host: str, netns: str, helpers: list[Helper]) -> None:
    target = subprocess.Popen(["ip", "netns", "exec", netns, "sleep", "60"])
    try:
        helper = Helper(["-c", str(target.pid), "tap0"], host)
        helpers.append(helper)
        assert helper.wait_ready() == b"1"
        assert "10.0.2.100/24" in ip_out("-n", netns, "-br", "addr", "show", "tap0")
        target.kill()
        target.wait()
        assert helper.finish()[0] == 0
    finally:
        if target.poll() is None:
            target.kill()
            target.wait()


def test_sigterm_ends_cleanly(host: str, netns: str, helpers: list[Helper]) -> None:
    helper = Helper(["-c", "--netns-type=path", f"/run/netns/{netns}", "tap0"], host)
    helpers.append(helper)
    assert helper.wait_ready() == b"1"
    helper.proc.send_signal(signal.SIGTERM)
    assert helper.finish()[0] == 0


def test_sigkill_leaves_nothing_behind(host: str, netns: str, helpers: list[Helper]) -> None:
    """rootlesskit ends slirp4netns with SIGKILL: no process of ours may survive, even one
    caught mid-set-up (the helpers die with their parent)."""
    for delay in (0.0, 0.05, 0.15, None):
        helper = Helper(["-c", "--netns-type=path", f"/run/netns/{netns}", "tap0"], host)
        helpers.append(helper)
        if delay is None:
            assert helper.wait_ready() == b"1"
        else:
            time.sleep(delay)
        helper.proc.kill()
        helper.proc.wait()
        wait_until(lambda: not processes_mentioning(netns), timeout=5)
        wait_until(lambda: "tap0" not in ip_out("-n", netns, "-br", "link"), timeout=5)


HELPER_SCRIPT = """
import sys, time
from nsbridge.linux.netns import Netns
from nsbridge.usernet.inside.helper import _in_helper

def work():
    with open(sys.argv[2], "w") as f:  # the helper's pid, then it hangs
        f.write(str(__import__("os").getpid()))
    time.sleep(60)
    return {}, []

_in_helper(Netns.from_path(sys.argv[1]), None, work, "test", 120, fixed=0, preload=False)
"""


def test_a_namespace_helper_dies_with_its_parent(netns: str, tmp_path: Path) -> None:
    """A helper caught mid-work when its parent gets SIGKILL does not stay behind."""
    pid_file = tmp_path / "helper.pid"
    parent = subprocess.Popen([sys.executable, "-c", HELPER_SCRIPT, f"/run/netns/{netns}",
                               str(pid_file)], cwd=REPO)
    try:
        wait_until(lambda: pid_file.exists() and pid_file.read_text() != "", timeout=10)
        helper = int(pid_file.read_text())
        assert os.path.exists(f"/proc/{helper}")
        parent.kill()
        parent.wait()
        wait_until(lambda: not os.path.exists(f"/proc/{helper}")
                   or "Z" in Path(f"/proc/{helper}/stat").read_text().split()[2], timeout=5)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if pid_file.exists() and pid_file.read_text():  # a failed test ends it here
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.parametrize(("args", "message"), [
    (["999999999", "tap0"], "no process with PID 999999999"),
    (["--netns-type=path", "/etc/hostname", "tap0"], "not a namespace file"),
    (["-m", "1000", "1", "tap0"], "MTU 1000 is not supported"),
    (["--netns-type=path", "/proc/self/ns/user", "tap0"], "not a network namespace"),
    # Bypass attempts through the new paths: our own namespace (a default route through
    # a device only we serve would cut the host off), a TAPNAME that is another kind of
    # device or a path, a user namespace file that is not one.
    (["-c", "--netns-type=path", "/proc/self/ns/net", "tap0"], "nsbridge's own network"),
    (["-c", "--netns-type=path", "{ns}", "lo"], "exists and is not a TAP device"),
    (["--netns-type=path", "{ns}", "lo"], "exists and is not a TAP device"),
    (["-c", "--netns-type=path", "{ns}", "../tap0"], "bad interface name"),
    (["-c", "--netns-type=path", "{ns}", "a" * 16], "bad interface name"),
    (["--userns-path={ns}", "-c", "--netns-type=path", "{ns}", "tap0"],
     "is not a user namespace file"),
])
def test_bad_input_one_line(host: str, netns: str, args: list[str], message: str,
                            helpers: list[Helper]) -> None:
    before = ip_out("-n", netns, "-br", "link")
    helper = Helper([arg.replace("{ns}", f"/run/netns/{netns}") for arg in args], host)
    helpers.append(helper)
    assert helper.wait_ready() == b""
    code, _out, err = helper.finish()
    assert code == 1
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert ip_out("-n", netns, "-br", "link") == before  # nothing made or changed


def test_ready_fd_not_open(host: str, netns: str) -> None:
    """An fd the caller did not pass is refused before we open anything of ours."""
    result = run(ours("-r", "97", "-c", "--netns-type=path", f"/run/netns/{netns}", "tap0",
                      host=host))
    assert result.returncode == 1
    assert "file descriptor 97" in result.stderr and "not open" in result.stderr
    assert "tap0" not in ip_out("-n", netns, "-br", "link")


def test_api_socket_is_in_place_when_ready(host: str, netns: str, tmp_path: Path,
                                           helpers: list[Helper]) -> None:
    """-a: the socket answers as soon as the ready byte is written (rootlesskit sends its
    first add_hostfwd right then), and is removed at the end."""
    import socket as socket_module

    path = tmp_path / "api.sock"
    helper = Helper(["-a", str(path), "-c", "--netns-type=path", f"/run/netns/{netns}",
                     "tap0"], host)
    helpers.append(helper)
    assert helper.wait_ready() == b"1"
    with socket_module.socket(socket_module.AF_UNIX) as client:
        client.connect(str(path))
        client.sendall(b'{"execute":"list_hostfwd"}')
        client.shutdown(socket_module.SHUT_WR)
        assert client.recv(4096) == b'{"entries":[]}'
    helper.close_exit_fd()
    assert helper.finish()[0] == 0
    assert not path.exists()


def test_api_socket_path_too_long(host: str, netns: str, helpers: list[Helper]) -> None:
    helper = Helper(["-a", "/tmp/" + "x" * 120, "-c", "--netns-type=path",
                     f"/run/netns/{netns}", "tap0"], host)
    helpers.append(helper)
    assert helper.wait_ready() == b""
    code, _out, err = helper.finish()
    assert code == 1 and "too long for a Unix socket" in err
    assert "tap0" not in ip_out("-n", netns, "-br", "link")  # refused before set-up


@pytest.mark.skipif(shutil.which("unshare") is None or shutil.which("nsenter") is None,
                    reason="util-linux unshare/nsenter needed")
def test_path_mode_from_inside_the_owning_user_namespace(host: str, tmp_path: Path,
                                                         helpers: list[Helper]) -> None:
    """podman: the namespace is bind-mounted at a path, owned by a user namespace we are
    already in; nobody lives in the network namespace."""
    mount = tmp_path / "netns"
    with podman_style_namespace(host, mount) as (holder, userns):
        # Enter only the user namespace (as podman's rootless process lives), then drop
        # the holder: the network namespace lives on in the bind mount alone.
        ready_r, ready_w = os.pipe()
        proc = subprocess.Popen(
            ["nsenter", f"--user={userns}", "--preserve-credentials", "--",
             *OURS, "-c", "-6", "-r", str(ready_w), "--netns-type=path", str(mount), "tap0"],
            pass_fds=(ready_w,), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=REPO)
        os.close(ready_w)
        try:
            wait_until(lambda: proc.poll() is not None or
                       os.readlink(f"/proc/{proc.pid}/ns/user") == os.readlink(userns),
                       timeout=5)
            holder.kill()
            holder.wait()
            assert os.read(ready_r, 1) == b"1", proc.stderr.read() if proc.poll() else ""
            out = subprocess.run(["nsenter", f"--net={mount}", "ip", "-br", "addr", "show",
                                  "tap0"], capture_output=True, text=True).stdout
            assert "10.0.2.100/24" in out
        finally:
            os.close(ready_r)
            proc.terminate()
            assert proc.wait(10) == 0


# ---- traffic through the TAP ----------------------------------------------------------


@pytest.mark.parametrize("disable_host_loopback", [False, True])
def test_traffic_through_the_tap(host: str, netns: str, helpers: list[Helper],
                                 disable_host_loopback: bool) -> None:
    """TCP to a server on the host's address and, unless --disable-host-loopback, to the
    host's loopback through 10.0.2.2."""
    from helpers.netns import connect_in, listen_in
    from helpers.usernet_host import HOST_V4

    servers = [listen_in(host, HOST_V4), listen_in(host, "127.0.0.1")]
    flags = ["--disable-host-loopback"] if disable_host_loopback else []
    helper = Helper([*flags, "-c", "--netns-type=path", f"/run/netns/{netns}", "tap0"], host)
    helpers.append(helper)
    try:
        assert helper.wait_ready() == b"1"
        # The fast path is added just after the ready byte; wait for it, so that the
        # connections below are known to take it (the tun path is tested in tap tests).
        wait_until(lambda: _fast_path_syns(netns) is not None, timeout=10,
                   what="the helper's nftables table")
        port = servers[0].getsockname()[1]
        client = connect_in(netns, (HOST_V4, port))
        client.close()
        loopback = servers[1].getsockname()[1]
        if disable_host_loopback:
            # Refused either at the SYN (tun path) or, on the fast path, by a reset right
            # after the namespace's kernel accepted: nothing is ever read.
            with pytest.raises(OSError):
                refused = connect_in(netns, ("10.0.2.2", loopback))
                try:
                    refused.settimeout(10)
                    refused.recv(1)
                finally:
                    refused.close()
        else:
            connect_in(netns, ("10.0.2.2", loopback)).close()
        assert _fast_path_syns(netns) == 2  # both SYNs were redirected
    finally:
        for server in servers:
            server.close()


def _fast_path_syns(netns: str) -> int | None:
    """The SYNs the fast path's output rule redirected in ``netns`` (None: no table)."""
    listing = subprocess.run(["ip", "netns", "exec", netns, "nft", "list", "chain", "inet",
                              "nsbridge", "output"], capture_output=True, text=True)
    found = re.search(r"counter packets (\d+)", listing.stdout)
    return int(found.group(1)) if listing.returncode == 0 and found else None
