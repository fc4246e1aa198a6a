"""The hypervisor layer: VMs that run sandboxes (QEMU's microvm machine today)."""

from hako.hypervisor.accel import Accelerator, choose, probe_kvm
from hako.hypervisor.base import Hypervisor, VMConfig
from hako.hypervisor.qemu import QemuVM, find_qemu

__all__ = ["Accelerator", "Hypervisor", "QemuVM", "VMConfig", "choose", "find_qemu", "probe_kvm"]
