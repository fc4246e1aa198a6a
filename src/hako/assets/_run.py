"""Running host tools (apt-get, dpkg-deb, make, mkfs.erofs, ...) with errors translated to AssetError."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from hako.errors import AssetError

# The Debian package that provides each host tool, for the "install it" hint.
TOOL_PACKAGES = {
    "apt-get": "apt",
    "apt-cache": "apt",
    "dpkg-deb": "dpkg",
    "dpkg-query": "dpkg",
    "depmod": "kmod",
    "make": "make",
    "gcc": "gcc",
    "tar": "tar",
    "xz": "xz-utils",
    "lz4": "lz4",
    "mkfs.erofs": "erofs-utils",
    "python3.11": "python3.11",
    "flex": "flex",
    "bison": "bison",
    "bc": "bc",
}


def need_tool(name: str) -> str:
    """The path of host tool ``name``, or AssetError saying which package to install."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        pkg = TOOL_PACKAGES.get(name, name)
        raise AssetError(f"{name} not found on the host; install it with `apt-get install {pkg}`")
    return path


def run(
    argv: Sequence[str | Path],
    *,
    what: str,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    input: bytes | None = None,
) -> str:
    """Run ``argv`` and return its stdout; on failure AssetError("<what> failed: <last stderr line>")."""
    args = [str(a) for a in argv]
    args[0] = need_tool(args[0]) if "/" not in args[0] else args[0]
    try:
        proc = subprocess.run(args, cwd=cwd, env=env, input=input, capture_output=True, check=False)
    except OSError as e:
        raise AssetError(f"{what} failed: cannot run {args[0]}: {e.strerror}") from e
    if proc.returncode != 0:
        raise AssetError(f"{what} failed (exit {proc.returncode}): {last_line(proc.stderr or proc.stdout)}")
    return proc.stdout.decode(errors="replace")


def last_line(output: bytes | str) -> str:
    """The last non-empty line of ``output`` that is not an apt warning, for one-line messages."""
    text = output.decode(errors="replace") if isinstance(output, bytes) else output
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("W: ")]
    return lines[-1] if lines else "no output"
