"""What the checkout and this machine offer the tests: the checkout's root (tests run its
package without installing it) and whether a command-line tool is installed (a test that
needs one skips without it instead of failing)."""

from __future__ import annotations

import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent


def have(tool: str) -> bool:
    return shutil.which(tool) is not None

