"""Choosing the accelerator: KVM where it works, TCG (software emulation) elsewhere.

`/dev/kvm` existing is not enough. Under ``kvm_pvm`` (nested virtualization by
paravirtualized page tables, found on some cloud machines) a standard guest
kernel hangs at boot, so ``auto`` treats PVM as "no KVM" and an explicit
``kvm`` request fails with the reason.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

from hako.errors import AcceleratorError, UsageError

KVM_GET_API_VERSION = 0xAE00
KVM_API_VERSION = 12
CHOICES = ("auto", "kvm", "tcg")


@dataclass(frozen=True)
class Accelerator:
    name: str  # "kvm" | "tcg"
    reason: str  # why this one, in words a user understands


@dataclass(frozen=True)
class KvmProbe:
    usable: bool
    reason: str


def probe_kvm(dev: Path = Path("/dev/kvm"), sys_module: Path = Path("/sys/module")) -> KvmProbe:
    if not dev.exists():
        return KvmProbe(False, f"{dev} does not exist (no hardware virtualization, or kvm is not loaded)")
    if (sys_module / "kvm_pvm").exists():
        return KvmProbe(False, f"{dev} is provided by kvm_pvm, under which standard guest kernels hang")
    try:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return KvmProbe(False, f"cannot open {dev}: {exc.strerror}")
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
    except OSError as exc:
        return KvmProbe(False, f"{dev} does not answer KVM_GET_API_VERSION: {exc.strerror}")
    finally:
        os.close(fd)
    if version != KVM_API_VERSION:
        return KvmProbe(False, f"{dev} speaks KVM API {version}, expected {KVM_API_VERSION}")
    return KvmProbe(True, "KVM is usable")


def choose(requested: str, probe: KvmProbe | None = None) -> Accelerator:
    """The accelerator for ``requested`` (auto|kvm|tcg), or AcceleratorError."""
    if requested not in CHOICES:
        raise UsageError(f"invalid accelerator {requested!r}: choose one of {', '.join(CHOICES)}")
    if requested == "tcg":
        return Accelerator("tcg", "TCG requested")
    kvm = probe or probe_kvm()
    if kvm.usable:
        return Accelerator("kvm", kvm.reason)
    if requested == "kvm":
        raise AcceleratorError(f"cannot use KVM: {kvm.reason}; use --accel tcg (or auto)")
    return Accelerator("tcg", f"TCG (software emulation): {kvm.reason}")
