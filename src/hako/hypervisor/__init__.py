"""The hypervisor layer: VMs that run sandboxes (QEMU's microvm machine today).

Its names are imported on first use: ``hako run`` checks the accelerator and the QEMU binary
long before (or, taking a pooled VM, without ever) starting QEMU itself.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hako.hypervisor.accel import Accelerator, choose, probe_kvm
    from hako.hypervisor.base import Hypervisor, VMConfig
    from hako.hypervisor.binary import find_qemu
    from hako.hypervisor.qemu import QemuVM

_HOMES = {
    "Accelerator": "accel",
    "choose": "accel",
    "probe_kvm": "accel",
    "Hypervisor": "base",
    "VMConfig": "base",
    "find_qemu": "binary",
    "QemuVM": "qemu",
}

__all__ = ["Accelerator", "Hypervisor", "QemuVM", "VMConfig", "choose", "find_qemu", "probe_kvm"]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)
