"""Parsing of option values the way Docker spells them."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path
from typing import TYPE_CHECKING

from hako.errors import UsageError

if TYPE_CHECKING:
    from hako.oci.spec import Volume

MIN_MEMORY = 6 << 20  # Docker's minimum container memory limit

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([bkmgt]?)(?:i?b)?", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str, what: str = "--memory") -> int:
    """``512m``, ``1g``, ``1.5G``, ``1048576`` -> bytes (binary units, as Docker)."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise UsageError(f"invalid size {text!r} for {what}: use a number with an optional unit b, k, m or g")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def parse_memory(text: str, host_bytes: int | None = None) -> int:
    """``--memory``: at least Docker's minimum, and no more than the host has (``host_bytes``,
    default: its MemTotal): QEMU would fail to map the VM's RAM."""
    size = parse_size(text)
    if size < MIN_MEMORY:
        raise UsageError(f"--memory {text} is too small: the minimum is 6m")
    host = _host_memory() if host_bytes is None else host_bytes
    if host and size > host:
        raise UsageError(f"--memory {text} is more than this host's memory ({host / (1 << 30):.1f}g)")
    return size


def _host_memory() -> int | None:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) << 10
    except (OSError, ValueError, IndexError):
        pass
    return None


def parse_cpus(text: str, host_cpus: int | None = None) -> float:
    """``--cpus``: more than 0, and at most the host's CPUs (``host_cpus``, default: this host's),
    as Docker checks it."""
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"invalid --cpus {text!r}: give a number of CPUs such as 1 or 0.5") from None
    if value <= 0:
        raise UsageError(f"invalid --cpus {text!r}: it must be more than 0")
    available = host_cpus or os.cpu_count() or 1
    if value > available:
        raise UsageError(f"invalid --cpus {text!r}: this host has {available} CPUs")
    return value


def parse_volume(text: str) -> Volume:
    """``HOST:CTR`` or ``HOST:CTR:ro|rw``; both paths absolute."""
    from hako.oci.spec import Volume

    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise UsageError(f"invalid volume {text!r}: use HOST:CONTAINER[:ro]")
    host, container = parts[0], parts[1]
    mode = parts[2] if len(parts) == 3 else "rw"
    if mode not in ("ro", "rw"):
        raise UsageError(f"invalid volume mode {mode!r} in {text!r}: use ro or rw")
    if not host.startswith("/"):
        raise UsageError(f"invalid volume {text!r}: the host path must be absolute")
    if not container.startswith("/"):
        raise UsageError(f"invalid volume {text!r}: the container path must be absolute")
    return Volume(source=host, destination=container, read_only=mode == "ro")


def parse_signal(text: str) -> int:
    """``KILL``, ``SIGKILL``, ``kill`` or ``9``."""
    if text.isdigit():
        number = int(text)
        if 0 < number < signal.NSIG:
            return number
    else:
        name = text.upper()
        name = name if name.startswith("SIG") else f"SIG{name}"
        if hasattr(signal.Signals, name):
            return int(signal.Signals[name])
    raise UsageError(f"invalid signal {text!r}: use a name such as TERM or KILL, or a number")


def read_env_file(path: str) -> list[str]:
    """``--env-file``: ``K=V`` or ``K`` (taken from the host's environment) per line, as Docker
    reads it; blank lines and ``#`` comments are skipped."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--env-file {path}: {getattr(exc, 'strerror', None) or exc}") from exc
    items = []
    for number, line in enumerate(lines, 1):
        item = line.lstrip()
        if not item or item.startswith("#"):
            continue
        if item.startswith("=") or any(c.isspace() for c in item.split("=", 1)[0]):
            raise UsageError(f"--env-file {path}, line {number}: {line!r} is not K=V")
        items.append(item)
    return items


def no_new_privileges(options: list[str]) -> bool:
    """``--security-opt``: only ``no-new-privileges`` (``:true``/``:false``, ``=``) is known."""
    wanted = False
    for option in options:
        name, _, value = option.replace("=", ":", 1).partition(":")
        if name != "no-new-privileges" or value not in ("", "true", "false"):
            raise UsageError(f"--security-opt {option!r}: hako knows only no-new-privileges[:true|false]")
        wanted = value != "false"
    return wanted
