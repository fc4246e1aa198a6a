"""QEMU backend: a micro-VM on QEMU's ``microvm`` machine.

The machine options and kernel arguments come with the guest kernel (the
trimmed one has no ACPI, so QEMU must list the virtio-mmio devices on its
command line: ``acpi=off``; Debian's finds them through ACPI). Devices: virtio-serial
with two ports (``hako.agent`` for ttRPC, ``hako.log`` for the agent's log),
virtio-9p for the shared directory, virtio-rng, a virtio-net NIC on a tap, empty
virtio-blk disk slots that containers' rootfs disks are attached to over QMP (the
machine has no hotplug), and the erofs root disk when the guest image is not an
initramfs. QEMU runs inside the sandbox's network namespace, where its tap is (an
empty namespace of its own if the sandbox has no network). The monitor and the agent channel are
socketpairs handed to QEMU as file descriptors, so both are connected the
moment QEMU starts: no socket files, no polling. QEMU runs under its own
seccomp filter (``-sandbox``) and is killed by the kernel if the process that
started it dies (``setpriv --pdeathsig``, so no Python runs between fork and
exec).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from hako.errors import HakoError, HypervisorError
from hako.hypervisor import ksm
from hako.hypervisor import qemu_args as qa
from hako.hypervisor.base import Hypervisor, VMConfig, cpu_model, disk_serial
from hako.hypervisor.binary import find_qemu
from hako.network import netns

if TYPE_CHECKING:
    from hako.hypervisor.qmp import QmpBridge

AGENT_PORT = "hako.agent"
LOG_PORT = "hako.log"
SHARE_TAG = "hako"
MEMORY_ID = "mem"
# Guest RAM that lives in a named file (a template's) is left out of the migration stream:
# the stream holds only device state, and clones map the RAM file copy-on-write.
TEMPLATE_CAPABILITIES = [{"capability": "x-ignore-shared", "state": True}]
SAVE_TIMEOUT = 60.0
NETDEV_ID = "net0"
BOOT_MAC = "02:00:00:00:00:01"
# What an empty disk slot reads as. The guest keeps the capacity it saw at boot (a template's
# clones never boot), so the empty slot is larger than any disk it will be given.
EMPTY_DISK_BYTES = 1 << 40


def _die_with_parent() -> list[str]:
    """A prefix that makes the kernel SIGKILL the VM when its runtime process dies."""
    setpriv = shutil.which("setpriv")
    if not setpriv:
        raise HypervisorError("setpriv not found: install util-linux")
    return [setpriv, "--pdeathsig", "KILL", "--"]


def build_argv(
    binary: str,
    config: VMConfig,
    qmp_fd: int,
    agent_fd: int,
    tap_fd: int,
    restore_fd: int | None = None,
) -> list[str]:
    """QEMU's command line. ``restore_fd`` is a second monitor's, for a VM restored from
    ``config.incoming``: see :func:`start_restore`."""
    run = config.run_dir
    cmdline = list(config.kernel_cmdline)
    if config.debug:
        cmdline.append("hako.debug=1")
    machine: dict[str, qa.OptionValue | None] = {
        "x-option-roms": False,
        "isa-serial": True,
        "rtc": False,
        "mem-merge": config.memory_merge,
    }
    for option in config.machine_options:
        key, _, value = option.partition("=")
        machine[key] = value
    if config.memory_file is not None:
        machine["memory-backend"] = MEMORY_ID
    parts: list[qa.Arg] = [
        qa.Name(f"hako-{config.name[:12]}"),
        qa.Machine("microvm", machine),
        qa.Accel(config.accel.name),
        qa.Cpu(cpu_model(config.accel.name)),
        qa.Memory(config.memory_mib),
    ]
    if config.memory_file is not None:
        backend: dict[str, qa.OptionValue | None] = {
            "size": f"{config.memory_mib}M",
            "mem-path": config.memory_file,
            "share": config.memory_shared,
        }
        parts.append(qa.Object("memory-backend-file", MEMORY_ID, backend))
    parts += [
        qa.Smp(config.vcpus),
        qa.Flags(("-nodefaults", "-no-user-config", "-nographic", "-no-reboot")),
    ]
    if config.incoming is None:
        # A clone's kernel, initrd and command line are in its saved RAM: reading the 40-odd MB
        # again would add ~10 ms to its QEMU's start for nothing.
        parts.append(qa.Kernel(config.kernel, " ".join(cmdline), config.initrd))
    parts += [
        qa.Chardev("file", "console", {"path": run / "console.log"}),
        qa.Serial("chardev:console"),
        qa.Chardev("socket", "qmp", {"fd": qmp_fd}),
        qa.Monitor("qmp"),
        qa.Device("virtio-serial-device", {"max_ports": 4}),
        qa.Chardev("socket", "agent", {"fd": agent_fd}),
        qa.Device("virtserialport", {"chardev": "agent", "name": AGENT_PORT}),
        qa.Chardev("file", "agentlog", {"path": run / "agent.log"}),
        qa.Device("virtserialport", {"chardev": "agentlog", "name": LOG_PORT}),
        qa.Object("rng-random", "rng0", {"filename": "/dev/urandom"}),
        qa.Device("virtio-rng-device", {"rng": "rng0"}),
    ]
    if config.root_disk is not None:
        parts += [qa.Drive("root", config.root_disk), qa.Device("virtio-blk-device", {"drive": "root"})]
    if config.shared_dir is not None:
        parts += [
            qa.Fsdev("shared", config.shared_dir),
            qa.Device("virtio-9p-device", {"fsdev": "shared", "mount_tag": SHARE_TAG}),
        ]
    parts += [
        qa.Netdev("tap", NETDEV_ID, {"fd": tap_fd}),  # vnet_hdr: QEMU finds it on the fd
        # The MAC is the template's in a clone: the agent gives the NIC its own (CreateSandbox).
        qa.Device("virtio-net-device", {"netdev": NETDEV_ID, "mac": BOOT_MAC}),
    ]
    for slot in range(config.disk_slots):
        parts += [
            qa.Blockdev(
                {
                    "driver": "null-co",
                    "node-name": _empty(slot),
                    "size": EMPTY_DISK_BYTES,
                    "read-zeroes": True,
                }
            ),
            qa.Blockdev({"driver": "raw", "node-name": _slot(slot), "file": _empty(slot)}),
            qa.Device("virtio-blk-device", {"drive": _slot(slot), "serial": disk_serial(slot)}),
        ]
    if config.incoming is not None:
        if restore_fd is not None:
            parts += [qa.Chardev("socket", "restore", {"fd": restore_fd}), qa.Monitor("restore")]
        parts.append(qa.Incoming("defer"))  # QMP sets the capabilities, then migrate-incoming
    parts.append(qa.Sandbox())
    return qa.render(binary, parts)


def start_restore(monitor: socket.socket, state_fd: int, timeout: float) -> None:
    """Start loading the saved state of a clone (QEMU's ``state_fd``) over a monitor of its own.

    Three plain QMP commands, written before QEMU's monitor is even up (QEMU reads them in
    order once it is), and their answers read back. The QMP client (asyncio and qemu.qmp) is
    not used for them: importing it took 50-100 ms in a sandbox daemon busy importing the
    agent's protobuf code at the same time, and the restore waited for it. The VM runs as soon
    as the state is loaded; a state that does not fit the VM makes QEMU exit.
    """
    commands = [
        {"execute": "qmp_capabilities"},
        {"execute": "migrate-set-capabilities", "arguments": {"capabilities": TEMPLATE_CAPABILITIES}},
        {"execute": "migrate-incoming", "arguments": {"uri": f"fd:{state_fd}"}},
    ]
    monitor.settimeout(timeout)
    try:
        monitor.sendall(b"".join(json.dumps(command).encode() + b"\n" for command in commands))
        pending, answers = b"", 0
        while answers < len(commands):
            chunk = monitor.recv(65536)
            if not chunk:
                raise HypervisorError("QEMU closed its monitor while the VM was being restored")
            *lines, pending = (pending + chunk).split(b"\n")
            for line in filter(None, (raw.strip() for raw in lines)):
                message = json.loads(line)
                if "error" in message:
                    desc = message["error"].get("desc", "unknown error")
                    raise HypervisorError(f"restoring the VM failed: {desc}")
                answers += "return" in message
    except (OSError, ValueError) as exc:
        raise HypervisorError(f"restoring the VM failed: {exc}") from exc


def _slot(slot: int) -> str:
    """The block node a disk slot's device is attached to: a raw filter whose file child is the
    slot's empty node or the disk it was given (``blockdev-reopen`` swaps it)."""
    return f"slot{slot}"


def _empty(slot: int) -> str:
    return f"slot{slot}-empty"


def _disk(slot: int) -> str:
    return f"slot{slot}-disk"


class QemuVM(Hypervisor):
    def __init__(self, config: VMConfig, on_event: Callable[[str, Mapping[str, object]], None] | None = None):
        self.config = config
        self.exited = threading.Event()
        self.launched_at: float | None = None  # time.monotonic() just before exec
        self._on_event = on_event
        self._process: subprocess.Popen[bytes] | None = None
        self._agent: socket.socket | None = None
        self._qmp_sock: socket.socket | None = None
        self._qmp: QmpBridge | None = None
        self._qmp_ready = threading.Event()
        self._restore_error: HypervisorError | None = None
        self._callbacks: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._stopped = False

    # -- VM manager ----------------------------------------------------------------------------
    def start(self) -> None:
        """Launch QEMU from a thread that lives exactly as long as QEMU does.

        The kernel sends the parent-death signal when the *thread* that forked a
        child exits, not the process; so QEMU is started by its own watcher thread,
        and the caller may be any thread (a ttRPC handler, say) that ends soon after.

        With ``memory_merge`` the calling process (the VM's owner: one per sandbox) and QEMU
        offer their memory to the host's KSM (:mod:`hako.hypervisor.ksm`).
        """
        binary = find_qemu()
        if self.config.memory_merge:
            ksm.merge_this_process()
        run = self.config.run_dir
        run.mkdir(parents=True, exist_ok=True)
        state_fd = self._open_state()
        own_netns = self.config.netns_fd is None
        try:
            netns_fd = netns.create() if own_netns else self.config.netns_fd
            assert netns_fd is not None
            try:
                tap_fd = netns.open_tap(netns_fd, persist=not self.config.netns_shared)
            except HakoError:
                if own_netns:
                    os.close(netns_fd)
                raise
        except BaseException:
            if state_fd is not None:
                os.close(state_fd)
            raise
        qmp_host, qmp_vm = socket.socketpair()
        agent_host, agent_vm = socket.socketpair()
        restore_host, restore_vm = socket.socketpair() if state_fd is not None else (None, None)
        vm_ends = [sock for sock in (qmp_vm, agent_vm, restore_vm) if sock is not None]
        fds = (*(sock.fileno() for sock in vm_ends), tap_fd, *(() if state_fd is None else (state_fd,)))
        restore_fd = restore_vm.fileno() if restore_vm is not None else None
        argv = build_argv(binary, self.config, qmp_vm.fileno(), agent_vm.fileno(), tap_fd, restore_fd)
        (run / "qemu.cmdline").write_text(" ".join(argv) + "\n")
        launched = threading.Event()
        failure: list[BaseException] = []
        thread = threading.Thread(
            target=self._launch_and_watch,
            args=(argv, fds, netns_fd, launched, failure),
            daemon=True,
            name="qemu-watch",
        )
        thread.start()
        launched.wait()
        for sock in vm_ends:
            sock.close()
        os.close(tap_fd)  # QEMU has its own; the tap goes with QEMU, or with its namespace
        if own_netns:
            os.close(netns_fd)
        if state_fd is not None:
            os.close(state_fd)
        if failure:
            for host_end in (qmp_host, agent_host, restore_host):
                if host_end is not None:
                    host_end.close()
            error = failure[0]
            if isinstance(error, HakoError):
                raise error
            detail = error.strerror if isinstance(error, OSError) else str(error)
            raise HypervisorError(f"cannot start {binary}: {detail}") from error
        self._agent = agent_host
        self._qmp_sock = qmp_host
        # QEMU's number for the state file is ours at launch (pass_fds keeps numbers).
        restoring = (restore_host, state_fd) if restore_host is not None and state_fd is not None else None
        threading.Thread(target=self._connect_qmp, args=(restoring,), daemon=True, name="qmp-connect").start()

    def _open_state(self) -> int | None:
        """The saved state of a clone, opened for QEMU to read at launch; None for a boot."""
        if self.config.incoming is None:
            return None
        try:
            return os.open(self.config.incoming, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            state = self.config.incoming
            raise HypervisorError(f"cannot read the saved VM state {state}: {exc.strerror}") from exc

    def _launch_and_watch(
        self,
        argv: list[str],
        fds: tuple[int, ...],
        netns_fd: int,
        launched: threading.Event,
        failure: list[BaseException],
    ) -> None:
        try:
            # QEMU runs in the sandbox's network namespace: a child starts in its forking
            # thread's namespaces, and this thread does nothing but wait for QEMU.
            netns.setns(netns_fd)
            with open(self.config.run_dir / "qemu.log", "wb") as log:
                self.launched_at = time.monotonic()
                self._process = subprocess.Popen(
                    _die_with_parent() + argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    pass_fds=fds,
                )
        except (OSError, HakoError) as exc:
            failure.append(exc)
            return
        finally:
            launched.set()
        self._process.wait()
        self.exited.set()
        self._qmp_ready.set()  # nobody waits for a monitor that will never come
        with self._lock:
            callbacks = list(self._callbacks)
        for callback in callbacks:
            callback()

    def _connect_qmp(self, restoring: tuple[socket.socket, int] | None) -> None:
        if restoring is not None:
            monitor, state_fd = restoring
            try:
                with monitor:
                    start_restore(monitor, state_fd, timeout=30)
            except HypervisorError as exc:
                self._restore_error = exc
                self._signal(signal.SIGKILL)  # a VM that cannot restore must not linger paused
                self._qmp_ready.set()
                return
        # Imported here, in the background, after QEMU was launched: asyncio and qemu.qmp
        # are not on the path to a booting guest.
        from hako.hypervisor.qmp import QmpBridge

        assert self._qmp_sock is not None
        bridge = QmpBridge(self.config.name[:12], self._on_event)
        try:
            bridge.connect(self._qmp_sock, timeout=30)
            self._qmp = bridge
        except Exception:
            bridge.close()
            if self.config.incoming is not None:
                self._signal(signal.SIGKILL)  # nothing could manage this clone: it must not linger
        finally:
            self._qmp_ready.set()

    def save_state(self, path: Path, timeout: float = SAVE_TIMEOUT) -> None:
        """Write the VM's device state to ``path`` (guest RAM stays in its file: only for a VM
        whose ``memory_file`` is shared). The VM is left stopped. It is saved while running
        (the migration stops it for the device state), so a restored VM starts running as
        soon as the state is loaded."""
        if self.config.memory_file is None or not self.config.memory_shared:
            raise HypervisorError("only a VM whose RAM is a shared file can be saved as a template")
        bridge = self._bridge()
        bridge.execute("migrate-set-capabilities", {"capabilities": TEMPLATE_CAPABILITIES})
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            bridge.send_fd(fd, "outgoing")
        finally:
            os.close(fd)
        bridge.execute("migrate", {"uri": "fd:outgoing"})
        deadline = time.monotonic() + timeout
        while True:
            status = bridge.execute("query-migrate")
            state = status.get("status") if isinstance(status, dict) else None
            if state == "completed":
                return
            if state in ("failed", "cancelled"):
                detail = status.get("error-desc", state) if isinstance(status, dict) else state
                raise HypervisorError(f"saving the VM state failed: {detail}")
            if time.monotonic() > deadline:
                raise HypervisorError(f"saving the VM state took more than {timeout:g} s")
            time.sleep(0.01)

    def wait_started(self, timeout: float) -> None:
        if not self._qmp_ready.wait(timeout):
            raise HypervisorError(f"QEMU did not start within {timeout:g} s")
        if self._restore_error is not None:
            raise self._restore_error
        if self.exited.is_set() or self._qmp is None:
            raise HypervisorError(f"QEMU failed to start: {self.exit_reason()}")

    def _bridge(self, timeout: float = 10.0) -> QmpBridge:
        if not self._qmp_ready.wait(timeout) or self._qmp is None:
            raise HypervisorError(f"QEMU monitor unavailable: {self.exit_reason()}")
        return self._qmp

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            already, self._stopped = self._stopped, True
        if not already and self._process is not None and not self.exited.is_set():
            with contextlib.suppress(HypervisorError):
                self._bridge(min(timeout, 2.0)).execute("quit", timeout=timeout)
            if not self.exited.wait(timeout):
                self._signal(signal.SIGTERM)
                if not self.exited.wait(2):
                    self.kill()
        self._release()

    def kill(self) -> None:
        self._signal(signal.SIGKILL)
        if self._process is not None:
            self._process.wait()
            self.exited.wait(5)

    def _signal(self, signum: int) -> None:
        if self._process is not None and self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._process.send_signal(signum)

    def _release(self) -> None:
        if self._qmp is not None:
            self._qmp.close()
        for sock in (self._agent, self._qmp_sock):
            if sock is not None:
                sock.close()

    def attach_disk(self, slot: int, path: Path) -> None:
        bridge = self._bridge()
        self._check_slot(slot)
        # qcow2 opens its backing file (the image's read-only base) from its header.
        file = {"driver": "file", "filename": str(path)}
        bridge.execute("blockdev-add", {"driver": "qcow2", "node-name": _disk(slot), "file": file})
        try:
            self._point_slot(bridge, slot, _disk(slot))
        except HypervisorError:
            with contextlib.suppress(HypervisorError):
                bridge.execute("blockdev-del", {"node-name": _disk(slot)})
            raise

    def detach_disk(self, slot: int) -> None:
        if self.exited.is_set():
            return
        bridge = self._bridge()
        self._check_slot(slot)
        self._point_slot(bridge, slot, _empty(slot))
        with contextlib.suppress(HypervisorError):  # never attached: nothing to delete
            bridge.execute("blockdev-del", {"node-name": _disk(slot)})

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.config.disk_slots:
            raise HypervisorError(f"disk slot {slot}: this VM has {self.config.disk_slots} slots")

    @staticmethod
    def _point_slot(bridge: QmpBridge, slot: int, node: str) -> None:
        options = {"driver": "raw", "node-name": _slot(slot), "file": node}
        bridge.execute("blockdev-reopen", {"options": [options]})

    def pause(self) -> None:
        self._bridge().execute("stop")

    def resume(self) -> None:
        self._bridge().execute("cont")

    # -- state ---------------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def exit_status(self) -> int | None:
        return self._process.returncode if self._process is not None else None

    def exit_reason(self) -> str:
        status = self.exit_status
        if status is None:
            return "QEMU is running"
        if status < 0:
            reason = f"QEMU was killed by {signal.Signals(-status).name}"
        else:
            reason = f"QEMU exited with status {status}"
        detail = self._log_tail()
        return f"{reason}: {detail}" if detail else reason

    def _log_tail(self) -> str:
        try:
            lines = (self.config.run_dir / "qemu.log").read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return lines[-1].strip() if lines else ""

    def on_exit(self, callback: Callable[[], None]) -> None:
        with self._lock:
            self._callbacks.append(callback)
        if self.exited.is_set():
            callback()

    # -- utilities -----------------------------------------------------------------------------
    def agent_channel(self) -> socket.socket:
        if self._agent is None:
            raise HypervisorError("the VM has not been started")
        return self._agent

    def check(self, timeout: float) -> None:
        self._bridge(timeout).execute("query-status", timeout=timeout)
