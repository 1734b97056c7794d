"""``nsbridge doctor`` on this real machine: every line is true, and the hints are right.

Nothing is faked: the doctor creates a real sandbox namespace, opens real ping sockets and
forks a real uid-65534 child.  Facts the test can change without touching the host are
changed inside a namespace of the test's own (``net.ipv4.ping_group_range`` is per network
namespace).  /dev/net/tun's mode is *read*, never changed (other tests share the device):
the test checks that the doctor reports whatever mode the device has (CI makes it 0666).
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys

from helpers.environment import REPO

LINE = re.compile(r"^(ok|limited|missing) +([^:]+): (.+)$")


def doctor(*prefix: str) -> tuple[int, dict[str, tuple[str, str]]]:
    """Run the doctor (after ``prefix``, e.g. ``ip netns exec NAME``); (exit code, lines by
    topic)."""
    result = subprocess.run([*prefix, sys.executable, "-m", "nsbridge", "doctor"],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("nsbridge "), result.stdout
    found = {}
    for line in lines[1:]:
        match = LINE.match(line)
        assert match, f"not a finding: {line!r}"
        found[match.group(2)] = (match.group(1), match.group(3))
    missing = [topic for topic, (level, _) in found.items() if level == "missing"]
    assert result.returncode == (1 if missing else 0), result.stdout
    return result.returncode, found


def test_doctor_reports_what_this_machine_does() -> None:
    """As root here: run works (the suite depends on it), the kernel line is this kernel,
    the tun device's mode is the real one, and every check has a line."""
    code, found = doctor()
    assert code == 0, found
    assert found["nsbridge run"][0] == "ok"
    assert os.uname().release in found["kernel"][1]
    mode = stat.S_IMODE(os.stat("/dev/net/tun").st_mode)
    assert f"{mode:04o}" in found["tun device"][1]
    assert found["tun device"][0] == ("ok" if mode & 0o006 == 0o006 else "limited")
    for topic in ("python", "pyroute2", "tcp fast path", "user namespaces", "--tcp=tun",
                  "ping", "native relay", "native TCP relay", "native switching core",
                  "--bypass"):
        assert topic in found, (topic, found)
    from nsbridge.linux import notifycore
    from nsbridge.relay import native

    assert found["native TCP relay"][0] == ("limited" if native.unavailable() else "ok")
    assert found["native switching core"][0] == (
        "limited" if notifycore.unavailable() else "ok")


def test_doctor_ping_hint_follows_the_sysctl(netns: str) -> None:
    """ping_group_range closed: 'limited' with the sysctl that opens it; open: 'ok'."""
    sysctl = ["ip", "netns", "exec", netns, "sysctl", "-qw"]
    subprocess.run([*sysctl, "net.ipv4.ping_group_range=1 0"], check=True)
    _, closed = doctor("ip", "netns", "exec", netns)
    level, text = closed["ping"]
    assert level == "limited" and "net.ipv4.ping_group_range" in text, text
    subprocess.run([*sysctl, "net.ipv4.ping_group_range=0 2147483647"], check=True)
    _, opened = doctor("ip", "netns", "exec", netns)
    assert opened["ping"][0] == "ok", opened["ping"]
