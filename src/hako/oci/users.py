"""Resolve a container user ("name|uid[:group|gid]") against the image's /etc/passwd and /etc/group.

Semantics follow runc (``libcontainer/user.GetExecUser``), which is what Docker users expect:
a numeric uid need not exist in passwd (its gid is then 0 and its home "/"); a name must; an
explicit group replaces the primary gid and suppresses supplementary groups; otherwise the user's
supplementary groups come from the group file's member lists. The files are read from the rootfs
with every symlink resolved inside it, never on the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hako.errors import ConfigError, ImageError
from hako.image.securejoin import read_file_in_root

MAX_ID = 2**31 - 1


@dataclass(frozen=True)
class ExecUser:
    uid: int
    gid: int
    additional_gids: tuple[int, ...] = ()
    home: str = "/"


@dataclass(frozen=True)
class _PasswdEntry:
    name: str
    uid: int
    gid: int
    home: str


@dataclass(frozen=True)
class _GroupEntry:
    name: str
    gid: int
    members: tuple[str, ...]


def _numeric(value: str) -> int | None:
    return int(value) if value.isascii() and value.isdigit() else None


def _check_id(value: int, what: str, spec: str) -> int:
    if value > MAX_ID:
        raise ConfigError(f"invalid user {spec!r}: {what} {value} is out of range (0-{MAX_ID})")
    return value


def _lines(rootfs: Path | None, path: str) -> list[list[str]] | None:
    if rootfs is None:
        return None
    try:
        data = read_file_in_root(rootfs, path)
    except ImageError as err:
        raise ConfigError(f"cannot read the image's {path}: {err}") from err
    if data is None:
        return None
    rows = []
    for raw in data.decode("utf-8", "replace").splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            rows.append(line.split(":"))
    return rows


def _passwd(rootfs: Path | None) -> list[_PasswdEntry] | None:
    rows = _lines(rootfs, "/etc/passwd")
    if rows is None:
        return None
    entries = []
    for row in rows:
        uid, gid = (_numeric(row[2]), _numeric(row[3])) if len(row) >= 4 else (None, None)
        if uid is not None and gid is not None:
            entries.append(_PasswdEntry(row[0], uid, gid, row[5] if len(row) >= 6 and row[5] else "/"))
    return entries


def _groups(rootfs: Path | None) -> list[_GroupEntry] | None:
    rows = _lines(rootfs, "/etc/group")
    if rows is None:
        return None
    entries = []
    for row in rows:
        gid = _numeric(row[2]) if len(row) >= 3 else None
        if gid is not None:
            members = tuple(m for m in row[3].split(",") if m) if len(row) >= 4 else ()
            entries.append(_GroupEntry(row[0], gid, members))
    return entries


def resolve_user(rootfs: Path | None, spec: str | None) -> ExecUser:
    """The uid, gid, supplementary gids and home for ``spec`` (empty: root) in ``rootfs``.

    ``rootfs=None`` means there is no image to look in: only numeric ids are accepted.
    """
    spec = (spec or "").strip()
    user_part, has_group, group_part = spec.partition(":")
    if has_group and not group_part:
        raise ConfigError(f"invalid user {spec!r}: expected USER[:GROUP] with a group after the colon")
    user_part = user_part or "0"
    passwd = _passwd(rootfs)
    uid_number = _numeric(user_part)
    entry = None
    if passwd is not None:
        if uid_number is None:
            entry = next((e for e in passwd if e.name == user_part), None)
        else:
            entry = next((e for e in passwd if e.uid == uid_number), None)
    if entry is None and uid_number is None:
        where = "no matching entries in passwd file" if passwd is not None else "the image has no /etc/passwd"
        raise ConfigError(f"unable to find user {user_part}: {where}")
    uid = _check_id(entry.uid if entry else uid_number or 0, "uid", spec)
    gid = entry.gid if entry else 0
    home = entry.home if entry else "/"

    groups = _groups(rootfs)
    additional: list[int] = []
    if has_group:
        gid_number = _numeric(group_part)
        if gid_number is not None:
            gid = gid_number
        else:
            group = next((g for g in groups or [] if g.name == group_part), None)
            if group is None:
                where = (
                    "no matching entries in group file"
                    if groups is not None
                    else "the image has no /etc/group"
                )
                raise ConfigError(f"unable to find group {group_part}: {where}")
            gid = group.gid
    elif entry is not None and groups:
        additional = [g.gid for g in groups if entry.name in g.members and g.gid != gid]
    return ExecUser(
        uid=uid,
        gid=_check_id(gid, "gid", spec),
        additional_gids=tuple(dict.fromkeys(additional)),
        home=home,
    )
