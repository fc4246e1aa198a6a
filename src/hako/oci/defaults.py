"""Defaults a container gets unless told otherwise, taken from Docker and ``runc spec``.

Sources: moby ``oci/caps/defaults.go`` (capabilities),
runc ``libcontainer/specconv/example.go`` (mounts, masked and read-only paths) and runc's
``AllowedDevices`` (the device rules Docker applies).
"""

from __future__ import annotations

from typing import Any

OCI_VERSION = "1.0.2"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CGROUPS_PARENT = "/hako"
CPU_PERIOD = 100_000  # microseconds, as Docker's --cpus uses
NOFILE_LIMIT = 1_048_576

# Docker's default capability set, in Docker's order.
CAPABILITIES = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
)

# Every capability Linux 6.1 knows, in number order (CAP_CHOWN is 0): for --cap-add ALL.
_CAPABILITY_NAMES = (
    "CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID KILL SETGID SETUID SETPCAP LINUX_IMMUTABLE "
    "NET_BIND_SERVICE NET_BROADCAST NET_ADMIN NET_RAW IPC_LOCK IPC_OWNER SYS_MODULE SYS_RAWIO "
    "SYS_CHROOT SYS_PTRACE SYS_PACCT SYS_ADMIN SYS_BOOT SYS_NICE SYS_RESOURCE SYS_TIME "
    "SYS_TTY_CONFIG MKNOD LEASE AUDIT_WRITE AUDIT_CONTROL SETFCAP MAC_OVERRIDE MAC_ADMIN SYSLOG "
    "WAKE_ALARM BLOCK_SUSPEND AUDIT_READ PERFMON BPF CHECKPOINT_RESTORE"
)
ALL_CAPABILITIES = tuple(f"CAP_{name}" for name in _CAPABILITY_NAMES.split())

# Network is left out on purpose: the whole VM is the network boundary, and the container shares
# the guest's network namespace (as Kata does).
# cgroup: the container sees its own cgroup as /sys/fs/cgroup (Docker's default on cgroup v2).
NAMESPACES = ("pid", "ipc", "uts", "mount", "cgroup")


def mounts() -> list[dict[str, Any]]:
    """runc's default mounts. The cgroup mount is written as ``runc spec`` writes it (type
    "cgroup"); on a cgroup v2 guest the agent mounts cgroup2 there, as runc does."""
    return [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
        },
        {
            "destination": "/dev/shm",
            "type": "tmpfs",
            "source": "shm",
            "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        },
        {
            "destination": "/dev/mqueue",
            "type": "mqueue",
            "source": "mqueue",
            "options": ["nosuid", "noexec", "nodev"],
        },
        {
            "destination": "/sys",
            "type": "sysfs",
            "source": "sysfs",
            "options": ["nosuid", "noexec", "nodev", "ro"],
        },
        {
            "destination": "/sys/fs/cgroup",
            "type": "cgroup",
            "source": "cgroup",
            "options": ["nosuid", "noexec", "nodev", "relatime", "ro"],
        },
    ]


MASKED_PATHS = (
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/sys/firmware",
    "/proc/scsi",
    "/sys/devices/virtual/tpm",
)

READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")


def device_rules() -> list[dict[str, Any]]:
    """Docker's device cgroup rules: deny all, then allow mknod of any, and the usual devices."""

    def allow(kind: str, major: int | None, minor: int | None, access: str = "rwm") -> dict[str, Any]:
        rule: dict[str, Any] = {"allow": True, "type": kind, "access": access}
        if major is not None:
            rule["major"] = major
        if minor is not None:
            rule["minor"] = minor
        return rule

    return [
        {"allow": False, "access": "rwm"},
        allow("c", None, None, "m"),
        allow("b", None, None, "m"),
        allow("c", 1, 3),  # /dev/null
        allow("c", 1, 8),  # /dev/random
        allow("c", 1, 7),  # /dev/full
        allow("c", 5, 0),  # /dev/tty
        allow("c", 1, 5),  # /dev/zero
        allow("c", 1, 9),  # /dev/urandom
        allow("c", 136, None),  # /dev/pts/*
        allow("c", 5, 2),  # /dev/ptmx
        allow("c", 10, 200),  # /dev/net/tun
    ]
