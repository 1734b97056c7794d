"""Fixtures of the forward tests: ``relay``, which runs a test against both TCP relays.

A module that sets ``BOTH_RELAYS = True`` and uses the ``relay`` fixture (``pytestmark =
pytest.mark.usefixtures("relay")``) runs each of its tests twice: with the native core
(``_tcprelay.c``) and with the Python relay (relay/tcp.py), chosen through
$NSBRIDGE_RELAY, which every nsbridge process the test starts (and its workers) inherits,
and which an in-process Bridge reads.  Where the native core was not built, its runs are
skipped with the reason.  Elsewhere ``relay`` is simply the default.
"""

from __future__ import annotations

import pytest

from nsbridge.relay.native import RELAY_ENV, RELAYS, unavailable


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if getattr(metafunc.module, "BOTH_RELAYS", False) and "relay" in metafunc.fixturenames:
        metafunc.parametrize("relay", RELAYS, indirect=True)


@pytest.fixture
def relay(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    name: str | None = getattr(request, "param", None)
    if name is None:
        return "default"
    if name == "native" and unavailable():
        pytest.skip(unavailable())
    monkeypatch.setenv(RELAY_ENV, name)
    return name
