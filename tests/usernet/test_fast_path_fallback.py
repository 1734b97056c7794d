"""``--tcp=auto`` falls back to the tun path only when the fast path is unavailable.

The redirect step runs inside the namespace (the sandbox's ``extra`` callback).  Under
``auto`` it may give up on the fast path only for ``NftUnavailable`` — then it hands the
host side the kernel's reason, which is logged at -v — and must let every other failure
through, instead of swallowing it and blaming a missing nf_tables.  Both cases are real:
the step runs in namespaces the test makes, with the kernel refusing for real.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable

import pytest

from helpers.environment import REPO, have

pytestmark = pytest.mark.skipif(not (have("unshare") and have("ip")),
                                reason="needs unshare (util-linux) and iproute2")

ENV = {**os.environ, "PYTHONPATH": str(REPO)}
# A user+network namespace of the step's own, loopback up: nf_tables works there.
LOOPBACK_UP = ["unshare", "-Urn", "sh", "-c", 'ip link set lo up && exec "$0" "$@"']

_STEP = """
import json, os, resource, sys
from nsbridge.usernet.network import redirect_listeners, redirect_setup
from nsbridge.usernet.options import UsernetOptions
step = redirect_setup(UsernetOptions(tcp=sys.argv[1]))
if sys.argv[2:] == ["no-fds"]:  # no fd can be opened from now on
    highest = max(int(name) for name in os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 1, highest + 1))
try:
    # as the sandbox sends them: every fd or socket the step returns, duplicated
    fds = [os.dup(item if isinstance(item, int) else item.fileno()) for item in step()]
    listeners, reason = redirect_listeners(fds)
except Exception as exc:
    print(json.dumps({"raised": type(exc).__name__, "message": str(exc)}))
else:
    print(json.dumps({"raised": None, "listeners": len(listeners), "reason": reason}))
"""


def _step(prefix: list[str], tcp: str, *more: str) -> dict:
    proc = subprocess.run([*prefix, sys.executable, "-c", _STEP, tcp, *more], capture_output=True,
                          text=True, timeout=60, cwd=REPO, env=ENV)
    assert proc.returncode == 0, proc.stderr
    result: dict = json.loads(proc.stdout)
    return result


def test_no_cap_net_admin_falls_back_with_the_kernels_reason(
        make_netns: Callable[[], str]) -> None:
    # A new user namespace over a network namespace it does not own: the listeners bind,
    # nf_tables refuses (EPERM).  Inside a throwaway namespace, so nothing else is touched.
    prefix = ["ip", "netns", "exec", make_netns(), "unshare", "-U"]
    result = _step(prefix, "auto")
    assert result["raised"] is None, result
    assert result["listeners"] == 0
    assert "nf_tables is unavailable" in result["reason"]
    assert "CAP_NET_ADMIN" in result["reason"]
    # --tcp=redirect insists: the same refusal is an error.
    strict = _step(prefix, "redirect")
    assert strict["raised"] == "NftUnavailable", strict


def test_a_failure_that_is_not_unavailability_is_not_swallowed() -> None:
    # A user+network namespace of its own, where nf_tables works, and a process that has
    # used up its open-file limit: the listener's socket() fails with EMFILE.  That is no
    # missing nf_tables; auto must let it through rather than fall back and blame it.
    result = _step(LOOPBACK_UP, "auto", "no-fds")
    assert result["raised"] in ("OSError", "SetupError"), result
    assert "Too many open files" in result["message"]
    assert "nf_tables" not in result["message"]


def test_the_fast_path_when_it_is_available() -> None:
    # In a user+network namespace of its own, with loopback up, the step programs the
    # redirect and hands back the listeners, no reason.
    result = _step(LOOPBACK_UP, "auto")
    assert result == {"raised": None, "listeners": 2, "reason": None}
