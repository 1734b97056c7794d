"""``nsbridge seccomp-agent`` served to real runtimes: a rootless busybox container run
by crun and by runc (Debian's), its seccomp profile the one ``--print-profile`` prints.

Everything runs as a fresh unprivileged user (helpers.rootlesskit's ``nsbrk-*``) inside
a "host" namespace of the test's own that reaches an "outside" namespace through a veth;
the servers outside answer with the client address they saw.  The container's network
namespace has nothing but ``lo``: whatever it reaches outside went through a socket the
agent switched, and the server then sees the host namespace's address.  /dev/net/tun is
not used (see helpers.oci).

Then the agent's own input: a connection from another user, garbage, oversized and
truncated messages, wrong fd counts and fds that are not seccomp listeners, each refused
with a line and a count while the agent keeps serving.
"""

from __future__ import annotations

import array
import contextlib
import errno
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from helpers.environment import have
from helpers.netns import listen_in
from helpers.oci import (
    PAGE,
    RUNTIMES,
    build_static,
    delete_container,
    make_bundle,
    nsbridge_command,
    run_container,
    runtime_as,
)
from helpers.rootlesskit import (
    CHILD_V4,
    DNS_V4,
    RootlessUser,
    World,
    end_user_processes,
    helper_binary,
    rootless_user,
    rootlesskit_world,
    tun_open_to_users,
    who,
)
from helpers.servers import DNS_ADDRESS, DNS_NAME, StreamServer
from helpers.unprivileged import as_nobody
from helpers.usernet_host import HOST_OUTSIDE_V4, HOST_OUTSIDE_V6, OUTSIDE_V4, OUTSIDE_V6
from nsbridge.linux import notifycore
from nsbridge.linux.seccomp_notify import unsupported
from nsbridge.usernet.host.seccompagent import ContainerAddresses
from nsbridge.usernet.proto.ociprofile import seccomp_section

pytestmark = [
    pytest.mark.skipif(unsupported() is not None, reason=f"{unsupported()}"),
    pytest.mark.timeout(120),
]


@pytest.fixture(scope="module")
def user() -> Iterator[RootlessUser]:
    with rootless_user() as made:
        try:
            yield made
        finally:
            end_user_processes(made.uid, timeout=0)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with rootlesskit_world() as made:
        denied = StreamServer(listen_in(made.outside, OUTSIDE_V4))
        made.servers.append(denied)
        denied.start(who)
        yield made


class Agent:
    """The agent running as ``user`` in ``host``; :meth:`stop` ends it and returns what
    it logged."""

    def __init__(self, argv: list[str], path: Path, log: Path) -> None:
        self.path = path
        self.log = log
        with open(log, "wb") as out:
            self.process = subprocess.Popen(argv, stdout=out, stderr=out,
                                            stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not path.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the agent did not start: {self.text()}")
            time.sleep(0.05)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # the agent itself: exec'ed through
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.text()


@contextlib.contextmanager
def agent_as(user: RootlessUser | None, host: str, top: Path, *flags: str) -> Iterator[Agent]:
    """The agent as ``user`` (None: root, from the checkout) in namespace ``host``."""
    path = top / f"agent-{uuid.uuid4().hex[:6]}.sock"
    log = top / f"agent-{uuid.uuid4().hex[:6]}.log"
    if user is None:
        argv = ["ip", "netns", "exec", host, sys.executable, "-m", "nsbridge",
                "seccomp-agent", "--socket", str(path), "-v", *flags]
    else:
        argv = ["ip", "netns", "exec", host, *user.argv(
            str(nsbridge_command(user)), "seccomp-agent", "--socket", str(path), "-v", *flags)]
    agent = Agent(argv, path, log)
    try:
        yield agent
    finally:
        agent.stop()


def run_script(user: RootlessUser, world: World, runtime: str, agent: Agent, top: Path,
               script: str, metadata: str = "") -> tuple[subprocess.CompletedProcess, str]:
    """``sh -c script`` in a fresh container of ``runtime`` whose profile names the
    agent's socket, run to its end and deleted; (the run's result, the container's
    name)."""
    bundle = make_bundle(top, user, ["sh", "-c", script],
                         seccomp_section(str(agent.path), metadata=metadata))
    name = f"nsbagent-{uuid.uuid4().hex[:8]}"
    try:
        return run_container(user, world.host, runtime, bundle, name), name
    finally:
        delete_container(user, world.host, runtime, bundle, name)


OWN_ADDRESS = "203.0.113.5"  # added inside, after the agent took the container

CONTAINER_SCRIPT = """\
httpd -p 8080 -h /www
ip addr add {own}/32 dev lo
sleep 0.3
echo "loopback: $(wget -q -O - http://127.0.0.1:8080/index.html)"
echo "own: $(wget -q -O - http://{own}:8080/index.html)"
echo "v4: $(echo hi | nc {v4} {port4} 2>&1)"
echo "v6: $(echo hi | nc {v6} {port6} 2>&1)"
echo "denied: $(echo hi | nc {v4} {denied} 2>&1)"
"""


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_container_connects_are_switched_and_decided(runtime: str, user: RootlessUser,
                                                     world: World) -> None:
    """Outbound TCP from the container reaches the outside through switched sockets (the
    server sees the host's addresses), a denied one is refused (and never reaches its
    server), the container's own loopback works, and so does an address the container
    adds to itself after start (read live from its namespace: switched, it would have
    gone to the host), and the agent's counters say so."""
    if not have(runtime):
        pytest.skip(f"needs {runtime} (apt-get install {runtime}; .ci/run installs it)")
    denied = world.servers[-1]
    top = user.tmpdir / f"{runtime}-{uuid.uuid4().hex[:6]}"
    top.mkdir()
    os.chown(top, user.uid, user.gid)
    with agent_as(user, world.host, top,
                  "--deny", f"tcp:{OUTSIDE_V4}:{denied.port}") as agent:
        script = CONTAINER_SCRIPT.format(own=OWN_ADDRESS, v4=OUTSIDE_V4, v6=OUTSIDE_V6,
                                         port4=world.tcp_outside.port,
                                         port6=world.tcp_outside6.port, denied=denied.port)
        result, name = run_script(user, world, runtime, agent, top, script,
                                  metadata=runtime)
        log = agent.stop()
    out = result.stdout
    assert result.returncode == 0, (out, result.stderr, log)
    assert f"loopback: {PAGE.strip()}" in out, (out, result.stderr, log)
    assert f"own: {PAGE.strip()}" in out, (out, result.stderr, log)
    assert f"v4: {HOST_OUTSIDE_V4}" in out, (out, log)
    assert f"v6: {HOST_OUTSIDE_V6}" in out, (out, log)
    assert "denied: " in out and "refused" in out.split("denied: ", 1)[1], (out, log)
    assert denied.accepted == [], "the denied destination was reached"
    assert f"serving container '{name}'" in log, log
    assert f"metadata '{runtime}'" in log, log
    assert f"container '{name}' ended" in log, log
    summary = log.strip().splitlines()[-1]
    assert "containers served: 1" in summary, log
    assert "switched 2" in summary and "denied:deny rule 1" in summary, summary
    assert "refused hand-ins: none" in summary, summary


CACHE_SCRIPT = """\
httpd -p 8080 -h /www
for i in 1 2 3 4 5 6; do echo "out $i: $(echo hi | nc {v4} {port} 2>&1)"; done
ip addr add {v4}/32 dev lo
echo "own now: $(wget -q -O - http://{v4}:8080/index.html 2>&1)"
echo "own port: $(echo hi | nc {v4} {port} 2>&1)"
"""


def test_cached_decisions_give_way_to_an_address_the_container_adds(
        user: RootlessUser, world: World) -> None:
    """Repeated connects to one outside destination are switched from the serving
    thread's decision cache (the agent watches the container's own addresses once it
    can read them); then the container makes that address its own, and the very next
    connect to it stays inside (its own httpd answers; a connect to the outside server's
    port finds nothing there) instead of going out on a cached decision."""
    runtime = next((name for name in RUNTIMES if have(name)), None)
    if runtime is None:
        pytest.skip(f"needs one of {', '.join(RUNTIMES)} (.ci/run installs them)")
    if notifycore.chosen() is None:
        pytest.skip(f"the cache is the native core's ({notifycore.unavailable()})")
    top = user.tmpdir / f"cache-{uuid.uuid4().hex[:6]}"
    top.mkdir()
    os.chown(top, user.uid, user.gid)
    before = len(world.tcp_outside.accepted)
    with agent_as(user, world.host, top) as agent:
        script = CACHE_SCRIPT.format(v4=OUTSIDE_V4, port=world.tcp_outside.port)
        result, _name = run_script(user, world, runtime, agent, top, script)
        log = agent.stop()
    out = result.stdout
    assert result.returncode == 0, (out, result.stderr, log)
    for i in range(1, 7):
        assert f"out {i}: {HOST_OUTSIDE_V4}" in out, (out, log)
    assert f"own now: {PAGE.strip()}" in out, (out, log)
    assert f"own port: {HOST_OUTSIDE_V4}" not in out, (out, log)
    assert len(world.tcp_outside.accepted) - before == 6, (out, log)
    summary = log.strip().splitlines()[-1]
    cached = int(summary.split("cached ", 1)[1].split(",")[0]) if "cached " in summary else 0
    assert 1 <= cached <= 5, summary
    assert "switched 6" in summary, summary


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_containers_at_once_each_served_and_freed(runtime: str, user: RootlessUser,
                                                  world: World) -> None:
    """Three containers started at once by one runtime, one agent: each is served, each
    one's end frees its listener and namespace watch (the agent's fd count is back where
    it was), and the agent serves the next one after that."""
    if not have(runtime):
        pytest.skip(f"needs {runtime} (apt-get install {runtime}; .ci/run installs it)")
    top = user.tmpdir / f"many-{runtime}-{uuid.uuid4().hex[:6]}"
    top.mkdir()
    os.chown(top, user.uid, user.gid)
    script = f"sleep 0.5; echo \"v4: $(echo hi | nc {OUTSIDE_V4} {world.tcp_outside.port})\""
    with agent_as(user, world.host, top) as agent:
        fds = Path(f"/proc/{agent.process.pid}/fd")
        before = len(list(fds.iterdir()))
        bundles = []
        for index in range(4):
            where = top / str(index)
            where.mkdir()
            bundles.append(make_bundle(where, user, ["sh", "-c", script],
                                       seccomp_section(str(agent.path))))
        names = [f"nsbagent-{uuid.uuid4().hex[:8]}" for _ in bundles]
        results: list[subprocess.CompletedProcess] = []
        try:
            with ThreadPoolExecutor(3) as pool:
                results = list(pool.map(
                    lambda pair: run_container(user, world.host, runtime, *pair),
                    list(zip(bundles[:3], names[:3], strict=True))))
            wait_for(agent, "ended", 3)
            assert len(list(fds.iterdir())) == before, agent.text()
            results.append(run_container(user, world.host, runtime, bundles[3], names[3]))
            wait_for(agent, "ended", 4)
        finally:
            for bundle, name in zip(bundles, names, strict=True):
                delete_container(user, world.host, runtime, bundle, name)
        assert len(list(fds.iterdir())) == before, agent.text()
        log = agent.stop()
    for result in results:
        assert result.returncode == 0 and f"v4: {HOST_OUTSIDE_V4}" in result.stdout, \
            (result.stdout, result.stderr, log)
    summary = log.strip().splitlines()[-1]
    assert "containers served: 4" in summary and "switched 4" in summary, log


NOT_SWITCHED_SCRIPT = """\
httpd -p 8080 -h /www
until ip addr show tap0 2>/dev/null | grep -q {child}; do sleep 0.05; done
echo "tcp: $(echo hi | nc {v4} {port})"
echo "own: $(wget -q -O - http://{child}:8080/index.html)"
echo "dns: $(nslookup {name} {dns} 2>&1 | grep -c {answer})"
"""


@pytest.mark.parametrize("excluded", [False, True], ids=["switched", "excluded"])
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_what_is_not_switched_takes_the_containers_own_networking(
        runtime: str, excluded: bool, user: RootlessUser, world: World) -> None:
    """runtimes.md's second step: ``create``, ``start``, nsbridge-slirp4netns
    ``--configure`` for the container's pid, the command waiting for its ``tap0``.  TCP
    to the outside is switched by the agent, DNS over UDP to 10.0.2.3 goes through the
    helper (to the host's resolver), and the container's own 10.0.2.100 stays inside.
    With ``--bypass-exclude PORT`` for the TCP server, that connect is made on the
    container's own socket and reaches the outside through the helper instead.
    /dev/net/tun: the helper opens it as the user, so it is made 0666 while the test
    runs (helpers.rootlesskit)."""
    if not have(runtime):
        pytest.skip(f"needs {runtime} (apt-get install {runtime}; .ci/run installs it)")
    top = user.tmpdir / f"net-{runtime}-{uuid.uuid4().hex[:6]}"
    top.mkdir()
    os.chown(top, user.uid, user.gid)
    helper = helper_binary("nsbridge", user)
    name = f"nsbagent-{uuid.uuid4().hex[:8]}"
    flags = ("--bypass-exclude", str(world.tcp_outside.port)) if excluded else ()
    with tun_open_to_users(), agent_as(user, world.host, top, *flags) as agent:
        script = NOT_SWITCHED_SCRIPT.format(v4=OUTSIDE_V4, port=world.tcp_outside.port,
                                            child=CHILD_V4, name=DNS_NAME, dns=DNS_V4,
                                            answer=DNS_ADDRESS)
        bundle = make_bundle(top, user, ["sh", "-c", script],
                             seccomp_section(str(agent.path)))
        output = top / "output"
        slirp = None
        try:
            with open(output, "w") as out:
                subprocess.run(runtime_as(user, world.host, runtime, bundle, "create",
                                          "--bundle", str(bundle), name),
                               stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                               check=True, timeout=60)
            # crun connects to the agent at create and sends at start: a pause between
            # them longer than the agent's 5 s for a started message must not matter.
            time.sleep(6 if runtime == "crun" else 0)
            # crun keeps the process undumpable until it execs: its namespaces can be
            # entered once it is started, not after create.
            subprocess.run(runtime_as(user, world.host, runtime, bundle, "start", name),
                           check=True, timeout=60, capture_output=True)
            pid = container_state(user, world.host, runtime, bundle, name)["pid"]
            ready_r, ready_w = os.pipe()
            try:
                # ip netns exec: the helper reads the host namespace's resolv.conf
                # (/etc/netns/HOST), which names the test's DNS server.
                slirp = subprocess.Popen(
                    ["ip", "netns", "exec", world.host, *user.argv(
                        helper, "--configure", "--mtu=65520", "--disable-host-loopback",
                        f"--ready-fd={ready_w}",
                        str(pid), "tap0")],
                    pass_fds=(ready_w,), stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE)
                os.close(ready_w)
                ready_w = -1
                assert os.read(ready_r, 1) == b"1", slirp.communicate(timeout=10)
            finally:
                os.close(ready_r)
                if ready_w >= 0:
                    os.close(ready_w)
            deadline = time.monotonic() + 30
            while container_state(user, world.host, runtime, bundle, name).get(
                    "status") != "stopped":
                assert time.monotonic() < deadline, output.read_text()
                time.sleep(0.1)
            wait_for(agent, "ended")
        finally:
            delete_container(user, world.host, runtime, bundle, name)
            if slirp is not None:
                try:
                    slirp.wait(timeout=10)  # it ends with the container's pid
                except subprocess.TimeoutExpired:
                    slirp.kill()
                    slirp.wait()
        log = agent.stop()
    out = output.read_text()
    assert f"tcp: {HOST_OUTSIDE_V4}" in out, (out, log)
    assert f"own: {PAGE.strip()}" in out, (out, log)
    assert "dns: 1" in out, (out, log)
    summary = log.strip().splitlines()[-1]
    if excluded:
        assert "excluded 1" in summary and "switched" not in summary, log
        assert f"not switched: *:{world.tcp_outside.port}" in log, log
    else:
        assert "switched 1" in summary and "excluded" not in summary, log


@pytest.mark.parametrize(("rule", "says"), [("udp:192.0.2.1", "only TCP"),
                                            ("*", "every connect")])
def test_bad_exclude_rules_exit_with_one_line_and_no_socket(rule: str, says: str,
                                                            tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"
    done = subprocess.run([sys.executable, "-m", "nsbridge", "seccomp-agent", "--socket",
                           str(path), "--bypass-exclude", rule],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert f"--bypass-exclude {rule}" in lines[0] and says in lines[0]
    assert not path.exists()


@pytest.fixture(scope="module")
def doors(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not have("gcc"):
        pytest.skip("needs gcc and libc6-dev to build the static probe (.ci/run installs "
                    "them)")
    return build_static(Path(__file__).parents[1] / "helpers" / "oci_doors.c",
                        tmp_path_factory.mktemp("doors") / "oci_doors")


NOTIFY_ONLY = "notify-only"


@pytest.mark.parametrize("runtime", [*RUNTIMES, NOTIFY_ONLY])
def test_doors_around_a_switched_socket_are_shut_by_the_profile(
        runtime: str, user: RootlessUser, world: World, doors: Path) -> None:
    """From a switched socket disconnected with AF_UNSPEC, every way to connect it to a
    denied server without a trapped connect fails under the profile the runtime built
    from ``--print-profile``'s section (MSG_FASTOPEN sends: EOPNOTSUPP; connect through
    ``int 0x80``: never runs; io_uring: ENOSYS), the plain connect is decided (refused),
    and the denied server is never reached.  The control (crun, a profile that only
    notifies connect and listen) shows the fastopen sends reaching it: the profile's
    rules are what shut them."""
    real = "crun" if runtime == NOTIFY_ONLY else runtime
    if not have(real):
        pytest.skip(f"needs {real} (apt-get install {real}; .ci/run installs it)")
    denied = world.servers[-1]
    accepted_before = len(denied.accepted)
    top = user.tmpdir / f"doors-{runtime}-{uuid.uuid4().hex[:6]}"
    top.mkdir()
    os.chown(top, user.uid, user.gid)
    with agent_as(user, world.host, top,
                  "--deny", f"tcp:{OUTSIDE_V4}:{denied.port}") as agent:
        section = seccomp_section(str(agent.path))
        if runtime == NOTIFY_ONLY:
            section["syscalls"] = section["syscalls"][:1]
        bundle = make_bundle(top, user, ["oci_doors", OUTSIDE_V4, str(world.tcp_outside.port),
                                         str(denied.port)], section, programs=(doors,))
        name = f"nsbagent-{uuid.uuid4().hex[:8]}"
        try:
            result = run_container(user, world.host, real, bundle, name)
        finally:
            delete_container(user, world.host, real, bundle, name)
        log = agent.stop()
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)
    print(f"{runtime}: {lines}")  # recorded (-rP): how each door failed under this runtime
    reached = denied.accepted[accepted_before:]
    if runtime == NOTIFY_ONLY:
        assert lines.get("sendto_fastopen") == "ok", (result.stdout, log)
        assert lines.get("io_uring_setup") == "ok", (result.stdout, log)
        assert reached, "the control reached nothing: the test cannot tell"
        return
    assert result.returncode == 0, (result.stdout, result.stderr, log)
    for door in ("sendto_fastopen", "sendmsg_fastopen", "sendmmsg_fastopen"):
        assert lines.get(door) == "EOPNOTSUPP", (door, result.stdout, log)
    assert lines.get("io_uring_setup") == "ENOSYS", (result.stdout, log)
    assert lines.get("int80") not in (None, "ok"), (result.stdout, log)
    assert lines.get("connect_denied") == "ECONNREFUSED", (result.stdout, log)
    assert reached == [], f"the denied server was reached from {reached}"
    assert "denied:deny rule 1" in log.strip().splitlines()[-1], log


KILLED_SCRIPT = """\
echo "kept: $( (sleep 2; echo hi) | nc {v4} {port} 2>&1)"
echo "after: $(echo hi | nc {v4} {port} 2>&1)"
"""


def test_the_agent_killed_keeps_switched_connections_and_fails_new_ones_at_once(
        user: RootlessUser, world: World) -> None:
    """SIGKILL to the agent while a container runs: its switched connection (opened
    before) still carries its bytes, and its next connect fails with ENOSYS at once
    (no listener left), nothing hangs."""
    if not have("crun"):
        pytest.skip("needs crun (apt-get install crun; .ci/run installs it)")
    top = user.tmpdir / f"killed-{uuid.uuid4().hex[:6]}"
    top.mkdir()
    os.chown(top, user.uid, user.gid)
    server = world.tcp_outside
    accepted_before = len(server.accepted)
    name = f"nsbagent-{uuid.uuid4().hex[:8]}"
    with agent_as(user, world.host, top) as agent:
        script = KILLED_SCRIPT.format(v4=OUTSIDE_V4, port=server.port)
        bundle = make_bundle(top, user, ["sh", "-c", script],
                             seccomp_section(str(agent.path)))
        try:
            with ThreadPoolExecutor(1) as pool:
                running = pool.submit(run_container, user, world.host, "crun", bundle, name)
                deadline = time.monotonic() + 20
                while len(server.accepted) == accepted_before:
                    assert time.monotonic() < deadline and not running.done(), agent.text()
                    time.sleep(0.02)
                agent.process.kill()
                agent.process.wait()
                started = time.monotonic()
                result = running.result(timeout=30)
                took = time.monotonic() - started
        finally:
            delete_container(user, world.host, "crun", bundle, name)
    assert f"kept: {HOST_OUTSIDE_V4}" in result.stdout, (result.stdout, result.stderr)
    assert "after: " in result.stdout and "Function not implemented" in \
        result.stdout.split("after: ", 1)[1], result.stdout
    assert took < 10, f"the container took {took:.1f} s after the agent died"


def test_a_root_agent_serves_an_allowed_users_rootless_container(
        user: RootlessUser, world: World) -> None:
    """One agent for the machine: run as root with ``--allow-user NAME``, it serves that
    user's rootless container (socket mode 0666, the peer's uid checked)."""
    if not have("crun"):
        pytest.skip("needs crun (apt-get install crun; .ci/run installs it)")
    shared = Path(tempfile.mkdtemp(prefix="nsbagent-"))
    top = user.tmpdir / f"root-{uuid.uuid4().hex[:6]}"
    top.mkdir()
    os.chown(top, user.uid, user.gid)
    name = f"nsbagent-{uuid.uuid4().hex[:8]}"
    try:
        shared.chmod(0o755)
        with agent_as(None, world.host, shared, "--allow-user", user.name) as agent:
            assert agent.path.stat().st_mode & 0o777 == 0o666
            script = f"echo \"v4: $(echo hi | nc {OUTSIDE_V4} {world.tcp_outside.port})\""
            bundle = make_bundle(top, user, ["sh", "-c", script],
                                 seccomp_section(str(agent.path)))
            try:
                result = run_container(user, world.host, "crun", bundle, name)
            finally:
                delete_container(user, world.host, "crun", bundle, name)
            wait_for(agent, "ended")
            log = agent.stop()
    finally:
        subprocess.run(["rm", "-rf", str(shared)], check=False)
    assert f"v4: {HOST_OUTSIDE_V4}" in result.stdout, (result.stdout, result.stderr, log)
    summary = log.strip().splitlines()[-1]
    assert "containers served: 1" in summary and "switched 1" in summary, log


def container_state(user: RootlessUser, host: str, runtime: str, bundle: Path,
                    name: str) -> dict:
    done = subprocess.run(runtime_as(user, host, runtime, bundle, "state", name),
                          capture_output=True, text=True, timeout=30)
    return json.loads(done.stdout) if done.returncode == 0 else {"status": "stopped"}


def test_container_addresses_wait_until_the_namespace_can_be_reached() -> None:
    """Until the container's namespace can be opened the fallback answers (one warning),
    and it is tried again after the retry delay, then read live."""
    tries: list[int] = []

    def reach(pid: int) -> socket.socket:
        tries.append(pid)
        if len(tries) == 1:
            raise PermissionError(errno.EACCES, "not dumpable yet")
        return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)

    fallback = {ipaddress.ip_address("10.0.2.100")}
    addresses = ContainerAddresses(4242, "c1", fallback, reach=reach)
    addresses.RETRY = 0.2
    try:
        assert ipaddress.ip_address("10.0.2.100") in addresses  # the fallback
        assert ipaddress.ip_address("127.0.0.1") not in addresses
        assert tries == [4242]
        assert ipaddress.ip_address("10.0.2.100") in addresses  # not tried again yet
        assert tries == [4242]
        time.sleep(0.25)
        assert ipaddress.ip_address("127.0.0.1") in addresses  # this namespace's lo
        assert ipaddress.ip_address("10.0.2.100") not in addresses
        assert tries == [4242, 4242]
    finally:
        addresses.close()


# ---- the agent's own input ------------------------------------------------------------


@pytest.fixture
def root_agent(world: World) -> Iterator[Agent]:
    """The agent as root (this test is then the runtime) with --allow-user 12345, so
    its socket is open to everyone and only the peer's uid decides (in a directory
    every user can reach: pytest's own are 0700)."""
    top = Path(tempfile.mkdtemp(prefix="nsbagent-"))
    try:
        top.chmod(0o755)
        with agent_as(None, world.host, top, "--allow-user", "12345") as agent:
            yield agent
    finally:
        subprocess.run(["rm", "-rf", str(top)], check=False)


def send(path: Path, data: bytes, fds: tuple[int, ...] = ()) -> None:
    """One hand-in as a runtime makes it: connect, one message (fds attached), close.
    The agent may close first (a message too long): that is its answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(path))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            if fds:
                sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                       array.array("i", fds))])
            elif data:
                sock.sendall(data)


def state(fds: list[str], pid: int | None = None) -> bytes:
    return json.dumps({"ociVersion": "1.0.2", "fds": fds, "pid": pid or os.getpid(),
                       "metadata": "", "state": {"ociVersion": "1.0.2", "id": "x",
                                                 "status": "creating", "pid": os.getpid(),
                                                 "bundle": "/"}}).encode()


def refusal_lines(log: str) -> int:
    """The agent's refusal lines (one per hand-in refused)."""
    return sum(1 for line in log.splitlines()
               if line.startswith("nsbridge: seccomp-agent: pid ")
               or "refused: only uid" in line)


def wait_for(agent: Agent, text: str, count: int = 1) -> None:
    deadline = time.monotonic() + 10
    while agent.text().count(text) < count:
        assert time.monotonic() < deadline, f"{text!r} never logged: {agent.text()}"
        assert agent.alive(), agent.text()
        time.sleep(0.05)


def test_bad_hand_ins_are_refused_with_a_line_and_the_agent_serves_on(
        root_agent: Agent, world: World) -> None:
    """Garbage, a non-object, missing fields, too long, no fd, two fds for one name, a
    pipe as seccompFd, nine fds, and another user's connection: each one line and a
    count; the agent is still alive, holds none of the fds, and its summary counts them
    by reason."""
    path = root_agent.path
    read, write = os.pipe()
    try:
        send(path, b"\x00\xffnot json")
        send(path, b"[1, 2, 3]")
        send(path, b'{"ociVersion": "1", "fds": []}')
        send(path, b" " * (70 * 1024))
        send(path, state(["seccompFd"]))  # no fd came with it
        send(path, state(["seccompFd"]), (read, write))
        send(path, state(["seccompFd"]), (read,))  # a pipe, not a listener
        send(path, state(["seccompFd"] * 9), (read,) * 9)  # more fds than any runtime
        send(path, b"")  # connect and close at once
        subprocess.run(["ip", "netns", "exec", world.host, *as_nobody(
            "python3", "-c", f"import socket; s = socket.socket(socket.AF_UNIX); "
            f"s.connect({str(path)!r}); s.recv(1)")], check=True, timeout=30)
    except BaseException:
        os.close(read)
        os.close(write)
        raise
    deadline = time.monotonic() + 10
    while refusal_lines(root_agent.text()) < 10:
        assert time.monotonic() < deadline, root_agent.text()
        time.sleep(0.05)
    assert root_agent.alive()
    pipe = f"pipe:[{os.fstat(read).st_ino}]"
    fds = Path(f"/proc/{root_agent.process.pid}/fd")
    held = [link for link in fds.iterdir() if os.readlink(link) == pipe]
    os.close(read)
    os.close(write)
    assert held == [], f"the agent still holds {held}"
    log = root_agent.stop()
    assert "Traceback" not in log, log
    summary = log.strip().splitlines()[-1]
    for reason, count in (("malformed state", 6), ("message too long", 1),
                          ("not a seccomp listener", 1), ("peer user not allowed", 1),
                          ("too many fds", 1)):
        assert f"{reason} x{count}" in summary, (reason, log)
    assert "containers served: 0" in summary, summary


def test_a_runtime_that_starts_a_message_and_stalls_is_dropped(root_agent: Agent) -> None:
    """A peer that sends part of a message and stops holds nothing past the receive
    timeout (counted from its first byte)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(root_agent.path))
        sock.sendall(b'{"ociVersion"')
        wait_for(root_agent, "sent no complete state within")
        assert sock.recv(1) == b""  # the agent closed its end
    assert root_agent.alive()


def test_a_runtime_that_connects_early_is_waited_for(root_agent: Agent) -> None:
    """crun connects at ``create`` and sends at ``start``: a connection that has sent
    nothing is not timed out (its message, here garbage, is read when it comes)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(root_agent.path))
        time.sleep(6)  # past the 5 s a started message has
        sock.sendall(b"late garbage")
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(1) == b""
    wait_for(root_agent, "not JSON")
    assert "sent no complete state" not in root_agent.text()


def test_connections_past_the_reading_limit_wait_in_the_backlog(root_agent: Agent) -> None:
    """With 64 connections being read (idle: no deadline), the 65th waits in the listen
    backlog without the agent spinning, and is read once one of them ends."""
    held = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(64)]
    try:
        for sock in held:
            sock.connect(str(root_agent.path))
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as late:
            late.connect(str(root_agent.path))
            late.sendall(b"[]")
            late.shutdown(socket.SHUT_WR)
            time.sleep(0.5)
            pid = root_agent.process.pid
            assert "not a JSON object" not in root_agent.text()
            assert _cpu_seconds(pid, 1.0) < 0.5, "the agent spins while full"
            held.pop().close()
            wait_for(root_agent, "not a JSON object")
    finally:
        for sock in held:
            sock.close()
    assert root_agent.alive()


def _cpu_seconds(pid: int, interval: float) -> float:
    """CPU time process ``pid`` used over ``interval`` seconds."""
    def used() -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    before = used()
    time.sleep(interval)
    return used() - before


def test_print_profile_is_what_the_tests_use(tmp_path: Path) -> None:
    """``--print-profile`` prints the section the container tests run with."""
    out = subprocess.run(["python3", "-m", "nsbridge", "seccomp-agent", "--socket",
                          str(tmp_path / "a.sock"), "--print-profile", "--metadata", "m"],
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == seccomp_section(str(tmp_path / "a.sock"), "m")
