"""Shared pytest wiring: each test is marked by the tier its folder names.

`pytest -m unit` therefore runs the pure tests with no cluster and no torch.
"""

from __future__ import annotations

from pathlib import Path

import pytest

_TIERS = ("unit", "cluster", "dataplane", "nodes")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        for tier in _TIERS:
            if tier in parts:
                item.add_marker(getattr(pytest.mark, tier))
