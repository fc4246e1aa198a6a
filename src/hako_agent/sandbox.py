"""The sandbox: the guest as a whole and the containers in it.

This is what the RPC handlers call. It speaks in plain Python values (bytes of
JSON, strings, :class:`Storage`), never protobuf, and raises the errors of
:mod:`hako_agent.errors`.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time

from hako_agent import linux, log, network
from hako_agent.cgroups import DEFAULT_ROOT, Cgroup, CgroupStats, cgroup_relpath, is_cgroup2, render_resources
from hako_agent.container import Container, Process
from hako_agent.errors import AlreadyExists, Cancelled, FailedPrecondition, InvalidArgument, NotFound
from hako_agent.reaper import Reaper
from hako_agent.spec import Mount, Spec, check_id, load_json, parse_mount_options, parse_resources, parse_spec

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from hako_agent.network import Interface, Route


class Storage:
    """A filesystem to mount in the guest (agent.proto's Storage)."""

    __slots__ = ("driver", "fstype", "mount_point", "options", "source")

    def __init__(self, driver: str, source: str, fstype: str, options: list[str], mount_point: str) -> None:
        self.driver = driver
        self.source = source
        self.fstype = fstype
        self.options = options
        self.mount_point = mount_point


_DRIVER_FSTYPE = {"9p": "9p", "virtio-fs": "virtiofs", "tmpfs": "tmpfs"}
SYS_BLOCK = "/sys/block"


class BlockDevices:
    """The guest's disks by serial, read once.

    A disk keeps its serial for the VM's life: the microvm machine has no hotplug, and a disk
    slot is given new contents, never a new serial. Reading a virtio disk's serial is a request
    to the device, and the lookup took 12-14 ms of a restored VM's first container create under
    TCG (code the VM's QEMU had not run yet). So they are read once, by the agent's warm-up,
    before a template is saved: its clones have them already (0.1 ms). A serial not among them
    is looked for again.
    """

    def __init__(self, sys_block: str = SYS_BLOCK) -> None:
        self.sys_block = sys_block
        self._by_serial: dict[str, str] | None = None
        self._lock = threading.Lock()

    def load(self) -> None:
        with self._lock:
            if self._by_serial is None:
                self._by_serial = self._scan()

    def find(self, serial: str) -> str | None:
        """The /dev node of the disk whose serial is ``serial``, if there is one."""
        with self._lock:
            if self._by_serial is None or serial not in self._by_serial:
                self._by_serial = self._scan()
            return self._by_serial.get(serial)

    def _scan(self) -> dict[str, str]:
        try:
            names = sorted(os.listdir(self.sys_block))
        except OSError:
            names = []
        found: dict[str, str] = {}
        for name in names:
            try:
                with open(f"{self.sys_block}/{name}/serial", encoding="ascii", errors="replace") as f:
                    serial = f.read().strip()
            except OSError:
                continue
            if serial:
                found.setdefault(serial, f"/dev/{name}")
        return found


BLOCK_DEVICES = BlockDevices()


def block_device(serial: str, field: str, devices: BlockDevices = BLOCK_DEVICES) -> str:
    """The /dev node of the virtio disk whose serial is ``serial`` (a "blk" storage's source;
    a path under /dev is taken as it is)."""
    if serial.startswith("/dev/"):
        return serial
    device = devices.find(serial)
    if device is None:
        raise InvalidArgument(f"{field}.source: no disk with serial {serial!r} in the guest")
    return device


def drop_cached_blocks(device: str) -> None:
    """Forget what the guest cached of ``device``: a disk slot's contents change under the guest
    (a template's clone, a slot given another disk), while its cache still holds the old blocks."""
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, linux.BLKFLSBUF, 0)
    finally:
        os.close(fd)


def check_mount_point(target: str, field: str) -> None:
    if not target.startswith("/") or ".." in target.split("/"):
        raise InvalidArgument(f"{field}: must be an absolute path, not {target!r}")


def mount_storage(storage: Storage, field: str) -> str:
    """Mount one Storage; returns its mount point."""
    target = storage.mount_point
    check_mount_point(target, f"{field}.mount_point")
    options = parse_mount_options(storage.options)
    bind = storage.driver == "bind" or options.bind
    fstype = storage.fstype or _DRIVER_FSTYPE.get(storage.driver, "")
    if not bind and not fstype:
        raise InvalidArgument(f"{field}.fstype: missing for driver {storage.driver!r}")
    source = storage.source
    try:
        if storage.driver == "blk":
            source = block_device(storage.source, field)
            drop_cached_blocks(source)
        if bind and not os.path.isdir(storage.source):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if not os.path.exists(target):
                os.close(os.open(target, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))
        else:
            os.makedirs(target, exist_ok=True)
        if bind:
            linux.mount(storage.source, target, None, linux.MS_BIND | (options.flags & linux.MS_REC))
            extra = options.flags & ~(linux.MS_BIND | linux.MS_REC)
            if extra:
                linux.mount(None, target, None, linux.MS_BIND | linux.MS_REMOUNT | extra)
        else:
            linux.mount(source or fstype, target, fstype, options.flags, options.data or None)
        for propagation in options.propagation:
            linux.mount(None, target, None, propagation)
    except OSError as exc:
        raise InvalidArgument(
            f"{field}: cannot mount {source!r} ({fstype or 'bind'}) on {target}: {exc.strerror}"
        ) from None
    log.debug(f"mounted {source} on {target}")
    return target


def unmount(target: str) -> None:
    try:
        linux.umount2(target)
    except OSError:
        try:
            linux.umount2(target, linux.MNT_DETACH)
        except OSError as exc:
            log.warning(f"cannot unmount {target}: {exc.strerror}")


class Sandbox:
    def __init__(self, *, reaper: Reaper | None = None, cgroup_root: str | None = DEFAULT_ROOT) -> None:
        self.reaper = reaper or Reaper()
        self.reaper.start()
        self.cgroup_root = cgroup_root if cgroup_root and is_cgroup2(cgroup_root) else None
        self.containers: dict[str, Container] = {}
        self.storages: list[str] = []  # sandbox-wide mounts
        # Sandbox-wide storages not mounted yet: each is mounted when the first container that
        # uses it (its rootfs or a bind source is under its mount point) is created. A sandbox
        # whose containers need none of them (a block rootfs, no volumes) never mounts them.
        self._pending: list[tuple[Storage, str]] = []
        self._storage_lock = threading.Lock()
        self.lock = threading.Lock()
        self._creating: set[str] = set()

    # -- sandbox --------------------------------------------------------------------------------
    def setup(
        self,
        hostname: str,
        storages: list[Storage],
        dns: list[str],
        time_unix_ns: int,
        interfaces: Sequence[Interface] = (),
        routes: Sequence[Route] = (),
    ) -> None:
        if time_unix_ns:
            time.clock_settime_ns(time.CLOCK_REALTIME, time_unix_ns)
        for i, storage in enumerate(storages):
            check_mount_point(storage.mount_point, f"storages[{i}].mount_point")
        self.identify(hostname, dns, interfaces, routes)
        for i, storage in enumerate(storages):
            self._pending.append((storage, f"sandbox storages[{i}]"))

    def identify(
        self,
        hostname: str,
        dns: list[str],
        interfaces: Sequence[Interface] = (),
        routes: Sequence[Route] = (),
    ) -> None:
        """The sandbox's identity and network: its hostname, its interfaces and routes, its
        resolv.conf and hosts. At set-up, and again for a pooled sandbox a pod takes."""
        if hostname:
            if len(hostname.encode()) > 64:
                raise InvalidArgument("hostname: longer than 64 bytes")
            linux.sethostname(hostname)
        if interfaces or routes:
            network.configure(interfaces, routes)
        if dns:
            write_resolv_conf(dns)
        write_hosts(hostname or os.uname().nodename, [a.address for i in interfaces for a in i.addresses])

    def shutdown(self, grace: float = 1.0) -> None:
        """Stop every container (SIGTERM to all, SIGKILL after ``grace`` s), unmount what the
        agent mounted, sync."""
        containers = list(self.containers.values())
        for container in containers:
            container.terminate()
        deadline = time.monotonic() + grace
        for container in containers:
            container.init.wait(timeout=max(0.0, deadline - time.monotonic()))
        for container in containers:
            try:
                self.remove_container(container.id, 0)
            except Exception:
                log.exception(f"destroy: removing container {container.id} failed")
        with self._storage_lock:
            for target in reversed(self.storages):
                unmount(target)
            self.storages.clear()
            self._pending.clear()
        os.sync()

    def _mount_used_storages(self, spec: Spec) -> None:
        """Mount the pending sandbox storages that ``spec`` uses."""
        paths = [spec.root_path, *(m.source for m in spec.mounts if m.source.startswith("/"))]
        with self._storage_lock:
            for pending in list(self._pending):
                storage, field = pending
                point = storage.mount_point.rstrip("/")
                if any(path == point or path.startswith(point + "/") for path in paths):
                    self.storages.append(mount_storage(storage, field))
                    self._pending.remove(pending)

    # -- containers -----------------------------------------------------------------------------
    def container(self, container_id: str) -> Container:
        container = self.containers.get(container_id)
        if container is None:
            raise NotFound(f"no container {container_id!r}")
        return container

    def process(self, container_id: str, exec_id: str) -> Process:
        return self.container(container_id).process(exec_id)

    def create_container(
        self, container_id: str, oci_spec: bytes, storages: list[Storage], want_stdin: bool
    ) -> None:
        check_id(container_id, "container_id")
        with self.lock:
            if container_id in self.containers or container_id in self._creating:
                raise AlreadyExists(f"container {container_id!r} already exists")
            self._creating.add(container_id)
        mounted: list[str] = []
        cgroup: Cgroup | None = None
        try:
            spec = parse_spec(oci_spec)
            add_network_files(spec)
            self._mount_used_storages(spec)
            for i, storage in enumerate(storages):
                mounted.append(mount_storage(storage, f"storages[{i}]"))
            if not os.path.isdir(spec.root_path):
                raise InvalidArgument(f"root.path: {spec.root_path} is not a directory in the guest")
            files = render_resources(spec.resources)
            if self.cgroup_root is not None:
                cgroup = Cgroup(self.cgroup_root, cgroup_relpath(spec.cgroups_path, container_id))
                cgroup.create()
                cgroup.apply(files)
            elif files:
                log.warning(f"container {container_id}: no cgroup v2, resources not applied")
            container = Container(container_id, spec, self.reaper, cgroup)
            container.storages = mounted
            container.create(want_stdin)
        except BaseException:
            if cgroup is not None:
                try:
                    cgroup.remove()
                except OSError as exc:
                    log.warning(f"cannot remove cgroup {cgroup.path}: {exc.strerror}")
            for target in reversed(mounted):
                unmount(target)
            with self.lock:
                self._creating.discard(container_id)
            raise
        with self.lock:
            self._creating.discard(container_id)
            self.containers[container_id] = container
        log.info(f"container {container_id}: created, init pid {container.init.pid}")

    def start_container(self, container_id: str) -> int:
        pid = self.container(container_id).start()
        log.info(f"container {container_id}: started")
        return pid

    def remove_container(self, container_id: str, timeout: float) -> None:
        """Kill what runs (SIGTERM, SIGKILL after ``timeout`` s), release everything. Idempotent."""
        container = self.containers.get(container_id)
        if container is None:
            return
        with container.lock:
            if self.containers.get(container_id) is not container:
                return  # removed meanwhile
            container.kill_all(timeout)
            container.release()
            if container.cgroup is not None:
                try:
                    container.cgroup.remove()
                except OSError as exc:
                    log.warning(f"container {container_id}: cannot remove cgroup: {exc.strerror}")
            for target in reversed(container.storages):
                unmount(target)
            with self.lock:
                del self.containers[container_id]
        log.info(f"container {container_id}: removed")

    def exec_process(self, container_id: str, exec_id: str, process: bytes, want_stdin: bool) -> int:
        return self.container(container_id).exec(exec_id, process, want_stdin)

    def signal_process(self, container_id: str, exec_id: str, signum: int, all_processes: bool) -> None:
        if not 0 <= signum <= 64:
            raise InvalidArgument(f"signal: {signum} is not a signal number")
        self.container(container_id).signal(exec_id, signum, all_processes)

    def wait_process(
        self, container_id: str, exec_id: str, cancelled: Callable[[], bool] | None = None
    ) -> tuple[int, int]:
        """(exit status, exited at ns) once the process exited; Cancelled if ``cancelled()`` first."""
        process = self.process(container_id, exec_id)
        if not process.wait(cancelled):
            raise Cancelled(f"gave up waiting for process {exec_id or 'init'} of {container_id}")
        return process.exit_status, process.exited_at_ns

    def list_processes(self, container_id: str) -> list[int]:
        return self.container(container_id).pids()

    def stats(self, container_id: str) -> CgroupStats:
        container = self.container(container_id)
        if container.cgroup is None:
            return CgroupStats()
        return container.cgroup.stats()

    def pause(self, container_id: str) -> None:
        self.container(container_id).pause()

    def resume(self, container_id: str) -> None:
        self.container(container_id).resume()

    def update(self, container_id: str, resources: bytes) -> None:
        container = self.container(container_id)
        files = render_resources(parse_resources(load_json(resources, "resources"), "resources"))
        container.update(files)

    # -- stdio ----------------------------------------------------------------------------------
    def write_stdin(
        self, container_id: str, exec_id: str, data: bytes, cancelled: Callable[[], bool] | None = None
    ) -> int:
        process = self.process(container_id, exec_id)
        if process.stdin is None:
            raise FailedPrecondition(f"process {exec_id or 'init'} of {container_id} has no stdin")
        return process.stdin.write(data, cancelled)

    def close_stdin(self, container_id: str, exec_id: str) -> None:
        process = self.process(container_id, exec_id)
        if process.stdin is not None:
            process.stdin.close()

    def read_output(
        self,
        container_id: str,
        exec_id: str,
        stderr: bool,
        size: int,
        cancelled: Callable[[], bool] | None = None,
    ) -> bytes:
        process = self.process(container_id, exec_id)
        stream = process.stderr if stderr else process.stdout
        if stream is None:
            return b""  # a terminal has no separate stderr
        return stream.read(size, cancelled)

    def resize(self, container_id: str, exec_id: str, rows: int, columns: int) -> None:
        self.process(container_id, exec_id).resize(rows, columns)


ETC = "/run/hako/etc"  # the sandbox's hosts, hostname and resolv.conf, given to its containers
SYSTEM_RESOLV_CONF = "/etc/resolv.conf"  # the guest's own, for its own lookups


def write_hosts(hostname: str, addresses: list[str]) -> None:
    """The sandbox's /etc/hosts and /etc/hostname, as Docker writes them for a container."""
    os.makedirs(ETC, exist_ok=True)
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    lines += [f"{address}\t{hostname}" for address in addresses]
    write_file(f"{ETC}/hosts", "\n".join(lines) + "\n")
    write_file(f"{ETC}/hostname", hostname + "\n")


def write_file(path: str, text: str) -> None:
    """``text`` as the whole of ``path`` (mode 0644), in plain system calls. In a clone of a
    template the first text-mode ``open().write()`` is code the emulator has not yet translated:
    the three small files of CreateSandbox took 29-37 ms that way, 15-26 ms like this."""
    data = text.encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        while data:
            data = data[os.write(fd, data) :]
    finally:
        os.close(fd)


def add_network_files(spec: Spec) -> None:
    """Bind the sandbox's /etc/hosts, /etc/hostname and /etc/resolv.conf into a container whose
    spec does not mount its own there (containerd's CRI does; `hako run` leaves it to us)."""
    taken = {mount.destination.rstrip("/") for mount in spec.mounts}
    for name in ("hosts", "hostname", "resolv.conf"):
        source = f"{ETC}/{name}"
        if f"/etc/{name}" not in taken and os.path.exists(source):
            spec.mounts.append(Mount(f"/etc/{name}", "bind", source, ["rbind", "rw", "nosuid", "nodev"]))


def write_resolv_conf(dns: list[str]) -> None:
    """/run/hako/resolv.conf, bind-mounted over /etc/resolv.conf when that exists (else created).
    Written again (a pooled sandbox a pod takes), it is rewritten in place: the mount stays one."""
    for i, server in enumerate(dns):
        if not server or any(c.isspace() for c in server):
            raise InvalidArgument(f"dns[{i}]: {server!r} is not an address")
    os.makedirs(ETC, exist_ok=True)
    path = f"{ETC}/resolv.conf"
    write_file(path, "".join(f"nameserver {server}\n" for server in dns))
    if os.path.exists(SYSTEM_RESOLV_CONF):
        if not os.path.samefile(path, SYSTEM_RESOLV_CONF):
            linux.mount(path, SYSTEM_RESOLV_CONF, None, linux.MS_BIND)
    else:
        try:
            os.symlink(path, SYSTEM_RESOLV_CONF)
        except OSError as exc:
            log.warning(f"cannot create /etc/resolv.conf: {exc.strerror}")
