"""Sandbox state persisted as JSON under /run/hako/sandboxes/<id>/state.json.

The process that owns the sandbox (its daemon) is the only writer while it
lives; writes are atomic (write a temporary file, rename). Readers (``hako ps``,
``hako exec``...) never need the daemon. Liveness is judged by the daemon's pid
and start time, so a crashed daemon shows as dead rather than running.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from hako.errors import SandboxNotFound, UsageError
from hako.runtime import paths

STATE_FILE = "state.json"
SPEC_FILE = "config.json"  # the OCI spec its container runs (host paths), once `hako run` wrote it
# Held (flock) by the daemon serving the sandbox, in a daemon that serves several (a pool's
# keeper: hako.runtime.keeper), where the process outlives each of its sandboxes.
LIVE_LOCK = "daemon.lock"


class Status(str, Enum):
    CREATING = "creating"
    RUNNING = "running"
    EXITED = "exited"  # the container's main process ended
    DEAD = "dead"  # the VM died under it, or its daemon vanished
    POOLED = "pooled"  # a restored, paused VM in the warm pool, not yet a container's
    PAUSED = "paused"  # running, its VM paused (hako pause)

    def __str__(self) -> str:
        return self.value


@dataclass
class SandboxState:
    id: str
    name: str
    image: str
    command: list[str]
    created: float  # unix time
    kernel: str
    accel: str
    accel_reason: str
    memory_mib: int
    vcpus: int
    auto_remove: bool = False
    status: Status = Status.CREATING
    exit_status: int | None = None
    finished: float | None = None
    error: str | None = None
    daemon_pid: int | None = None
    daemon_start_ticks: int | None = None
    shared_daemon: bool = False  # its daemon serves other sandboxes too (a pool's keeper)
    qemu_pid: int | None = None
    guest_kernel_release: str | None = None
    template: str | None = None  # the key of the VM template it was restored from
    network: str | None = None  # its network's mode (hako.network.sandbox), once it has one
    address: str | None = None  # its address on the bridge network
    ports: list[str] = field(default_factory=list)  # published: HOST:CTR/PROTO
    timing: dict[str, float] = field(default_factory=dict)

    @property
    def short_id(self) -> str:
        return self.id[:12]

    @property
    def dir(self) -> Path:
        return paths.sandbox_dir(self.id)

    def save(self) -> None:
        target = self.dir / STATE_FILE
        tmp = target.with_name(f".{STATE_FILE}.{os.getpid()}")
        data = asdict(self)
        data["status"] = self.status.value
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, target)

    @classmethod
    def load(cls, directory: Path) -> SandboxState:
        data: dict[str, Any] = json.loads((directory / STATE_FILE).read_text())
        data["status"] = Status(data["status"])
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    def spec(self) -> dict[str, Any]:
        """The OCI spec its container runs. OSError or ValueError if it has none (yet)."""
        spec: dict[str, Any] = json.loads((self.dir / SPEC_FILE).read_text())
        return spec

    def daemon_alive(self) -> bool:
        """Whether a daemon serves the sandbox: its process runs, and, in a daemon that serves
        several, still serves this one (holds its :data:`LIVE_LOCK`)."""
        if self.daemon_pid is None or process_start_ticks(self.daemon_pid) != self.daemon_start_ticks:
            return False
        return not self.shared_daemon or live_lock_held(self.dir)

    def effective_status(self) -> Status:
        """The recorded status, corrected to DEAD if the daemon vanished without saying so."""
        live = (Status.CREATING, Status.RUNNING, Status.PAUSED, Status.POOLED)
        if self.status in live and not self.daemon_alive():
            return Status.DEAD
        return self.status


def process_start_ticks(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot (stable identity against pid reuse)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22, counted after the parenthesised command name (which may contain spaces).
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None  # a zombie has ended: it is only waiting to be reaped
    return int(fields[19])


def served_by(daemon_pid: int) -> int:
    """How many sandboxes the daemon ``daemon_pid`` serves (a pool's keeper serves several)."""
    return sum(1 for state in all_states() if state.daemon_pid == daemon_pid and state.daemon_alive()) or 1


def hold_live_lock(directory: Path) -> int:
    """Take the sandbox's :data:`LIVE_LOCK` for the daemon serving it; the descriptor to close
    when it stops serving (a lock of the open file, so no other thread or check releases it)."""
    fd = os.open(directory / LIVE_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise
    return fd


def live_lock_held(directory: Path) -> bool:
    try:
        fd = os.open(directory / LIVE_LOCK, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # (releases the shared lock, if it was taken)
    return False


def new_id() -> str:
    return secrets.token_hex(32)


_ADJECTIVES = [
    "brave",
    "calm",
    "eager",
    "fancy",
    "gentle",
    "happy",
    "jolly",
    "keen",
    "lucid",
    "merry",
    "nimble",
    "proud",
    "quiet",
    "swift",
    "tidy",
    "vivid",
    "wise",
]
_NOUNS = [
    "ant",
    "bee",
    "crane",
    "deer",
    "eagle",
    "finch",
    "gecko",
    "heron",
    "ibis",
    "koala",
    "lynx",
    "moth",
    "newt",
    "otter",
    "panda",
    "quail",
    "robin",
    "seal",
]


def random_name() -> str:
    return f"{secrets.choice(_ADJECTIVES)}_{secrets.choice(_NOUNS)}_{secrets.randbelow(1000)}"


def all_states() -> list[SandboxState]:
    root = paths.sandboxes_dir()
    states = []
    if root.is_dir():
        for entry in sorted(root.iterdir()):
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                states.append(SandboxState.load(entry))
    return sorted(states, key=lambda s: s.created)


def using(path: Path) -> list[SandboxState]:
    """Containers whose rootfs is under ``path`` (an image's directory in the store), as the
    spec in their run dir says; whatever their status."""
    users = []
    for state in all_states():
        try:
            root = Path(state.spec()["root"]["path"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if root == path or path in root.parents:
            users.append(state)
    return users


def find(ref: str) -> SandboxState:
    """A sandbox by name, full id or unique id prefix."""
    states = all_states()
    for state in states:
        if ref in (state.name, state.id):
            return state
    matches = [s for s in states if len(ref) >= 3 and s.id.startswith(ref)]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise UsageError(f"{ref!r} matches {len(matches)} containers: give more of the id or the name")
    raise SandboxNotFound(f"no such container: {ref}")


@contextlib.contextmanager
def creation_lock() -> Iterator[None]:
    """Serialises name checks and directory creation across processes."""
    root = paths.run_root()
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(root / "create.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def check_name_free(name: str, claimant: SandboxState | None = None) -> None:
    """UsageError if another sandbox has ``name`` (call it under :func:`creation_lock`)."""
    for other in all_states():
        if other.name == name and (claimant is None or other.id != claimant.id):
            raise UsageError(
                f'the name "{name}" is already in use by container {other.short_id}: '
                "remove it (hako rm) or choose another name"
            )


def reserve(state: SandboxState) -> None:
    """Create the sandbox's directory and first state file, refusing a name in use."""
    with creation_lock():
        check_name_free(state.name)
        state.dir.mkdir(parents=True, mode=0o700)
        state.save()


def age(seconds: float) -> str:
    """Docker's "2 minutes" style."""
    seconds = max(0.0, seconds)
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            count = int(seconds // size)
            return f"{count} {unit}{'s' if count > 1 else ''}"
    return f"{int(seconds)} second{'s' if int(seconds) != 1 else ''}"


def now() -> float:
    return time.time()


def remove_dead(state: SandboxState) -> None:
    """Clean up after a sandbox whose daemon is gone: kill its QEMU if it survived, drop the state."""
    if not state.daemon_alive():
        kill_vm(state)
    shutil.rmtree(state.dir, ignore_errors=True)


def kill_vm(state: SandboxState) -> None:
    """Kill the sandbox's QEMU, recognised by its ``-name hako-<id>`` (a reused pid is never
    killed)."""
    if state.qemu_pid:
        with contextlib.suppress(OSError):
            if f"hako-{state.short_id}".encode() in Path(f"/proc/{state.qemu_pid}/cmdline").read_bytes():
                os.kill(state.qemu_pid, signal.SIGKILL)
