"""tests/unit needs no root: the whole folder passes as uid/gid 65534 with no groups, in a
copy of the checkout that user owns (see helpers.unprivileged), so nobody has to take
"no root" on trust and a unit test that starts needing root fails here."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from helpers.unprivileged import as_nobody, unprivileged_checkout


def test_the_unit_tests_pass_as_an_ordinary_user() -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("needs util-linux setpriv")
    with unprivileged_checkout() as (tree, python, env):
        done = subprocess.run(
            as_nobody(*python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/unit"),
            cwd=tree, env=env, capture_output=True, text=True, timeout=600)
        collected = subprocess.run(
            [*python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only",
             "tests/unit"], cwd=tree, env=env, capture_output=True, text=True, timeout=120)
    output = done.stdout[-4000:] + done.stderr[-2000:]
    assert done.returncode == 0, output
    passed = re.search(r"(\d+) passed", done.stdout)
    total = re.search(r"(\d+) tests? collected", collected.stdout)
    assert passed and total and passed.group(1) == total.group(1), output + collected.stdout
