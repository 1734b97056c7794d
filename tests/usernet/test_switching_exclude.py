"""``nsbridge run --bypass --bypass-exclude RULE`` end to end (world: helpers.switching).

An excluded connect is made on the program's own socket, so it takes the fast path:
the program's ``getsockname`` shows 10.0.2.100 and the fast path's counter moves
(``TCP connections: 1``), while a connect no rule covers, in the same program, is
switched (the host's address).  IPv4 and IPv6 rules, port rules.  The policy still
decides first: a denied destination stays denied whether a rule covers it or not (and
the host's loopback without host access).  ``-v`` names the rule.  Bad rules: one line
naming the rule and the accepted forms, before anything starts.  The Python API's
``bypass_exclude`` and its counter.  Ways around: a switched socket disconnected and
connected to an excluded destination stays the host's and is decided; a thread
rewriting the sockaddr of an excluded connect cannot reach a denied address.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest

from helpers.environment import REPO
from helpers.switching import (
    DENIED_PORT,
    ECHO_PORT,
    HOST_LOOPBACK_PORT,
    OUT4,
    OUT6,
    PROBE,
    UP4,
    UP6,
    World,
    switching_world,
)

pytestmark = pytest.mark.timeout(300)
NAMESPACE4, NAMESPACE6 = "10.0.2.100", "fd00::100"


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with switching_world() as made:
        yield made


def fast_path_connections(log: str) -> int:
    """The fast path's count in the -v summary (not the switched one beside it)."""
    found = re.search(r"(?<!switched )TCP connections: (\d+) \(", log)
    assert found, log
    return int(found.group(1))


def _probes(world: World, *options: str, calls: list[list[str]]) -> tuple[list[dict], str]:
    """Several probe runs inside one ``run``: their JSON answers and nsbridge's stderr."""
    script = " && ".join(" ".join([sys.executable, PROBE, *call]) for call in calls)
    done = world.run("--bypass", *options, command=["sh", "-c", script])
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()], done.stderr


@pytest.mark.parametrize(("rule", "excluded", "switched", "excluded_name", "switched_name"), [
    (f"{OUT4}:{ECHO_PORT}", OUT4, OUT6, NAMESPACE4, UP6),
    (f"[{OUT6}]:{ECHO_PORT}", OUT6, OUT4, NAMESPACE6, UP4),
    ("198.51.100.0/24", OUT4, OUT6, NAMESPACE4, UP6),
], ids=["ipv4-host-port", "ipv6-host-port", "ipv4-network"])
def test_excluded_takes_the_fast_path_the_rest_is_switched(
        world: World, rule: str, excluded: str, switched: str, excluded_name: str,
        switched_name: str) -> None:
    (first, second), log = _probes(
        world, "--bypass-exclude", rule,
        calls=[["connect", excluded, str(ECHO_PORT)], ["connect", switched, str(ECHO_PORT)]])
    # The fast path dials from the host too (the server sees the host's address); the
    # program's own socket tells the paths apart.
    assert first["result"] == "ok" and first["echo"] == "ping"
    assert first["sockname"] == excluded_name
    assert first["server_saw"] == (UP6 if ":" in excluded else UP4)
    assert second == {"result": "ok", "server_saw": switched_name, "echo": "ping",
                      "sockname": switched_name}
    assert "switched TCP connections: 1 (0 failed to connect), 1 excluded" in log, log
    assert fast_path_connections(log) == 1
    assert "excluded (" in log and "the namespace's path" in log


def test_port_rule_and_range(world: World) -> None:
    (one, other), log = _probes(
        world, "--bypass-exclude", str(ECHO_PORT), "--bypass-exclude", "7000-7001",
        calls=[["connect", OUT6, str(ECHO_PORT)], ["connect", OUT4, str(ECHO_PORT)]])
    assert one["sockname"] == NAMESPACE6 and other["sockname"] == NAMESPACE4
    assert f"excluded (*:{ECHO_PORT})" in log
    assert "switched TCP connections: 0 (0 failed to connect), 2 excluded" in log
    assert fast_path_connections(log) == 2


def test_denied_stays_denied_whether_excluded_or_not(world: World) -> None:
    before = len(world.seen.get(HOST_LOOPBACK_PORT, []))
    for options in ((), ("--bypass-exclude", str(DENIED_PORT)),
                    ("--bypass-exclude", f"{OUT4}/32"), ("--bypass-exclude", "10.0.2.2")):
        answers, log = _probes(
            world, "--deny", f"tcp:*:{DENIED_PORT}", *options,
            calls=[["connect", OUT4, str(DENIED_PORT)],
                   ["connect", "10.0.2.2", str(HOST_LOOPBACK_PORT)]])
        assert answers == [{"result": "ECONNREFUSED"}, {"result": "ECONNREFUSED"}], options
        assert "deny rule x1" in log and "host loopback disabled x1" in log, log
        assert "excluded (" not in log
    assert not world.seen.get(DENIED_PORT)
    assert len(world.seen.get(HOST_LOOPBACK_PORT, [])) == before


@pytest.mark.parametrize(("rule", "says"), [
    ("udp:192.0.2.1", "only TCP"),
    ("*", "every connect"),
    ("host.example:21", "not a network"),
    ("70000", "port '70000'"),
    ("192.0.2.1:21-20", "backwards"),
    ("[2001:db8::1:21", "missing ']'"),
])
def test_bad_rules_exit_with_one_line(rule: str, says: str) -> None:
    done = subprocess.run([sys.executable, "-m", "nsbridge", "run", "--bypass",
                           "--bypass-exclude", rule, "--", "true"],
                          capture_output=True, text=True, timeout=30, cwd=REPO)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert f"--bypass-exclude {rule}" in lines[0] and says in lines[0]
    assert "NETWORK, HOST:PORT" in lines[0] and "PORT[-PORT]" in lines[0]


def test_rules_without_bypass_are_refused() -> None:
    done = subprocess.run([sys.executable, "-m", "nsbridge", "run", "--bypass-exclude", "21",
                           "--", "true"], capture_output=True, text=True, timeout=30, cwd=REPO)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "give --bypass too" in lines[0]


def test_python_api_takes_rules(world: World, tmp_path) -> None:
    script = tmp_path / "api_driver.py"
    script.write_text(f"""
import json, os, sys
from nsbridge.usernet import api
from nsbridge.errors import UserError
try:
    api.run(["true"], bypass=True, bypass_exclude=["udp:1.2.3.4"])
    bad = "accepted"
except UserError as exc:
    bad = str(exc)
read_end, write_end = os.pipe()
with api.run([sys.executable, {PROBE!r}, "connect", "{OUT4}", "{ECHO_PORT}"],
             bypass=True, bypass_exclude=["{ECHO_PORT}"], dns=[("{OUT4}", 53)],
             stdout=write_end) as proc:
    os.close(write_end)
    output = os.read(read_end, 4096).decode()
    proc.wait()
    stats = proc.stats()
print(json.dumps({{"probe": json.loads(output), "bypass": stats["bypass"], "bad": bad}}))
""")
    done = subprocess.run(["ip", "netns", "exec", world.host, sys.executable, str(script)],
                          capture_output=True, text=True, timeout=90, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["probe"]["sockname"] == NAMESPACE4 and result["probe"]["echo"] == "ping"
    assert result["bypass"]["excluded"] == 1 and result["bypass"]["switched"] == 0
    assert "--bypass-exclude udp:1.2.3.4: only TCP" in result["bad"]


def test_switched_socket_reconnected_to_an_excluded_destination_stays_decided(
        world: World) -> None:
    """A switched socket is the host's: connecting it again (after AF_UNSPEC) to an
    excluded destination is decided and made on that host socket (a denied one still
    refused), never turned into a namespace connect by the rule."""
    result, _ = world.probe("unspec", OUT4, str(ECHO_PORT), OUT4, str(DENIED_PORT),
                              options=("--bypass", "--deny", f"tcp:*:{DENIED_PORT}",
                                       "--bypass-exclude", str(DENIED_PORT)))
    assert result["first_sockname"] == UP4 and result["denied"] == "ECONNREFUSED"
    assert result["again"] == "0" and result["sockname"] == UP4
    assert not world.seen.get(DENIED_PORT)


def test_sockaddr_rewritten_during_an_excluded_connect(world: World) -> None:
    """A thread flips the sockaddr between an excluded allowed address and the host's
    loopback while connect reads it: the host side connects with the bytes it decided
    on, so nothing reaches the host's loopback."""
    before = len(world.seen.get(HOST_LOOPBACK_PORT, []))
    result, _ = world.probe("race", OUT4, str(ECHO_PORT), "10.0.2.2",
                            str(HOST_LOOPBACK_PORT), "200",
                            options=("--bypass", "--bypass-exclude", str(ECHO_PORT),
                                     "--bypass-exclude", str(HOST_LOOPBACK_PORT)),
                            timeout=240)
    peers = result["peers"]
    assert set(peers) <= {f"{OUT4}:{ECHO_PORT}", "ECONNREFUSED"}, peers
    assert sum(peers.values()) == 200
    assert len(world.seen.get(HOST_LOOPBACK_PORT, [])) == before


def test_split_form_takes_rules(world: World, tmp_path) -> None:
    """``HostSide(bypass=True, bypass_exclude=[...])`` + ``child_setup``: the runtime's
    own child (made by unshare) has its excluded connect on the namespace's path."""
    script = tmp_path / "split_driver.py"
    script.write_text(f"""
import json, subprocess, sys
from nsbridge.usernet import api
child_code = (
    "import subprocess, sys\\n"
    "from nsbridge.usernet import api\\n"
    "api.child_setup(int(sys.argv[1]))\\n"
    "sys.exit(subprocess.call([sys.executable, {PROBE!r}, 'connect', '{OUT4}', "
    "'{ECHO_PORT}']))\\n")
with api.HostSide(bypass=True, bypass_exclude=["{OUT4}:{ECHO_PORT}"],
                  dns=[("{OUT4}", 53)]) as side:
    fd = side.child_fd()
    child = subprocess.Popen(["unshare", "-Urn", sys.executable, "-c", child_code, str(fd)],
                             pass_fds=(fd,), stdout=subprocess.PIPE, text=True)
    side.start(pid=child.pid)
    output, _ = child.communicate(timeout=60)
    side.wait(timeout=10)
    stats = side.stats()
print(json.dumps({{"probe": json.loads(output), "bypass": stats.get("bypass")}}))
""")
    done = subprocess.run(["ip", "netns", "exec", world.host, sys.executable, str(script)],
                          capture_output=True, text=True, timeout=90, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["probe"]["result"] == "ok" and result["probe"]["sockname"] == NAMESPACE4
    assert result["bypass"]["excluded"] == 1 and result["bypass"]["switched"] == 0
