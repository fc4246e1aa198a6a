"""What a sandbox is made of, and the VM that gives it (kept free of heavy imports: the
daemon starts QEMU from this before it imports anything else)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from hako import assets
from hako.hypervisor.accel import Accelerator
from hako.hypervisor.base import VMConfig

if TYPE_CHECKING:
    from hako.network.sandbox import SandboxNetwork

GUEST_SHARED = "/run/hako/shared"  # where the agent mounts the sandbox's shared directory
GUEST_CONTAINERS = "/run/hako/containers"  # block rootfs are mounted under <this>/<container>/rootfs


@dataclass(frozen=True)
class SandboxConfig:
    sandbox_id: str
    hostname: str
    kernel: assets.Kernel
    image: assets.GuestImage
    memory_mib: int
    vcpus: int
    accel: Accelerator
    run_dir: Path
    debug: bool = False
    boot_timeout: float = 60.0
    watchdog_interval: float = 5.0  # 0 disables the hang check
    template: Path | None = None  # restore from this VM template (a directory) instead of booting
    template_private: bool = False  # ... from a copy of its RAM: no pages shared with other clones
    disk_slots: int = 1  # disks a block rootfs can be attached to (the VM's devices: see VMConfig)
    netns_fd: int | None = None  # the network namespace the VM runs in (hako.network); own if None
    netns_shared: bool = False  # ... and it outlives the sandbox (joined: a pod's, ns:PATH)

    @property
    def shared_dir(self) -> Path:
        return self.run_dir / "shared"

    @property
    def private_memory(self) -> Path:
        """Where a clone's own copy of its template's RAM goes (``template_private``)."""
        return self.run_dir / "memory"

    def in_network(self, network: SandboxNetwork) -> SandboxConfig:
        """The same sandbox, its VM in ``network``'s namespace."""
        return replace(self, netns_fd=network.netns_fd, netns_shared=not network.owns_namespace)

    def prepare_host(self) -> None:
        """Make what this VM opens as it starts: the shared directory and, for a clone, what
        :func:`hako.runtime.templates.prepare_clone` makes."""
        self.shared_dir.mkdir(parents=True, exist_ok=True)
        if self.template is not None:
            from hako.runtime.templates import prepare_clone

            prepare_clone(self)

    def cold(self) -> SandboxConfig:
        """The same sandbox, booted instead of restored."""
        return replace(self, template=None, template_private=False)

    def vm_config(self) -> VMConfig:
        """The VM; restored from the template if there is one (same devices, RAM mapped
        copy-on-write from the template's file, its saved device state loaded)."""
        vm = self._boot_config()
        if self.template is None:
            return vm
        memory = self.private_memory if self.template_private else self.template / "memory"
        # A clone that shares the template's pages may share the pages it writes too, where the
        # host runs KSM (the same side channel: see the README's security note); a private one
        # shares nothing.
        return replace(
            vm,
            memory_file=memory,
            memory_shared=False,
            incoming=self.template / "state",
            memory_merge=not self.template_private,
        )

    def _boot_config(self) -> VMConfig:
        initramfs = self.image.format == "initramfs"
        return VMConfig(
            name=self.sandbox_id,
            kernel=self.kernel.path,
            kernel_cmdline=(*self.kernel.cmdline_for(self.accel.name), *self.image.cmdline),
            machine_options=self.kernel.microvm_options,
            initrd=self.image.path if initramfs else None,
            root_disk=None if initramfs else self.image.path,
            memory_mib=self.memory_mib,
            vcpus=self.vcpus,
            accel=self.accel,
            run_dir=self.run_dir,
            shared_dir=self.shared_dir,
            debug=self.debug,
            disk_slots=self.disk_slots,
            netns_fd=self.netns_fd,
            netns_shared=self.netns_shared,
        )
