"""Applying layers: whiteouts, opaque directories, and refusing to write outside the rootfs."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from hako.errors import ImageError
from hako.image.layer import apply_layer

Entry = tuple[tarfile.TarInfo, bytes | None]


def _info(name: str, kind: bytes, mode: int, **fields: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.mtime = 1_600_000_000
    for key, value in fields.items():
        setattr(info, key, value)
    return info


def file(name: str, data: bytes = b"", mode: int = 0o644, **fields: object) -> Entry:
    return _info(name, tarfile.REGTYPE, mode, size=len(data), **fields), data


def directory(name: str, mode: int = 0o755, **fields: object) -> Entry:
    return _info(name, tarfile.DIRTYPE, mode, **fields), None


def symlink(name: str, target: str) -> Entry:
    return _info(name, tarfile.SYMTYPE, 0o777, linkname=target), None


def hardlink(name: str, target: str) -> Entry:
    return _info(name, tarfile.LNKTYPE, 0o644, linkname=target), None


def device(name: str, major: int, minor: int, mode: int = 0o666) -> Entry:
    return _info(name, tarfile.CHRTYPE, mode, devmajor=major, devminor=minor), None


def layer_tar(*entries: Entry) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def apply(root: Path, *entries: Entry, privileged: bool | None = None) -> None:
    with tarfile.open(fileobj=io.BytesIO(layer_tar(*entries)), mode="r|") as tar:
        apply_layer(tar, root, what="test layer", privileged=privileged)


def tree(root: Path) -> dict[str, str]:
    """Every path under ``root`` -> "dir", "link:<target>" or the file's text."""
    result = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            rel = str(path.relative_to(root))
            if path.is_symlink():
                result[rel] = f"link:{os.readlink(path)}"
            elif path.is_dir():
                result[rel] = "dir"
            else:
                result[rel] = path.read_text()
    return result


@pytest.fixture
def root(tmp_path: Path) -> Path:
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    return rootfs


def test_whiteouts_and_opaque_directories_across_three_layers(root: Path) -> None:
    apply(
        root,
        directory("etc"),
        file("etc/keep", b"base"),
        file("etc/gone", b"base"),
        directory("etc/sub"),
        file("etc/sub/lower", b"base"),
        directory("opt"),
        file("opt/lower1", b"base"),
        directory("opt/deep"),
        file("opt/deep/lower2", b"base"),
        directory("var"),
        file("var/log", b"base"),
    )
    apply(
        root,
        file("etc/.wh.gone"),
        file("etc/sub/.wh.lower"),
        file("etc/added", b"two"),
        # Opaque marker after this layer's own entries: they must survive it.
        file("opt/upper", b"two"),
        directory("opt/deep"),
        file("opt/deep/upper", b"two"),
        file("opt/.wh..wh..opq"),
        file(".wh.var"),
    )
    apply(
        root,
        # Opaque marker before this layer's entries.
        file("etc/.wh..wh..opq"),
        file("etc/third", b"three"),
        file("opt/.wh.upper"),
        directory("var"),
        file("var/new", b"three"),
    )
    assert tree(root) == {
        "etc": "dir",
        "etc/third": "three",
        "opt": "dir",
        "opt/deep": "dir",
        "opt/deep/upper": "two",
        "var": "dir",
        "var/new": "three",
    }


def test_opaque_directory_keeps_implicit_parents_of_this_layer(root: Path) -> None:
    apply(root, directory("d"), directory("d/sub"), file("d/sub/old", b"1"), file("d/other", b"1"))
    # No "d/sub/" entry in this layer: d/sub is created implicitly by d/sub/new.
    apply(root, file("d/sub/new", b"2"), file("d/.wh..wh..opq"))
    assert tree(root) == {"d": "dir", "d/sub": "dir", "d/sub/new": "2"}


def test_file_replaces_directory_and_directory_keeps_contents(root: Path) -> None:
    apply(root, directory("a"), file("a/x", b"1"), file("b", b"file"))
    apply(root, file("a", b"now a file"), directory("b"), file("b/y", b"2"))
    apply(root, directory("b", mode=0o700))
    assert tree(root) == {"a": "now a file", "b": "dir", "b/y": "2"}
    assert stat.S_IMODE(os.stat(root / "b").st_mode) == 0o700


def test_parent_dot_dot_escape_is_refused(root: Path) -> None:
    with pytest.raises(ImageError, match="outside the rootfs"):
        apply(root, file("../escaped", b"x"))
    with pytest.raises(ImageError, match="outside the rootfs"):
        apply(root, file("a/../../escaped", b"x"))
    assert not (root.parent / "escaped").exists()


def test_inner_dot_dot_stays_inside(root: Path) -> None:
    apply(root, directory("a"), file("a/../b", b"x"))
    assert (root / "b").read_text() == "x"


def test_absolute_member_name_lands_inside_rootfs(root: Path, tmp_path: Path) -> None:
    target = tmp_path / "host-etc" / "x"
    apply(root, file(str(target), b"inside"))
    assert not target.exists()
    assert (root / str(target).lstrip("/")).read_text() == "inside"


def test_symlink_parent_cannot_redirect_writes_out_of_rootfs(root: Path, tmp_path: Path) -> None:
    host_dir = tmp_path / "host"
    host_dir.mkdir()
    (host_dir / "passwd").write_text("host")
    # a -> /<tmp>/host (absolute) and r -> ../../../.. (relative, climbing): both resolve in the rootfs.
    apply(
        root,
        symlink("a", str(host_dir)),
        file("a/passwd", b"container"),
        symlink("r", "../../../../../.."),
        file("r/escaped", b"container"),
    )
    assert (host_dir / "passwd").read_text() == "host"
    assert (root / str(host_dir).lstrip("/") / "passwd").read_text() == "container"
    assert (root / "escaped").read_text() == "container"
    assert not (Path("/") / "escaped").exists()


def test_symlink_planted_by_an_earlier_layer_is_resolved_inside(root: Path, tmp_path: Path) -> None:
    host_dir = tmp_path / "host"
    host_dir.mkdir()
    apply(root, symlink("etc", str(host_dir)))
    apply(root, file("etc/passwd", b"container"))
    assert not (host_dir / "passwd").exists()
    assert (root / str(host_dir).lstrip("/") / "passwd").read_text() == "container"


def test_directory_replaced_by_symlink_in_the_same_layer(root: Path, tmp_path: Path) -> None:
    host_dir = tmp_path / "host"
    host_dir.mkdir()
    apply(root, directory("d"), file("d/one", b"1"), symlink("d", str(host_dir)), file("d/two", b"2"))
    assert os.listdir(host_dir) == []
    assert (root / str(host_dir).lstrip("/") / "two").read_text() == "2"


def test_symlink_targets_are_kept_verbatim(root: Path) -> None:
    apply(root, directory("bin"), file("bin/busybox", b"bb"), symlink("bin/sh", "/bin/busybox"))
    apply(root, symlink("bin/ls", "busybox"), symlink("dangling", "/no/such/thing"))
    assert os.readlink(root / "bin/sh") == "/bin/busybox"
    assert os.readlink(root / "bin/ls") == "busybox"
    assert os.readlink(root / "dangling") == "/no/such/thing"


def test_hardlink_escape_is_refused(root: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("host secret")
    with pytest.raises(ImageError, match="outside the rootfs"):
        apply(root, hardlink("stolen", "../secret"))
    # An absolute target names a file inside the rootfs: there is none, so it fails.
    with pytest.raises(ImageError, match="does not exist"):
        apply(root, hardlink("stolen", str(secret)))
    # Through a symlink pointing at the host directory: still resolved inside the rootfs.
    with pytest.raises(ImageError, match="does not exist"):
        apply(root, symlink("h", str(tmp_path)), hardlink("stolen", "h/secret"))
    assert not (root / "stolen").exists()
    assert os.stat(secret).st_nlink == 1


def test_hardlink_inside_rootfs_shares_the_inode(root: Path) -> None:
    apply(root, directory("bin"), file("bin/busybox", b"bb", mode=0o755))
    apply(root, hardlink("bin/sh", "bin/busybox"), hardlink("bin/ash", "/bin/busybox"))
    assert os.stat(root / "bin/sh").st_ino == os.stat(root / "bin/busybox").st_ino
    assert os.stat(root / "bin/ash").st_ino == os.stat(root / "bin/busybox").st_ino


def test_file_under_a_regular_file_is_an_error(root: Path) -> None:
    with pytest.raises(ImageError, match="not a directory"):
        apply(root, file("f", b"x"), file("f/g", b"y"))


def test_whiteout_of_the_rootfs_itself_is_refused(root: Path) -> None:
    with pytest.raises(ImageError, match="invalid whiteout"):
        apply(root, file(".wh.."))


def test_unprivileged_apply_skips_ownership_and_devices(root: Path) -> None:
    apply(
        root,
        directory("locked", mode=0o500),
        file("locked/setuid", b"x", mode=0o4755, uid=1234, gid=1234),
        device("null", 1, 3),
        privileged=False,
    )
    st = os.stat(root / "locked/setuid")
    assert stat.S_IMODE(st.st_mode) == 0o4755
    assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())
    assert not (root / "null").exists()
    # Directories stay writable for us, so later layers and removal work.
    assert stat.S_IMODE(os.stat(root / "locked").st_mode) == 0o700 | 0o500


def test_modes_and_mtimes_are_kept(root: Path) -> None:
    apply(root, directory("d", mode=0o750), file("d/f", b"x", mode=0o600), directory("t", mode=0o1777))
    assert stat.S_IMODE(os.stat(root / "d/f").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(root / "t").st_mode) == 0o1777
    assert os.stat(root / "d").st_mtime == 1_600_000_000
    assert os.stat(root / "d/f").st_mtime == 1_600_000_000


def test_whiteout_in_a_missing_directory_creates_nothing(root: Path) -> None:
    apply(root, file("nowhere/.wh.thing"), file(".wh.absent"))
    assert tree(root) == {}


def test_whiteout_does_not_follow_a_symlinked_parent_out(root: Path, tmp_path: Path) -> None:
    host_dir = tmp_path / "host"
    host_dir.mkdir()
    (host_dir / "victim").write_text("host")
    apply(root, symlink("s", str(host_dir)), file("s/.wh.victim"), file("s/.wh..wh..opq"))
    assert (host_dir / "victim").read_text() == "host"


def test_symlink_loop_is_an_error(root: Path) -> None:
    with pytest.raises(ImageError, match="too many levels of symbolic links"):
        apply(root, symlink("a", "b"), symlink("b", "/a"), file("a/x", b"x"))
