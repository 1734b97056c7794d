"""Build hook for what pyproject.toml cannot say: the native module, man pages, completion.

* ``nsbridge.usernet.host._flowrelay`` serves UDP and ping for ``nsbridge run`` from a thread
  that never takes the GIL for a known flow.  It is optional: without a C compiler and the
  Python headers the build skips it and the Python engine serves them, slower.
* ``nsbridge.linux._notifycore`` runs the system calls of a switched connect (``run
  --bypass``) one call per step; optional too: without it the Python path serves.
* Man pages (``nsbridge(1)``, ``netns_tcp_bridge(1)``, ``nsbridge-slirp4netns(1)``) and the bash completion are generated
  at build time from the very argparse parsers the commands use (argparse-manpage and shtab,
  build requirements), so they cannot drift from ``--help``.  They are installed as data
  files into the environment's ``share/`` (``install.sh`` links them into the system's).
  Without those two packages (a build without isolation) they are skipped with a warning.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

from setuptools import Extension, setup

HERE = Path(__file__).resolve().parent
GENERATED = HERE / "build" / "generated"

# (page, module, function, program, one-line description)
MAN_PAGES = [
    ("nsbridge.1", "nsbridge.cli.main", "build_parser", "nsbridge",
     "connect Linux network namespaces: forwarding and rootless user-mode networking"),
    ("netns_tcp_bridge.1", "nsbridge.cli.compat", "build_parser", "netns_tcp_bridge",
     "TCP forwarder between network namespaces (nsbridge's drop-in for the original)"),
    ("nsbridge-slirp4netns.1", "nsbridge.cli.slirp4netns", "build_parser",
     "nsbridge-slirp4netns", "user-mode networking for container runtimes, in place of "
     "slirp4netns"),
]


def _version() -> str:
    for line in (HERE / "nsbridge" / "__init__.py").read_text().splitlines():
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip("\"'")
    raise RuntimeError("nsbridge/__init__.py has no __version__")


def _run(code: str, *args: str) -> None:
    """Run a generator in a child with the source tree importable (nothing is installed yet)
    and this process's path too (pip's isolated build environment lives on it)."""
    path = [str(HERE), *(entry for entry in sys.path if entry)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    subprocess.run([sys.executable, "-c", code, *args], check=True, env=env, cwd=HERE)


def generated_data_files() -> list[tuple[str, list[str]]]:
    """Generate man pages and completion into build/generated; their data_files entries."""
    try:
        import argparse_manpage  # noqa: F401
        import shtab  # noqa: F401
    except ImportError:
        warnings.warn("argparse-manpage or shtab missing: building without man pages and "
                      "bash completion", stacklevel=1)
        return []
    man_dir = GENERATED / "man1"
    man_dir.mkdir(parents=True, exist_ok=True)
    for page, module, function, prog, description in MAN_PAGES:
        _run("import sys; from argparse_manpage.cli import main; sys.exit(main())",
             "--module", module, "--function", function, "--prog", prog,
             "--project-name", "nsbridge", "--version", _version(),
             "--author", "The nsbridge developers", "--manual-title", "nsbridge manual",
             "--description", description, "--output", str(man_dir / page))
    completion_dir = GENERATED / "bash-completion"
    completion_dir.mkdir(parents=True, exist_ok=True)
    _run("import sys, shtab; from nsbridge.cli.main import build_parser; "
         "open(sys.argv[1], 'w').write(shtab.complete(build_parser(), shell='bash'))",
         str(completion_dir / "nsbridge"))
    relative = GENERATED.relative_to(HERE)
    return [
        ("share/man/man1", [str(relative / "man1" / page) for page, *_ in MAN_PAGES]),
        ("share/bash-completion/completions", [str(relative / "bash-completion" / "nsbridge")]),
    ]


def native(module: str) -> Extension:
    """An optional C module built from ``<module path>.c``: without a compiler and the
    Python headers the build skips it and the Python path serves."""
    return Extension(module, [module.replace(".", "/") + ".c"],
                     extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter",
                                         "-Wno-missing-field-initializers"],
                     optional=True)


setup(
    ext_modules=[
        native("nsbridge.usernet.host._flowrelay"),
        native("nsbridge.relay._tcprelay"),
        native("nsbridge.linux._notifycore"),
    ],
    data_files=generated_data_files(),
)
