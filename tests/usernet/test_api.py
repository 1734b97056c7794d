"""The Python API (nsbridge.usernet.api) and examples/embed.py, end to end, no mocks.

As in test_run.py, each test makes a "host" namespace of its own (the ``host``
fixture in conftest.py: 192.0.2.1/24 on a veth pair that stays inside it), and the
program embedding nsbridge runs *in* it (``ip netns exec HOST python3 driver``), because
the API opens its outside sockets in the caller's namespace.  Nothing can leave the
machine: the only server is in that namespace.

/dev/net/tun is mode 0600 on this machine, so these tests (like the whole suite) run as
root; inside the new user namespaces the caller is mapped to root as well.

"Nothing left behind" is checked by the driver itself after the API object is closed:
no thread besides the main one, no child process, and the same open fds as before.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.environment import REPO
from helpers.netns import in_netns
from helpers.waiting import wait_until

HTTP_PORT = 8000
URL = f"http://192.0.2.1:{HTTP_PORT}/index.html"
BODY = "hello from the host namespace\n"

# Shared by the drivers: what must hold once the API object is closed.
LEFTOVERS = textwrap.dedent("""
    import os, threading, time

    def children():
        found = []
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        if int(f.read().rsplit(")", 1)[1].split()[1]) == os.getpid():
                            found.append(int(pid))
                except (OSError, IndexError, ValueError):
                    pass
        return found

    def leftovers(fds_before):
        deadline = time.monotonic() + 5
        while True:
            state = {"threads": threading.active_count(), "children": children(),
                     "fds": sorted(set(os.listdir("/proc/self/fd")) - fds_before)}
            if state == {"threads": 1, "children": [], "fds": []} or time.monotonic() > deadline:
                return state
            time.sleep(0.05)
""")
CLEAN = {"threads": 1, "children": [], "fds": []}


def _env() -> dict[str, str]:
    """The repo's nsbridge, not an installed copy."""
    return {**os.environ, "PYTHONPATH": str(REPO)}


def _in_host(host: str, argv: list[str], timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", host, *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=_env())


def _driver(tmp_path: Path, body: str) -> str:
    path = tmp_path / "driver.py"
    path.write_text(LEFTOVERS + textwrap.dedent(body))
    return str(path)


def _last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture
def web(host: str, tmp_path: Path) -> Iterator[None]:
    """An HTTP server on 192.0.2.1 in the host namespace (ended by PID)."""
    root = tmp_path / "www"
    root.mkdir()
    (root / "index.html").write_text(BODY)
    proc = subprocess.Popen(["ip", "netns", "exec", host, sys.executable, "-m", "http.server",
                             str(HTTP_PORT), "--bind", "192.0.2.1", "-d", str(root)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: in_netns(host, _probe), what="http server")
        yield None
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _probe() -> bool:
    import socket

    try:
        socket.create_connection(("192.0.2.1", HTTP_PORT), timeout=1).close()
        return True
    except OSError:
        return False


def test_example_runs_curl_and_reports(host, web):
    # URL is on the host namespace's own address: host access opens it
    result = _in_host(host, [sys.executable, "examples/embed.py", "--allow-host-access", "--",
                             "curl", "-sS", "--max-time", "10", URL])
    assert result.returncode == 0, result.stderr
    assert result.stdout == BODY
    assert "exit status: 0" in result.stderr
    stats = json.loads(result.stderr.split("exit status: 0", 1)[1])
    assert stats["tcp"]["accepted"] == 1
    assert stats["tcp"]["closed"] == 1
    assert stats["tcp"]["bytes_down"] > len(BODY)


def test_example_exit_status_and_bad_input(host):
    assert _in_host(host, [sys.executable, "examples/embed.py", "--", "sh", "-c",
                           "exit 7"]).returncode == 7
    bad = _in_host(host, [sys.executable, "examples/embed.py", "-p", "8080:99999", "--",
                          "true"])
    assert bad.returncode == 2
    assert "namespace port" in bad.stderr and "Traceback" not in bad.stderr


def test_run_is_subprocess_like_and_leaves_nothing(host, web, tmp_path):
    driver = _driver(tmp_path, f"""
        import json, signal, sys
        from nsbridge.usernet import api

        before = set(os.listdir("/proc/self/fd"))
        out = {{}}
        with api.run(["curl", "-sS", "-o", "/dev/null", "--max-time", "10", {URL!r}],
                     allow_host_access=True) as p:  # URL: the host namespace's address
            out["curl"] = p.wait(timeout=30)
            out["stats"] = p.stats()
        with api.run(["sh", "-c", "exit 7"]) as p:
            out["exit7"] = p.wait()
            out["poll"] = p.poll()
        p = api.run(["sleep", "30"])
        out["poll_running"] = p.poll()
        out["running_stats"] = sorted(p.stats())
        try:
            p.wait(timeout=0.2)
        except TimeoutError:
            out["timed_out"] = True
        p.terminate()
        out["terminated"] = p.wait(timeout=10)
        p.close()
        with api.run(["sleep", "30"]) as p:
            out["pid"] = p.pid
        out["closed_sleep"] = p.returncode
        out["leftovers"] = leftovers(before)
        print(json.dumps(out))
    """)
    result = _in_host(host, [sys.executable, driver])
    assert result.returncode == 0, result.stderr
    out = _last_json(result.stdout)
    assert out["curl"] == 0
    assert out["stats"]["tcp"]["accepted"] == 1
    assert out["stats"]["tcp"]["connect_failed"] == 0
    assert out["exit7"] == 7 and out["poll"] == 7
    assert out["poll_running"] is None and out["timed_out"]
    assert out["running_stats"] == ["engine", "published", "tcp"]
    assert out["terminated"] == -signal.SIGTERM
    assert out["closed_sleep"] == -signal.SIGTERM  # close() ended the running command
    assert out["leftovers"] == CLEAN


def test_attach_serves_and_ends_with_the_target(host, web, tmp_path):
    target = subprocess.Popen(["unshare", "-Urn", "sleep", "30"])
    try:
        # unshare execs sleep in place: once the exe is sleep, the namespaces exist.
        wait_until(lambda: os.path.basename(os.readlink(f"/proc/{target.pid}/exe"))
                   .startswith("sleep"), what="the target to unshare")
        driver = _driver(tmp_path, f"""
            import json, subprocess, sys
            from nsbridge.usernet import api

            before = set(os.listdir("/proc/self/fd"))
            att = api.attach({target.pid}, allow_host_access=True)  # URL: a host address
            curl = subprocess.run(["nsenter", "-t", "{target.pid}", "-U", "-n",
                                   "--preserve-credentials", "curl", "-sS", "--max-time",
                                   "10", {URL!r}], capture_output=True, text=True)
            print(json.dumps({{"curl": curl.returncode, "body": curl.stdout,
                              "err": curl.stderr, "stats": att.stats(),
                              "running": att.running}}), flush=True)
            ended = att.wait(timeout=20)  # the test kills the target now
            gone = leftovers(before)
            att.close()  # idempotent after the end
            print(json.dumps({{"ended": ended, "leftovers": gone}}))
        """)
        proc = subprocess.Popen(["ip", "netns", "exec", host, sys.executable, driver],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=REPO, env=_env())
        try:
            assert proc.stdout is not None
            first = json.loads(proc.stdout.readline() or "{}")
            assert first.get("curl") == 0, (first, proc.stderr.read() if not first else "")
            assert first["body"] == BODY
            assert first["running"] is True
            assert first["stats"]["tcp"]["accepted"] == 1
            started = time.monotonic()
            target.kill()  # by PID: the process this test started
            target.wait(timeout=10)
            out, err = proc.communicate(timeout=30)
            assert proc.returncode == 0, err
            last = _last_json(out)
            assert last["ended"] is True
            assert time.monotonic() - started < 10
            assert last["leftovers"] == CLEAN
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    finally:
        if target.poll() is None:
            target.kill()
            target.wait()


def test_split_form_host_side_and_child_setup(host, web, tmp_path):
    driver = _driver(tmp_path, f"""
        import json, subprocess, sys
        from nsbridge.usernet import api

        before = set(os.listdir("/proc/self/fd"))
        child_code = (
            "import subprocess, sys\\n"
            "from nsbridge.usernet import api\\n"
            "info = api.child_setup(int(sys.argv[1]))\\n"
            "sys.exit(subprocess.call(['curl', '-sS', '-o', '/dev/null', '--max-time',"
            " '10', {URL!r}]))\\n"
        )
        with api.HostSide(allow_host_access=True) as side:  # URL: a host address
            fd = side.child_fd()
            # The runtime's own child: it makes its namespaces itself.
            child = subprocess.Popen(["unshare", "-Urn", sys.executable, "-c", child_code,
                                      str(fd)], pass_fds=(fd,))
            side.start(pid=child.pid)
            code = child.wait(timeout=30)
            ended = side.wait(timeout=10)
            stats = side.stats()
        # A child that dies before child_setup() is reported at once, not after a timeout.
        with api.HostSide() as side:
            fd = side.child_fd()
            child = subprocess.Popen(["true"], pass_fds=(fd,))
            try:
                side.start(pid=child.pid, timeout=20)
                early = "no error"
            except api.UserError as exc:
                early = str(exc)
            child.wait()
        print(json.dumps({{"code": code, "ended": ended, "stats": stats, "early": early,
                          "leftovers": leftovers(before)}}))
    """)
    result = _in_host(host, [sys.executable, driver])
    assert result.returncode == 0, result.stderr
    out = _last_json(result.stdout)
    assert out["code"] == 0
    assert out["ended"] is True
    assert out["stats"]["tcp"]["accepted"] == 1
    assert "exited" in out["early"]
    assert out["leftovers"] == CLEAN


def test_options_take_nat64_prefixes_and_every_address_rules():
    """``nat64_prefix`` takes one prefix or several; bad ones and a misused ``*`` are
    refused by options() itself, before anything is made."""
    from nsbridge.errors import UserError
    from nsbridge.usernet import api

    assert api.options(nat64_prefix="64:ff9b:1::/96").nat64_prefix == ["64:ff9b:1::/96"]
    assert api.options(nat64_prefix=["64:ff9b:1::/48", "2001:db8:64::/96"],
                       deny=["tcp:*:25"]).nat64_prefix == ["64:ff9b:1::/48", "2001:db8:64::/96"]
    with pytest.raises(UserError, match=r"^--nat64-prefix 64:ff9b:1::/100: a NAT64 prefix is"):
        api.options(nat64_prefix=["64:ff9b:1::/100"])
    with pytest.raises(UserError, match=r"^--deny \*/0: '\*' stands alone"):
        api.options(deny=["*/0"])


def test_publish_mode_is_device_by_default_and_checked():
    from nsbridge.errors import UserError
    from nsbridge.usernet import api

    assert api.options(publish=["8080:80"]).publish_mode == "device"
    assert api.options(publish_mode="splice").publish_mode == "splice"
    with pytest.raises(UserError, match=r"^--publish-mode 'fast': use 'device' or 'splice'"):
        api.options(publish_mode="fast")
