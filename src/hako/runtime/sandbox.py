"""A sandbox: one VM, its agent, and the containers in it.

This is the runtime library's core, shared by the per-sandbox daemon behind
``hako run`` and (later) the containerd shim. It lives in the process that owns
the VM. Lifecycle, shaped like qemu.machine's: ``start`` launches the VM and
returns at once, so the caller can prepare containers while the guest boots;
``wait_ready`` blocks until the agent answers; ``stop`` always cleans up.

Container filesystems reach the guest through one virtio-9p export per
sandbox (Kata's "shared directory"): the runtime mounts each container's rootfs
(an overlay of its image) and volumes under ``<run dir>/shared/<container>``,
which the agent sees under ``/run/hako/shared``.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hako.errors import AgentError, ContainerNotFound, HakoError, HypervisorError, SandboxError, VMDied
from hako.hypervisor import Hypervisor, QemuVM
from hako.hypervisor.base import disk_serial
from hako.network.sandbox import GuestInterface, GuestNetwork, GuestRoute, SandboxNetwork
from hako.runtime import mounts, timing
from hako.runtime.agent import AgentClient
from hako.runtime.config import GUEST_CONTAINERS, GUEST_SHARED, SandboxConfig
from hako_api import agent_pb2 as pb
from hako_ttrpc import codes

WARM_UP_CONTAINER = "hako-warm-up"
SHARE_OPTIONS = ("trans=virtio", "version=9p2000.L", "msize=524288", "cache=mmap")
KILLED_STATUS = 137  # what a container reports when its VM died under it (128 + SIGKILL)


@dataclass
class _Container:
    id: str
    mounts: list[Path]  # host mount points under the shared dir, innermost last
    disk_slot: int | None = None  # the disk slot its rootfs is attached to (a block rootfs)
    volumes: int = 0  # host directories it has bound (writes to them must reach the host)


RESTORE_TIMEOUT = 20.0  # a restored VM answers in well under a second; past this, boot cold
ENTROPY_BYTES = 64


class Sandbox:
    def __init__(
        self,
        config: SandboxConfig,
        hypervisor: Hypervisor | None = None,
        *,
        warn: Callable[[str], None] | None = None,
        network: SandboxNetwork | None = None,
    ) -> None:
        """``network``, if given, is the namespace the VM runs in (``config.netns_fd``): the
        sandbox wires it while the guest boots, configures the guest from it, and closes it."""
        self.config = config
        self.network = network
        self.warn = warn or (lambda message: None)
        self.shared_dir = config.shared_dir
        self.vm: Hypervisor = hypervisor or QemuVM(config.vm_config())
        self.agent: AgentClient | None = None
        self.timing: dict[str, float] = {}
        self.kernel_release = ""
        self.dead = threading.Event()
        self.death_reason = ""
        # Set once wait_ready knows which VM stays (its agent answered; a clone that failed to
        # restore has been replaced), or that none does (it failed): from then on a container's
        # rootfs can be attached while the guest is still being set up.
        self.settled = threading.Event()
        self._stopping = threading.Event()
        # A clone is restoring from its launch (which may precede this object) until wait_ready
        # knows: a clone's QEMU that exits meanwhile is replaced by a boot, not a dead sandbox.
        self._restoring = config.template is not None
        self._containers: dict[str, _Container] = {}
        self._lock = threading.Lock()

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        """Launch the VM (unless the caller already did). The guest boots in the background; see
        :meth:`wait_ready`."""
        if self.vm.launched_at is None:
            self.config.prepare_host()
            self.vm.start()
        self._watch(self.vm)
        if self.network is not None:
            self.network.start_wiring()

    def _watch(self, vm: Hypervisor) -> None:
        vm.on_exit(lambda: self._vm_exited(vm))

    def wait_ready(self) -> None:
        """Block until the agent answers, then set up the sandbox in the guest. A VM restored
        from a template that does not answer is replaced by one booted cold, with a warning."""
        try:
            self._wait_ready()
        finally:
            self.settled.set()

    def _wait_ready(self) -> None:
        restored = self.config.template is not None
        self._restoring = restored  # meanwhile a dying VM is not the sandbox dying
        try:
            check, answered = self._check_agent(RESTORE_TIMEOUT if restored else self.config.boot_timeout)
        except AgentError as exc:
            if not restored or self._stopping.is_set():  # being stopped: no boot to fall back to
                raise self._boot_failure(exc) from exc
            check, answered = self._boot_cold_instead(exc)
            restored = False
        finally:
            self._restoring = False
        if self.vm.exited.is_set():
            self._vm_exited(self.vm)  # it died just now: nothing else will say so
        agent = self._need_agent()
        self.kernel_release = check.kernel_release
        launched = self.vm.launched_at or answered
        if restored:
            self.timing["restore"] = answered - launched
        else:
            boot = check.boot
            self.timing.update(
                timing.boot_breakdown(
                    launched, answered, check.uptime, boot.kernel_done, boot.agent_start, boot.agent_ready
                )
            )
        self.settled.set()
        share = pb.Storage(
            driver="9p", source="hako", fstype="9p", options=SHARE_OPTIONS, mount_point=GUEST_SHARED
        )
        # Its own identity, even in a clone of a template: hostname, clock, fresh entropy, and
        # its NIC's MAC and addresses.
        agent.create_sandbox(
            self.config.sandbox_id,
            self.config.hostname,
            storages=[share],
            time_unix_ns=time.time_ns(),
            entropy=os.urandom(ENTROPY_BYTES),
            **self._guest_network(),
        )
        self.timing["sandbox_setup"] = time.monotonic() - answered
        if self.config.watchdog_interval > 0:
            threading.Thread(target=self._watchdog, daemon=True, name="vm-watchdog").start()

    def warm_up(self) -> None:
        """Run a throw-away container in the guest, as ``hako run`` would run one: its rootfs an
        (empty) ext4 disk in a disk slot, busybox ``true`` from the guest's own /bin.

        Under emulation (TCG) QEMU translates guest code the first time it runs, per QEMU
        process; a restored clone has translated none of what mounting a disk and creating,
        starting and reaping a container runs in the guest. A VM waiting in the warm pool does
        it here, before it is paused, rather than the ``hako run`` that takes it. (Under KVM it
        only warms the guest's caches.)
        """
        from hako.image.disk import make_ext4
        from hako.oci.spec import RunOptions, build_spec

        agent = self._need_agent()
        started = time.monotonic()
        container = _Container(WARM_UP_CONTAINER, [])
        work = self._overlay_path(container.id).parent
        with self._lock:
            self._containers[container.id] = container
        try:
            (work / "empty").mkdir(parents=True, exist_ok=True)
            make_ext4(work / "empty", work / "base.ext4")
            storage = self._attach_rootfs(container, work / "base.ext4")
            spec = build_spec(container.id, RunOptions(args=["/bin/true"]))
            spec["root"] = {"path": storage.mount_point}
            spec["mounts"].append(
                {"destination": "/bin", "type": "bind", "source": "/bin", "options": ["rbind", "ro"]}
            )
            agent.create_container(container.id, spec, stdin=False, storages=[storage])
            try:
                agent.start_container(container.id)
                status = agent.wait_process(container.id)
            finally:
                agent.remove_container(container.id)
        finally:
            with self._lock:
                self._containers.pop(container.id, None)
            self._release(container)
            shutil.rmtree(work, ignore_errors=True)
        if status != 0:
            raise SandboxError(f"the warm-up container exited {status}")
        self.timing["warm_up"] = time.monotonic() - started

    def renew_identity(self) -> None:
        """A sandbox that waited paused (the warm pool, hako pause) takes the host's clock and fresh
        entropy."""
        agent = self._need_agent()
        agent.set_clock(time.time_ns())
        agent.reseed_random(os.urandom(ENTROPY_BYTES))

    def take_identity(self, hostname: str) -> None:
        """A pooled sandbox that a pod took (or `hako run --hostname`): the guest takes its
        hostname and, if its network moved into the pod's namespace
        (:meth:`SandboxNetwork.move_into`), the pod's addresses and routes."""
        started = time.monotonic()
        self._need_agent().update_sandbox(hostname, **self._guest_network())
        self.timing["identity"] = time.monotonic() - started

    def _guest_network(self) -> dict[str, Any]:
        """The guest's DNS, interfaces and routes, as CreateSandbox and UpdateSandbox take them
        (for a joined namespace: once it is wired)."""
        guest = self.network.guest() if self.network is not None else GuestNetwork()
        return {
            "dns": guest.dns,
            "interfaces": [_interface_pb(i) for i in guest.interfaces],
            "routes": [_route_pb(r) for r in guest.routes],
        }

    def _check_agent(self, timeout: float) -> tuple[pb.CheckResponse, float]:
        self.agent = AgentClient(self.vm.agent_channel(), on_close=self._agent_lost)
        # The request waits in the channel until the agent opens its port: no polling.
        check = self.agent.check(timeout=timeout)
        return check, time.monotonic()

    def _boot_cold_instead(self, exc: AgentError) -> tuple[pb.CheckResponse, float]:
        from hako.runtime import templates

        template = self.config.template
        assert template is not None
        reason = self.vm.exit_reason() if self.vm.exited.wait(1) else str(exc)
        # Under the lock, so that a stop either comes first (and nothing is booted) or stops
        # the VM booted here (not the old one, leaving this one behind).
        with self._lock:
            if self._stopping.is_set():
                raise SandboxError("the sandbox was stopped while its VM was being restored")
            self.warn(f"restoring from template {template.name} failed ({reason}): removed it, booting cold")
            templates.discard(templates.Template(template.name, template))
            old_vm, old_agent = self.vm, self.agent
            self.config = self.config.cold()
            self.vm = QemuVM(self.config.vm_config())
            old_vm.kill()
            old_vm.stop()
            if old_agent is not None:
                old_agent.close()
            self._remove_private_memory()
            self.vm.start()
        self._watch(self.vm)
        if self.network is not None:
            self.network.rewire()
        try:
            return self._check_agent(self.config.boot_timeout)
        except AgentError as cold_exc:
            raise self._boot_failure(cold_exc) from cold_exc

    def _remove_private_memory(self) -> None:
        self.config.private_memory.unlink(missing_ok=True)

    def _boot_failure(self, exc: AgentError) -> HakoError:
        if self.vm.exited.wait(1):
            console = self._console_tail()
            return VMDied(f"the VM died while booting: {self.vm.exit_reason()}{console}")
        if exc.code == codes.DEADLINE_EXCEEDED:
            return HypervisorError(
                f"the guest agent did not answer within {self.config.boot_timeout:g} s "
                f"(console: {self.config.run_dir / 'console.log'})"
            )
        return exc

    def _console_tail(self) -> str:
        try:
            lines = (self.config.run_dir / "console.log").read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        interesting = [line for line in lines if "panic" in line.lower() or "error" in line.lower()]
        line = (interesting or lines or [""])[-1].strip()
        return f" (guest console: {line})" if line else ""

    def _vm_exited(self, vm: Hypervisor) -> None:
        if vm is not self.vm or self._restoring:
            return  # a restore that failed: wait_ready boots a VM instead
        if not self._stopping.is_set() and not self.death_reason:
            self.death_reason = self.vm.exit_reason()
        self.dead.set()

    def _agent_lost(self) -> None:
        # The channel only closes when QEMU goes away (or we close it); the exit watcher says why.
        if not self._stopping.is_set() and not self._restoring:
            threading.Thread(target=self._confirm_death, daemon=True).start()

    def _confirm_death(self) -> None:
        if not self.vm.exited.wait(5):
            self.death_reason = "the agent channel closed while QEMU kept running: killed it"
            self.vm.kill()

    def _watchdog(self) -> None:
        """Detect a hung VMM: a QEMU that stops answering its monitor is killed."""
        interval = self.config.watchdog_interval
        while not self.dead.wait(interval) and not self._stopping.is_set():
            try:
                self.vm.check(timeout=max(10.0, 2 * interval))
            except HypervisorError:
                if self._stopping.is_set() or self.vm.exited.is_set():
                    return
                self.death_reason = "QEMU stopped answering its monitor: killed it"
                self.vm.kill()
                return

    def stop(self, *, discard: bool = False) -> None:
        """Stop everything in the guest, stop the VM, remove host mounts. Idempotent.

        ``discard``: nothing of the sandbox is kept (``--rm``). If no container has a host
        directory bound either, nothing the guest holds needs writing out: the VM is killed
        rather than shut down (saves a round of guest work, ~30 ms under TCG)."""
        with self._lock:
            if self._stopping.is_set():
                return
            self._stopping.set()
            volumes = sum(container.volumes for container in self._containers.values())
        started = time.monotonic()
        if discard and not volumes:
            self.vm.kill()
        elif self.agent is not None and not self.vm.exited.is_set():
            with contextlib.suppress(HakoError):
                self.agent.destroy_sandbox(timeout=5)
        self.vm.stop(timeout=5)
        if self.network is not None:
            self.network.close()
        self._remove_private_memory()
        if self.agent is not None:
            self.agent.close()
        with self._lock:
            containers, self._containers = list(self._containers.values()), {}
        for container in containers:
            self._unmount(container)
        shutil.rmtree(self.shared_dir, ignore_errors=True)
        self.timing["teardown"] = time.monotonic() - started

    # -- containers ----------------------------------------------------------------------------
    def _need_agent(self) -> AgentClient:
        if self.dead.is_set():
            raise VMDied(f"sandbox {self.config.sandbox_id[:12]} is dead: {self.death_reason}")
        if self.agent is None:
            raise SandboxError("the sandbox is not ready")
        return self.agent

    def add_container(
        self,
        container_id: str,
        spec: Mapping[str, Any],
        stdin: bool,
        *,
        rootfs_writable: bool = False,
        disk: Path | None = None,
        before_create: Callable[[], None] | None = None,
    ) -> None:
        """Give the guest the container's rootfs and share its volumes, then create it there.

        ``spec`` is an OCI runtime spec with HOST paths; bind mounts name host sources.
        root.path is the image's read-only rootfs, which gets a writable overlay of
        the sandbox's own, shared over virtio-9p; or, with ``rootfs_writable`` (containerd's
        snapshot), a rootfs that is shared as it is. With ``disk`` (the image's rootfs as an
        ext4 image, :mod:`hako.image.disk`) the rootfs is a block device instead: a qcow2
        overlay of ``disk`` attached to a free disk slot of the VM, which the agent mounts.

        ``before_create`` runs between the host's part (the rootfs and volumes made ready for the
        guest) and the guest's; hako run's daemon waits there for the sandbox to be set up, so
        that its part overlaps the guest's own set-up (the VM must have :attr:`settled`).
        """
        started = time.monotonic()
        if self.network is not None:
            self.network.wait_wired()
        container = _Container(container_id, [])
        with self._lock:
            if container_id in self._containers:
                raise SandboxError(f"container {container_id} already exists in this sandbox")
            self._containers[container_id] = container
        try:
            storages: list[pb.Storage] = []
            if disk is not None:
                storages.append(self._attach_rootfs(container, disk))
            guest_spec = self._share(container, spec, rootfs_writable, block=bool(storages))
            if storages:
                guest_spec["root"] = {**spec["root"], "path": storages[0].mount_point}
            if before_create is not None:
                before_create()
            ready = time.monotonic()
            self._need_agent().create_container(container_id, guest_spec, stdin, storages=storages)
        except BaseException:
            with self._lock:
                self._containers.pop(container_id, None)
            self._release(container)
            raise
        # From when the guest could take it: the host's part, if done while the guest was being
        # set up, is in that row already.
        self.timing["container_create"] = time.monotonic() - max(started, ready)

    def _attach_rootfs(self, container: _Container, disk: Path) -> pb.Storage:
        """A writable overlay of ``disk`` in a free disk slot; the Storage the agent mounts."""
        from hako.image.disk import create_overlay

        with self._lock:
            busy = {c.disk_slot for c in self._containers.values()}
            free = [slot for slot in range(self.config.disk_slots) if slot not in busy]
            if not free:
                raise SandboxError(
                    f"no free disk slot for container {container.id} (the VM has "
                    f"{self.config.disk_slots}): use --rootfs 9p"
                )
            container.disk_slot = free[0]
        overlay = self._overlay_path(container.id)
        create_overlay(disk, overlay)
        self.vm.attach_disk(container.disk_slot, overlay)
        return pb.Storage(
            driver="blk",
            source=disk_serial(container.disk_slot),
            fstype="ext4",
            options=["nodev"],
            mount_point=f"{GUEST_CONTAINERS}/{container.id}/rootfs",
        )

    def _overlay_path(self, container_id: str) -> Path:
        return self.config.run_dir / "containers" / container_id / "rootfs.qcow2"

    def _share(
        self, container: _Container, spec: Mapping[str, Any], rootfs_writable: bool, *, block: bool = False
    ) -> dict[str, Any]:
        host_dir = self.shared_dir / container.id
        guest_dir = f"{GUEST_SHARED}/{container.id}"
        work = self.config.run_dir / "containers" / container.id
        guest_spec = copy.deepcopy(dict(spec))
        lower = Path(spec["root"]["path"])
        if not block:
            if not lower.is_dir():
                raise SandboxError(f"container rootfs {lower} is not a directory")
            rootfs = host_dir / "rootfs"
            if rootfs_writable:
                mounts.bind(lower, rootfs)
            else:
                mounts.overlay(lower, work / "upper", work / "work", rootfs)
            container.mounts.append(rootfs)
            guest_spec["root"] = {**spec["root"], "path": f"{guest_dir}/rootfs"}
        for index, mount in enumerate(guest_spec.get("mounts", [])):
            options = mount.get("options", [])
            if mount.get("type", "bind") != "bind" and "bind" not in options and "rbind" not in options:
                continue
            source = Path(mount["source"])
            target = host_dir / "volumes" / str(index)
            try:
                # As the host has it now: made since this process's namespace was (a Kubernetes
                # pod's volumes, for a daemon that waited in the warm pool) is there too.
                mounts.bind(source, target, readonly="ro" in options, from_host=True)
            except mounts.SourceMissing:
                raise SandboxError(f"volume source {source} does not exist") from None
            container.mounts.append(target)
            container.volumes += 1
            mount["source"] = f"{guest_dir}/volumes/{index}"
        return guest_spec

    def _release(self, container: _Container) -> None:
        """Give back what the host holds for a container that is gone from the guest."""
        if container.disk_slot is not None and not self.vm.exited.is_set():
            try:
                self.vm.detach_disk(container.disk_slot)
            except HakoError as exc:
                self.warn(f"container {container.id}: cannot empty disk slot {container.disk_slot}: {exc}")
        container.disk_slot = None
        self._unmount(container)

    def _unmount(self, container: _Container) -> None:
        for target in reversed(container.mounts):
            with contextlib.suppress(SandboxError):
                mounts.umount(target)
        container.mounts.clear()
        shutil.rmtree(self.shared_dir / container.id, ignore_errors=True)
        shutil.rmtree(self.config.run_dir / "containers" / container.id / "work", ignore_errors=True)

    def start_container(self, container_id: str) -> int:
        started = time.monotonic()
        pid = self._need_agent().start_container(container_id)
        self.timing["container_start"] = time.monotonic() - started
        return pid

    def wait(self, container_id: str, exec_id: str = "") -> int:
        """The process's exit status; KILLED_STATUS if the VM died under it."""
        try:
            return self._need_agent().wait_process(container_id, exec_id)
        except ContainerNotFound:
            raise
        except HakoError:
            if self.dead.wait(10):
                return KILLED_STATUS
            raise

    def remove_container(self, container_id: str) -> None:
        with self._lock:
            container = self._containers.pop(container_id, None)
        if container is None:
            raise ContainerNotFound(f"no container {container_id} in sandbox {self.config.sandbox_id[:12]}")
        try:
            if not self.dead.is_set() and self.agent is not None:
                self.agent.remove_container(container_id)
        finally:
            self._release(container)


def _interface_pb(interface: GuestInterface) -> pb.Interface:
    return pb.Interface(
        device=interface.device,
        hw_addr=interface.hw_addr,
        mtu=interface.mtu,
        addresses=[pb.IPAddress(address=a, prefix_len=n) for a, n in interface.addresses],
    )


def _route_pb(route: GuestRoute) -> pb.Route:
    return pb.Route(
        destination=route.destination, gateway=route.gateway, device=route.device, source=route.source
    )
