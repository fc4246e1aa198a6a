"""Debian packages as build inputs: resolve versions, `apt-get download` them, `dpkg-deb -x` them.

Nothing here installs a package on the host; the .deb files stay in ``<cache>/debs``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hako.errors import AssetError

from ._run import run

DPKG_STATUS = Path("/var/lib/dpkg/status")
INSTALLED_MEMO = ".installed-versions.json"  # in the cache root: see installed_version


@dataclass(frozen=True)
class Deb:
    package: str
    version: str
    path: Path


def installed_version(package: str, memo_dir: Path | None = None) -> str:
    """The version of ``package`` installed on the host, or AssetError.

    dpkg-query reads dpkg's whole status database, ~15 ms, and every `hako run` asks (the
    trimmed kernel is keyed by the installed kernel source). With ``memo_dir``, answers are
    kept there and reused while the database file is the same (its inode, size and mtime:
    dpkg replaces it on every change).
    """
    stamp = _status_stamp()
    memo_file = memo_dir / INSTALLED_MEMO if memo_dir is not None else None
    memo = _read_memo(memo_file, stamp)
    if package in memo:
        return memo[package]
    out = run(
        ["dpkg-query", "-W", "-f=${Status}\t${Version}", package], what=f"looking up the installed {package}"
    )
    status, _, version = out.partition("\t")
    if not status.endswith(" installed") or not version:
        raise AssetError(
            f"{package} is not installed on the host; install it with `apt-get install {package}`"
        )
    if memo_file is not None and stamp is not None:
        with contextlib.suppress(OSError):  # only a memo: a read-only cache does without
            memo_file.parent.mkdir(parents=True, exist_ok=True)
            temp = memo_file.with_name(f"{memo_file.name}.{os.getpid()}")
            temp.write_text(json.dumps({"status": stamp, "versions": {**memo, package: version}}))
            temp.replace(memo_file)
    return version


def _status_stamp() -> list[int] | None:
    try:
        st = DPKG_STATUS.stat()
    except OSError:
        return None
    return [st.st_ino, st.st_size, st.st_mtime_ns]


def _read_memo(memo_file: Path | None, stamp: list[int] | None) -> dict[str, str]:
    if memo_file is None or stamp is None:
        return {}
    try:
        data = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        return {}
    versions = data.get("versions") if isinstance(data, dict) and data.get("status") == stamp else None
    return {str(k): str(v) for k, v in versions.items()} if isinstance(versions, dict) else {}


def parse_policy(text: str) -> dict[str, str]:
    """{package: candidate version} from `apt-cache policy` output."""
    versions: dict[str, str] = {}
    package = None
    for line in text.splitlines():
        if line and not line[0].isspace() and line.endswith(":"):
            package = line[:-1].split(":")[0]
        elif package and line.strip().startswith("Candidate:"):
            cand = line.split(":", 1)[1].strip()
            if cand and cand != "(none)":
                versions[package] = cand
    return versions


def candidate_versions(packages: Sequence[str]) -> dict[str, str]:
    """{package: version apt would download now}, or AssetError naming the unknown packages."""
    out = run(["apt-cache", "policy", *packages], what="apt-cache policy")
    versions = parse_policy(out)
    missing = [p for p in packages if p not in versions]
    if missing:
        raise AssetError(
            f"no installable version of {', '.join(missing)} in the apt lists; "
            "run `apt-get update` (Debian 12 archive) and retry"
        )
    return versions


def parse_depends(text: str, prefix: str) -> str | None:
    """The first dependency starting with ``prefix`` in `apt-cache depends` output."""
    for line in text.splitlines():
        m = re.match(r"\s*\|?(?:Pre)?Depends:\s*(\S+)", line)
        if m and m.group(1).startswith(prefix):
            return m.group(1)
    return None


def resolve_metapackage(meta: str, prefix: str) -> str:
    """The concrete package ``meta`` depends on, e.g. linux-image-amd64 -> linux-image-6.1.0-N-amd64."""
    out = run(["apt-cache", "depends", meta], what=f"apt-cache depends {meta}")
    pkg = parse_depends(out, prefix)
    if pkg is None:
        raise AssetError(f"{meta} has no dependency named {prefix}*; run `apt-get update` and retry")
    return pkg


def deb_filename(package: str, version: str) -> str:
    """The glob apt-get download uses for this package's file (epoch colon is %3a-quoted)."""
    return f"{package}_{version.replace(':', '%3a')}_*.deb"


def fetch(packages: Sequence[str], debs_dir: Path, versions: dict[str, str] | None = None) -> list[Deb]:
    """The .deb of each package at its candidate (or given) version, downloading the missing ones."""
    versions = versions or candidate_versions(packages)
    debs_dir.mkdir(parents=True, exist_ok=True)
    found: dict[str, Path] = {}
    for pkg in packages:
        hits = sorted(debs_dir.glob(deb_filename(pkg, versions[pkg])))
        if hits:
            found[pkg] = hits[0]
    missing = [p for p in packages if p not in found]
    if missing:
        tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=debs_dir))
        try:
            run(
                ["apt-get", "download", "-q", *[f"{p}={versions[p]}" for p in missing]],
                what=f"apt-get download {' '.join(missing)}",
                cwd=tmp,
            )
            for pkg in missing:
                hits = sorted(tmp.glob(deb_filename(pkg, versions[pkg])))
                if not hits:
                    raise AssetError(f"apt-get download {pkg}={versions[pkg]} produced no .deb file")
                dest = debs_dir / hits[0].name
                hits[0].rename(dest)
                found[pkg] = dest
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return [Deb(p, versions[p], found[p]) for p in packages]


def extract(deb: Deb, dest: Path) -> None:
    """Unpack the files of ``deb`` under ``dest`` (no maintainer scripts run)."""
    dest.mkdir(parents=True, exist_ok=True)
    run(["dpkg-deb", "-x", deb.path, dest], what=f"dpkg-deb -x {deb.path.name}")
