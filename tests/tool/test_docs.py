"""Every code block in README.md and docs/*.md is checked, and every example is run.

Each fenced block is labelled on the line just above its opening fence:

* ``<!-- example: NAME -->``: a runnable example.  The block is extracted from the Markdown
  and run for real by ``run_<NAME>`` below (``EXAMPLES``), never a copy of it;
* ``<!-- proved by: tests/FOLDER/FILE.py::TEST -->``: an existing test does what the block shows;
* ``<!-- not an example: syntax|output|rules|tree -->``: usage grammar, sample output, a rule
  listing, a source tree.

Only what must be unique is substituted in an example, and only here (``substitute``):
namespace names (``web``, ``app``) become fresh ``nsbt-...`` names, paths under ``/run/``
move into the test's tmp directory, and ``examples/forwards.toml`` becomes a copy with the
same substitutions.  Fixed ports need no substitution: every example runs inside a "host"
namespace of the test's own (``nsenter --net=/run/netns/HOST ...``; the ``host`` fixture in
conftest.py, with 192.0.2.1 on it), so 8080 there is free and all traffic stays on its
loopback or in namespaces the test created; the servers the examples talk to (an HTTP
server on 192.0.2.1:80, a server on 127.0.0.1:80 of ``web``) are started by the test in
those namespaces.

``nsbridge`` is the checkout's: a shim named ``nsbridge`` first on PATH runs
``sys.executable -m nsbridge`` with PYTHONPATH set to the repository, which Python
examples get too.  Shell examples run with ``bash -e``, in a session of their own; they
end their background processes themselves (readers copy them), which is checked: any
process left in that session fails the test and is then killed by PID.  Namespaces are
removed even when a test fails.
"""

from __future__ import annotations

import ast
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers.environment import REPO
from helpers.netns import in_netns, reachable_in
from helpers.servers import serve_in_thread
from helpers.waiting import wait_until

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
README_LIMIT = 12_000  # bytes: the README is read in minutes, the rest is in docs/
NOT_AN_EXAMPLE = {"syntax", "output", "rules", "tree"}
FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)\s*$")
LABEL = re.compile(r"^\s*<!-- (example|proved by|not an example): (\S.*?) -->\s*$")
PAGE = "served by the docs test\n"  # index.html of the directory the examples run in
HOST_PAGE = "hello from 192.0.2.1\n"  # what the host namespace's server at 192.0.2.1 serves
WEB_PAGE = "hello from namespace web\n"  # what web's 127.0.0.1:80 serves


# ---- the blocks -----------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """A fenced code block and the label on the line above it (None: no label)."""

    path: Path
    line: int  # 1-based line of the opening fence
    language: str
    text: str
    label: tuple[str, str] | None

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def blocks_of(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown file, indented ones (inside a list) included."""
    lines = path.read_text().splitlines()
    found = []
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        indent, fence, language = opening.groups()
        end = index + 1
        while end < len(lines) and lines[end].strip() != fence:
            end += 1
        assert end < len(lines), f"{path}:{index + 1}: unclosed code block"
        body = [line[len(indent):] if line.startswith(indent) else line.lstrip()
                for line in lines[index + 1:end]]
        above = LABEL.match(lines[index - 1]) if index > 0 else None
        found.append(Block(path, index + 1, language, "\n".join(body) + "\n",
                           (above.group(1), above.group(2)) if above else None))
        index = end + 1
    return found


def all_blocks() -> list[Block]:
    return [block for path in DOCS for block in blocks_of(path)]


def example(name: str) -> Block:
    """The one block labelled ``example: name``."""
    matching = [block for block in all_blocks() if block.label == ("example", name)]
    assert len(matching) == 1, f"example {name!r} is labelled {len(matching)} times"
    return matching[0]


# ---- the checks on every block and link ---------------------------------------------------


def test_every_block_is_labelled() -> None:
    problems = []
    for block in all_blocks():
        if block.label is None:
            problems.append(f"{block.where}: no <!-- example|proved by|not an example --> "
                            "comment on the line above the block")
        elif block.label[0] == "not an example" and block.label[1] not in NOT_AN_EXAMPLE:
            problems.append(f"{block.where}: 'not an example: {block.label[1]}' is not one "
                            f"of {sorted(NOT_AN_EXAMPLE)}")
    assert not problems, "\n".join(problems)


def test_every_example_is_run_here() -> None:
    """Each example name is run by this file, once; no runner lacks its example."""
    names = [block.label[1] for block in all_blocks()
             if block.label is not None and block.label[0] == "example"]
    unknown = sorted(set(names) - set(EXAMPLES))
    assert not unknown, f"examples that tests/tool/test_docs.py does not run: {unknown}"
    doubled = sorted({name for name in names if names.count(name) > 1})
    assert not doubled, f"example names used more than once: {doubled}"
    unused = sorted(set(EXAMPLES) - set(names))
    assert not unused, f"runners without an example block: {unused}"


def test_proving_tests_exist() -> None:
    problems = []
    for block in all_blocks():
        if block.label is None or block.label[0] != "proved by":
            continue
        file, _, name = block.label[1].partition("::")
        path = REPO / file
        if not (file.startswith("tests/") and path.is_file()):
            problems.append(f"{block.where}: {file} is not a test file")
            continue
        defined = {node.name for node in ast.parse(path.read_text()).body
                   if isinstance(node, ast.FunctionDef)}
        if name not in defined:
            problems.append(f"{block.where}: {file} has no test function {name!r}")
    assert not problems, "\n".join(problems)


def anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of a Markdown file."""
    found = set()
    for line in path.read_text().splitlines():
        heading = re.match(r"^#{1,6}\s+(.*?)\s*$", line)
        if heading:
            text = re.sub(r"[^\w\- ]", "", heading.group(1).lower())
            found.add(text.replace(" ", "-"))
    return found


def test_relative_links_point_to_files_that_exist() -> None:
    problems = []
    for path in DOCS:
        text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
        for target in re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):
                continue  # https:, mailto:
            file, _, anchor = target.partition("#")
            resolved = (path.parent / file).resolve() if file else path
            if not resolved.exists():
                problems.append(f"{path.relative_to(REPO)}: link {target}: no such file")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                problems.append(f"{path.relative_to(REPO)}: link {target}: no such heading")
    assert not problems, "\n".join(problems)


def test_readme_links_every_docs_page() -> None:
    readme = (REPO / "README.md").read_text()
    missing = [page.name for page in sorted((REPO / "docs").glob("*.md"))
               if f"](docs/{page.name})" not in readme]
    assert not missing, f"README.md does not link {missing}"


def test_readme_is_short() -> None:
    size = len((REPO / "README.md").read_bytes())
    assert size <= README_LIMIT, f"README.md is {size} bytes; move detail into docs/"


# ---- what the examples run in ---------------------------------------------------------


@pytest.fixture
def shim(tmp_path: Path) -> dict[str, str]:
    """The environment examples run with: ``nsbridge`` on PATH is this checkout's."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "nsbridge"
    script.write_text(f'#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} -m nsbridge "$@"\n')
    script.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(REPO)}


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """The directory examples run in; a server started there serves PAGE."""
    path = tmp_path / "work"
    path.mkdir()
    (path / "index.html").write_text(PAGE)
    return path


@pytest.fixture
def names() -> Iterator[Callable[[str], str]]:
    """``names("web")``: a fresh namespace name standing for ``web``; every namespace so
    named is deleted at the end (whether the example or the test created it)."""
    given: dict[str, str] = {}

    def name(documented: str) -> str:
        return given.setdefault(documented, f"nsbt-{uuid.uuid4().hex[:10]}")

    try:
        yield name
    finally:
        for made in given.values():
            subprocess.run(["ip", "netns", "del", made], capture_output=True)


def substitute(text: str, names: Callable[[str], str], tmp: Path,
               namespaces: tuple[str, ...] = ("web",)) -> str:
    """The only changes made to an example: unique namespace names and /run paths."""
    for documented in namespaces:
        text = re.sub(rf"(?<![\w./-]){documented}(?![\w.-])", names(documented), text)
    return re.sub(r"/run/(?!netns/)", f"{tmp}/run-", text)


def processes_in_session(sid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                found.append(int(entry))
    return found


def end_session(sid: int) -> list[int]:
    """Wait briefly for the processes of session ``sid`` (ours) to end; kill what is left
    by PID and return those PIDs."""
    try:
        wait_until(lambda: not processes_in_session(sid), timeout=10)
        return []
    except AssertionError:
        left = processes_in_session(sid)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return left


def enter(netns: str, argv: list[str]) -> list[str]:
    """``argv`` run in network namespace ``netns`` and nothing else: unlike ``ip netns
    exec`` (a mount namespace of its own), an ``ip netns add`` inside is seen outside."""
    return ["nsenter", f"--net=/run/netns/{netns}", *argv]


def run_example(argv: list[str], netns: str | None, env: dict[str, str], cwd: Path,
                timeout: float = 120) -> subprocess.CompletedProcess:
    """Run an example to its end in a session of its own, inside ``netns``; fail if it
    leaves a process behind."""
    if netns is not None:
        argv = enter(netns, argv)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=cwd, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        end_session(proc.pid)
        out, err = proc.communicate()
        raise AssertionError(f"example timed out:\n{out}\n{err}") from None
    finally:
        left = end_session(proc.pid)
    assert not left, f"the example left processes behind: {left}\n{out}\n{err}"
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def run_shell(script: str, netns: str | None, env: dict[str, str], cwd: Path,
              ) -> subprocess.CompletedProcess:
    """A shell example with ``bash -e``; a failing step ends it, and then the trap ends
    its background jobs (a passing example ends them itself)."""
    wrapped = "trap 'kill $(jobs -p) 2>/dev/null || :' EXIT\n" + script
    return run_example(["bash", "-ec", wrapped], netns, env, cwd)


def run_python(code: str, netns: str | None, env: dict[str, str], cwd: Path,
               ) -> subprocess.CompletedProcess:
    path = cwd / "example.py"
    path.write_text(code)
    return run_example([sys.executable, str(path)], netns, env, cwd)


class Daemon:
    """A long-running example (a single foreground command), started in the background in
    a session of its own; stop() ends it and whatever it started, by PID."""

    def __init__(self, script: str, netns: str, env: dict[str, str], cwd: Path) -> None:
        self.log = cwd / "daemon.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(enter(netns, ["bash", "-ec", script]),
                                         stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                         start_new_session=True)

    def alive(self) -> None:
        assert self.proc.poll() is None, f"the example exited:\n{self.log.read_text()}"

    def stop(self) -> None:
        for pid in processes_in_session(self.proc.pid):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=20)
        finally:
            end_session(self.proc.pid)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    try:
        yield started
    finally:
        for daemon in started:
            daemon.stop()


def http_server(netns: str, address: str, port: int, directory: Path, text: str,
                ) -> subprocess.Popen:
    """``python3 -m http.server`` inside ``netns`` serving ``text`` as index.html."""
    directory.mkdir(exist_ok=True)
    (directory / "index.html").write_text(text)
    proc = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-m", "http.server",
                             str(port), "--bind", address, "-d", str(directory)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: reachable_in(netns, (address, port)), what=f"http server {address}")
    except AssertionError:
        proc.kill()
        proc.wait()
        raise
    return proc



@pytest.fixture
def servers() -> Iterator[list[subprocess.Popen]]:
    started: list[subprocess.Popen] = []
    try:
        yield started
    finally:
        for proc in started:
            proc.terminate()
            proc.wait(timeout=10)


@pytest.fixture
def host_web(host: str, names: Callable[[str], str], tmp_path: Path,
             servers: list[subprocess.Popen]) -> str:
    """The host namespace, with an HTTP server at 192.0.2.1:80 serving HOST_PAGE.

    The docs' 192.0.2.1 "stands for any server you can reach", so it is not one of the
    host's own addresses (those are closed to a sandbox without host access): the host
    fixture's veth peer moves to a namespace of its own holding 192.0.2.1, and the host
    keeps 192.0.2.254 on its end."""
    far = names("far")
    for command in (["netns", "add", far], ["-n", far, "link", "set", "lo", "up"],
                    ["-n", host, "addr", "del", "192.0.2.1/24", "dev", "d0"],
                    ["-n", host, "addr", "add", "192.0.2.254/24", "dev", "d0"],
                    ["-n", host, "link", "set", "d1", "netns", far],
                    ["-n", far, "addr", "add", "192.0.2.1/24", "dev", "d1"],
                    ["-n", far, "link", "set", "d1", "up"]):
        subprocess.run(["ip", *command], check=True, capture_output=True)
    servers.append(http_server(far, "192.0.2.1", 80, tmp_path / "host-www", HOST_PAGE))
    return host


@pytest.fixture
def web(names: Callable[[str], str], tmp_path: Path, servers: list[subprocess.Popen]) -> str:
    """Namespace ``web`` as the docs make it (``ip netns add``, lo up), with an HTTP server
    on its 127.0.0.1:80 serving WEB_PAGE."""
    name = names("web")
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    servers.append(http_server(name, "127.0.0.1", 80, tmp_path / "web-www", WEB_PAGE))
    return name


def curl_output(stdout: str) -> str:
    """What the example's curl printed: stdout without http.server's start-up line."""
    return "".join(line for line in stdout.splitlines(keepends=True)
                   if not line.startswith("Serving HTTP on "))


def curl(netns: str, url: str) -> str:
    result = subprocess.run(["ip", "netns", "exec", netns, "curl", "-sS", "--max-time", "10",
                             url], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout


def wait_curl(netns: str, url: str, daemon: Daemon) -> str:
    """curl ``url`` once the daemon example listens."""
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    wait_until(lambda: daemon.proc.poll() is not None or reachable_in(netns, ("127.0.0.1", port)),
               timeout=20, what=f"the example listening on {port}")
    daemon.alive()
    return curl(netns, url)


# ---- the examples -----------------------------------------------------------------------

Runner = Callable[[pytest.FixtureRequest], None]
EXAMPLES: dict[str, Runner] = {}


def runs(name: str) -> Callable[[Runner], Runner]:
    def register(fn: Runner) -> Runner:
        EXAMPLES[name] = fn
        return fn

    return register


def fixtures(request: pytest.FixtureRequest, *wanted: str) -> list:
    return [request.getfixturevalue(name) for name in wanted]


@runs("forward-netns")
def _forward_netns(request: pytest.FixtureRequest) -> None:
    """README: the script makes namespace web, its server and the forward, fetches the
    page, and ends everything it started (checked: no process, no namespace left)."""
    host, names, shim, workdir, tmp_path = fixtures(request, "host", "names", "shim",
                                                   "workdir", "tmp_path")
    script = substitute(example("forward-netns").text, names, tmp_path)
    result = run_shell(script, host, shim, workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert curl_output(result.stdout) == PAGE, result.stdout + result.stderr
    assert not Path(f"/run/netns/{names('web')}").exists()


@runs("serve-daemon")
def _serve_daemon(request: pytest.FixtureRequest) -> None:
    """README: examples/forwards.toml served for real (web as the README makes it), a
    forward added and used through ctl, statistics printed."""
    host, web, names, shim, workdir, tmp_path = fixtures(
        request, "host", "web", "names", "shim", "workdir", "tmp_path")
    config = tmp_path / "forwards.toml"
    config.write_text(substitute((REPO / "examples" / "forwards.toml").read_text(), names,
                                 tmp_path))
    script = substitute(example("serve-daemon").text, names, tmp_path)
    script = script.replace("examples/forwards.toml", str(config))
    result = run_shell(script, host, shim, workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(WEB_PAGE) == 2, result.stdout + result.stderr
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()
            if line.split() and line.split()[0] in (web, "dns", "admin", "web2")}
    assert set(rows) == {web, "dns", "admin", "web2"}, result.stdout
    assert int(rows["web2"][3]) == 1, result.stdout  # ACCEPTED: the one curl


@runs("run-publish")
def _run_publish(request: pytest.FixtureRequest) -> None:
    """README: a published server in a sandbox, then a command reaching 192.0.2.1."""
    host, shim, workdir = fixtures(request, "host_web", "shim", "workdir")
    result = run_shell(example("run-publish").text, host, shim, workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert curl_output(result.stdout) == PAGE + HOST_PAGE, result.stdout + result.stderr


@runs("api-run")
def _api_run(request: pytest.FixtureRequest) -> None:
    """README: the Python API runs curl with networking and reports the TCP counters."""
    host, shim, workdir = fixtures(request, "host_web", "shim", "workdir")
    result = run_python(example("api-run").text, host, shim, workdir)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(HOST_PAGE + "0 {"), result.stdout + result.stderr
    assert "'accepted': 1" in result.stdout, result.stdout  # the TCP path's one connection


@runs("run-policy")
def _run_policy(request: pytest.FixtureRequest) -> None:
    """usernet.md: the first command gets the page, the second is refused and -v says why."""
    host, shim, workdir = fixtures(request, "host_web", "shim", "workdir")
    result = run_shell(example("run-policy").text, host, shim, workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == HOST_PAGE + "refused\n", result.stdout + result.stderr
    assert "usernet tcp:" in result.stderr and "denied" in result.stderr, result.stderr


@runs("attach-cli")
def _attach_cli(request: pytest.FixtureRequest) -> None:
    """usernet.md: nsbridge attach serves a namespace unshare made until it exits."""
    host, shim, workdir = fixtures(request, "host_web", "shim", "workdir")
    result = run_shell(example("attach-cli").text, host, shim, workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == HOST_PAGE, result.stdout + result.stderr


@runs("api-forward")
def _api_forward(request: pytest.FixtureRequest) -> None:
    """api.md: a Bridge forward into web, fetched through from the same program."""
    host, names, _web, shim, workdir, tmp_path = fixtures(
        request, "host", "names", "web", "shim", "workdir", "tmp_path")
    code = substitute(example("api-forward").text, names, tmp_path)
    result = run_python(code, host, shim, workdir)
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(rf"listening on 127\.0\.0\.1:\d+\n200 {len(WEB_PAGE)} bytes through "
                        r"the forward\n", result.stdout), result.stdout + result.stderr


@runs("api-run-options")
def _api_run_options(request: pytest.FixtureRequest) -> None:
    """api.md: run() with a published port, a deny rule and a resolver."""
    host, shim, workdir = fixtures(request, "host_web", "shim", "workdir")
    result = run_python(example("api-run-options").text, host, shim, workdir)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(HOST_PAGE + "0 {"), result.stdout + result.stderr
    assert "'published'" in result.stdout, result.stdout


@runs("api-attach")
def _api_attach(request: pytest.FixtureRequest) -> None:
    """api.md: attach() to an unshare'd curl; it returns when curl exits."""
    host, shim, workdir = fixtures(request, "host_web", "shim", "workdir")
    result = run_python(example("api-attach").text, host, shim, workdir)
    assert result.returncode == 0, result.stderr
    assert result.stdout == HOST_PAGE + "curl exited with 0\n", result.stdout + result.stderr


@runs("api-split")
def _api_split(request: pytest.FixtureRequest) -> None:
    """api.md: the split form; the child keeps its networking because the program waits."""
    host, shim, workdir = fixtures(request, "host_web", "shim", "workdir")
    result = run_python(example("api-split").text, host, shim, workdir)
    assert result.returncode == 0, result.stderr
    assert result.stdout == HOST_PAGE + "child exited with 0\n", result.stdout + result.stderr


@runs("forward-abstract")
def _forward_abstract(request: pytest.FixtureRequest) -> None:
    """forward.md: an abstract socket inside app becomes a socket file, mode 0660."""
    host, names, shim, workdir, tmp_path, daemons = fixtures(
        request, "host", "names", "shim", "workdir", "tmp_path", "daemons")
    app = names("app")
    subprocess.run(["ip", "netns", "add", app], check=True)
    listener = in_netns(app, lambda: _abstract_listener(b"\0admin"))
    assert isinstance(listener, socket.socket)
    with listener:
        serve_in_thread(listener, _echo)
        script = substitute(example("forward-abstract").text, names, tmp_path,
                            namespaces=("app",))
        daemon = Daemon(script, host, shim, workdir)
        daemons.append(daemon)
        path = tmp_path / "run-app-admin.sock"
        wait_until(lambda: daemon.proc.poll() is not None or path.exists(), timeout=20,
                   what="the socket file")
        daemon.alive()
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(10)
            client.connect(str(path))
            client.sendall(b"admin?")
            assert client.recv(100) == b"admin?"
        listener.shutdown(socket.SHUT_RDWR)


def _abstract_listener(address: bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(address)
    sock.listen()
    return sock


def _echo(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


@runs("forward-web-dns")
def _forward_web_dns(request: pytest.FixtureRequest) -> None:
    """forward.md: TCP and UDP forwards into web in one process."""
    host, web, names, shim, workdir, tmp_path, daemons, udp_server = fixtures(
        request, "host", "web", "names", "shim", "workdir", "tmp_path", "daemons",
        "udp_server")
    udp_server(web, port=53)
    script = substitute(example("forward-web-dns").text, names, tmp_path)
    daemon = Daemon(script, host, shim, workdir)
    daemons.append(daemon)
    assert wait_curl(host, "http://127.0.0.1:8080/", daemon) == WEB_PAGE

    def ask() -> bytes:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(2)
            for _ in range(5):
                sock.sendto(b"dns?", ("127.0.0.1", 5353))
                try:
                    return sock.recv(100)
                except TimeoutError:
                    continue
            return b""

    assert in_netns(host, ask) == b"dns?"


@runs("config-file")
def _config_file(request: pytest.FixtureRequest) -> None:
    """forward.md: the config file, served; its control socket lists the forward."""
    host, web, names, shim, workdir, tmp_path, daemons = fixtures(
        request, "host", "web", "names", "shim", "workdir", "tmp_path", "daemons")
    config = tmp_path / "config.toml"
    config.write_text(substitute(example("config-file").text, names, tmp_path))
    daemon = Daemon(f"nsbridge serve --config {config}", host, shim, workdir)
    daemons.append(daemon)
    assert wait_curl(host, "http://127.0.0.1:8080/", daemon) == WEB_PAGE
    listed = subprocess.run(["nsbridge", "ctl", "--control", f"{tmp_path}/run-nsbridge.sock",
                             "list"], capture_output=True, text=True, env=shim, timeout=30)
    assert listed.returncode == 0, listed.stderr
    assert re.search(rf"^{web} +stream +127\.0\.0\.1:8080 ", listed.stdout, re.M), listed.stdout


@runs("forward-web")
def _forward_web(request: pytest.FixtureRequest) -> None:
    """forward.md: make web with lo up and forward into it; a server can then listen on
    web's 127.0.0.1:80 (it could not with lo down) and is reached through the forward."""
    host, names, shim, workdir, tmp_path, daemons, servers = fixtures(
        request, "host", "names", "shim", "workdir", "tmp_path", "daemons", "servers")
    web = names("web")
    daemon = Daemon(substitute(example("forward-web").text, names, tmp_path), host, shim,
                    workdir)
    daemons.append(daemon)
    wait_until(lambda: daemon.proc.poll() is not None or reachable_in(host, ("127.0.0.1", 8080)),
               timeout=20, what="the forward listening")
    daemon.alive()
    servers.append(http_server(web, "127.0.0.1", 80, tmp_path / "web-www", WEB_PAGE))
    assert curl(host, "http://127.0.0.1:8080/") == WEB_PAGE


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example(name: str, request: pytest.FixtureRequest) -> None:
    """Run the block labelled ``example: NAME`` for real (see the module docstring)."""
    EXAMPLES[name](request)
