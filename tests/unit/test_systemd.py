"""Socket activation and sd_notify against the real protocol, no systemd needed.

The activation tests do what systemd does: real listening sockets are placed at fds
3, 4, … of a child process (posix_spawn dup2 file actions), LISTEN_FDS/LISTEN_FDNAMES
are set, and LISTEN_PID is the child's own PID (``sh -c 'export LISTEN_PID=$$; exec …'``
keeps the PID across exec).  The child reports what ``listen_fds()`` found as JSON.
The notify tests bind a real AF_UNIX datagram socket as NOTIFY_SOCKET.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import struct
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.environment import REPO
from nsbridge.errors import UserError
from nsbridge.linux import systemd

CHILD = r"""
import fcntl, json, os, socket, sys
# systemd passes exactly LISTEN_FDS fds; drop anything else the test runner leaked.
os.closerange(3 + int(sys.argv[1]), 65536)
from nsbridge.linux import systemd
from nsbridge.errors import UserError

try:
    fds = systemd.listen_fds()
except UserError as exc:
    result = {"error": str(exc)}
else:
    result = {"fds": {}}
    for name, numbers in fds.items():
        entries = []
        for fd in numbers:
            sock = socket.socket(fileno=fd)
            entries.append({
                "fd": fd,
                "port": sock.getsockname()[1],
                "listening": sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN),
                "cloexec": bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC),
            })
            sock.detach()
        result["fds"][name] = entries
result["env"] = {k: os.environ.get(k) for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")}
print(json.dumps(result))
"""


def run_activated(sockets: list[socket.socket], env: dict[str, str]) -> dict:
    """Spawn CHILD with ``sockets`` at fds 3.. and ``env`` plus LISTEN_PID=<its pid>."""
    # Move the sources far from 3.. so no dup2 in the list overwrites a later source.
    sources = [fcntl.fcntl(s.fileno(), fcntl.F_DUPFD_CLOEXEC, 200) for s in sockets]
    out_r, out_w = os.pipe()
    actions = [(os.POSIX_SPAWN_DUP2, out_w, 1)]
    actions += [
        (os.POSIX_SPAWN_DUP2, fd, systemd.LISTEN_FDS_START + i) for i, fd in enumerate(sources)
    ]
    argv = ["sh", "-c", 'export LISTEN_PID=$$; exec "$@"', "sh"]
    argv += [sys.executable, "-c", CHILD, str(len(sockets))]
    child_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO), **env}
    try:
        pid = os.posix_spawn("/bin/sh", argv, child_env, file_actions=actions)
    finally:
        os.close(out_w)
        for fd in sources:
            os.close(fd)
    with os.fdopen(out_r, "rb") as out:
        output = out.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, output
    return json.loads(output)


@pytest.fixture
def listeners() -> Iterator[list[socket.socket]]:
    socks = [socket.create_server(("127.0.0.1", 0)) for _ in range(3)]
    try:
        yield socks
    finally:
        for sock in socks:
            sock.close()


def port(sock: socket.socket) -> int:
    return sock.getsockname()[1]


# ---- listen_fds: real activation ------------------------------------------------------


def test_names_map_to_the_right_sockets(listeners: list[socket.socket]) -> None:
    result = run_activated(listeners, {"LISTEN_FDS": "3", "LISTEN_FDNAMES": "web:admin:web"})
    fds = result["fds"]
    assert sorted(fds) == ["admin", "web"]
    assert [e["fd"] for e in fds["web"]] == [3, 5]
    assert [e["port"] for e in fds["web"]] == [port(listeners[0]), port(listeners[2])]
    assert [e["fd"] for e in fds["admin"]] == [4]
    assert [e["port"] for e in fds["admin"]] == [port(listeners[1])]
    for entry in fds["web"] + fds["admin"]:
        assert entry["listening"] == 1
        assert entry["cloexec"] is True
    assert result["env"] == {"LISTEN_PID": None, "LISTEN_FDS": None, "LISTEN_FDNAMES": None}


def test_names_default_to_unknown(listeners: list[socket.socket]) -> None:
    result = run_activated(listeners[:2], {"LISTEN_FDS": "2"})
    assert [e["port"] for e in result["fds"]["unknown"]] == [
        port(listeners[0]),
        port(listeners[1]),
    ]


def test_fd_not_passed_is_an_error(listeners: list[socket.socket]) -> None:
    result = run_activated(listeners[:2], {"LISTEN_FDS": "3"})
    assert result["error"].startswith("LISTEN_FDS=3: file descriptor 5 is not open")
    assert result["env"]["LISTEN_FDS"] is None  # unset even on error


def test_names_count_mismatch_in_child(listeners: list[socket.socket]) -> None:
    result = run_activated(listeners[:2], {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "web"})
    assert result["error"] == "LISTEN_FDNAMES='web': 1 names for LISTEN_FDS=2 file descriptors"


# ---- listen_fds: environment handling (in-process, no fd is touched) -----------------


def test_not_activated() -> None:
    env: dict[str, str] = {"PATH": "/bin"}
    assert systemd.listen_fds(env) == {}
    assert env == {"PATH": "/bin"}


def test_other_pid_means_not_for_us() -> None:
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b"}
    assert systemd.listen_fds(env) == {}
    assert env == {}


def test_zero_fds_and_keep_environment() -> None:
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"}
    assert systemd.listen_fds(env, unset=False) == {}
    assert env == {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"}


def test_pid_without_fds_is_nothing() -> None:
    assert systemd.listen_fds({"LISTEN_PID": str(os.getpid())}) == {}


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LISTEN_PID": "abc", "LISTEN_FDS": "1"}, "LISTEN_PID='abc': not a PID"),
        ({"LISTEN_PID": "", "LISTEN_FDS": "1"}, "LISTEN_PID='': not a PID"),
        ({"LISTEN_PID": "0", "LISTEN_FDS": "1"}, "LISTEN_PID='0': not a PID"),
        ({"LISTEN_PID": "-5", "LISTEN_FDS": "1"}, "LISTEN_PID='-5': not a PID"),
        ({"LISTEN_FDS": "x"}, "LISTEN_FDS='x': not a number of file descriptors"),
        ({"LISTEN_FDS": "-1"}, "LISTEN_FDS='-1': not a number of file descriptors"),
        ({"LISTEN_FDS": "1.5"}, "LISTEN_FDS='1.5': not a number of file descriptors"),
        ({"LISTEN_FDS": " 1"}, "LISTEN_FDS=' 1': not a number of file descriptors"),
        ({"LISTEN_FDS": "99999999"}, "LISTEN_FDS='99999999': implausibly many"),
        (
            {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "a:b"},
            "LISTEN_FDNAMES='a:b': 2 names for LISTEN_FDS=1 file descriptors",
        ),
        (
            {"LISTEN_FDS": "1", "LISTEN_FDNAMES": ""},
            "LISTEN_FDNAMES='': 0 names for LISTEN_FDS=1 file descriptors",
        ),
    ],
)
def test_malformed_environment(env: dict[str, str], message: str) -> None:
    env = {"LISTEN_PID": str(os.getpid()), **env}
    with pytest.raises(UserError) as info:
        systemd.listen_fds(env)
    assert str(info.value).startswith(message), str(info.value)
    assert env == {}


def test_fds_named() -> None:
    fds = {"web": [3], "admin": [4, 5]}
    assert systemd.fds_named(fds, "admin", what="--listen-fd-name") == [4, 5]
    with pytest.raises(UserError, match=r"^--listen-fd-name db: systemd passed sockets named "
                       r"admin, web$"):
        systemd.fds_named(fds, "db", what="--listen-fd-name")
    with pytest.raises(UserError, match=r"systemd passed no sockets"):
        systemd.fds_named({}, "web", what="--listen-fd-name")


# ---- notify -----------------------------------------------------------------------------


@pytest.fixture(params=["path", "abstract"])
def notify_socket(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[str, socket.socket]]:
    """A bound datagram socket and the NOTIFY_SOCKET value that names it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.settimeout(10)
    if request.param == "path":
        address: str | bytes = str(tmp_path / "notify.sock")
        value = str(address)
    else:
        name = f"nsbridge-test-{uuid.uuid4().hex}"
        address, value = b"\0" + name.encode(), "@" + name
    sock.bind(address)
    with sock:
        yield value, sock


def test_ready_reaches_the_socket(notify_socket: tuple[str, socket.socket]) -> None:
    value, sock = notify_socket
    assert systemd.ready({"NOTIFY_SOCKET": value}) is True
    assert sock.recv(4096) == b"READY=1"
    assert systemd.stopping({"NOTIFY_SOCKET": value}) is True
    assert sock.recv(4096) == b"STOPPING=1"
    assert systemd.notify("READY=1\nSTATUS=up", {"NOTIFY_SOCKET": value}) is True
    assert sock.recv(4096) == b"READY=1\nSTATUS=up"


def test_status_cannot_inject_assignments(notify_socket: tuple[str, socket.socket]) -> None:
    value, sock = notify_socket
    assert systemd.status("3 connections\nREADY=1", {"NOTIFY_SOCKET": value})
    assert sock.recv(4096) == b"STATUS=3 connections READY=1"


def test_child_process_notifies_with_its_own_pid(
    notify_socket: tuple[str, socket.socket],
) -> None:
    """As under systemd: the environment names the socket, the sender's PID is checked."""
    value, sock = notify_socket
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    code = "from nsbridge.linux import systemd; assert systemd.ready(); systemd.status('serving')"
    env = {**os.environ, "NOTIFY_SOCKET": value, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO)
    try:
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    messages = []
    for _ in range(2):
        data, ancillary, _flags, _addr = sock.recvmsg(4096, socket.CMSG_SPACE(12))
        (level, kind, cred), = ancillary
        assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS)
        assert struct.unpack("iII", cred)[0] == proc.pid
        messages.append(data)
    assert messages == [b"READY=1", b"STATUS=serving"]


def test_notify_unset_or_empty_is_false() -> None:
    assert systemd.notify("READY=1", {}) is False
    assert systemd.ready({"NOTIFY_SOCKET": ""}) is False


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("run/notify", "NOTIFY_SOCKET='run/notify': expected an absolute path or @abstract-name"),
        ("@", "NOTIFY_SOCKET='@': expected an absolute path or @abstract-name"),
        ("vsock:2:1234", "NOTIFY_SOCKET='vsock:2:1234': expected an absolute path"),
    ],
)
def test_notify_malformed(value: str, message: str) -> None:
    with pytest.raises(UserError, match="^" + message.replace("(", r"\(")):
        systemd.ready({"NOTIFY_SOCKET": value})


def test_notify_nobody_listening(tmp_path: Path) -> None:
    missing = tmp_path / "gone.sock"
    with pytest.raises(UserError) as info:
        systemd.ready({"NOTIFY_SOCKET": str(missing)})
    assert str(info.value) == (
        f"NOTIFY_SOCKET={missing}: cannot send READY=1 (No such file or directory)"
    )
    with pytest.raises(UserError, match="cannot send READY=1 \\(Connection refused\\)"):
        systemd.ready({"NOTIFY_SOCKET": f"@nsbridge-nobody-{uuid.uuid4().hex}"})
