"""The public value types of hako.assets (re-exported there)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

KERNEL_KINDS = ("trimmed", "debian")
# Kernel arguments every guest kernel gets (see _trimmed.py and _debian.py for why each).
# no_timer_check: the kernel otherwise checks that the IO-APIC delivers timer interrupts by
# waiting for ticks (timer_irq_works, ~25-40 ms of a TCG boot in RIP samples; Kata passes it too).
BASE_CMDLINE = ("console=ttyS0", "quiet", "no_timer_check", "panic=-1", "reboot=t", "random.trust_cpu=on")
IMAGE_FORMATS = ("initramfs", "erofs")


@dataclass(frozen=True)
class Kernel:
    kind: str  # "trimmed" | "debian"
    path: Path  # uncompressed ELF vmlinux, booted by PVH (for debian: extracted from its vmlinuz)
    release: str  # e.g. "6.1.192-hako" / "6.1.0-56-amd64"
    cmdline: tuple[str, ...]  # recommended kernel args for a fast boot on microvm (any accelerator)
    # -M microvm,<these>: the trimmed kernel has no ACPI, and with acpi=off QEMU also appends the
    # virtio_mmio.device=... args of the attached devices to the kernel command line; the debian
    # kernel finds virtio-mmio devices only through ACPI, so it keeps microvm's default.
    microvm_options: tuple[str, ...] = ()
    # Extra args under TCG that only this kernel takes (see cmdline_for).
    tcg_cmdline: tuple[str, ...] = ()

    def cmdline_for(self, accel: str) -> tuple[str, ...]:
        """:attr:`cmdline` plus the args this kernel needs under ``accel`` ("kvm" or "tcg").

        Under TCG the guest TSC runs at the host TSC's rate, but emulation jitter makes the kernel
        distrust it: its calibration against the emulated PIT fails at random (the debian kernel
        then hangs in most boots) and the clocksource watchdog later drops it for jiffies (4 ms
        clock resolution). ``tsc_early_khz`` and ``tsc=reliable`` prevent both. Under KVM the
        kernel uses kvm-clock and needs neither.

        A one-vCPU guest rewrites every ``lock`` prefix of its text for uniprocessor use; under
        TCG each write to code it has run invalidates translated code, ~100 ms in all (measured
        by sampling the guest's RIP over QMP): ``noreplace-smp``. Then :attr:`tcg_cmdline`.
        """
        if accel != "tcg":
            return self.cmdline
        khz = host_tsc_khz()
        tsc = (*((f"tsc_early_khz={khz}",) if khz else ()), "tsc=reliable")
        return (*self.cmdline, *tsc, "noreplace-smp", *self.tcg_cmdline)


@dataclass(frozen=True)
class GuestImage:
    kernel_kind: str
    format: str  # "initramfs" | "erofs"
    path: Path
    size_bytes: int

    @property
    def cmdline(self) -> tuple[str, ...]:
        """Kernel args this image needs: for erofs, its root (attached as the first virtio-blk
        device, read-only) and /init as init (the kernel looks for /init only in an initramfs)."""
        if self.format == "erofs":
            return ("root=/dev/vda", "ro", "rootfstype=erofs", "init=/init")
        return ()


@dataclass(frozen=True)
class AssetStatus:
    """One asset for `hako check`: built or not, where, how big."""

    name: str  # "kernel/trimmed", "image/trimmed/erofs", ...
    built: bool
    path: Path | None
    size_bytes: int
    detail: str  # release, or what to run to build it
    required: bool = True  # `hako run` needs it (the kernels and each kernel's default image)

    def __str__(self) -> str:
        where = f"{self.path} ({self.size_bytes / 1e6:.1f} MB)" if self.built else "not built"
        optional = "" if self.required else " (optional)"
        return f"{self.name + optional:45} {where}  {self.detail}"


@functools.cache
def host_tsc_khz() -> int | None:
    """The host's TSC rate in kHz (what a TCG guest's TSC runs at), from /proc/cpuinfo; None if
    the CPU has no constant TSC (then "cpu MHz" is not the TSC rate)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags: set[str] = set()
    mhz = None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags" and not flags:
            flags = set(value.split())
        elif key.strip() == "cpu MHz" and mhz is None:
            mhz = float(value)
    if mhz is None or "constant_tsc" not in flags:
        return None
    return round(mhz * 1000)
