"""The contract every VMM backend of hako fulfils (QEMU today).

Grouped by concern as Kata's hypervisor interface is: the VM manager
(start/stop/kill/pause/resume), its state (pid, exit), and utilities (the agent
channel, a liveness check). A backend must make ``stop`` idempotent and leave
nothing behind however the VM ended.
"""

from __future__ import annotations

import socket
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hako.hypervisor.accel import Accelerator


@dataclass(frozen=True)
class VMConfig:
    name: str  # sandbox id
    kernel: Path
    kernel_cmdline: tuple[str, ...]  # complete: the kernel's and the guest image's arguments
    initrd: Path | None  # the guest image as an initramfs ...
    root_disk: Path | None  # ... or as a read-only disk image booted as root
    memory_mib: int
    vcpus: int
    accel: Accelerator
    run_dir: Path  # console.log, agent.log and qemu.log are written here
    shared_dir: Path | None = None  # exported to the guest over virtio-9p, mount tag "hako"
    machine_options: tuple[str, ...] = ()  # "key=value" for -machine microvm, as the kernel needs
    debug: bool = False
    # Guest RAM in a file (VM templates): written through to it (``memory_shared``, while a
    # template is made) or mapped copy-on-write from it (a clone restored from a template).
    memory_file: Path | None = None
    memory_shared: bool = False
    # Restore the device state saved in this file instead of booting (with ``memory_file``).
    incoming: Path | None = None
    # Let the host's KSM merge this VM's memory with other sandboxes' identical pages: guest RAM
    # (QEMU's mem-merge) and QEMU's own (PR_SET_MEMORY_MERGE on the process that starts it,
    # which QEMU inherits). Off: no page of it is merged, even where the host runs KSM.
    memory_merge: bool = False
    # Empty virtio-blk devices that a container's disk is attached to while the VM runs (the
    # microvm machine has no hotplug, and a template's clones need the same devices).
    disk_slots: int = 1
    # The network namespace QEMU runs in, whose tap its NIC uses (a descriptor; the VM gets an
    # empty namespace of its own if None). Every VM has the NIC: a template's clones need it.
    netns_fd: int | None = None
    # That namespace outlives the sandbox (a pod's, joined): its tap must go with QEMU. In one
    # that ends with the sandbox, the tap stays until the namespace goes (see netns.open_tap).
    netns_shared: bool = False


def disk_serial(slot: int) -> str:
    """The serial number by which the guest finds disk slot ``slot`` (/sys/block/*/serial)."""
    return f"hako-disk{slot}"


class Hypervisor(ABC):
    #: Set once the VM process has exited; ``exit_status`` is then known.
    exited: threading.Event
    #: time.monotonic() just before the VMM was started (boot timing starts here).
    launched_at: float | None = None

    # -- VM manager ----------------------------------------------------------------------------
    @abstractmethod
    def start(self) -> None:
        """Launch the VM; returns as soon as it runs (the guest boots in the background)."""

    @abstractmethod
    def wait_started(self, timeout: float) -> None:
        """Block until the VMM has initialised (monitor up); HypervisorError if it failed."""

    @abstractmethod
    def stop(self, timeout: float = 5.0) -> None:
        """Stop the VM: gracefully, then by force. Idempotent; always releases everything."""

    @abstractmethod
    def kill(self) -> None:
        """Stop the VM now."""

    @abstractmethod
    def pause(self) -> None: ...

    @abstractmethod
    def resume(self) -> None: ...

    @abstractmethod
    def attach_disk(self, slot: int, path: Path) -> None:
        """Give disk slot ``slot`` the qcow2 image at ``path`` (the guest sees it by the serial
        :func:`disk_serial` names; it must drop its cached blocks of the device before use)."""

    @abstractmethod
    def detach_disk(self, slot: int) -> None:
        """Empty disk slot ``slot`` again (the guest has unmounted it); idempotent."""

    # -- state ---------------------------------------------------------------------------------
    @property
    @abstractmethod
    def pid(self) -> int | None: ...

    @property
    @abstractmethod
    def exit_status(self) -> int | None:
        """The VMM's exit status (negative: killed by that signal), None while it runs."""

    @abstractmethod
    def exit_reason(self) -> str:
        """One line on why the VM ended, for error messages."""

    @abstractmethod
    def on_exit(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (from another thread) when the VM process ends."""

    # -- utilities -----------------------------------------------------------------------------
    @abstractmethod
    def agent_channel(self) -> socket.socket:
        """The host end of the agent's channel, connected from the moment the VM starts."""

    @abstractmethod
    def check(self, timeout: float) -> None:
        """Raise HypervisorError if the VMM does not answer within ``timeout``."""


# Under TCG: QEMU's most capable CPU model, less ERMS ("enhanced rep movsb/stosb"). With ERMS
# the guest kernel zeroes pages and copies to and from user space with byte-wise `rep stosb`
# and `rep movsb`, which TCG runs one byte per loop iteration; without it, `rep stosq` and
# `rep movsq` move 8 bytes per iteration. Measured in a guest: dd of 100 MiB from /dev/zero to
# /dev/null took 1.05-1.10 s with ERMS and 0.36 s without. (Under KVM the host's CPU is given.)
TCG_CPU = "max,-erms"


def cpu_model(accel: str) -> str:
    """The -cpu of a VM under ``accel`` (part of a template's inputs: a clone must get its CPU)."""
    return TCG_CPU if accel == "tcg" else "host"
