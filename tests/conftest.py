"""Test-wide rules: root and VM tests run only as root (CI runs as root)."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (run the suite as root, as CI does)")
    for item in items:
        if "root" in item.keywords or "integration" in item.keywords:
            item.add_marker(skip)
