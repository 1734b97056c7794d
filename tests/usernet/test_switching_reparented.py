"""A process that left nsbridge's tree under ``run --bypass`` (a daemon whose parent
exited, re-parented away), its connects still served (world: helpers.switching).

Why they are: the host side reaches a program with ``pidfd_getfd`` and
``process_vm_readv``, which need ptrace access.  nsbridge's uid owns the user namespace
the program runs in (its helper made it), and the kernel gives a namespace's owner
CAP_SYS_PTRACE inside it.  That capability is what the kernel asks for when the target
is not dumpable, and what Yama's ``ptrace_scope`` 1 (and 2) accept in place of being
an ancestor.  So the daemon here makes itself non-dumpable, and nsbridge runs as an
ordinary user (uid 65534: no capability of its own): its connect is still switched.
With Yama present the same runs again under ``ptrace_scope`` 1 (set for the test, put
back even on failure); without Yama that test is skipped, with the reason.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.switching import ECHO_PORT, OUT4, UP4, World, switching_world

pytestmark = pytest.mark.timeout(300)
YAMA = Path("/proc/sys/kernel/yama/ptrace_scope")


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with switching_world() as made:
        yield made


def daemon_connects(world: World) -> tuple[dict, int]:
    """The ``reparented`` probe under ``nsbridge run --bypass`` as uid 65534: what the
    daemon saw, and nsbridge's pid."""
    from helpers.unprivileged import as_nobody, unprivileged_checkout

    with unprivileged_checkout() as (tree, python, env):
        probe = str(tree / "tests" / "helpers" / "switch_probe_tcp.py")
        argv = ["ip", "netns", "exec", world.host, *as_nobody(
            *python, "-m", "nsbridge", "run", "--bypass", "--dns", OUT4, "--", *python,
            probe, "reparented", OUT4, str(ECHO_PORT))]
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, cwd=tree, env=env)
        out, err = process.communicate(timeout=90)
        assert process.returncode == 0, err
        return json.loads(out.strip().splitlines()[-1]), process.pid


def check_served(result: dict, nsbridge: int) -> None:
    assert nsbridge not in result["ancestors"], result  # it left nsbridge's tree
    assert result["dumpable"] == 0
    assert result == {"ancestors": result["ancestors"], "dumpable": 0, "result": "ok",
                      "sockname": UP4}


def test_reparented_non_dumpable_daemon_is_switched(world: World) -> None:
    # ip netns exec and setpriv exec in place: the Popen's pid becomes nsbridge's.
    check_served(*daemon_connects(world))


@pytest.mark.skipif(not YAMA.exists(), reason="Yama is absent on this kernel "
                    "(no /proc/sys/kernel/yama/ptrace_scope)")
def test_reparented_daemon_under_yama_scope_1(world: World) -> None:
    saved = YAMA.read_text().strip()
    if saved == "3":
        pytest.skip("Yama ptrace_scope is 3, which cannot be lowered until reboot")
    try:
        YAMA.write_text("1")
        check_served(*daemon_connects(world))
    finally:
        YAMA.write_text(saved)
