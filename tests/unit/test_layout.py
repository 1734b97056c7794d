"""The house rules, read from the source: package maps, layering, the lean worker.

No root and no network needed: these tests read files and import modules.

* Every package's ``__init__.py`` is its map: each module in the folder is named there as
  ``:mod:`.NAME```, so a newcomer reading the map sees every room.
* Layering (DESIGN.md): ``linux/`` and ``net/`` import nothing from ``relay/``,
  ``forward/``, ``usernet/`` or ``cli/``; ``relay/`` nothing from ``forward/``,
  ``usernet/`` or ``cli/``; nothing outside ``cli/`` imports ``cli/``; ``usernet/`` uses
  forwarding only through the package's public names (``from nsbridge.forward import``).
  Imports under ``if TYPE_CHECKING:`` are types only and do not count.
* A forwarding worker process (booted exactly as the supervisor boots it) imports none of
  ``dataclasses``, ``typing``, ``logging``: each costs resident memory in every worker.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.environment import REPO

PACKAGE = REPO / "nsbridge"
LOWER_LAYERS = {
    "linux": ("relay", "forward", "usernet", "cli"),
    "net": ("relay", "forward", "usernet", "cli"),
    "relay": ("forward", "usernet", "cli"),
}


def modules() -> list[Path]:
    return sorted(path for path in PACKAGE.rglob("*.py") if "__pycache__" not in path.parts)


def dotted(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(path: Path) -> set[str]:
    """Absolute names of the nsbridge modules ``path`` imports at run time."""
    tree = ast.parse(path.read_text())
    type_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) \
                and node.test.id == "TYPE_CHECKING":
            type_only.update(id(child) for child in ast.walk(node))
    package = dotted(path) if path.name == "__init__.py" else dotted(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            if module.startswith("nsbridge"):
                found.add(module)
                found.update(f"{module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("nsbridge"))
    return found


@pytest.mark.parametrize("init", sorted(PACKAGE.rglob("__init__.py")),
                         ids=lambda path: dotted(path))
def test_every_package_map_names_each_module(init: Path) -> None:
    folder = init.parent
    names = {path.stem for path in folder.glob("*.py") if path.name != "__init__.py"}
    names |= {path.name for path in folder.iterdir()
              if path.is_dir() and (path / "__init__.py").exists()}
    names.discard("__main__")
    doc = ast.get_docstring(ast.parse(init.read_text())) or ""
    missing = sorted(name for name in names if f":mod:`.{name}`" not in doc)
    assert not missing, f"{dotted(init)}'s map lacks {missing}"


@pytest.mark.parametrize("path", modules(), ids=lambda path: dotted(path))
def test_layering(path: Path) -> None:
    module = dotted(path)
    layer = module.split(".")[1] if module.count(".") else ""
    imported = runtime_imports(path)
    for lower, forbidden in LOWER_LAYERS.items():
        if layer == lower:
            bad = sorted(name for name in imported
                         if name.split(".")[1:2] and name.split(".")[1] in forbidden)
            assert not bad, f"{module} ({lower}/) imports {bad}"
    if layer != "cli" and module != "nsbridge.__main__":
        bad = sorted(name for name in imported if name.startswith("nsbridge.cli"))
        assert not bad, f"{module} imports the command line: {bad}"
    if layer == "usernet":
        bad = sorted(name for name in imported if name.startswith("nsbridge.forward.")
                     and name.count(".") >= 2 and name.split(".")[2][:1].islower())
        assert not bad, f"{module} reaches into forward/'s modules: {bad}"


def test_a_worker_imports_no_dataclasses_typing_or_logging() -> None:
    """The worker's boot, as the supervisor runs it (python3 -S, the stand-in logger first),
    up to the point where it would serve: the heavy modules stay out."""
    from nsbridge.forward.worker import WORKER_BOOT

    boot = WORKER_BOOT.split("; sys.exit(")[0]
    probe = (f"{boot}; import json; print(json.dumps(sorted(sys.modules)))")
    done = subprocess.run([sys.executable, "-S", "-c", probe, str(REPO), "20"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    loaded = set(done.stdout.split('"')[1::2])
    assert "nsbridge.forward.worker" in loaded
    assert not loaded & {"dataclasses", "typing", "logging"}, sorted(
        loaded & {"dataclasses", "typing", "logging"})
