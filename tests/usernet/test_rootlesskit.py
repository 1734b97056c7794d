"""rootlesskit as the real client of a slirp4netns-compatible helper, every case run
against the real /usr/bin/slirp4netns and against ours (``nsbridge-slirp4netns``), so a
broken environment fails loudly on the real one too.

rootlesskit runs as a fresh unprivileged user with subordinate ids, inside a "host"
namespace of the test's own (servers on its loopback, a DNS resolver on its address),
which reaches an "outside" namespace through a veth (see helpers.rootlesskit, which also
says how /dev/net/tun mode 0600 is handled). The command inside prints what each case
checks; the servers outside answer with the client address they saw.

Until ``nsbridge-slirp4netns`` exists in the checkout, the ``nsbridge`` cases fail with
"nsbridge-slirp4netns not found" rather than skip. The client addresses the server
inside saw through each port driver are printed and recorded (``-rP`` shows them).
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from helpers.environment import have
from helpers.nested import nested_script
from helpers.netns import free_port, in_netns
from helpers.rootlesskit import (
    CHILD_V4,
    DIG,
    DNS_V4,
    GATEWAY_V4,
    HELPERS,
    PROBE,
    RootlessUser,
    World,
    end_user_processes,
    helper_binary,
    probe,
    rootless_user,
    rootlesskit_world,
    run_rootlesskit,
    socket_files,
    start_rootlesskit,
    tun_open_to_users,
    user_processes,
)
from helpers.servers import DNS_ADDRESS
from helpers.usernet_host import HOST_OUTSIDE_V4, HOST_OUTSIDE_V6, OUTSIDE_V4, OUTSIDE_V6

pytestmark = [
    pytest.mark.skipif(not have("rootlesskit") or not have("newuidmap"),
                       reason="needs rootlesskit and uidmap (apt-get install rootlesskit "
                              "uidmap; .ci/run installs them)"),
    pytest.mark.timeout(120),
]


@pytest.fixture(scope="module")
def user() -> Iterator[RootlessUser]:
    with tun_open_to_users(), rootless_user() as made:
        try:
            yield made
        finally:
            end_user_processes(made.uid, timeout=0)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with rootlesskit_world() as made:
        yield made


@pytest.fixture(params=HELPERS)
def helper(request: pytest.FixtureRequest, user: RootlessUser) -> str:
    """The --slirp4netns-binary of each helper (ours fails loudly when missing)."""
    return helper_binary(request.param, user)


@pytest.fixture(autouse=True)
def nothing_left(request: pytest.FixtureRequest) -> Iterator[None]:
    """After every case: no process of the user survives rootlesskit's end."""
    yield
    if "user" in request.fixturenames:
        made: RootlessUser = request.getfixturevalue("user")
        left = end_user_processes(made.uid)
        assert not left, f"processes left behind: {left}"


def inside(world: World, user: RootlessUser, helper: str, script: str,
           flags: tuple[str, ...] = ()) -> str:
    done = run_rootlesskit(world, user, helper, list(flags), f"set -e\n{script}")
    assert done.returncode == 0, f"rc={done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_addresses_and_resolv_conf(world: World, user: RootlessUser, helper: str) -> None:
    out = inside(world, user, helper,
                 "ip -o -4 addr show dev tap0; ip -o link show tap0; ip route; "
                 "cat /etc/resolv.conf")
    assert f"inet {CHILD_V4}/24" in out
    assert "mtu 65520" in out
    assert f"default via {GATEWAY_V4} dev tap0" in out
    assert f"nameserver {DNS_V4}" in out


def test_host_loopback_through_the_gateway(world: World, user: RootlessUser,
                                           helper: str) -> None:
    out = inside(world, user, helper, probe("tcp", GATEWAY_V4, str(world.tcp_loopback.port)))
    assert out.strip() == "127.0.0.1"


def test_host_loopback_refused_with_disable_host_loopback(world: World, user: RootlessUser,
                                                          helper: str) -> None:
    before = len(world.tcp_loopback.accepted)
    out = inside(world, user, helper,
                 probe("tcp", GATEWAY_V4, str(world.tcp_loopback.port)) + " || true",
                 ("--disable-host-loopback",))
    assert out.startswith("failed:"), out
    assert len(world.tcp_loopback.accepted) == before


def test_dns_through_the_dns_address(world: World, user: RootlessUser, helper: str) -> None:
    before = world.dns.received
    out = inside(world, user, helper, DIG)
    assert out.split() == [DNS_ADDRESS]
    assert world.dns.received > before


def test_tcp_and_udp_out(world: World, user: RootlessUser, helper: str) -> None:
    out = inside(world, user, helper,
                 f"{probe('tcp', OUTSIDE_V4, str(world.tcp_outside.port))}\n"
                 f"{probe('udp', OUTSIDE_V4, str(world.udp_outside.port))}")
    assert out.split() == [HOST_OUTSIDE_V4, "HELLO"]


def test_ping(world: World, user: RootlessUser, helper: str) -> None:
    out = inside(world, user, helper,
                 f"ping -c 1 -W 5 {OUTSIDE_V4}\nping -c 1 -W 5 {GATEWAY_V4}")
    assert out.count("1 received") == 2, out


# Wait for a SLAAC address that finished duplicate address detection ("-tentative"): a
# tentative address is no source address yet, so a connect made before DAD ends (about a
# second after the router advertisement) leaves without it and is never answered.
IPV6_SCRIPT = """
for i in $(seq 100); do
    ip -6 -o addr show dev tap0 scope global -tentative | grep -q 'fd00::' && break
    sleep 0.1
done
echo "after ${i}"
ip -6 -o addr show dev tap0 scope global
"""


def test_ipv6_slaac_and_tcp_out(world: World, user: RootlessUser, helper: str) -> None:
    out = inside(world, user, helper,
                 IPV6_SCRIPT + probe("tcp", OUTSIDE_V6, str(world.tcp_outside6.port)),
                 ("--ipv6",))
    assert "inet6 fd00::" in out, out
    assert int(out.split("after ", 1)[1].split()[0]) < 100, "no SLAAC address in 10 s"
    assert out.strip().splitlines()[-1] == HOST_OUTSIDE_V6


# nsbridge's helper adds its TCP fast path just after "ready": wait for its table (with
# the real slirp4netns there is none to wait for).
WAIT_FOR_FAST_PATH = """
for i in $(seq 100); do nft list table inet nsbridge >/dev/null 2>&1 && break; sleep 0.05; done
"""


def test_nested_namespace_masqueraded_out_of_tap0(world: World, user: RootlessUser,
                                                  helper: str) -> None:
    script = nested_script("tap0", [probe("tcp", OUTSIDE_V4, str(world.tcp_outside.port)),
                                    probe("udp", OUTSIDE_V4, str(world.udp_outside.port)),
                                    f"ping -c 1 -W 5 {OUTSIDE_V4}"],
                           before="" if _real(helper) else WAIT_FOR_FAST_PATH)
    out = inside(world, user, helper, script)
    lines = out.splitlines()
    assert lines[:2] == [HOST_OUTSIDE_V4, "HELLO"], out
    assert "1 received" in out
    # Ours carries the container's TCP on the fast path: the prerouting redirect's
    # counter shows its SYN (slirp4netns has no such table).
    counters = [line for line in lines if line.startswith("counter packets")]
    assert counters == ([] if _real(helper) else ["counter packets 1"]), out


def _real(helper: str) -> bool:
    return helper.endswith("/slirp4netns")


def _read_line(proc: subprocess.Popen, timeout: float = 20) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise AssertionError("no line from inside rootlesskit in time")
    return proc.stdout.readline().strip()


def _ask(netns: str, address: tuple, timeout: float = 15) -> str:
    """The address the server inside saw, asked through a published port (retried while
    the port driver is still setting up)."""
    def once() -> str:
        with socket.create_connection(address, timeout=5) as sock:
            sock.sendall(b"hello\n")
            return sock.recv(4096).decode().strip()

    deadline = time.monotonic() + timeout
    while True:
        try:
            answer = in_netns(netns, once)
            if answer:
                return str(answer)
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"published port {address} never answered")
        time.sleep(0.1)


def _published(world: World, user: RootlessUser, helper: str,
               driver: str) -> tuple[str, str, subprocess.Popen]:
    """Publish the server inside on the host's loopback and on its outside address with
    ``driver``; what the server saw for a client on each."""
    loopback_port, outside_port = free_port(world.host), free_port(world.host)
    proc = start_rootlesskit(
        world, user, helper,
        [f"--port-driver={driver}", "-p", f"127.0.0.1:{loopback_port}:80/tcp",
         "-p", f"{HOST_OUTSIDE_V4}:{outside_port}:80/tcp"],
        ["python3", str(PROBE), "serve", "80"])
    try:
        assert _read_line(proc) == "READY"
        from_loopback = _ask(world.host, ("127.0.0.1", loopback_port))
        from_outside = _ask(world.outside, (HOST_OUTSIDE_V4, outside_port))
    except BaseException:
        proc.kill()
        proc.wait(timeout=10)
        raise
    return from_loopback, from_outside, proc


def _finish(proc: subprocess.Popen) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    try:
        rc = proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert rc == 0, proc.stderr.read() if proc.stderr else rc


def test_port_driver_builtin(world: World, user: RootlessUser, helper: str,
                             record_property, request: pytest.FixtureRequest) -> None:
    from_loopback, from_outside, proc = _published(world, user, helper, "builtin")
    _finish(proc)
    record_property("client_address_seen", f"loopback={from_loopback} "
                                           f"outside={from_outside}")
    print(f"{request.node.callspec.id}: server inside saw loopback client as "
          f"{from_loopback}, outside client ({OUTSIDE_V4}) as {from_outside}")
    # rootlesskit's builtin driver dials from the child's own loopback, whatever the helper.
    assert (from_loopback, from_outside) == ("127.0.0.1", "127.0.0.1")


def test_port_driver_slirp4netns(world: World, user: RootlessUser, helper: str,
                                 record_property, request: pytest.FixtureRequest) -> None:
    from_loopback, from_outside, proc = _published(world, user, helper, "slirp4netns")
    _finish(proc)
    record_property("client_address_seen", f"loopback={from_loopback} "
                                           f"outside={from_outside}")
    print(f"{request.node.callspec.id}: server inside saw loopback client as "
          f"{from_loopback}, outside client ({OUTSIDE_V4}) as {from_outside}")
    # Both show a client on the host's loopback as the gateway and any other client with
    # its own address (ours dials through the device as the client: usernet/host/inbound.py).
    assert (from_loopback, from_outside) == (GATEWAY_V4, OUTSIDE_V4)


def _leftovers(user: RootlessUser) -> list[str]:
    return sorted(str(path.relative_to(user.home)) for path in socket_files(user.home))


def test_exit_leaves_nothing_behind(world: World, user: RootlessUser, helper: str) -> None:
    inside(world, user, helper, "ip -o link show tap0",
           ("--port-driver=slirp4netns", "--disable-host-loopback"))
    # rootlesskit SIGKILLs the helper and waits for it; whatever the helper forked goes
    # with it (PR_SET_PDEATHSIG), allowed a moment to be reaped.
    left = end_user_processes(user.uid, timeout=2)
    assert not left, f"left after rootlesskit's exit: {left}"
    assert _leftovers(user) == []
    assert os.listdir(user.tmpdir) == [], "rootlesskit's state directory is left"


def test_sigkill_leaves_no_helper_behind(world: World, user: RootlessUser,
                                         helper: str) -> None:
    proc = start_rootlesskit(world, user, helper,
                             ["--port-driver=slirp4netns", "--disable-host-loopback"],
                             ["python3", str(PROBE), "serve", "80"])
    try:
        assert _read_line(proc) == "READY"
        # rootlesskit's parent and child both carry --slirp4netns-binary; the helper not.
        helpers = {pid: cmd for pid, cmd in user_processes(user.uid).items()
                   if "slirp4netns" in cmd and "--slirp4netns-binary" not in cmd}
        assert helpers, "no helper process seen while rootlesskit ran"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    left = end_user_processes(user.uid)
    assert not left, f"left after rootlesskit's SIGKILL: {left}"
    # rootlesskit cannot remove its state directory when killed; in it, its own api.sock
    # and the helper's API socket (.s4nn.sock: a helper killed by PDEATHSIG cannot unlink
    # it; rootlesskit clears the directory on its next start). Nothing else.
    stray = [path for path in _leftovers(user)
             if os.path.basename(path) not in ("api.sock", ".s4nn.sock")]
    assert stray == []
    for entry in os.listdir(user.tmpdir):
        subprocess.run(["rm", "-rf", str(user.tmpdir / entry)], check=True)


@pytest.mark.parametrize("locked", [True, False], ids=["locked", "control"])
def test_helper_locked_down_and_out_of_the_childs_reach(world: World, user: RootlessUser,
                                                        helper: str, locked: bool) -> None:
    """With --enable-sandbox --enable-seccomp (rootlesskit's auto mode passes them),
    the helper keeps CAP_NET_BIND_SERVICE alone, runs under a seccomp filter and sees
    only /etc and /run; ours also leaves the child's root (our user id outside) none of
    its /proc files, where the real slirp4netns, still dumpable, shows its root,
    environment and fds (recorded, not asserted). The control, both flags off, shows the
    probe reaches an unlocked helper of either kind: its fd list is open to the child."""
    flags = [] if locked else ["--slirp4netns-sandbox=false", "--slirp4netns-seccomp=false"]
    proc = start_rootlesskit(world, user, helper, flags, ["python3", str(PROBE), "reach"])
    try:
        line = _read_line(proc)
        assert line.startswith("helper "), line + (proc.stderr.read() if proc.poll() else "")
        _, number, *verdicts = line.split()
        pid = int(number)
        seen = dict(verdict.split(":") for verdict in verdicts)
        caps = subprocess.run(["getpcaps", str(pid)], capture_output=True, text=True,
                              check=True).stdout.strip()
        with open(f"/proc/{pid}/status") as f:
            seccomp = next(row.split()[1] for row in f if row.startswith("Seccomp:"))
        print(f"{os.path.basename(helper)} locked={locked}: the child reaches {seen}")
        if locked:
            if "nsbridge" in helper:
                assert seen == dict.fromkeys(("root", "environ", "fd", "mem"), "denied")
            assert caps == f"{pid}: cap_net_bind_service=eip"
            assert seccomp == "2"
            assert sorted(os.listdir(f"/proc/{pid}/root")) == ["etc", "run"]
        else:
            assert seen["fd"] == "open", seen
            assert seccomp == "0"
    finally:
        if proc.stdin:
            proc.stdin.close()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
