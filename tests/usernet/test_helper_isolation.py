"""nsbridge's helpers that enter a sandbox's or container's namespaces are out of its reach.

The program inside (root of its user namespace) runs ``helpers/isolation_scanner.py``: from
before nsbridge starts (``attach``; for ``run`` the command can only start after nsbridge)
until the test stops it, it lists /proc on every pass and tries, on every other process,
``/proc/PID/root``, ``cwd``, ``environ``, ``mem``, opening ``/proc/PID/fd/N``,
``pidfd_getfd`` and ``PTRACE_SEIZE``.  Every case asserts:

* it got nothing, anywhere (``got`` is empty),
* the secret planted in nsbridge's environment (and, for the API, in the embedding
  program's memory) appears nowhere in its report,
* it *saw* nsbridge's long-lived socket factory when ports are published (the test, as
  root outside, finds the processes that share the scanner's user namespace) and every
  attempt on it was refused;
* and, from outside, that the factory holds only fds 0-3 (0-2 on /dev/null) and its
  root and cwd are an empty directory.

``test_scanner_catches_an_unconfined_helper`` is the control: a process that enters the
scanner's user namespace the way the helpers did before they were confined is found and
read (environment, root, fds), so the cases above cannot pass for want of trying.

Cases: ``run`` and ``attach``, CLI and API, and the API's split form (``HostSide`` +
``child_setup``), with and without ``-p``; ``attach`` as root
(the target's user namespace created by root: the kernel then keeps the helper dumpable
across setns, the worst case) and rootless.  Rootless here means nsbridge runs as root of
a user namespace of its own (``unshare -U -r``), holding no capability outside it, and
the target is a child of that namespace, as a rootless runtime's container is: /root is
0700 on this machine, so uid 65534 cannot run this interpreter.  /dev/net/tun is then
opened by the mapped uid 0, which owns it, so these tests do not depend on its mode
(0600 here before .ci/run, 0666 on normal systems).

Every nsbridge runs inside a "host" namespace of the test's own (the ``host`` fixture);
no traffic is sent.  Processes are ended by PID.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers.environment import REPO, have
from helpers.netns import free_port
from helpers.waiting import wait_until

pytestmark = pytest.mark.skipif(not have("unshare"), reason="needs util-linux unshare")

SCANNER = REPO / "tests" / "helpers" / "isolation_scanner.py"
SCAN_SECONDS = 1.5  # scanning after nsbridge is set up, before the test stops it
REFUSED = {"EACCES", "EPERM"}
ROOTLESS = ["unshare", "-U", "-r", "--"]


@dataclass
class Scan:
    """One scanner's files: REPORT, STOP and READY (READY holds the scanner's pid)."""

    directory: Path
    secret: str

    @property
    def report(self) -> Path:
        return self.directory / "report.json"

    @property
    def stop_file(self) -> Path:
        return self.directory / "stop"

    @property
    def ready(self) -> Path:
        return self.directory / "ready"

    def argv(self) -> list[str]:
        return [sys.executable, str(SCANNER), str(self.report), str(self.stop_file),
                str(self.ready)]

    def env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(REPO), "NSB_SECRET": self.secret}

    def wait_ready(self, proc: subprocess.Popen, what: str) -> int:
        def ready() -> bool:
            assert proc.poll() is None, f"{what} exited with {proc.returncode}"
            return self.ready.exists() and self.ready.read_text().strip().isdigit()

        wait_until(ready, timeout=30, what=f"the scanner to start ({what})")
        return int(self.ready.read_text())

    def stop(self) -> None:
        self.stop_file.touch()

    def result(self) -> dict:
        wait_until(self.report.exists, timeout=20, what="the scanner's report")
        return json.loads(self.report.read_text())


@pytest.fixture
def scan(tmp_path: Path) -> Scan:
    directory = tmp_path / "scan"
    directory.mkdir()
    return Scan(directory, f"nsb-secret-{uuid.uuid4().hex}")



def _userns(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/user").st_ino


def nsbridge_in(scanner: int) -> set[int]:
    """The processes sharing the scanner's user namespace, besides the scanner: nsbridge's
    helpers (root outside may read every process's namespace links)."""
    userns = _userns(scanner)
    found = set()
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != scanner:
            try:
                if _userns(int(name)) == userns:
                    found.add(int(name))
            except OSError:
                pass
    return found


def wait_for_factory(scanner: int) -> set[int]:
    """nsbridge's long-lived helper (the published ports' socket factory) in the
    scanner's user namespace."""
    box: dict[str, set[int]] = {}

    def present() -> bool:
        box["pids"] = {pid for pid in nsbridge_in(scanner) if _is_factory(pid)}
        return bool(box["pids"])

    wait_until(present, timeout=30, what="the socket factory in the sandbox's user namespace")
    return box["pids"]


def _is_factory(pid: int) -> bool:
    """The factory holds fds 0-3; the short-lived set-up helpers hold more."""
    try:
        return sorted(os.listdir(f"/proc/{pid}/fd")) == ["0", "1", "2", "3"]
    except OSError:
        return False


def factory_from_outside(pid: int) -> list[str]:
    """What root outside sees of the factory, as a list of problems: it must hold only
    its channel and /dev/null, and have an empty root (the empty tmpfs) as root and cwd."""
    problems = []
    fds = {int(fd): os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    if sorted(fds) != [0, 1, 2, 3] or {fds[0], fds[1], fds[2]} != {"/dev/null"} or \
            not fds[3].startswith("socket:"):
        problems.append(f"factory {pid} holds {fds}")
    for what in ("root", "cwd"):
        if listing := os.listdir(f"/proc/{pid}/{what}/"):
            problems.append(f"factory {pid}'s {what} is not empty: {sorted(listing)[:8]}")
    return problems


def check_report(report: dict, scan: Scan, factories: set[int]) -> None:
    assert report["passes"] > 100, report["passes"]
    assert report["got"] == [], json.dumps(report["got"], indent=1)[:4000]
    assert scan.secret not in json.dumps(report)
    seen = {int(pid) for pid in report["seen"]}
    assert factories <= seen, (factories, "not seen by the scanner")
    for pid in factories:
        outcome = report["outcome"][str(pid)]
        for what in ("root", "cwd", "environ", "mem", "fd", "getfd", "ptrace"):
            assert outcome[what] in REFUSED, (pid, what, outcome)


def finish(scan: Scan, proc: subprocess.Popen, log: Path, factories: set[int]) -> dict:
    """Let the scanner run a little longer, stop it, wait for nsbridge (or the driver) to
    end with status 0, and return the scanner's report."""
    time.sleep(SCAN_SECONDS)
    outside = [problem for pid in factories for problem in factory_from_outside(pid)]
    scan.stop()
    report = scan.result()
    assert proc.wait(timeout=30) == 0, log.read_text()
    assert "Traceback" not in log.read_text(), log.read_text()
    check_report(report, scan, factories)
    assert outside == []
    return report


# ---- run --------------------------------------------------------------------------------


@pytest.mark.parametrize("publish", [False, True], ids=["plain", "publish"])
def test_run_cli(host, scan, processes, tmp_path, publish):
    """``nsbridge run [-p ...] -- scanner``: the command finds nothing of nsbridge's."""
    ports = ["-p", f"127.0.0.1:{free_port(host)}:80"] if publish else []
    log = tmp_path / "nsbridge.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(["ip", "netns", "exec", host, sys.executable, "-m",
                                 "nsbridge", "run", *ports, "--", *scan.argv()],
                                stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                env=scan.env())
    processes.append(proc)
    scanner = scan.wait_ready(proc, "nsbridge run")
    factories = wait_for_factory(scanner) if publish else set()
    finish(scan, proc, log, factories)


EMBEDDER = """
    import json, os, socket, subprocess, sys, time
    from nsbridge.usernet import api

    scanner_argv, publish, mode = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
    # What the embedding program must not give away: its environment (NSB_SECRET), a
    # secret in its memory, a private log file and a socket in its own namespace.
    secret = "in-memory-" + os.environ["NSB_SECRET"]
    private_log = open(sys.argv[4], "a")
    private_log.write("private line\\n")
    private_log.flush()
    host_udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    host_udp.connect(("127.0.0.1", 9))
    if mode == "run":
        proc = api.run(scanner_argv, publish=publish)
        code = proc.wait(timeout=120)
        proc.close()
    elif mode == "split":
        with api.HostSide(publish=publish) as side:
            fd = side.child_fd()
            setup = ("import os, sys\\nfrom nsbridge.usernet import api\\n"
                     "api.child_setup(int(sys.argv[1]))\\nos.execvp(sys.argv[2], sys.argv[2:])")
            child = subprocess.Popen(["unshare", "-Urn", sys.executable, "-c", setup, str(fd),
                                      *scanner_argv], pass_fds=(fd,))
            side.start(pid=child.pid)
            code = child.wait(timeout=120)
            side.wait(timeout=20)
    else:
        target = subprocess.Popen(["unshare", "-Urn", *scanner_argv])
        ready = scanner_argv[-1]
        while not os.path.exists(ready) and target.poll() is None:
            time.sleep(0.005)
        with api.attach(target.pid, publish=publish) as net:
            code = target.wait(timeout=120)
            net.wait(timeout=20)
    print(json.dumps({"code": code, "secret": len(secret)}))
"""


def _embedder(tmp_path: Path, scan: Scan, mode: str, publish: bool, host: str,
              prefix: list[str]) -> tuple[subprocess.Popen, Path, Path]:
    driver = tmp_path / "embedder.py"
    driver.write_text(textwrap.dedent(EMBEDDER))
    private_log = tmp_path / "private.log"
    ports = [f"127.0.0.1:{free_port(host)}:80"] if publish else []
    log = tmp_path / "embedder.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(["ip", "netns", "exec", host, *prefix, sys.executable,
                                 str(driver), json.dumps(scan.argv()), json.dumps(ports), mode,
                                 str(private_log)],
                                stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=scan.env())
    return proc, log, private_log


@pytest.mark.parametrize("publish", [False, True], ids=["plain", "publish"])
def test_run_api(host, scan, processes, tmp_path, publish):
    """``api.run(scanner, publish=...)`` in an embedding program holding a secret, a log
    file and a host socket: none of them is reachable from the command."""
    proc, log, private_log = _embedder(tmp_path, scan, "run", publish, host, [])
    processes.append(proc)
    scanner = scan.wait_ready(proc, "the embedding program")
    factories = wait_for_factory(scanner) if publish else set()
    finish(scan, proc, log, factories)
    assert json.loads(log.read_text().strip().splitlines()[-1])["code"] == 0
    assert private_log.read_text() == "private line\n"


@pytest.mark.parametrize("publish", [False, True], ids=["plain", "publish"])
def test_split_form_api(host, scan, processes, tmp_path, publish):
    """``api.HostSide(publish=...)`` + ``child_setup`` in the runtime's own child, which
    then execs the scanner: the factory the host side starts inside is out of reach."""
    proc, log, private_log = _embedder(tmp_path, scan, "split", publish, host, [])
    processes.append(proc)
    scanner = scan.wait_ready(proc, "the embedding program")
    try:
        factories = wait_for_factory(scanner) if publish else set()
        finish(scan, proc, log, factories)
    finally:
        scan.stop()
    assert json.loads(log.read_text().strip().splitlines()[-1])["code"] == 0
    assert private_log.read_text() == "private line\n"


# ---- attach -----------------------------------------------------------------------------


@pytest.mark.parametrize("publish", [False, True], ids=["plain", "publish"])
@pytest.mark.parametrize("rootless", [False, True], ids=["root", "rootless"])
def test_attach_cli(host, scan, processes, tmp_path, publish, rootless):
    """``nsbridge attach [-p ...] PID`` of a container whose root has been scanning since
    before nsbridge started: neither the set-up helper nor the factory is reachable."""
    ports = f"-p 127.0.0.1:{free_port(host)}:80" if publish else ""
    scanner = " ".join(f"'{arg}'" for arg in scan.argv())
    script = (f"unshare -Urn {scanner} & "
              f"while [ ! -e '{scan.ready}' ]; do sleep 0.005; done; "
              f"exec {sys.executable} -m nsbridge attach {ports} $!")
    log = tmp_path / "nsbridge.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(["ip", "netns", "exec", host, *(ROOTLESS if rootless else []),
                                 "sh", "-c", script],
                                stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=scan.env())
    processes.append(proc)
    scanner_pid = scan.wait_ready(proc, "nsbridge attach")
    try:
        factories = wait_for_factory(scanner_pid) if publish else set()
        if not publish:
            wait_until(lambda: "nsb0" in _links_of(scanner_pid), timeout=30,
                       what="nsbridge to give the target its tun device")
        finish(scan, proc, log, factories)
    finally:
        scan.stop()  # the scanner (the attach target) ends, and nsbridge with it


def _links_of(pid: int) -> str:
    return subprocess.run(["nsenter", "-t", str(pid), "-n", "ip", "-o", "link"],
                          capture_output=True, text=True).stdout


@pytest.mark.parametrize("publish", [False, True], ids=["plain", "publish"])
@pytest.mark.parametrize("rootless", [False, True], ids=["root", "rootless"])
def test_attach_api(host, scan, processes, tmp_path, publish, rootless):
    """``api.attach(pid, publish=...)`` from an embedding program with a secret, a log
    file and a host socket, the container's root scanning from before the attach."""
    proc, log, private_log = _embedder(tmp_path, scan, "attach", publish, host,
                                       ROOTLESS if rootless else [])
    processes.append(proc)
    scanner = scan.wait_ready(proc, "the embedding program")
    try:
        factories = wait_for_factory(scanner) if publish else set()
        if not publish:
            wait_until(lambda: "nsb0" in _links_of(scanner), timeout=30,
                       what="nsbridge to give the target its tun device")
        finish(scan, proc, log, factories)
    finally:
        scan.stop()
    assert private_log.read_text() == "private line\n"


# ---- the control ------------------------------------------------------------------------


UNCONFINED = """
    import ctypes, os, sys, time
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/proc/{sys.argv[1]}/ns/user", os.O_RDONLY)
    private_log = open(sys.argv[3], "a")
    if libc.setns(fd, 0x10000000) != 0:
        raise OSError(ctypes.get_errno(), "setns")
    while not os.path.exists(sys.argv[2]):
        time.sleep(0.05)
"""


def test_scanner_catches_an_unconfined_helper(scan, processes, tmp_path):
    """The control: a process that enters the scanner's user namespace as nsbridge's
    helpers did before they were confined (forked from a program with secrets in its
    environment and files open, entering with setns) is found and read."""
    target = subprocess.Popen(["unshare", "-Urn", *scan.argv()], env=scan.env())
    processes.append(target)
    scanner = scan.wait_ready(target, "the scanner")
    helper = subprocess.Popen([sys.executable, "-c", textwrap.dedent(UNCONFINED), str(scanner),
                               str(scan.stop_file), str(tmp_path / "private.log")],
                              env=scan.env())
    processes.append(helper)
    wait_until(lambda: helper.pid in nsbridge_in(scanner), timeout=10,
               what="the unconfined helper to enter the namespace")
    time.sleep(SCAN_SECONDS)
    scan.stop()
    report = scan.result()
    assert helper.wait(timeout=10) == 0
    got = {item["what"] for item in report["got"] if item["pid"] == helper.pid}
    assert {"root", "cwd", "environ", "mem", "fd", "getfd", "ptrace"} <= got, report["got"]
    assert scan.secret in json.dumps(report["got"])
    assert any("private.log" in json.dumps(item["detail"]) for item in report["got"]
               if item["what"] in ("fd", "getfd"))


# ---- what the command still gets ----------------------------------------------------------


def test_run_command_keeps_the_callers_cwd_environment_and_fds(tmp_path, monkeypatch):
    """The helper sheds cwd, environment and fds before it enters anything; the command
    it becomes still gets the caller's working directory and environment (or ``env``),
    its stdio and ``pass_fds``."""
    from nsbridge.usernet.inside.sandbox import Sandbox

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NSB_FROM_CALLER", "yes")
    script = ('pwd; echo "${NSB_FROM_CALLER:-unset} ${NSB_GIVEN:-unset}"; '
              'echo passed > "/proc/self/fd/$0"')
    for env, expected in ((None, "yes unset"), ({"NSB_GIVEN": "given", "PATH": os.defpath},
                                                "unset given")):
        out_r, out_w = os.pipe()
        pass_r, pass_w = os.pipe()
        handle = Sandbox.create(["sh", "-c", script, str(pass_w)], stdout=out_w,
                                pass_fds=[pass_w], env=env)
        os.close(out_w)
        os.close(pass_w)
        try:
            assert handle.wait(timeout=30) == 0
            out = os.read(out_r, 65536).decode().splitlines()
            assert out == [str(tmp_path), expected], out
            assert os.read(pass_r, 100) == b"passed\n"
        finally:
            handle.close()
            os.close(out_r)
            os.close(pass_r)


# ---- the host namespace's /proc/PID/net ------------------------------------------------


def test_host_sockets_visible_through_proc_net_unless_cmd_has_a_pid_namespace(host):
    """The README's word on item 6, both halves: the command reads the host namespace's
    abstract socket names through /proc/<nsbridge>/net/unix, and ``unshare -pf
    --mount-proc`` (the documented workaround) hides them while passing the exit status."""
    from helpers.netns import in_netns

    name = f"nsbridge-test-{uuid.uuid4().hex[:12]}"

    def bind() -> object:
        import socket

        sock = socket.socket(socket.AF_UNIX)
        sock.bind("\0" + name)
        return sock

    sock = in_netns(host, bind)
    try:
        count = f"cat /proc/[0-9]*/net/unix 2>/dev/null | grep -c {name}; exit 4"
        for prefix, visible in (([], True), (["unshare", "-pf", "--mount-proc"], False)):
            result = subprocess.run(["ip", "netns", "exec", host, sys.executable, "-m",
                                     "nsbridge", "run", "--", *prefix, "sh", "-c", count],
                                    capture_output=True, text=True, timeout=60, cwd=REPO,
                                    env={**os.environ, "PYTHONPATH": str(REPO)})
            assert result.returncode == 4, result.stderr
            assert (int(result.stdout.strip()) > 0) is visible, (prefix, result.stdout)
    finally:
        sock.close()  # type: ignore[attr-defined]
