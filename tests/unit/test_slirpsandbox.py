"""nsbridge-slirp4netns's lock-down helpers that need no root: the import watch that
names a module loaded too late, and what the new root keeps."""

from __future__ import annotations

import os
import sys
from pathlib import Path

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


def test_a_resolv_conf_elsewhere_is_kept_too(tmp_path: Path) -> None:
    """/etc/resolv.conf as a link to a resolver daemon's file outside /etc and /run
    (slirp4netns's issue 116): that file is bound as well; a link that stays inside, or
    leads nowhere, adds nothing."""
    target = tmp_path / "daemon" / "resolv.conf"
    target.parent.mkdir()
    target.write_text("nameserver 192.0.2.1\n")
    link = tmp_path / "resolv.conf"
    link.symlink_to(target)
    assert sandbox_paths(str(link)) == ["/etc", "/run", str(target)]
    inside = tmp_path / "inside.conf"
    inside.symlink_to("/run/nowhere-nsbridge-test/resolv.conf")
    assert sandbox_paths(str(inside)) == ["/etc", "/run"]
    assert sandbox_paths("/etc/hostname") == ["/etc", "/run"]


def test_the_pivot_refuses_a_process_with_threads() -> None:
    """unshare(CLONE_NEWNS) cannot work with a second thread (it shares the file system
    context): the lock-down says so instead of failing with a bare EINVAL. Nothing is
    changed before the check."""
    import threading

    from nsbridge.linux.lockdown import LockdownError, pivot_to_empty_root

    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        with pytest.raises(LockdownError, match="needs a single thread"):
            pivot_to_empty_root(["/etc"])
    finally:
        stop.set()
        thread.join()
