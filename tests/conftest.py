"""pytest configuration shared by every test module: per-test time limits.

``pyproject.toml`` sets pytest-timeout's default limit (``timeout = 300`` s per test). End-to-end runs
(marked ``slow``) train, validate and sometimes start subprocesses with their own 300-600 s limits,
so they get :data:`SLOW_TIMEOUT` unless they carry their own ``@pytest.mark.timeout(N)``.
"""

from __future__ import annotations

import pytest

SLOW_TIMEOUT = 900
"""Seconds allowed to a test marked ``slow`` without its own ``timeout`` mark."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("slow") is not None and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT))
