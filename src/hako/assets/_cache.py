"""The asset cache: where built assets live, how they are keyed and how they are put in place.

Layout (``$HAKO_CACHE``, default ``/var/cache/hako``)::

    debs/                       Debian packages fetched with `apt-get download`
    kernel/<key>/               one built kernel (trimmed or debian), info.json says which
    image/<key>/                one guest image
    <kind>/.tmp-<pid>-<rand>/   a build in progress; renamed to <key> when complete

An entry directory appears only complete: it is built under a temporary name in the same
directory and renamed into place, so a failed or interrupted build leaves no half-entry.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hako.errors import AssetError

DEFAULT_CACHE = Path("/var/cache/hako")
INFO = "info.json"


def cache_root() -> Path:
    """The cache directory: ``$HAKO_CACHE`` or ``/var/cache/hako``."""
    return Path(os.environ.get("HAKO_CACHE") or DEFAULT_CACHE)


def cache_key(*parts: str | bytes) -> str:
    """A short stable hash of ``parts`` (each length-prefixed, so ("ab", "c") != ("a", "bc"))."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:20]


def tree_digest(root: Path, names: list[str]) -> str:
    """sha256 over the relative paths and contents of ``names`` (relative to ``root``), sorted."""
    h = hashlib.sha256()
    for name in sorted(names):
        h.update(name.encode() + b"\0")
        h.update((root / name).read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def read_info(entry: Path) -> dict[str, Any] | None:
    """The entry's info.json, or None if the entry is missing or unreadable."""
    try:
        info = json.loads((entry / INFO).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def write_info(entry: Path, info: dict[str, Any]) -> None:
    (entry / INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(kind_dir: Path) -> None:
    """Remove ``.tmp-<pid>-*`` build directories whose builder process is gone."""
    if not kind_dir.is_dir():
        return
    for tmp in kind_dir.glob(".tmp-*"):
        try:
            pid = int(tmp.name.split("-")[1])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def new_entry(final: Path) -> Iterator[Path]:
    """Yield a temporary directory next to ``final``; on success rename it to ``final``.

    On any exception (including KeyboardInterrupt) the temporary directory is removed. If another
    builder completed ``final`` meanwhile, its entry is kept and ours is dropped.
    """
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(final.parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{os.getpid()}-", dir=final.parent))
    except OSError as e:
        raise AssetError(
            f"cannot create a build directory in {final.parent}: {e.strerror}; "
            "set HAKO_CACHE to a writable directory"
        ) from e
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, final)
        except OSError:
            if read_info(final) is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def newest_entry(kind_dir: Path, match: dict[str, Any]) -> Path | None:
    """The most recently built complete entry of ``kind_dir`` whose info.json contains ``match``."""
    best: tuple[float, Path] | None = None
    if not kind_dir.is_dir():
        return None
    for entry in kind_dir.iterdir():
        if entry.name.startswith("."):
            continue
        info = read_info(entry)
        if info is None or any(info.get(k) != v for k, v in match.items()):
            continue
        built = float(info.get("built_at", 0))
        if best is None or built > best[0]:
            best = (built, entry)
    return best[1] if best else None


def prune(kind_dir: Path, group: dict[str, Any], keep: int) -> None:
    """Delete all but the ``keep`` newest entries whose info.json contains ``group``.

    A VM still running from a deleted image is unaffected: QEMU has read the initramfs or holds the
    erofs file open.
    """
    entries = []
    for entry in kind_dir.iterdir() if kind_dir.is_dir() else ():
        info = read_info(entry) if not entry.name.startswith(".") else None
        if info is not None and all(info.get(k) == v for k, v in group.items()):
            entries.append((float(info.get("built_at", 0)), entry))
    for _built, entry in sorted(entries, reverse=True)[keep:]:
        shutil.rmtree(entry, ignore_errors=True)
