"""A failed set-up step is the user's error: one line on stderr, exit code 2, no traceback.

``SetupError`` (a namespace's tun device, addresses, redirect listeners or nftables rules)
is a ``UserError``, like the ``SandboxError`` that reports a failed namespace helper, so
every caller that prints user errors as one line prints these as one line too.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Callable

import pytest

from helpers.environment import REPO, have
from helpers.waiting import wait_until
from nsbridge.cli.main import run_guarded
from nsbridge.errors import SetupError, UserError
from nsbridge.usernet.inside import netconf, nft
from nsbridge.usernet.inside.sandbox import SandboxError


def test_the_hierarchy() -> None:
    assert netconf.SetupError is SetupError  # the old import path still names it
    for error in (SetupError, nft.NftError, nft.NftUnavailable, SandboxError):
        assert issubclass(error, UserError), error


def test_a_set_up_step_that_fails_in_process_prints_one_line(
        capsys: pytest.CaptureFixture[str]) -> None:
    from nsbridge.usernet.host.redirect import make_redirect_listeners

    def handler(_args: argparse.Namespace) -> int:
        make_redirect_listeners(70000)  # refused before any socket is made
        return 0

    assert run_guarded(handler, argparse.Namespace()) == 2
    assert capsys.readouterr().err == "nsbridge: error: redirect port 70000 is not 0-65535\n"


@pytest.mark.skipif(not (have("unshare") and have("ip")),
                    reason="needs unshare (util-linux) and iproute2")
def test_attach_whose_device_cannot_be_made_prints_one_line(
        processes: list[subprocess.Popen], make_netns: Callable[[], str]) -> None:
    """The target's namespace already has a non-tun device (a veth) under the tun device's name:
    the helper's TUNSETIFF is refused, and ``nsbridge attach`` says so in one line.
    (nsbridge's host side runs in a namespace of the test's own.)"""
    target = subprocess.Popen(["unshare", "-Urn", "sh", "-c",
                               "ip link add nsb0 type veth peer name nsb1 && exec sleep 60"])
    processes.append(target)
    wait_until(lambda: _exe(target.pid) == "sleep", what="the target to make its device")
    result = subprocess.run(["ip", "netns", "exec", make_netns(), sys.executable, "-m",
                             "nsbridge", "attach", str(target.pid)],
                            capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("nsbridge: error: ") and "nsb0" in line, line


def _exe(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as comm:
            return comm.read().strip()
    except OSError:
        return ""
