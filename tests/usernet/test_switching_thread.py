"""The socket switcher's native serving thread and its decision cache
(``nsbridge run --bypass`` with the native core; the Python path for comparison).

In the switching world (helpers.switching: nsbridge in a "host" namespace of the test's
own, echo servers in an "outside" one that first say the address they saw), a driver
runs the Python API in the host namespace with a small program under the filter that
connects when told (one JSON line per step on its stdin, one back on its stdout), so
the test can change the host between two connects of the same program:

- repeated connects to an allowed destination are switched, and with the native core
  all but the first (give or take an address event) come from the cache (``cached``),
  blocking and non-blocking, IPv4 and IPv6; thousands leave the program's and the host
  side's fd counts as they were;
- sockets made with and without ``SOCK_CLOEXEC`` keep that flag once switched, on
  cached switches as on Python's;
- a denied destination is denied on every attempt (never cached);
- the race the cache must not lose: a destination switched (and cached), then made one
  of the host's own addresses (``ip addr add`` in the host namespace): the very next
  connect is denied ("host address"); removed again, switched again.  Twenty rounds;
- cached switches that fail or keep connecting answered as on Python's path, and the
  ``--outbound-addr`` bind kept for every hit; at ``-vv`` nothing is cached;
- the switcher closed while the program connects in a loop: the program's next connect
  fails (ENOSYS: no listener left) instead of hanging, and it exits.

IPv4 for the race: the kernel announces an IPv4 address before ``ip addr add`` returns,
an IPv6 one a moment later from a work queue (tests/usernet/test_hostaddrs.py), so only
for IPv4 is "at once" the kernel's promise.  No /dev/net/tun is opened as an ordinary
user here: everything runs as root in the test's own namespaces.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.environment import REPO
from helpers.switching import (
    DENIED_PORT,
    ECHO_PORT,
    OUT4,
    OUT6,
    PROBE,
    UP4,
    UP6,
    World,
    switching_world,
)

BOTH_SWITCH_PATHS = True
REFUSING_PORT, SILENT_PORT = 7399, 7398  # nothing listens; SYNs dropped (one test's nft)
pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("switch_path")]

# The program under the filter: one step per line on stdin, one JSON result per line.
STEPPER = r'''
import ctypes, errno, fcntl, json, os, select, socket, struct, sys

libc = ctypes.CDLL(None, use_errno=True)

def said(sock):
    line = b""
    while not line.endswith(b"\n"):
        chunk = sock.recv(100)
        if not chunk:
            break
        line += chunk
    return "saw " + line.decode().strip()

def flagged(ip, port, cloexec):
    """A socket made by libc's socket() with or without SOCK_CLOEXEC (Python's own
    always sets it), connected blocking: its close-on-exec flag before and after."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    fd = libc.socket(family, socket.SOCK_STREAM | (socket.SOCK_CLOEXEC if cloexec else 0), 0)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "socket")
    sock = socket.socket(fileno=fd)
    made = bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)
    try:
        sock.connect((ip, port))
        kept = bool(fcntl.fcntl(sock.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC)
        sock.settimeout(10)
        return {"made": made, "kept": kept, "said": said(sock)}
    except OSError as exc:
        return {"made": made, "error": errno.errorcode.get(exc.errno, str(exc))}
    finally:
        sock.close()

def one(ip, port, kind):
    sock = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET)
    try:
        if kind == "sndtimeo":  # a blocking connect the kernel gives up after 0.3 s
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                            struct.pack("=qq", 0, 300000))
        if kind in ("blocking", "sndtimeo"):  # blocking for the kernel: no settimeout
            sock.connect((ip, port))
            sock.settimeout(10)
        else:
            sock.setblocking(False)
            error = sock.connect_ex((ip, port))
            if error == errno.EINPROGRESS:
                select.select([], [sock], [], 10)
                error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                raise OSError(error, os.strerror(error))
            sock.setblocking(True)
            sock.settimeout(10)
        return said(sock)
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc))
    finally:
        sock.close()

for line in sys.stdin:
    kind, ip, port, count = json.loads(line)
    if kind == "until_error":
        done = 0
        while (outcome := one(ip, port, "blocking")).startswith("saw "):
            done += 1
            if done == 1:
                print(json.dumps({"started": True}), flush=True)
        print(json.dumps({"done": done, "error": outcome}), flush=True)
        break
    if kind == "flags":  # count: the close-on-exec flag of each socket in turn
        print(json.dumps({"flags": [flagged(ip, port, cloexec) for cloexec in count]}),
              flush=True)
        continue
    before = len(os.listdir("/proc/self/fd"))
    outcomes = {}
    for _ in range(count):
        outcome = one(ip, port, kind)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    print(json.dumps({"outcomes": outcomes, "fds": [before, len(os.listdir("/proc/self/fd"))]}),
          flush=True)
'''

# The driver, run in the host namespace: the API with the stepper under --bypass.
DRIVER = r'''
import json, os, subprocess, sys, time
from nsbridge.usernet import api
steps = json.loads(sys.argv[2])
to_r, to_w = os.pipe()
from_r, from_w = os.pipe()
results = []

def fds():
    found = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            found[name] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass
    return found

with api.run([sys.executable, sys.argv[1]], bypass=True, deny=[f"tcp:*:{sys.argv[3]}"],
             dns=[(sys.argv[4], 53)], stdin=to_r, stdout=from_w) as proc:
    os.close(to_r)
    os.close(from_w)
    to_program = os.fdopen(to_w, "w")
    from_program = os.fdopen(from_r)
    for step in steps:
        if step[0] == "sh":
            subprocess.run(step[1:], check=True, capture_output=True)
            continue
        if step[0] == "close_switcher_when_started":
            network = proc._network
            assert json.loads(from_program.readline()) == {"started": True}
            time.sleep(0.2)  # well into the loop
            network.bridge.loop.call_soon_threadsafe(network.switcher.close)
            results.append(json.loads(from_program.readline()))
            continue
        before = fds()
        to_program.write(json.dumps(step) + "\n")
        to_program.flush()
        if step[0] == "until_error":
            continue
        result = json.loads(from_program.readline())
        # The program may be answered before the loop closed its last call's pidfd and
        # socket reference (the answer hands it the CPU): a leak never settles.
        deadline = time.monotonic() + 5
        while len(after := fds()) != len(before) and time.monotonic() < deadline:
            time.sleep(0.05)
        result["host_fds"] = [len(before), len(after)]
        if before != after:  # what differs, for the assertion's message
            result["host_fds_changed"] = sorted(set(before.items()) ^ set(after.items()))
        results.append(result)
    to_program.close()
    proc.wait()
    stats = proc.stats()
print(json.dumps({"results": results, "bypass": stats["bypass"]}))
'''


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with switching_world() as made:
        yield made


def drive(world: World, tmp_path: Path, steps: list[list], timeout: float = 180) -> dict:
    stepper, driver = tmp_path / "stepper.py", tmp_path / "driver.py"
    stepper.write_text(STEPPER)
    driver.write_text(DRIVER)
    done = subprocess.run(["ip", "netns", "exec", world.host, sys.executable, str(driver),
                           str(stepper), json.dumps(steps), str(DENIED_PORT), OUT4],
                          capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_cache_hits_are_switched_and_counted(world: World, tmp_path: Path,
                                             switch_path: str) -> None:
    steps = [["blocking", OUT4, ECHO_PORT, 1],  # warm-up: the host side's fds settle
             ["blocking", OUT4, ECHO_PORT, 2000],
             ["nonblocking", OUT4, ECHO_PORT, 500],
             ["blocking", OUT6, ECHO_PORT, 500]]
    report = drive(world, tmp_path, steps)
    warm, many, nonblocking, six = report["results"]
    assert warm["outcomes"] == {f"saw {UP4}": 1}
    assert many["outcomes"] == {f"saw {UP4}": 2000}
    assert nonblocking["outcomes"] == {f"saw {UP4}": 500}
    assert six["outcomes"] == {f"saw {UP6}": 500}
    for result in (many, nonblocking, six):
        assert result["fds"][0] == result["fds"][1], result  # the program's
        assert result["host_fds"][0] == result["host_fds"][1], result  # nsbridge's
    bypass = report["bypass"]
    assert bypass["switched"] == 3001 and bypass["errors"] == 0 and bypass["denied"] == {}
    if switch_path == "python":
        assert bypass["cached"] == 0
    else:
        # The first connect to each destination is decided by Python, then cached; an
        # address event of the host namespace's own life (an IPv6 address finishing
        # DAD) empties the cache meanwhile, so one or two more may be decided again.
        assert 3001 - 10 <= bypass["cached"] <= 3001 - 2, bypass


def test_cached_switches_keep_the_programs_close_on_exec_flag(world: World, tmp_path: Path,
                                                             switch_path: str) -> None:
    """The switched socket keeps the close-on-exec flag the program gave its own: the
    native thread reads it from ``/proc/PID/fdinfo/FD`` for every cached switch, as the
    Python path does for the ones it decides.  Sockets with and without
    ``SOCK_CLOEXEC`` alternate to one destination per family; the first to each is
    decided by Python (once with, once without the flag), the rest are cache hits.
    ``cached`` bounds the misses (an address event may empty the cache) below the
    count of either flag, so each flag was kept on cached switches too."""
    rounds = 10
    steps = [["flags", OUT4, ECHO_PORT, [True] + [False, True] * rounds],
             ["flags", OUT6, ECHO_PORT, [False] + [True, False] * rounds]]
    report = drive(world, tmp_path, steps)
    total = 0
    for (_, _, _, wanted), up, result in zip(steps, (UP4, UP6), report["results"],
                                             strict=True):
        assert [one["made"] for one in result["flags"]] == wanted  # the program's socket
        assert [one["kept"] for one in result["flags"]] == wanted, result  # after connect
        assert {one["said"] for one in result["flags"]} == {f"saw {up}"}  # switched
        total += len(wanted)
    bypass = report["bypass"]
    assert bypass["switched"] == total and bypass["errors"] == 0, bypass
    if switch_path == "python":
        assert bypass["cached"] == 0
    else:
        misses = 6  # beyond the first per destination; below `rounds` of either flag
        assert total - 2 - misses <= bypass["cached"] <= total - 2, bypass


def test_denied_destination_stays_denied(world: World, tmp_path: Path) -> None:
    steps = [["blocking", OUT4, DENIED_PORT, 50], ["blocking", OUT4, ECHO_PORT, 5],
             ["nonblocking", OUT4, DENIED_PORT, 50], ["blocking", OUT6, DENIED_PORT, 20]]
    report = drive(world, tmp_path, steps)
    denied4, allowed, denied4_nb, denied6 = report["results"]
    assert denied4["outcomes"] == {"ECONNREFUSED": 50}
    assert allowed["outcomes"] == {f"saw {UP4}": 5}
    assert denied4_nb["outcomes"] == {"ECONNREFUSED": 50}
    assert denied6["outcomes"] == {"ECONNREFUSED": 20}
    assert report["bypass"]["denied"] == {"deny rule": 120}
    assert report["bypass"]["switched"] == 5
    assert world.seen.get(DENIED_PORT, []) == []  # nothing reached the denied port


def test_host_address_added_after_caching_is_denied_at_once(world: World,
                                                            tmp_path: Path) -> None:
    """The cache's race: an allowed destination is cached; ``ip addr add`` makes it one
    of the host's own; the next connect, right after that returned, must be denied.

    A stale hit would be refused too (nothing listens on that address in the host), so
    the denial counter tells: with the thread not watching the netlink socket, no
    connect is denied; without the hook that empties the cache, only the first after
    each ``ip addr add`` (the second rides the stale entry).  Both were tried."""
    add = ["sh", "ip", "addr", "add", f"{OUT4}/32", "dev", "lo"]
    remove = ["sh", "ip", "addr", "del", f"{OUT4}/32", "dev", "lo"]
    rounds = 20
    steps: list[list] = []
    for _ in range(rounds):
        steps += [["blocking", OUT4, ECHO_PORT, 3], add, ["blocking", OUT4, ECHO_PORT, 1],
                  ["nonblocking", OUT4, ECHO_PORT, 1], remove]
    steps.append(["blocking", OUT4, ECHO_PORT, 3])
    try:
        report = drive(world, tmp_path, steps)
    finally:
        subprocess.run(["ip", "-n", world.host, "addr", "del", f"{OUT4}/32", "dev", "lo"],
                       capture_output=True)
    results = report["results"]
    assert len(results) == 3 * rounds + 1
    for index in range(rounds):
        allowed, blocked, blocked_nb = results[3 * index:3 * index + 3]
        assert allowed["outcomes"] == {f"saw {UP4}": 3}, index
        assert blocked["outcomes"] == {"ECONNREFUSED": 1}, index
        assert blocked_nb["outcomes"] == {"ECONNREFUSED": 1}, index
    assert results[-1]["outcomes"] == {f"saw {UP4}": 3}
    assert report["bypass"]["denied"] == {"host address": 2 * rounds}
    assert report["bypass"]["switched"] == 3 * rounds + 3


def test_cached_switches_that_fail_or_wait_go_back_to_python(world: World, tmp_path: Path,
                                                            switch_path: str) -> None:
    """A cached destination whose host connect is refused (nothing listens: FAILED) or
    does not finish in the call (SYNs dropped, a blocking connect bounded by
    ``SO_SNDTIMEO``: PENDING) is handed back and answered as on Python's path:
    ECONNREFUSED each time; EINPROGRESS when the program's timeout runs out."""
    subprocess.run(["ip", "netns", "exec", world.outside, "nft", "-f", "-"], check=True,
                   text=True, input=f"""
table inet thread_silent {{
    chain input {{
        type filter hook input priority 0;
        tcp dport {SILENT_PORT} drop
    }}
}}
""")
    try:
        report = drive(world, tmp_path, [["blocking", OUT4, REFUSING_PORT, 5],
                                         ["nonblocking", OUT4, REFUSING_PORT, 5],
                                         ["sndtimeo", OUT4, SILENT_PORT, 3]])
    finally:
        subprocess.run(["ip", "netns", "exec", world.outside, "nft", "delete", "table",
                        "inet", "thread_silent"], capture_output=True)
    refused, refused_nb, silent = report["results"]
    assert refused["outcomes"] == {"ECONNREFUSED": 5}
    assert refused_nb["outcomes"] == {"ECONNREFUSED": 5}
    assert silent["outcomes"] == {"EINPROGRESS": 3}
    for result in report["results"]:
        assert result["fds"][0] == result["fds"][1], result
    bypass = report["bypass"]
    # blocking refusals fail before install; non-blocking and the silent ones are
    # installed (the host socket carries the refusal, or goes on connecting)
    assert bypass["connect_failed"] == 5 and bypass["switched"] == 8, bypass
    assert bypass["errors"] == 0
    # the first connect to each destination decided by Python, the rest from the cache
    # (an address event of the host namespace meanwhile may send one more to Python)
    if switch_path == "python":
        assert bypass["cached"] == 0
    else:
        assert 4 + 5 + 2 - 3 <= bypass["cached"] <= 4 + 5 + 2, bypass


def test_cached_switches_keep_the_outbound_address(world: World) -> None:
    """``--outbound-addr``: the bind the cache holds is made for every hit, so all 20
    connections reach the server from that second host address."""
    source = "198.51.100.9"
    shown = subprocess.run(["ip", "-n", world.host, "-j", "addr", "show"], check=True,
                           capture_output=True, text=True).stdout
    device = next(link["ifname"] for link in json.loads(shown)
                  if any(a["local"] == UP4 for a in link.get("addr_info", [])))
    subprocess.run(["ip", "-n", world.host, "addr", "add", f"{source}/24", "dev", device],
                   check=True)
    before = len(world.seen.get(ECHO_PORT, []))
    try:
        result, log = world.probe("connect_many", OUT4, str(ECHO_PORT), "20",
                                  options=("--bypass", "--outbound-addr", source))
    finally:
        subprocess.run(["ip", "-n", world.host, "addr", "del", f"{source}/24", "dev", device],
                       check=True)
    assert result["ok"] == 20
    assert world.seen[ECHO_PORT][before:] == [source] * 20
    assert "switched TCP connections: 20 (0 failed to connect)" in log


def test_debug_logging_leaves_every_switch_to_python(world: World) -> None:
    """At -vv each switched connect is logged, so none is taken from the cache."""
    done = world.run("-v", "--bypass", command=[sys.executable, str(PROBE), "connect_many",
                                                OUT4, str(ECHO_PORT), "20"])
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("switched\n") == 20, done.stderr[-2000:]


def test_switcher_closed_mid_traffic_nothing_hangs(world: World, tmp_path: Path) -> None:
    report = drive(world, tmp_path, [["until_error", OUT4, ECHO_PORT, 0],
                                     ["close_switcher_when_started"]], timeout=120)
    (ended,) = report["results"]
    assert ended["done"] >= 1 and ended["error"] == "ENOSYS", ended
