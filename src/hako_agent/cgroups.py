"""cgroup v2 in the guest: one cgroup per container, its limits, freezer and statistics.

The pure half (:func:`render_resources`, :func:`parse_keyed`, :func:`parse_max`,
:func:`cgroup_relpath`) turns OCI ``linux.resources`` into interface files and
reads them back; :class:`Cgroup` does the file I/O.
"""

from __future__ import annotations

import os
import time

from hako_agent.errors import FailedPrecondition, InvalidArgument

TYPE_CHECKING = False
if TYPE_CHECKING:
    from hako_agent.spec import Resources

DEFAULT_ROOT = "/sys/fs/cgroup"
CONTROLLERS = ("cpu", "memory", "pids")  # what the agent enables for containers


def is_cgroup2(root: str) -> bool:
    """True when ``root`` is the root (or a subtree) of a cgroup v2 hierarchy."""
    return os.path.exists(os.path.join(root, "cgroup.procs")) and os.path.exists(
        os.path.join(root, "cgroup.controllers")
    )


def cgroup_relpath(cgroups_path: str, container_id: str) -> str:
    """linux.cgroupsPath if it is an absolute path, else /hako/<id> (systemd "slice:prefix:name" too)."""
    if cgroups_path.startswith("/"):
        parts = [p for p in cgroups_path.split("/") if p]
        if parts and not any(p in (".", "..") for p in parts):
            return "/" + "/".join(parts)
        raise InvalidArgument(f"linux.cgroupsPath: {cgroups_path!r} is not a cgroup path")
    return f"/hako/{container_id}"


def _limit(value: int) -> str:
    return "max" if value < 0 else str(value)


def shares_to_weight(shares: int) -> int:
    """cgroup v1 cpu.shares (2..262144) -> v2 cpu.weight (1..10000), as runc converts it."""
    if shares <= 0:
        return 100
    return max(1, min(10000, 1 + ((shares - 2) * 9999) // 262142))


def render_resources(res: Resources) -> dict[str, str]:
    """OCI linux.resources -> {interface file: value}, in the order to write them."""
    files: dict[str, str] = {}
    if res.memory_limit:  # 0 means "not set", as in runc
        files["memory.max"] = _limit(res.memory_limit)
    if res.memory_reservation:
        files["memory.low"] = _limit(res.memory_reservation)
    if res.memory_swap:
        if res.memory_swap < 0:
            files["memory.swap.max"] = "max"
        elif res.memory_limit is None or res.memory_limit <= 0:
            raise InvalidArgument("linux.resources.memory.swap: needs memory.limit too")
        elif res.memory_swap < res.memory_limit:
            raise InvalidArgument("linux.resources.memory.swap: must not be below memory.limit")
        else:
            files["memory.swap.max"] = str(res.memory_swap - res.memory_limit)
    if res.cpu_shares:
        files["cpu.weight"] = str(shares_to_weight(res.cpu_shares))
    quota = res.cpu_quota or 0
    period = res.cpu_period or 0
    if quota or period:
        value = str(quota) if quota > 0 else "max"
        files["cpu.max"] = f"{value} {period}" if period else value
    if res.cpu_cpus:
        files["cpuset.cpus"] = res.cpu_cpus
    if res.cpu_mems:
        files["cpuset.mems"] = res.cpu_mems
    if res.pids_limit:
        files["pids.max"] = _limit(res.pids_limit)
    files.update(res.unified)
    return files


def parse_keyed(text: str) -> dict[str, int]:
    """A flat keyed file ("key value" lines: cpu.stat, memory.events) -> {key: value}."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        try:
            out[key] = int(value)
        except ValueError:
            continue
    return out


def parse_max(text: str) -> int:
    """ "max" -> 0 (unlimited), else the number."""
    text = text.strip()
    if not text or text == "max":
        return 0
    return int(text.split()[0])


class CgroupStats:
    __slots__ = ("cpu_system_usec", "cpu_usage_usec", "cpu_user_usec", "memory_limit", "memory_max_usage",
                 "memory_usage", "nr_throttled", "oom_kills", "pids_current", "pids_limit",
                 "throttled_usec")  # fmt: skip

    def __init__(self) -> None:
        self.memory_usage = 0
        self.memory_max_usage = 0
        self.memory_limit = 0
        self.oom_kills = 0
        self.cpu_usage_usec = 0
        self.cpu_user_usec = 0
        self.cpu_system_usec = 0
        self.nr_throttled = 0
        self.throttled_usec = 0
        self.pids_current = 0
        self.pids_limit = 0


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return None


def _write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


class Cgroup:
    """One cgroup v2 directory: ``root`` + ``relpath``."""

    def __init__(self, root: str, relpath: str) -> None:
        self.root = root
        self.relpath = relpath
        self.path = root + relpath

    def file(self, name: str) -> str:
        return f"{self.path}/{name}"

    def create(self, controllers: tuple[str, ...] = CONTROLLERS) -> None:
        """mkdir -p, enabling ``controllers`` (those available) in every ancestor on the way."""
        current = self.root
        for part in [p for p in self.relpath.split("/") if p]:
            self._enable(current, controllers)
            current = f"{current}/{part}"
            try:
                os.mkdir(current, 0o755)
            except FileExistsError:
                pass

    @staticmethod
    def _enable(path: str, controllers: tuple[str, ...]) -> None:
        available = (_read(f"{path}/cgroup.controllers") or "").split()
        enabled = (_read(f"{path}/cgroup.subtree_control") or "").split()
        wanted = [c for c in controllers if c in available and c not in enabled]
        if wanted:
            _write(f"{path}/cgroup.subtree_control", " ".join(f"+{c}" for c in wanted))

    def apply(self, files: dict[str, str]) -> None:
        for name, value in files.items():
            try:
                _write(self.file(name), value)
            except FileNotFoundError:
                raise InvalidArgument(
                    f"linux.resources: {name} is not available in this guest (controller not enabled)"
                ) from None
            except OSError as exc:
                raise InvalidArgument(
                    f"linux.resources: cannot set {name} to {value!r}: {exc.strerror}"
                ) from None

    def open_procs(self) -> int:
        """An fd on cgroup.procs: writing b"0" to it moves the writer in (used by forked children)."""
        return os.open(self.file("cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC)

    def procs(self) -> list[int]:
        text = _read(self.file("cgroup.procs"))
        return [int(line) for line in (text or "").split()]

    def freeze(self, frozen: bool, timeout: float = 5.0) -> None:
        """Write cgroup.freeze and wait until cgroup.events says it took effect."""
        if not os.path.exists(self.file("cgroup.freeze")):
            raise FailedPrecondition("the cgroup has no freezer (cgroup.freeze)")
        _write(self.file("cgroup.freeze"), "1" if frozen else "0")
        want = "frozen 1" if frozen else "frozen 0"
        deadline = time.monotonic() + timeout
        while want not in (_read(self.file("cgroup.events")) or want).splitlines():
            if time.monotonic() > deadline:
                raise FailedPrecondition(
                    f"cgroup {self.relpath}: not {'frozen' if frozen else 'thawed'} after {timeout:.0f}s"
                )
            time.sleep(0.002)

    def kill(self) -> bool:
        """SIGKILL every process in the cgroup (cgroup.kill, Linux 5.14+); False if unavailable."""
        try:
            _write(self.file("cgroup.kill"), "1")
        except FileNotFoundError:
            return False
        return True

    def stats(self) -> CgroupStats:
        out = CgroupStats()
        out.memory_usage = parse_max(_read(self.file("memory.current")) or "0")
        out.memory_max_usage = parse_max(_read(self.file("memory.peak")) or "0")
        out.memory_limit = parse_max(_read(self.file("memory.max")) or "max")
        out.oom_kills = parse_keyed(_read(self.file("memory.events")) or "").get("oom_kill", 0)
        cpu = parse_keyed(_read(self.file("cpu.stat")) or "")
        out.cpu_usage_usec = cpu.get("usage_usec", 0)
        out.cpu_user_usec = cpu.get("user_usec", 0)
        out.cpu_system_usec = cpu.get("system_usec", 0)
        out.nr_throttled = cpu.get("nr_throttled", 0)
        out.throttled_usec = cpu.get("throttled_usec", 0)
        out.pids_current = parse_max(_read(self.file("pids.current")) or "0")
        out.pids_limit = parse_max(_read(self.file("pids.max")) or "max")
        return out

    def remove(self, timeout: float = 2.0) -> None:
        """rmdir the cgroup, waiting out EBUSY while its last processes finish exiting."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError as exc:
                if exc.errno != 16 or time.monotonic() > deadline:  # EBUSY
                    raise
                time.sleep(0.005)
