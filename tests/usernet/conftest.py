"""Fixtures of the user-mode networking tests alone.

``switch_path``: a module that sets ``BOTH_SWITCH_PATHS = True`` and uses it
(``pytestmark = pytest.mark.usefixtures("switch_path")``) runs each test twice, with
the socket switcher's native core (``_notifycore.c``) and with its Python path, chosen
through $NSBRIDGE_SWITCH, which every nsbridge process the test starts inherits and an
in-process switcher reads.  Where the core was not built, its runs are skipped with
the reason (the forward tests' ``relay`` fixture is the same pattern).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from helpers.bypass import Environment, bypass_environment
from nsbridge.linux.notifycore import PATHS, SWITCH_ENV, unavailable


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if getattr(metafunc.module, "BOTH_SWITCH_PATHS", False) and \
            "switch_path" in metafunc.fixturenames:
        metafunc.parametrize("switch_path", PATHS, indirect=True)


@pytest.fixture
def switch_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    name: str | None = getattr(request, "param", None)
    if name is None:
        return "default"
    if name == "native" and unavailable():
        pytest.skip(unavailable())
    monkeypatch.setenv(SWITCH_ENV, name)
    return name


@pytest.fixture(scope="module")
def bypass(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Environment]:
    """The policy-bypass harness's host namespace, servers and API driver, one per test
    module (see helpers.bypass); all removed at the module's end even when a test fails."""
    with bypass_environment(tmp_path_factory) as environment:
        yield environment
