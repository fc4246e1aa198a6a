"""The OCI runtime spec, parsed and checked into plain typed objects (pure: no system calls).

Only the parts hako acts on are kept. Every error is an :class:`InvalidArgument`
whose message starts with the offending field (``process.args: ...``), so the
host can tell the user what to fix. The JSON module is imported here, after the
agent is serving, never at boot.
"""

from __future__ import annotations

import json

from hako_agent.errors import InvalidArgument
from hako_agent.linux import (
    CLONE_NEWCGROUP,
    CLONE_NEWIPC,
    CLONE_NEWNET,
    CLONE_NEWNS,
    CLONE_NEWPID,
    CLONE_NEWUTS,
    MS_BIND,
    MS_DIRSYNC,
    MS_LAZYTIME,
    MS_MANDLOCK,
    MS_NOATIME,
    MS_NODEV,
    MS_NODIRATIME,
    MS_NOEXEC,
    MS_NOSUID,
    MS_NOSYMFOLLOW,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    MS_RELATIME,
    MS_SHARED,
    MS_SILENT,
    MS_SLAVE,
    MS_STRICTATIME,
    MS_SYNCHRONOUS,
    MS_UNBINDABLE,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable

CAPABILITIES: dict[str, int] = {
    name: number
    for number, name in enumerate(
        (
            "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
            "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE",
            "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_IPC_OWNER",
            "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_SYS_PACCT",
            "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE", "CAP_SYS_RESOURCE", "CAP_SYS_TIME",
            "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE", "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL",
            "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM",
            "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
        )
    )
}  # fmt: skip
CAP_LAST = max(CAPABILITIES.values())

RLIMITS: dict[str, int] = {
    name: number
    for number, name in enumerate(
        (
            "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_DATA", "RLIMIT_STACK", "RLIMIT_CORE", "RLIMIT_RSS",
            "RLIMIT_NPROC", "RLIMIT_NOFILE", "RLIMIT_MEMLOCK", "RLIMIT_AS", "RLIMIT_LOCKS",
            "RLIMIT_SIGPENDING", "RLIMIT_MSGQUEUE", "RLIMIT_NICE", "RLIMIT_RTPRIO", "RLIMIT_RTTIME",
        )
    )
}  # fmt: skip
RLIM_INFINITY = -1  # what resource.setrlimit takes for "unlimited"

NAMESPACES: dict[str, int] = {
    "pid": CLONE_NEWPID,
    "network": CLONE_NEWNET,
    "mount": CLONE_NEWNS,
    "ipc": CLONE_NEWIPC,
    "uts": CLONE_NEWUTS,
    "cgroup": CLONE_NEWCGROUP,
}
# /proc/<pid>/ns/<file> for each namespace type, in the order an exec joins them
# (mount last: after it, /proc is the container's).
NS_FILES: dict[str, str] = {
    "cgroup": "cgroup", "ipc": "ipc", "uts": "uts", "network": "net", "pid": "pid", "mount": "mnt",
}  # fmt: skip

# mount(8) option -> (flag, set it?)
MOUNT_FLAGS: dict[str, tuple[int, bool]] = {
    "defaults": (0, False),
    "ro": (MS_RDONLY, True),
    "rw": (MS_RDONLY, False),
    "nosuid": (MS_NOSUID, True),
    "suid": (MS_NOSUID, False),
    "nodev": (MS_NODEV, True),
    "dev": (MS_NODEV, False),
    "noexec": (MS_NOEXEC, True),
    "exec": (MS_NOEXEC, False),
    "sync": (MS_SYNCHRONOUS, True),
    "async": (MS_SYNCHRONOUS, False),
    "dirsync": (MS_DIRSYNC, True),
    "mand": (MS_MANDLOCK, True),
    "nomand": (MS_MANDLOCK, False),
    "atime": (MS_NOATIME, False),
    "noatime": (MS_NOATIME, True),
    "diratime": (MS_NODIRATIME, False),
    "nodiratime": (MS_NODIRATIME, True),
    "relatime": (MS_RELATIME, True),
    "norelatime": (MS_RELATIME, False),
    "strictatime": (MS_STRICTATIME, True),
    "nostrictatime": (MS_STRICTATIME, False),
    "lazytime": (MS_LAZYTIME, True),
    "nolazytime": (MS_LAZYTIME, False),
    "symfollow": (MS_NOSYMFOLLOW, False),
    "nosymfollow": (MS_NOSYMFOLLOW, True),
    "silent": (MS_SILENT, True),
    "loud": (MS_SILENT, False),
    "bind": (MS_BIND, True),
    "rbind": (MS_BIND | MS_REC, True),
}
PROPAGATION: dict[str, int] = {
    "private": MS_PRIVATE,
    "rprivate": MS_PRIVATE | MS_REC,
    "shared": MS_SHARED,
    "rshared": MS_SHARED | MS_REC,
    "slave": MS_SLAVE,
    "rslave": MS_SLAVE | MS_REC,
    "unbindable": MS_UNBINDABLE,
    "runbindable": MS_UNBINDABLE | MS_REC,
}
# runc extensions that ask for nothing the kernel needs to see
_IGNORED_OPTIONS = frozenset({"tmpcopyup", "notmpcopyup"})

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


class MountOptions:
    """mount(8)-style options split into what mount(2) takes."""

    __slots__ = ("data", "flags", "propagation")

    def __init__(self, flags: int, data: str, propagation: list[int]) -> None:
        self.flags = flags  # MS_* flags, including MS_BIND|MS_REC for (r)bind
        self.data = data  # the filesystem's own options, e.g. "mode=755,size=65536k"
        self.propagation = propagation  # MS_PRIVATE etc., each applied by its own mount(2) call

    @property
    def bind(self) -> bool:
        return bool(self.flags & MS_BIND)

    def __repr__(self) -> str:
        return f"MountOptions(flags={self.flags:#x}, data={self.data!r}, propagation={self.propagation!r})"


def parse_mount_options(options: Iterable[str]) -> MountOptions:
    """``["nosuid", "mode=755", "rprivate"]`` -> MS_NOSUID, "mode=755", [MS_PRIVATE|MS_REC]."""
    flags = 0
    data: list[str] = []
    propagation: list[int] = []
    for option in options:
        if option in MOUNT_FLAGS:
            flag, set_it = MOUNT_FLAGS[option]
            flags = flags | flag if set_it else flags & ~flag
        elif option in PROPAGATION:
            propagation.append(PROPAGATION[option])
        elif option not in _IGNORED_OPTIONS and option:
            data.append(option)
    return MountOptions(flags, ",".join(data), propagation)


class User:
    __slots__ = ("additional_gids", "gid", "uid", "umask")

    def __init__(
        self, uid: int = 0, gid: int = 0, additional_gids: list[int] | None = None, umask: int | None = None
    ) -> None:
        self.uid = uid
        self.gid = gid
        self.additional_gids = additional_gids or []
        self.umask = umask


class Capabilities:
    """Capability sets as 64-bit masks (bit n = capability number n)."""

    __slots__ = ("ambient", "bounding", "effective", "inheritable", "permitted")

    def __init__(
        self,
        bounding: int = 0,
        effective: int = 0,
        inheritable: int = 0,
        permitted: int = 0,
        ambient: int = 0,
    ) -> None:
        self.bounding = bounding
        self.effective = effective
        self.inheritable = inheritable
        self.permitted = permitted
        self.ambient = ambient


class Rlimit:
    __slots__ = ("hard", "resource", "soft")

    def __init__(self, resource: int, soft: int, hard: int) -> None:
        self.resource = resource  # RLIMIT_* number
        self.soft = soft  # RLIM_INFINITY (-1) for unlimited
        self.hard = hard


class Process:
    __slots__ = ("args", "capabilities", "console_size", "cwd", "env", "no_new_privileges",
                 "oom_score_adj", "rlimits", "terminal", "user")  # fmt: skip

    def __init__(
        self,
        args: list[str],
        env: list[str],
        cwd: str = "/",
        terminal: bool = False,
        user: User | None = None,
        capabilities: Capabilities | None = None,
        rlimits: list[Rlimit] | None = None,
        no_new_privileges: bool = False,
        oom_score_adj: int | None = None,
        console_size: tuple[int, int] | None = None,
    ) -> None:
        self.args = args
        self.env = env
        self.cwd = cwd
        self.terminal = terminal
        self.user = user or User()
        self.capabilities = capabilities  # None: keep what the agent has (all)
        self.rlimits = rlimits or []
        self.no_new_privileges = no_new_privileges
        self.oom_score_adj = oom_score_adj
        self.console_size = console_size  # (rows, columns)

    def path_list(self) -> list[str]:
        """Where to look for args[0]: the PATH of the process's own environment."""
        path = DEFAULT_PATH
        for entry in self.env:
            if entry.startswith("PATH="):
                path = entry[5:]
        return [part or "." for part in path.split(":")]


class Mount:
    __slots__ = ("destination", "options", "raw_options", "source", "type")

    def __init__(self, destination: str, type: str, source: str, raw_options: list[str]) -> None:
        self.destination = destination
        self.type = type
        self.source = source
        self.raw_options = raw_options
        self.options = parse_mount_options(raw_options)


class Namespace:
    __slots__ = ("path", "type")

    def __init__(self, type: str, path: str = "") -> None:
        self.type = type
        self.path = path  # non-empty: join this namespace instead of making a new one


class Resources:
    """linux.resources; None means "leave as it is"."""

    __slots__ = ("cpu_cpus", "cpu_mems", "cpu_period", "cpu_quota", "cpu_shares", "memory_limit",
                 "memory_reservation", "memory_swap", "pids_limit", "unified")  # fmt: skip

    def __init__(self) -> None:
        self.memory_limit: int | None = None  # bytes; -1 unlimited
        self.memory_reservation: int | None = None
        self.memory_swap: int | None = None  # memory + swap, as OCI (and cgroup v1) count it
        self.cpu_shares: int | None = None
        self.cpu_quota: int | None = None  # microseconds per period; -1 unlimited
        self.cpu_period: int | None = None
        self.cpu_cpus: str | None = None
        self.cpu_mems: str | None = None
        self.pids_limit: int | None = None  # <= 0 unlimited
        self.unified: dict[str, str] = {}


class Spec:
    __slots__ = ("cgroups_path", "hostname", "masked_paths", "mounts", "namespaces", "process",
                 "readonly_paths", "resources", "root_path", "root_readonly", "rootfs_propagation",
                 "sysctl")  # fmt: skip

    def __init__(self, root_path: str, process: Process) -> None:
        self.root_path = root_path
        self.root_readonly = False
        self.process = process
        self.hostname = ""
        self.mounts: list[Mount] = []
        self.namespaces: list[Namespace] = []
        self.masked_paths: list[str] = []
        self.readonly_paths: list[str] = []
        self.cgroups_path = ""
        self.resources = Resources()
        self.rootfs_propagation = MS_SLAVE | MS_REC
        self.sysctl: dict[str, str] = {}

    def namespace(self, type: str) -> Namespace | None:
        for ns in self.namespaces:
            if ns.type == type:
                return ns
        return None


# -- parsing --------------------------------------------------------------------------------------


def check_id(value: str, field: str) -> str:
    """Container and exec ids end up in paths: keep them to [A-Za-z0-9_.-], no leading dot."""
    if not value:
        raise InvalidArgument(f"{field}: must not be empty")
    if len(value) > 256 or value[0] == "." or not _ID_CHARS.issuperset(value):
        raise InvalidArgument(f"{field}: {value!r} is not a valid id (letters, digits, '_', '.', '-')")
    return value


def load_json(raw: bytes | str, field: str) -> object:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"{field}: not valid JSON: {exc}") from None


def _obj(value: object, field: str) -> dict[str, object]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument(f"{field}: must be an object")
    return value


def _list(value: object, field: str) -> list[object]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidArgument(f"{field}: must be an array")
    return value


def _str(value: object, field: str, default: str = "") -> str:
    if value is None:
        return default
    if not isinstance(value, str):
        raise InvalidArgument(f"{field}: must be a string")
    if "\0" in value:
        raise InvalidArgument(f"{field}: must not contain NUL")
    return value


def _strs(value: object, field: str) -> list[str]:
    return [_str(item, f"{field}[{i}]") for i, item in enumerate(_list(value, field))]


def _int(
    value: object,
    field: str,
    default: int | None = None,
    minimum: int | None = None,
    maximum: int | None = None,
) -> int | None:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{field}: must be an integer")
    if minimum is not None and value < minimum:
        raise InvalidArgument(f"{field}: must be at least {minimum}")
    if maximum is not None and value > maximum:
        raise InvalidArgument(f"{field}: must be at most {maximum}")
    return value


def _bool(value: object, field: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidArgument(f"{field}: must be true or false")
    return value


def _abs_path(value: object, field: str) -> str:
    path = _str(value, field)
    if not path.startswith("/"):
        raise InvalidArgument(f"{field}: must be an absolute path, not {path!r}")
    return path


def cap_mask(names: Iterable[str], field: str) -> int:
    mask = 0
    for i, name in enumerate(names):
        number = CAPABILITIES.get(name.upper() if name.upper().startswith("CAP_") else f"CAP_{name.upper()}")
        if number is None:
            raise InvalidArgument(f"{field}[{i}]: unknown capability {name!r}")
        mask |= 1 << number
    return mask


def cap_names(mask: int) -> list[str]:
    return [name for name, number in CAPABILITIES.items() if mask >> number & 1]


def _rlimit_value(value: object, field: str) -> int:
    number = _int(value, field, minimum=0)
    assert number is not None
    return RLIM_INFINITY if number >= 1 << 63 else number


def parse_process(value: object, field: str = "process") -> Process:
    """An OCI process object (the spec's, or an exec's)."""
    raw = _obj(value, field)
    if not raw:
        raise InvalidArgument(f"{field}: missing")
    args = _strs(raw.get("args"), f"{field}.args")
    if not args or not args[0]:
        raise InvalidArgument(f"{field}.args: must name the program to run")
    env = _strs(raw.get("env"), f"{field}.env")
    for i, variable in enumerate(env):
        if "=" not in variable or variable.startswith("="):
            raise InvalidArgument(f"{field}.env[{i}]: {variable!r} is not NAME=value")
    cwd = _abs_path(raw.get("cwd", "/"), f"{field}.cwd")

    user_raw = _obj(raw.get("user"), f"{field}.user")
    uid = _int(user_raw.get("uid"), f"{field}.user.uid", 0, 0, 0xFFFFFFFE)
    gid = _int(user_raw.get("gid"), f"{field}.user.gid", 0, 0, 0xFFFFFFFE)
    groups = [
        _int(g, f"{field}.user.additionalGids[{i}]", 0, 0, 0xFFFFFFFE) or 0
        for i, g in enumerate(_list(user_raw.get("additionalGids"), f"{field}.user.additionalGids"))
    ]
    umask = _int(user_raw.get("umask"), f"{field}.user.umask", None, 0, 0o777)
    user = User(uid or 0, gid or 0, groups, umask)

    capabilities = None
    if raw.get("capabilities") is not None:
        caps = _obj(raw.get("capabilities"), f"{field}.capabilities")
        sets: dict[str, int] = {}
        for name in ("bounding", "effective", "inheritable", "permitted", "ambient"):
            sets[name] = cap_mask(
                _strs(caps.get(name), f"{field}.capabilities.{name}"), f"{field}.capabilities.{name}"
            )
        capabilities = Capabilities(**sets)

    rlimits = []
    for i, item in enumerate(_list(raw.get("rlimits"), f"{field}.rlimits")):
        where = f"{field}.rlimits[{i}]"
        entry = _obj(item, where)
        name = _str(entry.get("type"), f"{where}.type")
        if name not in RLIMITS:
            raise InvalidArgument(f"{where}.type: unknown rlimit {name!r}")
        soft = _rlimit_value(entry.get("soft"), f"{where}.soft")
        hard = _rlimit_value(entry.get("hard"), f"{where}.hard")
        if hard != RLIM_INFINITY and (soft == RLIM_INFINITY or soft > hard):
            raise InvalidArgument(f"{where}: soft limit exceeds hard limit")
        rlimits.append(Rlimit(RLIMITS[name], soft, hard))

    console_size = None
    if raw.get("consoleSize") is not None:
        size = _obj(raw.get("consoleSize"), f"{field}.consoleSize")
        rows = _int(size.get("height"), f"{field}.consoleSize.height", 0, 0, 0xFFFF) or 0
        cols = _int(size.get("width"), f"{field}.consoleSize.width", 0, 0, 0xFFFF) or 0
        console_size = (rows, cols)

    return Process(
        args=args,
        env=env,
        cwd=cwd,
        terminal=_bool(raw.get("terminal"), f"{field}.terminal"),
        user=user,
        capabilities=capabilities,
        rlimits=rlimits,
        no_new_privileges=_bool(raw.get("noNewPrivileges"), f"{field}.noNewPrivileges"),
        oom_score_adj=_int(raw.get("oomScoreAdj"), f"{field}.oomScoreAdj", None, -1000, 1000),
        console_size=console_size,
    )


def parse_resources(value: object, field: str = "linux.resources") -> Resources:
    raw = _obj(value, field)
    res = Resources()
    memory = _obj(raw.get("memory"), f"{field}.memory")
    res.memory_limit = _int(memory.get("limit"), f"{field}.memory.limit", None, -1)
    res.memory_reservation = _int(memory.get("reservation"), f"{field}.memory.reservation", None, -1)
    res.memory_swap = _int(memory.get("swap"), f"{field}.memory.swap", None, -1)
    cpu = _obj(raw.get("cpu"), f"{field}.cpu")
    res.cpu_shares = _int(cpu.get("shares"), f"{field}.cpu.shares", None, 0)
    res.cpu_quota = _int(cpu.get("quota"), f"{field}.cpu.quota", None, -1)
    res.cpu_period = _int(cpu.get("period"), f"{field}.cpu.period", None, 0)
    if res.cpu_period is not None and res.cpu_period and not 1000 <= res.cpu_period <= 1_000_000:
        raise InvalidArgument(f"{field}.cpu.period: must be between 1000 and 1000000 microseconds")
    if res.cpu_quota is not None and 0 <= res.cpu_quota < 1000:
        raise InvalidArgument(f"{field}.cpu.quota: must be -1 (unlimited) or at least 1000 microseconds")
    cpus = _str(cpu.get("cpus"), f"{field}.cpu.cpus")
    mems = _str(cpu.get("mems"), f"{field}.cpu.mems")
    res.cpu_cpus = cpus or None
    res.cpu_mems = mems or None
    pids = _obj(raw.get("pids"), f"{field}.pids")
    res.pids_limit = _int(pids.get("limit"), f"{field}.pids.limit")
    unified = _obj(raw.get("unified"), f"{field}.unified")
    for key, val in unified.items():
        if not key or "/" in key or key.startswith(".") or key.startswith("cgroup."):
            raise InvalidArgument(f"{field}.unified: {key!r} is not a controller file")
        res.unified[key] = _str(val, f"{field}.unified.{key}")
    return res


def parse_spec(raw: bytes | str) -> Spec:
    """CreateContainerRequest.oci_spec -> :class:`Spec`."""
    doc = _obj(load_json(raw, "oci_spec"), "oci_spec")
    root = _obj(doc.get("root"), "root")
    root_path = _abs_path(root.get("path"), "root.path")
    spec = Spec(root_path, parse_process(doc.get("process")))
    spec.root_readonly = _bool(root.get("readonly"), "root.readonly")
    spec.hostname = _str(doc.get("hostname"), "hostname")
    if len(spec.hostname.encode()) > 64:
        raise InvalidArgument("hostname: longer than 64 bytes")

    for i, item in enumerate(_list(doc.get("mounts"), "mounts")):
        where = f"mounts[{i}]"
        entry = _obj(item, where)
        mount = Mount(
            destination=_abs_path(entry.get("destination"), f"{where}.destination"),
            type=_str(entry.get("type"), f"{where}.type"),
            source=_str(entry.get("source"), f"{where}.source"),
            raw_options=_strs(entry.get("options"), f"{where}.options"),
        )
        if ".." in mount.destination.split("/"):
            raise InvalidArgument(f"{where}.destination: must not contain '..'")
        if mount.type == "bind" and not mount.options.bind:
            mount.options.flags |= MS_BIND  # type "bind" alone means a bind mount
        if not mount.type and not mount.options.bind:
            raise InvalidArgument(f"{where}.type: missing (and options do not ask for a bind mount)")
        if mount.options.bind and not mount.source.startswith("/"):
            raise InvalidArgument(f"{where}.source: a bind mount needs an absolute source path")
        spec.mounts.append(mount)

    linux = _obj(doc.get("linux"), "linux")
    seen: set[str] = set()
    for i, item in enumerate(_list(linux.get("namespaces"), "linux.namespaces")):
        where = f"linux.namespaces[{i}]"
        entry = _obj(item, where)
        ns_type = _str(entry.get("type"), f"{where}.type")
        if ns_type in ("user", "time"):
            raise InvalidArgument(f"{where}.type: {ns_type} namespaces are not supported")
        if ns_type not in NAMESPACES:
            raise InvalidArgument(f"{where}.type: unknown namespace {ns_type!r}")
        if ns_type in seen:
            raise InvalidArgument(f"{where}.type: {ns_type} listed twice")
        seen.add(ns_type)
        path = _str(entry.get("path"), f"{where}.path")
        if path and not path.startswith("/"):
            raise InvalidArgument(f"{where}.path: must be an absolute path")
        spec.namespaces.append(Namespace(ns_type, path))
    mnt = spec.namespace("mount")
    if mnt is None or mnt.path:
        raise InvalidArgument("linux.namespaces: a new mount namespace is required")
    uts = spec.namespace("uts")
    if spec.hostname and (uts is None or uts.path):
        raise InvalidArgument("hostname: setting it needs a new uts namespace")

    spec.masked_paths = [
        _abs_path(p, f"linux.maskedPaths[{i}]")
        for i, p in enumerate(_list(linux.get("maskedPaths"), "linux.maskedPaths"))
    ]
    spec.readonly_paths = [
        _abs_path(p, f"linux.readonlyPaths[{i}]")
        for i, p in enumerate(_list(linux.get("readonlyPaths"), "linux.readonlyPaths"))
    ]
    spec.cgroups_path = _str(linux.get("cgroupsPath"), "linux.cgroupsPath")
    spec.resources = parse_resources(linux.get("resources"))
    propagation = _str(linux.get("rootfsPropagation"), "linux.rootfsPropagation")
    if propagation:
        if propagation not in PROPAGATION:
            raise InvalidArgument(f"linux.rootfsPropagation: unknown propagation {propagation!r}")
        spec.rootfs_propagation = PROPAGATION[propagation]
    sysctl = _obj(linux.get("sysctl"), "linux.sysctl")
    for key, val in sysctl.items():
        if not key or "/" in key or ".." in key:
            raise InvalidArgument(f"linux.sysctl: {key!r} is not a sysctl name")
        spec.sysctl[key] = _str(val, f"linux.sysctl.{key}")
    return spec


def parse_exec_process(raw: bytes | str) -> Process:
    """ExecProcessRequest.process (an OCI process object as JSON)."""
    return parse_process(load_json(raw, "process"), "process")
