"""Finding the QEMU binary (cheap: every command that starts a VM checks for it first)."""

from __future__ import annotations

import os
import shutil

from hako.errors import QemuNotFound

QEMU_BINARY = "qemu-system-x86_64"


def find_qemu() -> str:
    """The QEMU binary: $HAKO_QEMU if set, else qemu-system-x86_64 on PATH."""
    override = os.environ.get("HAKO_QEMU")
    path = shutil.which(override) if override else shutil.which(QEMU_BINARY)
    if not path:
        raise QemuNotFound(
            f"{override or QEMU_BINARY} not found: install QEMU with `apt-get install qemu-system-x86`"
        )
    return path
