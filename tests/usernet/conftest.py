"""Fixtures of the user-mode networking tests alone."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from helpers.bypass import Environment, bypass_environment


@pytest.fixture(scope="module")
def bypass(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Environment]:
    """The policy-bypass harness's host namespace, servers and API driver, one per test
    module (see helpers.bypass); all removed at the module's end even when a test fails."""
    with bypass_environment(tmp_path_factory) as environment:
        yield environment
