"""Host-wide records of what sandboxes hold on the shared network: addresses and host ports.

Sandboxes of every run root (``$HAKO_RUN``) share one bridge, so their records live in one
place, ``/run/hako-net`` (or ``$HAKO_NET_STATE``), one file per address or port, written under
one lock. Each names its holder: the process that owns the sandbox (its daemon, or the
containerd shim), by pid and start time. A record whose holder has gone is stale: its sandbox
ended without saying so (a SIGKILL, a crash) and whatever it held is free again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from hako.runtime.state import process_start_ticks


def state_dir() -> Path:
    return Path(os.environ.get("HAKO_NET_STATE", "/run/hako-net"))


@dataclass(frozen=True)
class Holder:
    """The process that owns a sandbox, and the sandbox."""

    sandbox_id: str
    pid: int
    start_ticks: int | None

    @classmethod
    def this_process(cls, sandbox_id: str) -> Holder:
        return cls(sandbox_id, os.getpid(), process_start_ticks(os.getpid()))

    def alive(self) -> bool:
        return process_start_ticks(self.pid) == self.start_ticks


# A POSIX record lock excludes other processes only: the sandboxes a pool's keeper serves
# (hako.runtime.keeper) are threads of one process, and take turns on this first.
_THREADS = threading.Lock()


@contextlib.contextmanager
def locked() -> Iterator[Path]:
    """The records, one holder at a time (a POSIX record lock, which a forked child does not
    inherit, and between the threads of a process a lock of their own)."""
    directory = state_dir()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    with _THREADS, open(directory / "lock", "w") as lock:
        fcntl.lockf(lock, fcntl.LOCK_EX)
        yield directory


def read(path: Path) -> tuple[Holder, dict[str, object]] | None:
    """A record's holder and data (None if it is unreadable: treat it as free)."""
    try:
        data = json.loads(path.read_text())
        holder = Holder(str(data.pop("sandbox_id")), int(data.pop("pid")), data.pop("start_ticks"))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return holder, data


def write(path: Path, holder: Holder, **data: object) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps({**asdict(holder), **data}))
    os.replace(tmp, path)


def entries(kind: str) -> list[tuple[Path, Holder, dict[str, object]]]:
    """Every record of ``kind`` (a subdirectory) that can be read, with its holder."""
    directory = state_dir() / kind
    found = []
    for path in sorted(directory.glob("*")) if directory.is_dir() else []:
        if path.name.startswith("."):
            continue
        record = read(path)
        if record is None:
            path.unlink(missing_ok=True)
            continue
        found.append((path, *record))
    return found
