"""The guest system as PID 1 sets it up: filesystems, kernel modules, loopback, clock, entropy.

Imported at boot, so it costs only what it must: ``os``, ``time`` and
:mod:`hako_agent.linux` (ctypes). The pure helpers (:func:`parse_cmdline`,
:func:`parse_kmsg`, :func:`parse_meminfo`) have unit tests.
"""

from __future__ import annotations

import os
import time

from hako_agent import linux, log

_NOSUID_NODEV_NOEXEC = linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC

# (target, fstype, flags, data), mounted in this order, each unless something is mounted there
# already (an erofs root gets /dev from the kernel). /proc first (is / an initramfs?), then
# what the kernel modules and the channel need, then the rest.
PROC_MOUNT = (("/proc", "proc", _NOSUID_NODEV_NOEXEC, ""),)
EARLY_MOUNTS = (
    ("/sys", "sysfs", _NOSUID_NODEV_NOEXEC, ""),
    ("/dev", "devtmpfs", linux.MS_NOSUID, "mode=0755"),
)
LATE_MOUNTS = (
    ("/dev/pts", "devpts", linux.MS_NOSUID | linux.MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620,gid=5"),
    ("/dev/shm", "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "mode=1777"),
    ("/run", "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "mode=0755"),
    ("/tmp", "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "mode=1777"),
    ("/sys/fs/cgroup", "cgroup2", _NOSUID_NODEV_NOEXEC | linux.MS_RELATIME, ""),
)
CGROUP_CONTROLLERS = ("cpu", "memory", "pids")
MODULES_LOAD = "/etc/hako/modules.load"
VIRTIO_PORTS = "/sys/class/virtio-ports"


def boottime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def ensure_stdio() -> None:
    """Make sure fds 0, 1 and 2 are open (the kernel leaves them closed without /dev/console),
    so that no pipe the agent makes later lands on them."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = (
                os.open("/dev/null", os.O_RDWR) if os.path.exists("/dev/null") else os.open("/", os.O_RDONLY)
            )
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def mount_all(table: tuple[tuple[str, str, int, str], ...], *, strict: bool = True) -> None:
    """Mount each (target, fstype, flags, data) not mounted yet; ``strict``: errors raise."""
    for target, fstype, flags, data in table:
        try:
            os.mkdir(target, 0o755)
        except OSError:
            pass  # exists, or a read-only root that must already have it
        if os.path.ismount(target):
            continue
        try:
            linux.mount(fstype, target, fstype, flags, data or None)
        except OSError as exc:
            if strict:
                raise
            log.error(f"cannot mount {fstype} on {target}: {exc.strerror}")


def enable_cgroup_controllers(root: str) -> None:
    try:
        with open(f"{root}/cgroup.controllers", encoding="utf-8") as f:
            available = f.read().split()
    except OSError:
        return
    wanted = " ".join(f"+{c}" for c in CGROUP_CONTROLLERS if c in available)
    if wanted:
        try:
            fd = os.open(f"{root}/cgroup.subtree_control", os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, wanted.encode())
            finally:
                os.close(fd)
        except OSError as exc:
            log.error(f"cannot enable cgroup controllers {wanted}: {exc.strerror}")


def root_is_initramfs() -> bool:
    """True when / is the kernel's rootfs (an initramfs), which pivot_root cannot leave."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and fields[4] == "/":
                    tail = fields[fields.index("-") + 1 :] if "-" in fields else []
                    return bool(tail) and tail[0] == "rootfs"
    except OSError:
        pass
    return False


def leave_initramfs() -> None:
    """Make / a bind mount of the initramfs instead of the rootfs itself.

    pivot_root(2) refuses to move away from the rootfs (EINVAL), which every
    container needs. A bind mount of it, moved over / and chrooted into, has a
    parent mount, so containers can pivot_root as usual. Call it with nothing
    mounted yet (the bind is not recursive).
    """
    os.makedirs("/.hako-root", exist_ok=True)
    linux.mount("/", "/.hako-root", None, linux.MS_BIND)
    os.chdir("/.hako-root")
    linux.mount(".", "/", None, linux.MS_MOVE)
    os.chroot(".")
    os.chdir("/")


def parse_cmdline(text: str) -> dict[str, str]:
    """The kernel command line -> {key: value} ("quiet" -> {"quiet": ""})."""
    out: dict[str, str] = {}
    for word in text.split():
        key, _, value = word.partition("=")
        out[key] = value
    return out


def read_cmdline() -> dict[str, str]:
    try:
        with open("/proc/cmdline", encoding="utf-8", errors="replace") as f:
            return parse_cmdline(f.read())
    except OSError:
        return {}


def load_modules(path: str = MODULES_LOAD) -> None:
    """finit_module each .ko listed in ``path`` (absolute paths, in order); missing file: nothing."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return
    for line in lines:
        module = line.strip()
        if not module or module.startswith("#"):
            continue
        try:
            fd = os.open(module, os.O_RDONLY | os.O_CLOEXEC)
            try:
                linux.finit_module(fd)
            finally:
                os.close(fd)
            log.debug(f"loaded {module}")
        except OSError as exc:
            if exc.errno != 17:  # EEXIST: built in or loaded already
                log.error(f"cannot load module {module}: {exc.strerror}")


def virtio_ports() -> dict[str, str]:
    """{port name: /dev path} of the virtio-serial ports the kernel has set up."""
    ports: dict[str, str] = {}
    try:
        entries = os.listdir(VIRTIO_PORTS)
    except OSError:
        return ports
    for entry in entries:
        try:
            with open(f"{VIRTIO_PORTS}/{entry}/name", encoding="utf-8") as f:
                name = f.read().strip()
        except OSError:
            continue
        if name and os.path.exists(f"/dev/{entry}"):
            ports[name] = f"/dev/{entry}"
    return ports


def wait_for_port(name: str, timeout: float) -> dict[str, str]:
    """Virtio ports are announced by the host asynchronously: poll for ``name`` briefly."""
    deadline = time.monotonic() + timeout
    while True:
        ports = virtio_ports()
        if name in ports or time.monotonic() > deadline:
            return ports
        time.sleep(0.005)


def parse_kmsg(record: bytes) -> tuple[float, str] | None:
    """One /dev/kmsg record (``prio,seq,usec,flags;text``) -> (seconds, text)."""
    header, sep, text = record.partition(b";")
    if not sep:
        return None
    fields = header.split(b",")
    if len(fields) < 3:
        return None
    try:
        usec = int(fields[2])
    except ValueError:
        return None
    return usec / 1e6, text.split(b"\n", 1)[0].decode(errors="replace")


_cache: dict[str, float] = {}


def kernel_done_from(records: list[tuple[float, str]], marker: str, marker_boottime: float) -> float:
    """The kernel's "Run <init> as init process" time, in CLOCK_BOOTTIME seconds.

    printk stamps come from the scheduler clock, which is not CLOCK_BOOTTIME: under TCG
    they differ by a good part of a second (the TSC counts from the VM's start; jiffies
    lose ticks on a busy host). ``marker`` is a line the agent wrote to /dev/kmsg just
    before reading ``marker_boottime``: its stamp gives the offset between the two.
    0.0 if the kernel's line is gone; its raw stamp if the marker is.
    """
    done = offset = None
    for stamp, text in records:
        if done is None and text.startswith("Run ") and text.endswith(" as init process"):
            done = stamp
        elif text == marker:
            offset = stamp - marker_boottime
    if done is None:
        return 0.0
    return max(0.0, done - offset) if offset is not None else done


def _read_kmsg(fd: int) -> list[tuple[float, str]]:
    records: list[tuple[float, str]] = []
    while True:
        try:
            record = os.read(fd, 8192)
        except BlockingIOError:
            return records
        except BrokenPipeError:  # EPIPE: records overwritten under us; carry on
            continue
        if not record:
            return records
        parsed = parse_kmsg(record)
        if parsed is not None:
            records.append(parsed)


def kernel_done_time() -> float:
    """When the kernel started init, in CLOCK_BOOTTIME seconds (see :func:`kernel_done_from`)."""
    if "kernel_done" in _cache:
        return _cache["kernel_done"]
    try:
        fd = os.open("/dev/kmsg", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return 0.0
    try:
        marker = f"hako-agent: clock sync {time.monotonic_ns()}"
        try:
            os.write(fd, f"<7>{marker}\n".encode())
        except OSError:
            pass  # rate-limited: the raw printk time will do
        marker_boottime = boottime()
        done = kernel_done_from(_read_kmsg(fd), marker, marker_boottime)
    finally:
        os.close(fd)
    _cache["kernel_done"] = done
    return done


def loopback_up() -> None:
    """ip link set lo up, with the two ioctls it takes."""
    import fcntl
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = b"lo".ljust(16, b"\0") + bytes(24)
        flags = int.from_bytes(fcntl.ioctl(sock, linux.SIOCGIFFLAGS, request)[16:18], "little")
        flags |= 0x1 | 0x40  # IFF_UP | IFF_RUNNING
        fcntl.ioctl(sock, linux.SIOCSIFFLAGS, request[:16] + flags.to_bytes(2, "little") + bytes(22))


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo -> {field: bytes}."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return out


def memory_total() -> int:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            return parse_meminfo(f.read()).get("MemTotal", 0)
    except OSError:
        return 0


def cgroup_controllers(root: str = "/sys/fs/cgroup") -> list[str]:
    try:
        with open(f"{root}/cgroup.controllers", encoding="utf-8") as f:
            return f.read().split()
    except OSError:
        return []


def set_clock(unix_ns: int) -> None:
    time.clock_settime_ns(time.CLOCK_REALTIME, unix_ns)


def reseed_random(data: bytes) -> None:
    """Mix ``data`` into the kernel's pool, credit it, and reseed the CRNG now (VM clones
    must not share random state)."""
    import fcntl

    fd = os.open("/dev/random", os.O_WRONLY | os.O_CLOEXEC)
    try:
        if data:
            info = (len(data) * 8).to_bytes(4, "little") + len(data).to_bytes(4, "little") + data
            fcntl.ioctl(fd, linux.RNDADDENTROPY, info)
        fcntl.ioctl(fd, linux.RNDRESEEDCRNG, 0)
    finally:
        os.close(fd)


def power_off() -> None:
    """Reboot, which ends the VM: it runs with reboot=t and QEMU's -no-reboot."""
    os.sync()
    linux.reboot(linux.RB_AUTOBOOT)
