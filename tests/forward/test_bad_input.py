"""Every bad input is refused the same way: exit code 2 and ONE line on stderr,
``nsbridge: error: …``, that names the offending value or flag — never a traceback, and
nothing left listening.

Where a case has a valid ``-l`` next to the bad input, the listen port is a free one picked
here, and the test checks afterwards that nothing listens there: a refusal must come
before the listener is opened (or the listener must be gone with the process).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.environment import REPO, have
from helpers.netns import connect_in, listen_in
from helpers.processes import run_nsbridge
from nsbridge.relay.native import unavailable as native_unavailable

# ---- helpers ------------------------------------------------------------------------


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str,
                          command: str = "nsbridge") -> str:
    """Exit 2, one ``COMMAND: error:`` line on stderr containing every needle, no stdout."""
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith(f"{command}: error: "), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    assert result.stdout == ""
    return line


def free_port(netns: str | None = None) -> int:
    """A port nothing listens on right now (in ``netns``, or here)."""
    with listen_in(netns) as probe:
        return probe.getsockname()[1]


def assert_nothing_listens(port: int, netns: str | None = None) -> None:
    with pytest.raises(ConnectionRefusedError):
        connect_in(netns, ("127.0.0.1", port)).close()


def run_compat(*args: str) -> subprocess.CompletedProcess:
    """The ``netns-tcp-bridge`` entry point (python -m nsbridge.cli.compat), to completion."""
    return subprocess.run([sys.executable, "-m", "nsbridge.cli.compat", *args],
                          capture_output=True, text=True, timeout=30, cwd=REPO)


@pytest.fixture
def listen_port() -> Iterator[int]:
    """A free port for a valid ``-l``; afterwards nothing may listen there."""
    port = free_port()
    yield port
    assert_nothing_listens(port)


@pytest.fixture
def regular_file_fd(tmp_path) -> Iterator[int]:
    path = tmp_path / "not-a-socket"
    path.write_text("just a file\n")
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    yield fd
    os.close(fd)


# ---- addresses ----------------------------------------------------------------------

MALFORMED = [
    pytest.param("127.0.0.1", "expected HOST:PORT", id="no-port"),
    pytest.param("[::1:80", "malformed address", id="unclosed-bracket"),
    pytest.param("::1:80", "IPv6 addresses need brackets, e.g. [::1]:80", id="v6-no-brackets"),
    pytest.param("host:abc", "port 'abc' is not a number", id="port-not-number"),
    pytest.param("", "expected HOST:PORT", id="empty"),
    # "²".isdigit() is True but int("²") fails: this used to end in a traceback.
    pytest.param("127.0.0.1:\u00b2", "is not a number", id="unicode-digit-port"),
]


@pytest.mark.parametrize(("value", "why"), MALFORMED)
def test_malformed_listen_address(value: str, why: str) -> None:
    result = run_nsbridge("forward", "-l", value, "-c", "127.0.0.1:9")
    assert_one_line_error(result, f"-l {value!r}", why)


@pytest.mark.parametrize(("value", "why"), MALFORMED)
def test_malformed_connect_address(value: str, why: str, listen_port: int) -> None:
    result = run_nsbridge("forward", "-l", f"127.0.0.1:{listen_port}", "-c", value)
    assert_one_line_error(result, f"-c {value!r}", why)


@pytest.mark.parametrize(("flag", "value", "why"), [
    pytest.param("-l", "127.0.0.1:70000", "port 70000 out of range (0-65535)", id="listen-70000"),
    pytest.param("-c", "127.0.0.1:0", "port 0 out of range (1-65535)", id="connect-0"),
    pytest.param("-c", "127.0.0.1:65536", "port 65536 out of range", id="connect-65536"),
])
def test_port_out_of_range(flag: str, value: str, why: str) -> None:
    args = ["-l", value, "-c", "127.0.0.1:9"] if flag == "-l" else ["-l", "127.0.0.1:0",
                                                                      "-c", value]
    result = run_nsbridge("forward", *args)
    assert_one_line_error(result, f"{flag} {value!r}", why)


@pytest.mark.parametrize(("flag", "value"), [
    pytest.param("--accept", "fast", id="accept"),
    pytest.param("--engine", "zerocopy", id="engine"),
    pytest.param("--mover", "zerocopy", id="mover"),
    pytest.param("--relay", "turbo", id="relay"),
])
def test_unknown_mode_names_the_choices(flag: str, value: str, listen_port: int) -> None:
    result = run_nsbridge("forward", "-l", f"127.0.0.1:{listen_port}", "-c", "127.0.0.1:9",
                          flag, value)
    line = assert_one_line_error(result, flag, f"invalid choice: {value!r}")
    assert "choose from" in line


@pytest.mark.parametrize("one_shot", [False, True], ids=["daemon", "one-shot"])
def test_unknown_relay_in_the_environment_is_one_line(one_shot: bool,
                                                       listen_port: int) -> None:
    """$NSBRIDGE_RELAY is read by every process (workers too): a bad value is refused
    up front, naming the variable, whichever way the forward runs."""
    env = {**os.environ, "NSBRIDGE_RELAY": "turbo"}
    result = _forward_with_env(one_shot, listen_port, env)
    line = assert_one_line_error(result, "$NSBRIDGE_RELAY", "'turbo'")
    assert "choose from native, python" in line


def _forward_with_env(one_shot: bool, listen_port: int, env: dict[str, str]):
    """``nsbridge forward`` to a closed port with ``env``, one-shot on an inherited
    socket or as a daemon on ``listen_port``: for errors read before any traffic."""
    if one_shot:
        ours, theirs = socket.socketpair()
        with ours, theirs:
            return run_nsbridge("forward", "-S", str(theirs.fileno()), "-c", "127.0.0.1:9",
                                env=env, pass_fds=(theirs.fileno(),))
    return run_nsbridge("forward", "-l", f"127.0.0.1:{listen_port}", "-c", "127.0.0.1:9",
                        env=env)


@pytest.mark.parametrize("one_shot", [False, True], ids=["daemon", "one-shot"])
def test_bad_relay_sockopts_in_the_environment_are_one_line(one_shot: bool,
                                                            listen_port: int) -> None:
    """$NSBRIDGE_RELAY_SOCKOPTS (the native core's tuning knobs) is refused up front
    with the item named, never half-applied by the workers."""
    env = {**os.environ, "NSBRIDGE_RELAY": "native",
           "NSBRIDGE_RELAY_SOCKOPTS": "server:sndbuf=16M,client:turbo=1"}
    if one_shot and native_unavailable():
        pytest.skip("the one-shot forward reads it only in the native core, not built here")
    result = _forward_with_env(one_shot, listen_port, env)
    line = assert_one_line_error(result, "$NSBRIDGE_RELAY_SOCKOPTS", "'client:turbo=1'")
    assert "sndbuf, rcvbuf, notsent_lowat, busy_poll" in line


def _resolution_stays_local() -> bool:
    """True when name lookups are done by this process itself (files, dns).

    nscd or systemd-resolved would resolve over a Unix socket from *their* namespace,
    which could send a DNS packet off the machine; then the test is skipped.
    """
    try:
        with open("/etc/nsswitch.conf") as conf:
            hosts = next((line.split(":", 1)[1] for line in conf
                          if line.strip().startswith("hosts:")), "files dns")
    except OSError:
        hosts = "files dns"
    modules = {word for word in hosts.split() if not word.startswith("[")}
    local = modules <= {"files", "dns", "myhostname"}
    return local and not os.path.exists("/var/run/nscd/socket")


@pytest.mark.skipif(not _resolution_stays_local(), reason="a resolver daemon could leak DNS")
def test_unknown_host(netns: str, listen_port: int) -> None:
    """Resolved inside a fresh namespace with only loopback: no DNS packet can leave."""
    result = run_nsbridge("forward", "-l", f"127.0.0.1:{listen_port}",
                          "--connect-netns", netns, "-c", "no-such-host.invalid:80")
    assert_one_line_error(result, "no-such-host.invalid", "cannot resolve host")


# ---- namespaces ---------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--connect-netns", "--listen-netns", "-t", "-f"])
def test_namespace_path_does_not_exist(flag: str, listen_port: int) -> None:
    path = f"/run/netns/nsbt-missing-{uuid.uuid4().hex[:10]}"
    result = run_nsbridge("forward", flag, path, "-l", f"127.0.0.1:{listen_port}",
                          "-c", "127.0.0.1:9")
    assert_one_line_error(result, path, "does not exist")


@pytest.mark.parametrize(("flag", "expected"), [
    pytest.param(flag, expected, id=flag) for flag, expected in [
        ("--connect-netns", "a path, pid:N, fd:N or an `ip netns` name"),
        ("--listen-netns", "a path, pid:N, fd:N or an `ip netns` name"),
        ("-f", "a path such as /proc/1234/ns/net"),
        ("-t", "a path such as /proc/1234/ns/net"),
        ("-F", "an open file descriptor number"),
        ("-T", "an open file descriptor number"),
    ]
])
def test_empty_namespace(flag: str, expected: str, listen_port: int) -> None:
    result = run_nsbridge("forward", flag, "", "-l", f"127.0.0.1:{listen_port}",
                          "-c", "127.0.0.1:9")
    assert_one_line_error(result, f"{flag} ''", "empty network namespace", expected)


def _regular_file() -> str:
    return "/etc/hostname" if os.path.isfile("/etc/hostname") else "/etc/passwd"


@pytest.mark.parametrize(("path", "why"), [
    pytest.param("/proc/self/ns/mnt", "is a mount namespace, not a network namespace",
                 id="mount-namespace"),
    pytest.param(_regular_file(), "is not a namespace file", id="regular-file"),
    pytest.param("/etc", "is a directory", id="directory"),
])
@pytest.mark.parametrize("flag", ["--connect-netns", "-f"])
def test_not_a_network_namespace(flag: str, path: str, why: str, listen_port: int) -> None:
    result = run_nsbridge("forward", flag, path, "-l", f"127.0.0.1:{listen_port}",
                          "-c", "127.0.0.1:9")
    assert_one_line_error(result, path, why)


def _absent_pid() -> int:
    with open("/proc/sys/kernel/pid_max") as f:
        pid = int(f.read()) - 1
    while os.path.exists(f"/proc/{pid}"):
        pid -= 1
    return pid


def test_pid_that_does_not_exist(listen_port: int) -> None:
    pid = _absent_pid()
    result = run_nsbridge("forward", "-l", f"127.0.0.1:{listen_port}",
                          "--connect-netns", f"pid:{pid}", "-c", "127.0.0.1:9")
    assert_one_line_error(result, f"pid:{pid}", "no such process")


def test_pid_not_a_number(listen_port: int) -> None:
    result = run_nsbridge("forward", "-l", f"127.0.0.1:{listen_port}",
                          "--connect-netns", "pid:abc", "-c", "127.0.0.1:9")
    assert_one_line_error(result, "pid:abc", "not a process id")


def test_name_not_in_run_netns(listen_port: int) -> None:
    name = f"nsbt-missing-{uuid.uuid4().hex[:10]}"
    result = run_nsbridge("forward", "-l", f"127.0.0.1:{listen_port}",
                          "--connect-netns", name, "-c", "127.0.0.1:9")
    assert_one_line_error(result, repr(name), "not found", "ip netns list")


def _can_unshare_user() -> bool:
    if not have("unshare"):
        return False
    return subprocess.run(["unshare", "-U", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_unshare_user(), reason="needs unshare -U (user namespaces)")
def test_permission_denied_on_setns(netns: str, listen_port: int) -> None:
    """uid 0 inside a fresh user namespace has no CAP_SYS_ADMIN over the initial one."""
    result = subprocess.run(
        ["unshare", "-U", sys.executable, "-m", "nsbridge", "forward",
         "-l", f"127.0.0.1:{listen_port}", "--connect-netns", f"/run/netns/{netns}",
         "-c", "127.0.0.1:80"],
        capture_output=True, text=True, timeout=30, cwd=REPO)
    assert_one_line_error(result, "permission denied", f"/run/netns/{netns}",
                          "CAP_SYS_ADMIN", "unshare -U")


# ---- listening ----------------------------------------------------------------------


def test_listen_address_in_use() -> None:
    with listen_in(None) as holder:
        port = holder.getsockname()[1]
        result = run_nsbridge("forward", "-l", f"127.0.0.1:{port}", "-c", "127.0.0.1:9")
    assert_one_line_error(result, f"127.0.0.1:{port}", "Address already in use")


def test_listen_address_in_use_in_namespace(netns: str) -> None:
    with listen_in(netns) as holder:
        port = holder.getsockname()[1]
        result = run_nsbridge("forward", "--listen-netns", netns, "-l", f"127.0.0.1:{port}",
                              "-c", "127.0.0.1:9")
    assert_one_line_error(result, f"127.0.0.1:{port}", "Address already in use", netns)


def test_address_not_available_in_namespace(netns: str) -> None:
    """The namespace has only loopback: 10.123.0.1 is no address of it (bind sends nothing)."""
    result = run_nsbridge("forward", "-l", "10.123.0.1:8080", "--listen-netns", netns,
                          "-c", "127.0.0.1:9")
    assert_one_line_error(result, "10.123.0.1:8080", "Cannot assign requested address",
                          "no interface in that namespace has this address")


# ---- inherited file descriptors -------------------------------------------------------


def _args_for(flag: str, fd: int, listen_port: int) -> list[str]:
    """A command with ``flag fd`` as the bad input and a valid other side."""
    if flag == "-C":
        return ["forward", "-l", f"127.0.0.1:{listen_port}", "-C", str(fd)]
    return ["forward", flag, str(fd), "-c", "127.0.0.1:9"]


LONG = {"-L": "-L/--listen-fd", "-S": "-S/--preaccepted-fd", "-C": "-C/--connect-fd"}


def test_listen_fd_not_open() -> None:
    # subprocess closes every fd above 2 in the child, so 99 is not open there.
    result = run_nsbridge("forward", "-L", "99", "-c", "127.0.0.1:9")
    assert_one_line_error(result, "-L/--listen-fd 99", "file descriptor 99 is not open")


def test_fd_not_a_number() -> None:
    result = run_nsbridge("forward", "-L", "abc", "-c", "127.0.0.1:9")
    assert_one_line_error(result, "-L/--listen-fd 'abc'", "not a file descriptor number")


@pytest.mark.parametrize("flag", ["-L", "-S", "-C"])
def test_fd_is_a_regular_file(flag: str, regular_file_fd: int, listen_port: int) -> None:
    result = run_nsbridge(*_args_for(flag, regular_file_fd, listen_port),
                          pass_fds=(regular_file_fd,))
    assert_one_line_error(result, f"{LONG[flag]} {regular_file_fd}",
                          "is a regular file, not a socket")


def test_listen_fd_is_connected_not_listening() -> None:
    with listen_in(None) as listener, \
            socket.create_connection(listener.getsockname(), timeout=10) as connected:
        fd = connected.fileno()
        result = run_nsbridge("forward", "-L", str(fd), "-c", "127.0.0.1:9", pass_fds=(fd,))
    assert_one_line_error(result, f"-L/--listen-fd {fd}", "socket is not listening",
                          "-S/--preaccepted-fd")


@pytest.mark.parametrize(("flag", "hint"), [
    pytest.param("-S", "pass a listening socket with -L/--listen-fd", id="-S"),
    pytest.param("-C", "it must already be connected to the target", id="-C"),
])
def test_connected_fd_is_listening(flag: str, hint: str, listen_port: int) -> None:
    with listen_in(None) as listener:
        fd = listener.fileno()
        result = run_nsbridge(*_args_for(flag, fd, listen_port), pass_fds=(fd,))
    assert_one_line_error(result, f"{LONG[flag]} {fd}", "socket is listening, not connected",
                          hint)


def test_connect_fd_not_connected(listen_port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as unconnected:
        fd = unconnected.fileno()
        result = run_nsbridge(*_args_for("-C", fd, listen_port), pass_fds=(fd,))
    assert_one_line_error(result, f"-C/--connect-fd {fd}", "socket is not connected")


@pytest.mark.parametrize("flag", ["-L", "-S", "-C"])
def test_fd_is_a_udp_socket(flag: str, listen_port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        fd = udp.fileno()
        result = run_nsbridge(*_args_for(flag, fd, listen_port), pass_fds=(fd,))
    assert_one_line_error(result, f"{LONG[flag]} {fd}", "datagram", "stream")


def test_same_fd_as_client_and_target() -> None:
    """-S 5 -C 5 would relay a socket to itself (and used to crash with a traceback)."""
    with listen_in(None) as listener, \
            socket.create_connection(listener.getsockname(), timeout=10) as connected:
        fd = connected.fileno()
        result = run_nsbridge("forward", "-S", str(fd), "-C", str(fd), pass_fds=(fd,))
    assert_one_line_error(result, f"-S {fd} and -C {fd}", "same file descriptor")


@pytest.mark.parametrize("flag", ["-F", "-T"])
def test_netns_fd_is_not_a_namespace(flag: str, regular_file_fd: int, listen_port: int) -> None:
    result = run_nsbridge("forward", "-l", f"127.0.0.1:{listen_port}", flag,
                          str(regular_file_fd), "-c", "127.0.0.1:9", pass_fds=(regular_file_fd,))
    assert_one_line_error(result, f"{flag} {regular_file_fd}", "is not a namespace file")


@pytest.mark.parametrize("flag", ["-F", "-T"])
def test_netns_fd_is_another_kind_of_namespace(flag: str, listen_port: int) -> None:
    fd = os.open("/proc/self/ns/uts", os.O_RDONLY | os.O_CLOEXEC)
    try:
        result = run_nsbridge("forward", "-l", f"127.0.0.1:{listen_port}", flag, str(fd),
                              "-c", "127.0.0.1:9", pass_fds=(fd,))
    finally:
        os.close(fd)
    assert_one_line_error(result, f"{flag} {fd}", "is a uts namespace, not a network namespace")


@pytest.mark.parametrize("flag", ["-F", "-T"])
def test_netns_fd_not_open(flag: str, listen_port: int) -> None:
    result = run_nsbridge("forward", "-l", f"127.0.0.1:{listen_port}", flag, "99",
                          "-c", "127.0.0.1:9")
    assert_one_line_error(result, f"{flag} 99", "not open")


# ---- options ------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "flags"), [
    pytest.param(["-l", "127.0.0.1:0", "-L", "3", "-c", "127.0.0.1:9"], ("-l", "-L"),
                 id="-l-and-L"),
    pytest.param(["-l", "127.0.0.1:0", "-c", "127.0.0.1:9", "-C", "3"], ("-c", "-C"),
                 id="-c-and-C"),
    pytest.param(["-l", "127.0.0.1:0", "-f", "/run/netns/x", "--listen-netns", "x",
                  "-c", "127.0.0.1:9"], ("-f", "--listen-netns"), id="-f-and--listen-netns"),
    pytest.param(["-l", "127.0.0.1:0", "-t", "/run/netns/x", "-T", "3", "-c", "127.0.0.1:9"],
                 ("-t", "-T"), id="-t-and-T"),
])
def test_conflicting_options(args: list[str], flags: tuple[str, str]) -> None:
    result = run_nsbridge("forward", *args)
    assert_one_line_error(result, "conflicting options", f"{flags[0]} and {flags[1]}")


@pytest.mark.parametrize(("args", "why"), [
    pytest.param(["forward", "-c", "127.0.0.1:9"], "missing listen side: give one of -l, -L, -S",
                 id="no-listen-side"),
    pytest.param(["forward", "-l", "127.0.0.1:0"], "missing connect side: give one of -c, -C",
                 id="no-connect-side"),
    pytest.param(["forward"], "missing listen side", id="forward-without-arguments"),
    pytest.param([], "missing command: give one of forward, serve, ctl, run, attach, demo",
                 id="no-arguments-at-all"),
])
def test_missing_options(args: list[str], why: str) -> None:
    assert_one_line_error(run_nsbridge(*args), why)


def test_negative_connect_timeout(listen_port: int) -> None:
    result = run_nsbridge("forward", "-l", f"127.0.0.1:{listen_port}", "-c", "127.0.0.1:9",
                          "--connect-timeout", "-1")
    assert_one_line_error(result, "--connect-timeout -1", "must be 0 or more seconds")


@pytest.mark.parametrize("count", ["0", "-2"])
def test_workers_below_one(count: str, listen_port: int) -> None:
    result = run_nsbridge("forward", "-l", f"127.0.0.1:{listen_port}", "-c", "127.0.0.1:9",
                          "--workers", count)
    assert_one_line_error(result, f"--workers {count}", "must be 1 or more")


@pytest.mark.parametrize(("args", "needles"), [
    pytest.param(["forward", "-l"], ("-l/--listen", "expected one argument"), id="no-value"),
    pytest.param(["forward", "-l", "127.0.0.1:0", "-c", "127.0.0.1:9", "--connect-timeout",
                  "abc"], ("--connect-timeout", "'abc'"), id="timeout-not-a-number"),
    pytest.param(["forward", "--bogus"], ("--bogus",), id="unknown-option"),
    pytest.param(["frobnicate"], ("frobnicate",), id="unknown-command"),
])
def test_usage_errors_are_one_line_too(args: list[str], needles: tuple[str, ...]) -> None:
    """argparse's own errors use the same one-line format, pointing at --help."""
    assert_one_line_error(run_nsbridge(*args), *needles, "--help")


# ---- the netns-tcp-bridge entry point -------------------------------------------------


def test_compat_malformed_address() -> None:
    result = run_compat("-l", "127.0.0.1", "-c", "127.0.0.1:9")
    assert_one_line_error(result, "-l '127.0.0.1'", "expected HOST:PORT",
                          command="netns_tcp_bridge")


@pytest.mark.parametrize(("args", "why"), [
    pytest.param([], "missing listen side: give one of -l, -L, -S", id="no-arguments"),
    pytest.param(["-l", "127.0.0.1:0"], "missing connect side: give one of -c, -C",
                 id="no-connect-side"),
    pytest.param(["-c", "127.0.0.1:9"], "missing listen side", id="no-listen-side"),
])
def test_compat_missing_options(args: list[str], why: str) -> None:
    assert_one_line_error(run_compat(*args), why, command="netns_tcp_bridge")


def test_compat_rejects_nsbridge_only_options() -> None:
    """The compat CLI has exactly the original flags; extras are a usage error."""
    result = run_compat("-l", "127.0.0.1:0", "-c", "127.0.0.1:9", "--connect-timeout", "5")
    assert_one_line_error(result, "unrecognized arguments", "--connect-timeout",
                          "netns_tcp_bridge --help", command="netns_tcp_bridge")


@pytest.mark.parametrize("name", ["netns_tcp_bridge", "netns-tcp-bridge"])
def test_compat_commands_are_installed_under_both_names(name: str) -> None:
    """The original's binary name (underscores) and the dashed one are both installed, and
    each names itself in its errors and --version, so existing scripts and logs read right."""
    script = Path(sys.executable).parent / name
    if not script.exists():
        pytest.skip(f"nsbridge is not installed next to {sys.executable} (pip install .)")
    result = subprocess.run([str(script), "-l", "127.0.0.1", "-c", "127.0.0.1:9"],
                            capture_output=True, text=True, timeout=30)
    assert_one_line_error(result, "-l '127.0.0.1'", command=name)
    version = subprocess.run([str(script), "--version"], capture_output=True, text=True,
                             timeout=30)
    assert version.returncode == 0 and version.stdout.startswith(f"{name} (nsbridge "), version
