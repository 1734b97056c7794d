"""nsbridge-slirp4netns's lock-down helpers that need no root: the import watch that
names a module loaded too late, and what the new root keeps."""

from __future__ import annotations

import os
import sys

import pytest

from nsbridge.usernet.slirpsandbox import ImportWatch, sandbox_paths


def test_import_watch_names_a_late_import_once(caplog: pytest.LogCaptureFixture) -> None:
    """After the pivot a module not yet loaded cannot be found: the watch says which
    (once), and the import still fails as it would have."""
    watch = ImportWatch()
    sys.meta_path.insert(0, watch)  # type: ignore[arg-type]
    try:
        with caplog.at_level("WARNING", logger="nsbridge"):
            for _ in range(2):
                with pytest.raises(ModuleNotFoundError):
                    __import__("nsbridge_no_such_module")
    finally:
        sys.meta_path.remove(watch)  # type: ignore[arg-type]
    lines = [r.getMessage() for r in caplog.records if "imported after" in r.getMessage()]
    assert lines == ["module nsbridge_no_such_module imported after the sandbox was "
                     "entered (it cannot be loaded there)"]


def test_the_new_root_keeps_etc_and_run() -> None:
    paths = sandbox_paths()
    assert paths[:2] == ["/etc", "/run"]
    # Anything more is the file /etc/resolv.conf leads to, when it lives elsewhere.
    for extra in paths[2:]:
        assert extra == os.path.realpath("/etc/resolv.conf")
