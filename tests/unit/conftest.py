"""Fixtures shared by the unit tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """Stand-ins for a VM's kernel, guest image and QEMU binary (templates key on them)."""
    made = {}
    for name in ("vmlinux", "initramfs.cpio", "qemu"):
        made[name] = tmp_path / name
        made[name].write_bytes(name.encode())
    return made
