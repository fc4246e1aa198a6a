"""Importing as root keeps what a rootfs needs: ownership, setuid/setgid bits, device nodes, xattrs."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tarfile
from pathlib import Path
from typing import Any

import pytest

from hako.image import mediatypes as mt
from hako.image.store import ImageStore

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
]

# A file capability (cap_net_bind_service+ep), as `setcap` writes it (VFS_CAP_REVISION_2).
NET_BIND_CAP = bytes.fromhex("01000002" + "00040000" + "00000000" + "00000000" + "00000000")


def _entry(
    name: str, kind: bytes, mode: int, data: bytes = b"", **fields: Any
) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    for key, value in fields.items():
        setattr(info, key, value)
    return info, data


def _layer() -> bytes:
    entries = [
        _entry("bin", tarfile.DIRTYPE, 0o755),
        _entry("bin/su", tarfile.REGTYPE, 0o4755, b"setuid root"),
        _entry("bin/wall", tarfile.REGTYPE, 0o2755, b"setgid tty", gid=5),
        _entry(
            "bin/ping",
            tarfile.REGTYPE,
            0o755,
            b"capable",
            pax_headers={"SCHILY.xattr.security.capability": NET_BIND_CAP.decode("latin-1")},
        ),
        _entry("home", tarfile.DIRTYPE, 0o755),
        _entry("home/app", tarfile.DIRTYPE, 0o700, uid=1000, gid=1000),
        _entry("home/app/notes", tarfile.REGTYPE, 0o600, b"mine", uid=1000, gid=1000),
        _entry("home/app/link", tarfile.SYMTYPE, 0o777, linkname="/etc/passwd", uid=1000, gid=1000),
        _entry("dev", tarfile.DIRTYPE, 0o755),
        _entry("dev/null", tarfile.CHRTYPE, 0o666, devmajor=1, devminor=3),
        _entry("dev/loop0", tarfile.BLKTYPE, 0o660, devmajor=7, devminor=0, gid=6),
        _entry("dev/initctl", tarfile.FIFOTYPE, 0o600),
        _entry(
            "tagged",
            tarfile.REGTYPE,
            0o644,
            b"x",
            pax_headers={"SCHILY.xattr.user.origin": "layer", "SCHILY.xattr.trusted.overlay.opaque": "y"},
        ),
    ]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buffer.getvalue()


def _write_layout(layout: Path, layer: bytes) -> None:
    def blob(data: bytes, media_type: str) -> dict[str, Any]:
        hexdigest = hashlib.sha256(data).hexdigest()
        path = layout / "blobs" / "sha256" / hexdigest
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return {"mediaType": media_type, "digest": f"sha256:{hexdigest}", "size": len(data)}

    config = {"architecture": "amd64", "os": "linux", "config": {"Cmd": ["sh"]}}
    manifest = {
        "schemaVersion": 2,
        "config": blob(json.dumps(config).encode(), mt.OCI_CONFIG),
        "layers": [blob(layer, mt.OCI_LAYER_TAR)],
    }
    index = {"schemaVersion": 2, "manifests": [blob(json.dumps(manifest).encode(), mt.OCI_MANIFEST)]}
    (layout / "index.json").write_text(json.dumps(index))


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    _write_layout(tmp_path / "layout", _layer())
    return ImageStore(tmp_path / "store").import_path(tmp_path / "layout").rootfs


def test_ownership_is_kept(rootfs: Path) -> None:
    for path in ("home/app", "home/app/notes"):
        st = os.lstat(rootfs / path)
        assert (st.st_uid, st.st_gid) == (1000, 1000), path
    link = os.lstat(rootfs / "home/app/link")
    assert (link.st_uid, link.st_gid) == (1000, 1000)
    assert os.readlink(rootfs / "home/app/link") == "/etc/passwd"


def test_setuid_and_setgid_bits_survive_chown(rootfs: Path) -> None:
    su = os.stat(rootfs / "bin/su")
    assert stat.S_IMODE(su.st_mode) == 0o4755
    assert su.st_uid == 0
    wall = os.stat(rootfs / "bin/wall")
    assert stat.S_IMODE(wall.st_mode) == 0o2755
    assert wall.st_gid == 5


def test_device_nodes_and_fifos(rootfs: Path) -> None:
    null = os.lstat(rootfs / "dev/null")
    assert stat.S_ISCHR(null.st_mode)
    assert (os.major(null.st_rdev), os.minor(null.st_rdev)) == (1, 3)
    assert stat.S_IMODE(null.st_mode) == 0o666
    loop = os.lstat(rootfs / "dev/loop0")
    assert stat.S_ISBLK(loop.st_mode)
    assert (os.major(loop.st_rdev), os.minor(loop.st_rdev), loop.st_gid) == (7, 0, 6)
    assert stat.S_ISFIFO(os.lstat(rootfs / "dev/initctl").st_mode)


def test_xattrs_are_kept_but_overlay_ones_refused(rootfs: Path) -> None:
    assert os.getxattr(rootfs / "tagged", "user.origin") == b"layer"
    assert "trusted.overlay.opaque" not in os.listxattr(rootfs / "tagged")
    # security.capability is set after chown and chmod, which would clear it.
    assert os.getxattr(rootfs / "bin/ping", "security.capability") == NET_BIND_CAP


def test_store_is_private(rootfs: Path) -> None:
    store_root = rootfs.parents[2]
    assert stat.S_IMODE(os.stat(store_root).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(store_root / "images").st_mode) == 0o700
