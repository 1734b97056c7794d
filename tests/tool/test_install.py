"""The README's first command, run the way a stock Debian/Ubuntu machine runs it.

A stock machine has Debian's ``/usr/bin/python3`` with its PEP 668 marker, nothing installed
by pip, and ``PATH=/usr/sbin:/usr/bin:/sbin:/bin`` (no pyenv, no ~/.local).  The command is
read from the README itself, so the README cannot drift from what is tested, and run in a
clean environment.  Only the install locations are moved into a temporary directory (the
script's NSBRIDGE_VENV/NSBRIDGE_BIN/NSBRIDGE_SHARE settings) so the test leaves nothing on the
machine; that directory is put first on PATH as /usr/local/bin is on a stock root shell.

The install fetches pyroute2 from the package registry (as a user's would).  Debian packages
are installed only if missing (``.ci/run`` has installed them already).  The unprivileged
variant runs as uid 65534 in a user namespace of its own; it needs no /dev/net/tun (the demo
uses only a network namespace and loopback), so the device's mode does not matter here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.environment import REPO

STOCK_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
STOCK_PYTHON = Path("/usr/bin/python3")
DEMO_PASSED = "demo passed"


def readme_commands() -> list[str]:
    """The command lines of the README's first ``sh`` block (comments dropped)."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"```sh\n(.*?)```", text, re.S)
    assert block is not None, "the README has no sh block"
    return [line for line in block.group(1).splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def copy_checkout(target: Path) -> Path:
    """The work tree's source files, as a fresh clone has them: no build/, venvs or .so."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], cwd=REPO, capture_output=True, check=True)
    for name in listed.stdout.decode().split("\0"):
        source = REPO / name
        if name and source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


@pytest.fixture(scope="module")
def installed() -> Iterator[Path]:
    """The README's first command run as written; yields the directory holding bin/."""
    if not STOCK_PYTHON.exists():
        pytest.skip("no /usr/bin/python3: not a Debian/Ubuntu machine")
    first = readme_commands()[0]
    assert first == "./install.sh && nsbridge demo", first
    top = Path(tempfile.mkdtemp(prefix="nsbridge-install-"))
    top.chmod(0o755)  # the unprivileged case runs the installed command as uid 65534
    try:
        env = {"HOME": str(top / "home"), "LANG": "C.UTF-8",
               "PATH": f"{top / 'bin'}:{STOCK_PATH}",
               "NSBRIDGE_VENV": str(top / "venv"), "NSBRIDGE_BIN": str(top / "bin"),
               "NSBRIDGE_SHARE": str(top / "share")}
        for name in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_CERT",
                     "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"):
            if name in os.environ:  # how this machine reaches the registry, nothing more
                env[name] = os.environ[name]
        clone = copy_checkout(top / "clone")
        result = subprocess.run(["sh", "-c", first], cwd=clone, env=env, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr
        assert DEMO_PASSED in result.stdout, result.stdout
        assert "Traceback" not in result.stderr, result.stderr
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_readme_first_command_installs_and_the_demo_passes(installed: Path) -> None:
    """The venv uses the system Python, and every command of the package is on PATH."""
    venv_python = installed / "venv" / "bin" / "python"
    assert os.path.realpath(venv_python).startswith("/usr/bin/python3"), venv_python
    for command in ("nsbridge", "netns-tcp-bridge", "netns_tcp_bridge",
                    "nsbridge-slirp4netns"):
        assert (installed / "bin" / command).exists(), command
    # Never under slirp4netns's own name: it must not shadow a real one on PATH.
    assert not (installed / "bin" / "slirp4netns").exists()
    assert not (installed / "venv" / "bin" / "slirp4netns").exists()


def test_unprivileged_variant(installed: Path) -> None:
    """`unshare -Ur nsbridge demo` as an ordinary user (uid 65534)."""
    if shutil.which("setpriv") is None or shutil.which("unshare") is None:
        pytest.skip("needs util-linux setpriv and unshare")
    result = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
         "unshare", "-Ur", str(installed / "bin" / "nsbridge"), "demo"],
        env={"PATH": STOCK_PATH, "HOME": "/", "LANG": "C.UTF-8"}, cwd="/",
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert DEMO_PASSED in result.stdout, result.stdout


def test_man_pages_and_completion_are_installed(installed: Path) -> None:
    """nsbridge(1) and netns_tcp_bridge(1), generated from the parsers at build time, are
    linked into share/man and render; every flag `--help` shows is in the page; the bash
    completion loads and completes the commands."""
    if shutil.which("man") is None:
        pytest.skip("man-db is not installed")
    pages = installed / "share" / "man" / "man1"
    for page, command in (("nsbridge.1", ["nsbridge", "run"]),
                          ("netns_tcp_bridge.1", ["netns_tcp_bridge"]),
                          ("nsbridge-slirp4netns.1", ["nsbridge-slirp4netns"])):
        rendered = subprocess.run(["man", "-l", str(pages / page)], capture_output=True,
                                  text=True, timeout=60, env={**os.environ, "MANWIDTH": "200"})
        assert rendered.returncode == 0, rendered.stderr
        helped = subprocess.run([str(installed / "bin" / command[0]), *command[1:], "--help"],
                                capture_output=True, text=True, timeout=60)
        flags = set(re.findall(r"(?<![\w-])(--[a-z][\w-]+)", helped.stdout))
        assert flags, helped.stdout
        text = rendered.stdout.replace("\u2010", "-")  # man may hyphenate with U+2010
        absent = {flag for flag in flags if flag not in text}
        assert not absent, f"{page} lacks {sorted(absent)}"
    completion = installed / "share" / "bash-completion" / "completions" / "nsbridge"
    script = (f"source {completion}; COMP_WORDS=(nsbridge ru); COMP_CWORD=1; "
              "COMP_LINE='nsbridge ru'; COMP_POINT=${#COMP_LINE}; "
              "$(complete -p nsbridge | sed 's/.*-F \\([^ ]*\\) .*/\\1/') nsbridge ru nsbridge; "
              "echo ${COMPREPLY[@]}")
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["run"], done.stdout + done.stderr


def test_sdist_and_wheel_hold_what_they_should(tmp_path: Path) -> None:
    """The sdist carries what the README links to and what building needs; the wheel the
    package, its type marker, the built relay (not its C source), man pages, completion."""
    import tarfile
    import zipfile

    clone = copy_checkout(tmp_path / "clone")
    built = tmp_path / "dist"
    for command in (["sdist", "-d", str(built)], ["bdist_wheel", "-d", str(built)]):
        done = subprocess.run([sys.executable, "setup.py", "-q", *command], cwd=clone,
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0 and "invalid command 'bdist_wheel'" in done.stderr:
            pytest.skip("the wheel package is not installed next to this Python")
        assert done.returncode == 0, done.stderr
    (sdist,) = built.glob("*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    for wanted in ("LICENSE", "README.md", "install.sh", "setup.py", "examples/forwards.toml",
                   "examples/embed.py", "contrib/nsbridge-web.service",
                   "nsbridge/usernet/host/_flowrelay.c", "docs/forward.md"):
        assert wanted in names, f"{wanted} missing from the sdist"
    (wheel,) = built.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert "nsbridge/py.typed" in names
    assert not any(name.endswith(".c") for name in names), sorted(names)
    data = {name.split(".data/data/", 1)[1] for name in names if ".data/data/" in name}
    if data:  # generated when argparse-manpage and shtab are importable (pip's builds)
        assert data == {"share/man/man1/nsbridge.1", "share/man/man1/netns_tcp_bridge.1",
                        "share/man/man1/nsbridge-slirp4netns.1",
                        "share/bash-completion/completions/nsbridge"}, data


def test_an_old_pyroute2_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    """pyroute2 0.9.1 (below the declared floor): `nsbridge run` says what to install."""
    if not STOCK_PYTHON.exists():
        pytest.skip("no /usr/bin/python3")
    venv = tmp_path / "venv"
    subprocess.run([str(STOCK_PYTHON), "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "pyroute2==0.9.1"],
                         capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stderr
    result = subprocess.run([str(venv / "bin" / "python"), "-m", "nsbridge", "run", "--",
                             "true"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "pyroute2 0.9.1 is too old" in lines[0] and "pyroute2>=0.9.3" in lines[0], lines


def uninstall_commands() -> str:
    """The ``sh`` block of docs/install.md's "Uninstalling" section, as written there."""
    text = (REPO / "docs" / "install.md").read_text()
    section = text.split("## Uninstalling", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block is not None, "docs/install.md's Uninstalling section has no sh block"
    return block.group(1)


def test_uninstall_removes_the_venv_and_the_links(installed: Path) -> None:
    """docs/install.md's uninstall steps, with root's default locations moved to the
    fixture's (the only substitution), remove everything install.sh made.  Runs last:
    the installation is gone afterwards."""
    script = uninstall_commands()
    for default, moved in (("/opt/nsbridge", installed / "venv"),
                           ("/usr/local/bin", installed / "bin"),
                           ("/usr/local/share", installed / "share")):
        assert default in script, default
        script = script.replace(default, str(moved))
    made = [installed / "venv", *(installed / "bin").iterdir(),
            *(installed / "share").rglob("*")]
    links = [path for path in made if path.is_symlink()]
    assert len(links) >= 8, made  # four commands, three man pages, the completion
    result = subprocess.run(["sh", "-ec", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    left = [path for path in made if path.is_symlink() or path.is_file()]
    assert not left, f"left behind: {left}"
    assert not (installed / "venv").exists()
