"""A pod in the shim: one sandbox (VM), its containers, their processes.

containerd speaks of tasks: a container's init process, and processes exec'd
in it. The first container created (under Kubernetes, the pod's sandbox
container) boots the VM; later ones join it; the VM stops when the last one is
deleted. containerd passes the container's rootfs as mounts (its snapshot),
which the pod mounts in the shim's private mount namespace and shares with the
guest as they are.

Every state change is announced on the event publisher in containerd's order:
create, start, exit, delete; exec-added, exec-started, exit. A process's exit
is announced after what it wrote has been passed on.

The container's pid, as containerd sees it, is its VM's QEMU process: the one
host process that holds the container (Kata does the same).
"""

from __future__ import annotations

import contextlib
import copy
import enum
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hako.errors import ConfigError, ContainerError, ContainerExists, ContainerNotFound, HakoError
from hako.runtime import mounts
from hako.runtime.sandbox import Sandbox
from hako.shim import config as shim_config
from hako.shim.early import EarlyVM, prepare
from hako.shim.events import Publisher
from hako.shim.pooled import PooledVM
from hako.shim.stdio import Log, ProcessIO, check_uri
from hako_api import agent_pb2

# Namespaces a container gets of its own inside the guest; anything else in a spec from
# containerd (network, user, paths to host namespaces) means nothing in the VM.
GUEST_NAMESPACES = ("pid", "ipc", "uts", "mount", "cgroup")
OUTPUT_DRAIN_TIMEOUT = 10.0
Mount = tuple[str, str, list[str]]  # containerd's rootfs mount: type, source, options


class Status(enum.IntEnum):
    """containerd's task status (containerd.v1.types.Status), by number."""

    UNKNOWN = 0
    CREATED = 1
    RUNNING = 2
    STOPPED = 3
    PAUSED = 4


@dataclass
class Process:
    container_id: str
    exec_id: str  # "" for the container's init process
    stdin: str
    stdout: str
    stderr: str
    terminal: bool
    spec: dict[str, Any] | None = None  # an exec's OCI process
    status: Status = Status.CREATED
    pid: int = 0
    exit_status: int = 0
    exited_at_ns: int = 0
    exited: threading.Event = field(default_factory=threading.Event)
    io: ProcessIO | None = None

    @property
    def id(self) -> str:
        return self.exec_id or self.container_id


@dataclass
class Container:
    id: str
    bundle: Path
    rootfs: Path
    mounted_rootfs: bool
    init: Process
    execs: dict[str, Process] = field(default_factory=dict)


def guest_spec(spec: dict[str, Any], container_id: str, rootfs: Path) -> dict[str, Any]:
    """containerd's spec, made to fit the guest: host-only parts removed.

    Namespace paths point at host namespaces, the network namespace is the VM's
    own, hooks are host programs and the cgroup path is the host's: none of it
    applies inside the VM.
    """
    guest = copy.deepcopy(spec)
    guest["root"] = {**guest.get("root", {}), "path": str(rootfs)}
    guest.pop("hooks", None)
    linux = guest.setdefault("linux", {})
    kinds = [ns.get("type") for ns in linux.get("namespaces", [])]
    linux["namespaces"] = [{"type": kind} for kind in GUEST_NAMESPACES if kind in kinds or kind == "mount"]
    linux["cgroupsPath"] = f"/hako/{container_id}"
    linux.pop("seccomp", None)
    return guest


class Pod:
    def __init__(
        self,
        pod_id: str,
        state_dir: Path,
        events: Publisher,
        log: Log,
        on_vm: Callable[[int | None], None] = lambda pid: None,
        early: EarlyVM | PooledVM | None = None,
    ) -> None:
        """``early``: the pod's VM, launched as the shim started (:mod:`hako.shim.early`) or
        taken from the warm pool (:mod:`hako.shim.pooled`); the first container takes it if it
        wants that VM."""
        self.pod_id = pod_id
        self.state_dir = state_dir
        self.events = events
        self.log = log
        self._on_vm = on_vm  # told the VM's pid when it starts, None when it stops
        self.sandbox: Sandbox | None = None
        self.containers: dict[str, Container] = {}
        self._lock = threading.RLock()
        self._exits = threading.Lock()  # a process seen stopped has had its exit announced
        self._early = early

    # -- the VM --------------------------------------------------------------------------------
    def _sandbox_for(self, config_path: str | None, hostname: str, netns_path: str = "") -> Sandbox:
        """The pod's VM, started for its first container. Its network is the namespace
        ``netns_path`` (the pod's, which containerd's CNI configured) if there is one: the VM's
        NIC stands in for its veth. Without one, the VM gets an empty namespace of its own."""
        if self.sandbox is not None:
            if self.sandbox.dead.is_set():
                raise ContainerError(f"the pod's VM is dead: {self.sandbox.death_reason}")
            return self.sandbox
        early, self._early = self._early, None
        if early is not None:
            for note in early.notes:
                self.log(note)
            if not early.fits(config_path, hostname, netns_path):
                self.log("the VM launched early is not the one the pod's first container asks for")
                early.discard()
                early = None
        if isinstance(early, PooledVM):
            sandbox = early.sandbox
            sandbox.warn = self.log
            try:
                if sandbox.dead.is_set():
                    raise ContainerError(f"the pod's VM is dead: {sandbox.death_reason}")
                sandbox.take_identity(hostname or self.pod_id[:12])
            except BaseException:
                sandbox.stop()
                raise
            took = sandbox.timing.get("identity", 0.0)
            self.log(
                f"VM ready: QEMU pid {sandbox.vm.pid}, the pod's hostname and network given in {took:.2f} s"
            )
            self.sandbox = sandbox
            self._on_vm(sandbox.vm.pid)
            return sandbox
        if early is not None:
            cfg, config, network = early.settings, early.config, early.network
            sandbox = Sandbox(config, early.vm, warn=self.log, network=network)
        else:
            cfg = shim_config.load(config_path)
            config, network = prepare(self.pod_id, self.state_dir, cfg, hostname, netns_path, self.log)
            sandbox = Sandbox(config, warn=self.log, network=network)
        how = f"restoring it from template {config.template.name}" if config.template else "booting it"
        reason = config.accel.reason
        self.log(f"the pod's VM: {how} ({cfg.kernel} kernel, {reason}; config: {cfg.source})")
        try:
            sandbox.start()
            sandbox.wait_ready()
        except BaseException:
            sandbox.stop()
            raise
        took = sandbox.timing.get("restore", sandbox.timing.get("boot_total", 0.0))
        self.log(f"VM ready: QEMU pid {sandbox.vm.pid}, in {took:.2f} s")
        self.sandbox = sandbox
        self._on_vm(sandbox.vm.pid)
        return sandbox

    def _live_sandbox(self) -> Sandbox:
        if self.sandbox is None:
            raise ContainerError("the pod has no VM")
        return self.sandbox

    def _stop_sandbox(self) -> None:
        sandbox, self.sandbox = self.sandbox, None
        if sandbox is not None:
            self.log("stopping the pod's VM: no container left")
            sandbox.stop()
            self._on_vm(None)

    @property
    def vm_pid(self) -> int:
        return (self.sandbox.vm.pid or 0) if self.sandbox is not None else 0

    # -- lookups -------------------------------------------------------------------------------
    def _container(self, container_id: str) -> Container:
        container = self.containers.get(container_id)
        if container is None:
            raise ContainerNotFound(f"container {container_id} not found")
        return container

    def process(self, container_id: str, exec_id: str = "") -> Process:
        container = self._container(container_id)
        if not exec_id:
            return container.init
        process = container.execs.get(exec_id)
        if process is None:
            raise ContainerNotFound(f"process {exec_id} not found in container {container_id}")
        return process

    # -- containers ----------------------------------------------------------------------------
    def create(
        self,
        container_id: str,
        bundle: Path,
        rootfs_mounts: list[Mount],
        stdio: tuple[str, str, str],
        terminal: bool,
        config_path: str | None,
    ) -> int:
        for uri in stdio:
            check_uri(uri)
        try:
            spec: dict[str, Any] = json.loads((bundle / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{bundle / 'config.json'}: {exc}") from exc
        rootfs = bundle / spec.get("root", {}).get("path", "rootfs")
        with self._lock:
            if container_id in self.containers:
                raise ContainerExists(f"container {container_id} already exists")
            sandbox = self._sandbox_for(
                config_path, spec.get("hostname", ""), shim_config.network_namespace(spec)
            )
            mount_rootfs(rootfs_mounts, rootfs)
            try:
                sandbox.add_container(
                    container_id,
                    guest_spec(spec, container_id, rootfs),
                    stdin=bool(stdio[0]),
                    rootfs_writable=True,
                )
            except BaseException:
                unmount_rootfs(rootfs, bool(rootfs_mounts))
                if not self.containers:
                    self._stop_sandbox()
                raise
            init = Process(container_id, "", *stdio, terminal=terminal, pid=self.vm_pid)
            init.io = self._io(sandbox, init)
            init.io.start()
            self.containers[container_id] = Container(container_id, bundle, rootfs, bool(rootfs_mounts), init)
        self.events.create(container_id, str(bundle), rootfs_mounts, stdio, terminal, init.pid)
        return init.pid

    def _io(self, sandbox: Sandbox, process: Process) -> ProcessIO:
        assert sandbox.agent is not None
        return ProcessIO(
            sandbox.agent,
            process.container_id,
            process.exec_id,
            stdin=process.stdin,
            stdout=process.stdout,
            stderr=process.stderr,
            terminal=process.terminal,
            log=self.log,
        )

    def start(self, container_id: str, exec_id: str = "") -> int:
        process = self.process(container_id, exec_id)
        sandbox = self._live_sandbox()
        if process.status != Status.CREATED:
            raise ContainerError(f"process {process.id} cannot start: it is {process.status.name.lower()}")
        if not exec_id:
            sandbox.start_container(container_id)
            process.status = Status.RUNNING
            self.events.start(container_id, process.pid)  # before its exit can be announced
            self._watch(sandbox, process)
            return process.pid
        assert sandbox.agent is not None and process.spec is not None
        sandbox.agent.exec_process(container_id, exec_id, process.spec, stdin=bool(process.stdin))
        process.pid = self.vm_pid
        process.io = self._io(sandbox, process)
        process.io.start()
        process.status = Status.RUNNING
        self.events.exec_started(container_id, exec_id, process.pid)
        self._watch(sandbox, process)
        return process.pid

    def _watch(self, sandbox: Sandbox, process: Process) -> None:
        def wait() -> None:
            status = sandbox.wait(process.container_id, process.exec_id)
            if process.io is not None:
                process.io.wait_output(OUTPUT_DRAIN_TIMEOUT)
            with self._exits:
                process.exit_status = status
                process.exited_at_ns = time.time_ns()
                process.status = Status.STOPPED
                process.exited.set()
                self.events.exit(process.container_id, process.id, process.pid, status, process.exited_at_ns)

        threading.Thread(target=wait, daemon=True, name=f"wait-{process.id[:12]}").start()

    def exec(
        self,
        container_id: str,
        exec_id: str,
        stdio: tuple[str, str, str],
        terminal: bool,
        spec: dict[str, Any],
    ) -> None:
        for uri in stdio:
            check_uri(uri)
        container = self._container(container_id)
        if container.init.status not in (Status.RUNNING, Status.PAUSED):
            raise ContainerError(f"container {container_id} is not running")
        if exec_id in container.execs:
            raise ContainerExists(f"process {exec_id} already exists in container {container_id}")
        container.execs[exec_id] = Process(container_id, exec_id, *stdio, terminal=terminal, spec=spec)
        self.events.exec_added(container_id, exec_id)

    def delete(self, container_id: str, exec_id: str = "") -> Process:
        """Forget a process that has exited (or never started); for the init, the whole container."""
        container = self._container(container_id)
        process = self.process(container_id, exec_id)
        if process.status in (Status.RUNNING, Status.PAUSED):
            raise ContainerError(f"cannot delete process {process.id}: it is running (kill it first)")
        if exec_id:
            del container.execs[exec_id]
            return process
        with self._lock:
            del self.containers[container_id]
            sandbox = self.sandbox
            try:
                if sandbox is not None and not sandbox.dead.is_set():
                    sandbox.remove_container(container_id)
                elif sandbox is not None:
                    with contextlib.suppress(HakoError):
                        sandbox.remove_container(container_id)
            finally:
                unmount_rootfs(container.rootfs, container.mounted_rootfs)
                if not self.containers:
                    self._stop_sandbox()
        with self._exits:  # the exit of a process that was seen stopped is announced first
            self.events.delete(container_id, process.pid, process.exit_status, process.exited_at_ns)
        return process

    def kill(self, container_id: str, exec_id: str, signal: int, all: bool) -> None:
        process = self.process(container_id, exec_id)
        if process.status == Status.STOPPED:
            raise ContainerNotFound(f"process {process.id} already finished")
        agent = self._live_sandbox().agent
        assert agent is not None
        agent.signal_process(container_id, exec_id, signal, all=all)

    def wait(self, container_id: str, exec_id: str, cancelled: threading.Event) -> Process:
        process = self.process(container_id, exec_id)
        while not process.exited.wait(0.2):
            if cancelled.is_set():
                raise ContainerError("the caller went away")
        return process

    def pause(self, container_id: str) -> None:
        init = self.process(container_id)
        if init.status != Status.RUNNING:
            raise ContainerError(f"container {container_id} is not running")
        agent = self._live_sandbox().agent
        assert agent is not None
        agent.pause_container(container_id)
        init.status = Status.PAUSED
        self.events.paused(container_id)

    def resume(self, container_id: str) -> None:
        init = self.process(container_id)
        if init.status != Status.PAUSED:
            raise ContainerError(f"container {container_id} is not paused")
        agent = self._live_sandbox().agent
        assert agent is not None
        agent.resume_container(container_id)
        init.status = Status.RUNNING
        self.events.resumed(container_id)

    def pids(self, container_id: str) -> list[int]:
        self._container(container_id)
        agent = self._live_sandbox().agent
        assert agent is not None
        return agent.list_processes(container_id)

    def stats(self, container_id: str) -> agent_pb2.StatsContainerResponse:
        self._container(container_id)
        agent = self._live_sandbox().agent
        assert agent is not None
        return agent.stats(container_id)

    def update(self, container_id: str, resources: bytes) -> None:
        self._container(container_id)
        agent = self._live_sandbox().agent
        assert agent is not None
        agent.update_container(container_id, resources)

    def resize(self, container_id: str, exec_id: str, width: int, height: int) -> None:
        process = self.process(container_id, exec_id)
        if not process.terminal:
            raise ContainerError(f"process {process.id} has no terminal")
        agent = self._live_sandbox().agent
        assert agent is not None
        agent.resize_tty(container_id, exec_id, height, width)

    def close_io(self, container_id: str, exec_id: str) -> None:
        process = self.process(container_id, exec_id)
        if process.io is not None:
            process.io.close_stdin()

    def close(self) -> None:
        """The shim is going away: stop the VM and release every mount (idempotent)."""
        with self._lock:
            containers, self.containers = list(self.containers.values()), {}
            self._stop_sandbox()
            early, self._early = self._early, None
            if early is not None:  # launched, but no container ever came for it
                early.discard()
        for container in containers:
            unmount_rootfs(container.rootfs, container.mounted_rootfs)


_FLAGS = {
    "ro": mounts.MS_RDONLY,
    "nosuid": mounts.MS_NOSUID,
    "nodev": mounts.MS_NODEV,
    "bind": mounts.MS_BIND,
    "rbind": mounts.MS_BIND | mounts.MS_REC,
}
_IGNORED = {"rw", "suid", "dev", "exec", "defaults"}


def mount_rootfs(rootfs_mounts: list[Mount], target: Path) -> None:
    """Mount containerd's rootfs (its snapshot: an overlay, or a bind of a directory)."""
    if not rootfs_mounts:
        return  # containerd prepared the bundle's rootfs itself
    if len(rootfs_mounts) != 1:
        raise ConfigError(f"hako takes one rootfs mount, containerd gave {len(rootfs_mounts)}")
    kind, source, options = rootfs_mounts[0]
    flags = 0
    data = []
    for option in options:
        if option in _FLAGS:
            flags |= _FLAGS[option]
        elif option not in _IGNORED:
            data.append(option)
    target.mkdir(parents=True, exist_ok=True)
    fstype = None if flags & mounts.MS_BIND else kind
    mounts.mount(source, target, fstype, flags, ",".join(data) or None)


def unmount_rootfs(target: Path, mounted: bool) -> None:
    if mounted:
        with contextlib.suppress(HakoError):
            mounts.umount(target)
