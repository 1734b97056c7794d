"""nsbridge.usernet.inside.sandbox: real user+network+mount namespaces with a real tun device.

Run these tests as root.  /dev/net/tun is mode 0600 on the CI machine (0666 on most
systems), so the namespace creator must be root; inside the new user namespace it is
mapped to root.  One test runs the creator as an unprivileged uid (via ``setpriv``) and is
skipped unless /dev/net/tun is world-readable and writable (``.ci/run`` makes it 0666).

Traffic goes only into the tun devices of namespaces created here, and the test reads it
from the tun fd itself: nothing leaves the machine, nothing reaches the host's network.
Every process started here is ended by PID; every namespace dies with its process or fd.
"""

from __future__ import annotations

import gc
import ipaddress
import json
import os
import select
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from helpers.environment import REPO, have
from nsbridge.errors import UserError
from nsbridge.usernet.inside.netconf import VNET_HDR_SIZE
from nsbridge.usernet.inside.sandbox import Sandbox, SandboxError, SandboxHandle

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/net/tun"),
                                reason="no /dev/net/tun on this machine (modprobe tun)")

TUN_MODE_OK = os.path.exists("/dev/net/tun") and \
    stat.S_IMODE(os.stat("/dev/net/tun").st_mode) & 0o006 == 0o006
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


# ---- helpers -------------------------------------------------------------------------


@pytest.fixture
def sandboxes() -> Iterator[list[SandboxHandle]]:
    """Handles appended here are killed (by PID), reaped and closed even if a test fails."""
    handles: list[SandboxHandle] = []
    yield handles
    for handle in handles:
        if handle.pid is not None and handle.returncode is None and handle.started:
            handle.kill(signal.SIGKILL)
            handle.wait(timeout=10)
        handle.close()


def run_capture(tmp_path: Path, command: list[str],
                sandboxes: list[SandboxHandle], **kwargs) -> tuple[SandboxHandle, int, str]:
    """Run ``command`` in a new sandbox with stdout in a file; (handle, exit code, output)."""
    out_path = tmp_path / f"out-{len(sandboxes)}.txt"
    with open(out_path, "w") as out:
        handle = Sandbox.create(command, stdout=out.fileno(), **kwargs)
    sandboxes.append(handle)
    code = handle.wait(timeout=30)
    return handle, code, out_path.read_text()


def parse_udp(frame: bytes) -> tuple[str, str, int, bytes] | None:
    """(src, dst, dport, payload) of a tun frame holding IPv4/IPv6 UDP, else None."""
    packet = frame[VNET_HDR_SIZE:]
    if not packet:
        return None
    version = packet[0] >> 4
    if version == 4 and packet[9] == socket.IPPROTO_UDP:
        ihl = (packet[0] & 0x0F) * 4
        src, dst = packet[12:16], packet[16:20]
        udp = packet[ihl:]
    elif version == 6 and packet[6] == socket.IPPROTO_UDP:
        src, dst = packet[8:24], packet[24:40]
        udp = packet[40:]
    else:
        return None  # ICMPv6 router solicitations, MLD reports and the like
    length = int.from_bytes(udp[4:6], "big")
    return (str(ipaddress.ip_address(src)), str(ipaddress.ip_address(dst)),
            int.from_bytes(udp[2:4], "big"), bytes(udp[8:length]))


def read_udp(tun: int, wanted: int, timeout: float = 10) -> list[tuple[str, str, int, bytes]]:
    """Read frames from the tun fd until ``wanted`` UDP packets arrived."""
    found: list[tuple[str, str, int, bytes]] = []
    deadline = time.monotonic() + timeout
    while len(found) < wanted:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"only {found} arrived on the tun device")
        ready, _, _ = select.select([tun], [], [], remaining)
        if ready:
            parsed = parse_udp(os.read(tun, 1 << 17))
            if parsed is not None:
                found.append(parsed)
    return found


SEND_UDP = textwrap.dedent("""
    import socket
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.sendto(b"hello-v4", ("10.0.2.2", 9))
    s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s6.sendto(b"hello-v6", ("fd00::2", 9))
""")


def child_pids() -> list[int]:
    """Our direct children: none may be left once a sandbox is closed and waited for."""
    pids: list[int] = []
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/children") as f:
            pids.extend(int(x) for x in f.read().split())
    return pids


def our_mounts() -> list[str]:
    """The host's mount table, minus ``ip netns`` mounts that concurrent tests come and go
    with: a sandbox must add nothing to it (its mounts live in its own namespace)."""
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if not line.split()[4].startswith("/run/netns")]


def open_fd_count() -> int:
    """This process's open fds, after collecting garbage: a socket an earlier test left
    in a reference cycle (a failed test's traceback holds its frame) would otherwise be
    closed by the collector in the middle of a count."""
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


# ---- run: the new namespace ------------------------------------------------------------


@pytest.mark.skipif(not have("ip"), reason="needs iproute2's ip")
def test_run_configures_namespace(tmp_path: Path, sandboxes: list[SandboxHandle]) -> None:
    script = ("id -u; echo ===; ip -j addr; echo ===; ip -j route; echo ===; "
              "ip -j -6 route; echo ===; cat /etc/resolv.conf")
    handle, code, out = run_capture(tmp_path, ["sh", "-c", script], sandboxes)
    assert code == 0, out
    uid, addrs, routes4, routes6, resolv = out.split("===\n")
    assert uid.strip() == "0"  # the creator is root inside

    links = {link["ifname"]: link for link in json.loads(addrs)}
    assert "UP" in links["lo"]["flags"]
    tun = links["nsb0"]
    assert tun["mtu"] == 65520
    assert "UP" in tun["flags"]
    local = {(a["local"], a["prefixlen"]) for a in tun["addr_info"]}
    assert ("10.0.2.100", 24) in local
    assert ("fd00::100", 64) in local
    v6 = next(a for a in tun["addr_info"] if a["local"] == "fd00::100")
    assert not v6.get("tentative"), "nodad: the IPv6 address is usable at once"

    default4 = [r for r in json.loads(routes4) if r["dst"] == "default"]
    assert [(r["gateway"], r["dev"]) for r in default4] == [("10.0.2.2", "nsb0")]
    default6 = [r for r in json.loads(routes6) if r["dst"] == "default"]
    assert [(r["gateway"], r["dev"]) for r in default6] == [("fd00::2", "nsb0")]

    nameservers = [line.split()[1] for line in resolv.splitlines()
                   if line.startswith("nameserver")]
    assert nameservers == ["10.0.2.3", "fd00::3"]

    assert handle.ifname == "nsb0"
    assert handle.ipv6
    assert handle.vnet_hdr_size == VNET_HDR_SIZE
    assert {"csum", "tso4", "tso6"} <= set(handle.offloads)
    assert handle.warnings == []


def test_tun_carries_udp_from_the_namespace(sandboxes: list[SandboxHandle]) -> None:
    handle = Sandbox.create([sys.executable, "-c", SEND_UDP])
    sandboxes.append(handle)
    assert handle.wait(timeout=30) == 0
    packets = read_udp(handle.tun, 2)
    assert ("10.0.2.100", "10.0.2.2", 9, b"hello-v4") in packets
    assert ("fd00::100", "fd00::2", 9, b"hello-v6") in packets


def test_exit_status_propagates(sandboxes: list[SandboxHandle]) -> None:
    handle = Sandbox.create(["sh", "-c", "exit 7"])
    sandboxes.append(handle)
    assert handle.wait(timeout=30) == 7
    killed = Sandbox.create(["sh", "-c", "kill -TERM $$"])
    sandboxes.append(killed)
    assert killed.wait(timeout=30) == -signal.SIGTERM


def test_nothing_left_behind() -> None:
    """No fds, mounts, temp dirs or child processes survive a closed sandbox."""
    warm = Sandbox.create(["true"])  # first use imports pyroute2
    warm.wait(timeout=30)
    warm.close()
    with open("/etc/resolv.conf", "rb") as f:
        resolv_before = f.read()
    mounts_before = our_mounts()
    tmp = Path(tempfile.gettempdir())
    temp_before = {p.name for p in tmp.glob("nsbridge-*")}
    fds_before = open_fd_count()

    handle = Sandbox.create(["sh", "-c", "cat /etc/resolv.conf >/dev/null"])
    assert handle.wait(timeout=30) == 0
    handle.close()
    with pytest.raises(UserError):
        Sandbox.create(["/nonexistent/command"])

    assert open_fd_count() == fds_before
    with open("/etc/resolv.conf", "rb") as f:
        assert f.read() == resolv_before
    assert our_mounts() == mounts_before
    assert {p.name for p in tmp.glob("nsbridge-*")} == temp_before
    assert child_pids() == []


def test_hold_until_start(tmp_path: Path, sandboxes: list[SandboxHandle]) -> None:
    marker = tmp_path / "ran"
    handle = Sandbox.create(["touch", str(marker)], hold=True)
    sandboxes.append(handle)
    time.sleep(0.2)
    assert not marker.exists(), "a held command must not run before start()"
    handle.start()
    assert handle.wait(timeout=30) == 0
    assert marker.exists()


def test_held_sandbox_closed_without_start() -> None:
    handle = Sandbox.create(["true"], hold=True)
    handle.close()
    assert child_pids() == []


def test_command_not_found() -> None:
    with pytest.raises(UserError, match=r"cannot run '/nonexistent/command': No such file"):
        Sandbox.create(["/nonexistent/command"])
    assert child_pids() == []


def test_extra_fds_made_inside(sandboxes: list[SandboxHandle]) -> None:
    """A socket the callback made inside belongs to the namespace: its traffic hits the tun."""

    def make() -> list[socket.socket]:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("10.0.2.100", 0))
        return [sock]

    handle = Sandbox.create(["sleep", "30"], extra=make)
    sandboxes.append(handle)
    [fd] = handle.take_extra()
    with socket.socket(fileno=fd) as sock:
        assert sock.getsockname()[0] == "10.0.2.100"
        sock.sendto(b"from-extra", ("10.0.2.2", 9))
        assert read_udp(handle.tun, 1) == [("10.0.2.100", "10.0.2.2", 9, b"from-extra")]
    [fd] = handle.make_fds(lambda: [socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)])
    with socket.socket(fileno=fd) as sock:
        sock.sendto(b"from-helper", ("fd00::2", 9))
        assert read_udp(handle.tun, 1) == [("fd00::100", "fd00::2", 9, b"from-helper")]
    handle.kill(signal.SIGKILL)
    assert handle.wait(timeout=30) == -signal.SIGKILL


def test_helper_death_is_reported_not_hung() -> None:
    started = time.monotonic()
    with pytest.raises(SandboxError, match="killed by SIGKILL before reporting"):
        Sandbox.create(["true"], extra=lambda: os.kill(os.getpid(), signal.SIGKILL))
    assert time.monotonic() - started < 10
    assert child_pids() == []


def test_extra_callback_error_is_reported() -> None:
    with pytest.raises(SandboxError, match=r"extra callback failed.*ZeroDivisionError"):
        Sandbox.create(["true"], extra=lambda: [1 // 0])
    assert child_pids() == []


def _python_in(prefix: list[str], body: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``body`` under ``prefix`` (unshare, setpriv...) with the checkout importable."""
    code = f"import sys; sys.path.insert(0, {str(REPO)!r})\n" + textwrap.dedent(body)
    return subprocess.run([*prefix, sys.executable, "-c", code], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


CREATE_AND_REPORT = """
    import json
    from nsbridge.errors import UserError
    from nsbridge.usernet.inside.sandbox import Sandbox
    try:
        handle = Sandbox.create(["true"])
    except UserError as exc:
        print(exc)
        raise SystemExit(exc.exit_code)
    print(json.dumps({"code": handle.wait(), "warnings": handle.warnings}))
    handle.close()
"""


@pytest.mark.skipif(not have("unshare"), reason="needs util-linux unshare")
def test_missing_tun_device() -> None:
    """/dev/net/tun hidden by a tmpfs in a private mount namespace of a child process."""
    result = _python_in(["unshare", "-m", "sh", "-c",
                         'mount -t tmpfs tmpfs /dev/net && exec "$0" "$@"'],
                        CREATE_AND_REPORT)
    assert result.returncode == 2, result.stderr
    assert "/dev/net/tun does not exist" in result.stdout
    assert "modprobe tun" in result.stdout


@pytest.mark.skipif(not have("unshare"), reason="needs util-linux unshare")
def test_user_namespaces_unavailable() -> None:
    """user.max_user_namespaces=0 inside a throwaway user namespace (the limit is per
    namespace, so the host's setting is untouched): unshare fails, the message says why."""
    result = _python_in(["unshare", "-Ur", "sh", "-c",
                         'echo 0 > /proc/sys/user/max_user_namespaces && exec "$0" "$@"'],
                        CREATE_AND_REPORT)
    assert result.returncode == 2, result.stderr
    assert "cannot create a user namespace" in result.stdout
    assert "max_user_namespaces" in result.stdout


@pytest.mark.skipif(not have("unshare"), reason="needs util-linux unshare")
@pytest.mark.parametrize("target_exists", [True, False], ids=["symlink", "dangling-symlink"])
def test_resolv_conf_symlink(target_exists: bool) -> None:
    """systemd-resolved style /etc/resolv.conf -> ../run/resolve/stub-resolv.conf, built in
    a private mount namespace of a child process (tmpfs /run, a bind-mounted copy of /etc).
    The file outside the sandbox keeps its content; a dangling target gets a tmpfs."""
    setup = textwrap.dedent(f"""
        set -e
        mount -t tmpfs tmpfs /run
        mkdir -p /run/etc /run/resolve
        cp -a /etc/. /run/etc/
        ln -sfn ../run/resolve/stub-resolv.conf /run/etc/resolv.conf
        mount --bind /run/etc /etc
        {"echo 'nameserver 127.0.0.53' > /run/resolve/stub-resolv.conf" if target_exists else ""}
        exec "$0" "$@"
    """)
    body = """
        import json, os
        from nsbridge.usernet.inside.sandbox import Sandbox
        r, w = os.pipe()
        handle = Sandbox.create(["cat", "/etc/resolv.conf"], stdout=w)
        os.close(w)
        inside = os.read(r, 65536).decode()
        code = handle.wait()
        try:
            outside = open("/run/resolve/stub-resolv.conf").read()
        except FileNotFoundError:
            outside = None
        print(json.dumps({"code": code, "inside": inside, "outside": outside,
                          "warnings": handle.warnings}))
        handle.close()
    """
    result = _python_in(["unshare", "-m", "sh", "-c", setup], body)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["code"] == 0
    assert "nameserver 10.0.2.3" in report["inside"]
    if target_exists:
        assert report["outside"] == "nameserver 127.0.0.53\n"
        assert report["warnings"] == []
    else:
        assert report["outside"] is None
        assert "tmpfs" in report["warnings"][0]


@pytest.mark.skipif(not TUN_MODE_OK,
                    reason="/dev/net/tun is not world read/writable (mode 0600 here; "
                           ".ci/run sets 0666 as on normal systems)")
@pytest.mark.skipif(not have("setpriv") or not have("ip"), reason="needs setpriv and ip")
def test_unprivileged_creator() -> None:
    """The real rootless case: the creator is uid 65534 with no capabilities at all."""
    probe = _python_in(NOBODY, "import nsbridge.usernet.inside.sandbox, pyroute2")
    if probe.returncode != 0:
        pytest.skip(f"uid 65534 cannot import nsbridge and pyroute2 with {sys.executable}: "
                    f"{probe.stderr.strip().splitlines()[-1:]}")
    body = """
        import json, os, select, sys
        from nsbridge.usernet.inside.sandbox import Sandbox
        r, w = os.pipe()
        cmd = ["sh", "-c", "id -u; ip -j addr show nsb0; exit 3"]
        handle = Sandbox.create(cmd, stdout=w)
        os.close(w)
        out = b""
        while chunk := os.read(r, 65536):
            out += chunk
        code = handle.wait()
        print(json.dumps({"code": code, "out": out.decode(), "uid": os.getuid(),
                          "offloads": handle.offloads}))
        handle.close()
    """
    result = _python_in(NOBODY, body)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["uid"] == 65534
    assert report["code"] == 3
    uid_inside, addrs = report["out"].split("\n", 1)
    assert uid_inside == "0"
    [tun] = json.loads(addrs)
    assert tun["mtu"] == 65520
    assert {a["local"] for a in tun["addr_info"]} >= {"10.0.2.100", "fd00::100"}


# ---- attach -------------------------------------------------------------------------


@pytest.fixture
def make_target() -> Iterator[Callable[[str], int]]:
    """Factory: a ``sleep`` in its own user+net namespace (owned by a child of our user
    namespace, like a rootless container), after running ``setup`` (shell) in it."""
    if not have("unshare") or not have("nsenter"):
        pytest.skip("needs util-linux unshare and nsenter")
    procs: list[subprocess.Popen] = []

    def make(setup: str = "") -> int:
        proc = subprocess.Popen(["unshare", "-Urn", "sh", "-c", f"{setup}\nexec sleep 30"])
        procs.append(proc)
        own = os.stat("/proc/self/ns/net").st_ino
        deadline = time.monotonic() + 10
        while True:  # the shell execs sleep once the namespaces, maps and setup exist
            try:
                with open(f"/proc/{proc.pid}/comm") as f:
                    ready = f.read().strip() == "sleep" and \
                        os.stat(f"/proc/{proc.pid}/ns/net").st_ino != own
            except FileNotFoundError:
                ready = False
            if ready:
                return proc.pid
            assert proc.poll() is None and time.monotonic() < deadline, "target did not start"
            time.sleep(0.01)

    try:
        yield make
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=10)


def _nsenter(pid: int, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["nsenter", "-t", str(pid), "-U", "-n", *argv],
                          capture_output=True, text=True, timeout=30)


@pytest.mark.skipif(not have("ip"), reason="needs iproute2's ip")
def test_attach_to_pid(make_target: Callable[[str], int]) -> None:
    rootless_target = make_target("")
    fds_before = open_fd_count()
    with Sandbox.for_namespace(rootless_target) as handle:
        assert handle.pid is None
        assert handle.ifname == "nsb0"
        addrs = _nsenter(rootless_target, "ip", "-j", "addr")
        links = {link["ifname"]: link for link in json.loads(addrs.stdout)}
        assert "UP" in links["lo"]["flags"]
        assert links["nsb0"]["mtu"] == 65520
        local = {a["local"] for a in links["nsb0"]["addr_info"]}
        assert {"10.0.2.100", "fd00::100"} <= local
        routes = json.loads(_nsenter(rootless_target, "ip", "-j", "route").stdout)
        assert {"dst": "default", "gateway": "10.0.2.2"}.items() <= routes[0].items()

        sent = _nsenter(rootless_target, sys.executable, "-c", SEND_UDP)
        assert sent.returncode == 0, sent.stderr
        packets = read_udp(handle.tun, 2)
        assert ("10.0.2.100", "10.0.2.2", 9, b"hello-v4") in packets
        assert ("fd00::100", "fd00::2", 9, b"hello-v6") in packets

        with pytest.raises(UserError, match="already exists in the namespace"):
            Sandbox.for_namespace(f"/proc/{rootless_target}/ns/net")
    assert open_fd_count() == fds_before
    assert child_pids() == [rootless_target]


@pytest.mark.skipif(not have("ip"), reason="needs iproute2's ip")
def test_attach_netlink_failure(make_target: Callable[[str], int]) -> None:
    """A namespace that already has a default route (through its own lo): the netlink
    error comes back naming the step, and the half-made tun device disappears with the
    helper that held its only fd."""
    pid = make_target("ip link set lo up && ip route add default dev lo")
    with pytest.raises(SandboxError, match=r"netlink: cannot add default route via 10\.0\.2\.2"
                       r": File exists \(the namespace already has a default route\)"):
        Sandbox.for_namespace(pid)
    links = json.loads(_nsenter(pid, "ip", "-j", "link").stdout)
    assert "nsb0" not in {link["ifname"] for link in links}
    assert child_pids() == [pid]


def _free_pid() -> int:
    with open("/proc/sys/kernel/pid_max") as f:
        return int(f.read()) + 1  # above pid_max: never a live process


@pytest.mark.parametrize("target, message", [
    (lambda tmp: _free_pid(), r"no such process"),
    (lambda tmp: str(tmp), r"is a directory"),
    (lambda tmp: _touch(tmp / "file"), r"is not a namespace file"),
    (lambda tmp: "/proc/self/ns/user", r"is a user namespace, not a network namespace"),
    (lambda tmp: "/nonexistent/ns/net", r"does not exist"),
    (lambda tmp: os.getpid(), r"nsbridge's own network namespace"),
], ids=["no-such-pid", "directory", "regular-file", "user-ns", "missing-path", "own-ns"])
def test_attach_bad_target(tmp_path: Path, target: Callable[[Path], object],
                           message: str) -> None:
    fds_before = open_fd_count()
    with pytest.raises(UserError, match=message):
        Sandbox.for_namespace(target(tmp_path))  # type: ignore[arg-type]
    assert open_fd_count() == fds_before
    assert child_pids() == []


def _touch(path: Path) -> str:
    path.write_text("not a namespace\n")
    return str(path)


def test_bad_config_refused_before_fork() -> None:
    from nsbridge.usernet.inside.netconf import NetConfig

    with pytest.raises(UserError, match="bad interface name"):
        Sandbox.create(["true"], NetConfig(ifname="x" * 16))
    with pytest.raises(UserError, match="bad MTU"):
        Sandbox.create(["true"], NetConfig(mtu=100))
    with pytest.raises(UserError, match="no command"):
        Sandbox.create([])
    assert child_pids() == []
