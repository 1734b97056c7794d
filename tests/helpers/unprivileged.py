"""Running Python as an ordinary user (uid/gid 65534, no groups) with this run's test
dependencies, to prove that what claims to need no root really needs none.

The checkout is copied to a fresh directory under /tmp owned by that user (the tests'
own temporary directories are root's, mode 0700).  When this interpreter or its
site-packages are not readable by that user (a pyenv under root's 0700 home, say), the
installed files of the distributions the tests import are copied there too and run by
the system's Python of the same version: a copy, so nothing of this machine is changed.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from packaging.requirements import Requirement

from helpers.environment import REPO

NOBODY = 65534
# What pytest runs the unit tests with: the test extra of pyproject.toml, and nsbridge's
# own dependency (each with what it requires).
TEST_DISTRIBUTIONS = ("pytest", "pytest-timeout", "hypothesis", "dnspython", "pyroute2")
# Never copied with the checkout: build and tool output, virtual environments, git.
NOT_COPIED = (".git", ".ci", "build", "dist", "*.egg-info", "__pycache__", ".hypothesis",
              ".mypy_cache", ".ruff_cache", ".pytest_cache")


def as_nobody(*argv: str) -> list[str]:
    """``argv`` run as uid/gid 65534 with no supplementary groups."""
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv]


@contextlib.contextmanager
def unprivileged_checkout() -> Iterator[tuple[Path, list[str], dict[str, str]]]:
    """(the copied checkout, the Python command, the environment) for running it as
    65534; everything is removed at the end."""
    top = Path(tempfile.mkdtemp(prefix="nsbridge-nobody-"))
    try:
        tree = top / "checkout"
        shutil.copytree(REPO, tree, ignore=shutil.ignore_patterns(*NOT_COPIED), symlinks=True)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(top),
               "TMPDIR": str(top), "XDG_CACHE_HOME": str(top / "cache"),
               "PYTHONDONTWRITEBYTECODE": "1", "LANG": "C.UTF-8"}
        python = [sys.executable]
        if not _imports_as_nobody(sys.executable, top, env):
            python, site = [system_python()], top / "site-packages"
            copy_distributions(site, TEST_DISTRIBUTIONS)
            env["PYTHONPATH"] = str(site)
        subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", str(top)], check=True)
        yield tree, python, env
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _imports_as_nobody(python: str, cwd: Path, env: dict[str, str]) -> bool:
    probe = "import pytest, hypothesis, dns.message, pyroute2"
    done = subprocess.run(as_nobody(python, "-c", probe), cwd=cwd, env=env,
                          capture_output=True)
    return done.returncode == 0


def system_python() -> str:
    """The distribution's own Python of this version (the same ABI, so the checkout's
    built native module loads too)."""
    wanted = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (f"/usr/bin/{wanted}", f"/usr/local/bin/{wanted}"):
        if os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError(f"no {wanted} readable by uid {NOBODY} outside this "
                            f"interpreter's prefix {sys.prefix}")


def copy_distributions(site: Path, names: tuple[str, ...]) -> None:
    """Copy every installed file of the distributions ``names`` and their requirements
    (markers evaluated for this interpreter) into ``site``."""
    todo, done = list(names), set()
    while todo:
        dist = importlib.metadata.distribution(todo.pop())
        key = dist.metadata["Name"].lower().replace("_", "-")
        if key in done:
            continue
        done.add(key)
        for path in dist.files or ():
            source = Path(str(dist.locate_file(path))).resolve()
            target = (site / path).resolve()
            if target.is_relative_to(site.resolve()) and source.is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)
        for text in dist.requires or ():
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
