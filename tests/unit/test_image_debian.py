"""Debian-package images without the network: the dependency walk, the library check, the layer."""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import struct
import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from hako.cli import info
from hako.errors import ImageError
from hako.image.busybox import GROUP, MTIME, PASSWD, Layer, write_layer
from hako.image.debian import (
    INDEX_HTML,
    NGINX,
    add_preset_files,
    add_tree,
    check_libraries,
    download_error,
    library_closure,
    parse_depends,
    parse_sections,
)

# -- choosing packages ------------------------------------------------------------------------

# As `apt-cache depends --no-recommends ...` prints it (nginx and iperf3 from bookworm, plus a
# virtual package without providers and a Pre-Depends).
APT_DEPENDS = """\
nginx
  Depends: libc6
  Depends: libssl3
  Depends: zlib1g
  Depends: iproute2
  Depends: nginx-common
  Depends: nginx-common
iperf3
  PreDepends: init-system-helpers
  Depends: debconf
  Depends: adduser
  Depends: libiperf0
 |Depends: debconf
  Depends: <debconf-2.0>
    cdebconf
    debconf
virtual-first
  Depends: <mail-transport-agent>
    exim4-daemon-light
    postfix
 |Depends: <no-provider>
  Depends: libreal1
  PreDepends: libpre1
"""


def test_parse_depends_takes_the_first_alternative_and_a_virtual_packages_first_provider() -> None:
    assert parse_depends(APT_DEPENDS) == {
        "nginx": ["libc6", "libssl3", "zlib1g", "iproute2", "nginx-common", "nginx-common"],
        "iperf3": ["init-system-helpers", "debconf", "adduser", "libiperf0", "debconf"],
        "virtual-first": ["exim4-daemon-light", "libreal1", "libpre1"],
    }


def test_parse_sections() -> None:
    text = (
        "Package: zlib1g\nVersion: 1:1.2.13\nSection: libs\nDescription: compression\n continued: line\n\n"
        "Package: debconf\nSection: admin\n\nPackage: libfoo1\nSection: non-free/libs\n\n"
    )
    assert parse_sections(text) == {"zlib1g": "libs", "debconf": "admin", "libfoo1": "non-free/libs"}


class FakeIndex:
    """A package graph standing in for apt; records what the walk asked about."""

    def __init__(self, graph: Mapping[str, tuple[str, Sequence[str]]]) -> None:
        self.graph = graph  # package: (section, dependencies)
        self.asked: list[str] = []

    def depends(self, packages: Sequence[str]) -> dict[str, list[str]]:
        self.asked.extend(packages)
        return {p: list(self.graph[p][1]) for p in packages if p in self.graph}

    def sections(self, packages: Sequence[str]) -> dict[str, str]:
        return {p: self.graph[p][0] for p in packages if p in self.graph}


GRAPH: dict[str, tuple[str, Sequence[str]]] = {
    "app": ("utils", ["libfoo1", "zlib1g", "debconf", "adduser", "app-data"]),
    "app-data": ("misc", []),
    "app-tools": ("utils", ["python3", "libbar2"]),
    "libfoo1": ("libs", ["libc6", "libfoo-common"]),
    "libfoo-common": ("libs", []),
    "libbar2": ("libs", ["libc6"]),
    "libc6": ("libs", ["libgcc-s1"]),
    "libgcc-s1": ("libs", ["libc6"]),
    "zlib1g": ("libs", ["libc6"]),
    "debconf": ("admin", ["perl-base", "libdebconfclient0"]),
    "libdebconfclient0": ("libs", ["libc6"]),
    "adduser": ("admin", ["passwd"]),
    "passwd": ("admin", ["libpam0g"]),
    "libpam0g": ("libs", ["libc6"]),
    "perl-base": ("perl", []),
    "python3": ("python", ["libpython3.11-stdlib"]),
    "libpython3.11-stdlib": ("python", ["libc6"]),
}


def test_closure_keeps_library_packages_and_walks_only_through_them() -> None:
    index = FakeIndex(GRAPH)
    closure = library_closure(["app"], index)
    # zlib1g is a library by its section, not its name; libfoo-common is library data.
    assert closure == ["app", "libc6", "libfoo-common", "libfoo1", "libgcc-s1", "zlib1g"]
    # What maintainer scripts use is never walked, so neither are its libraries (libpam0g).
    assert not {"debconf", "adduser", "passwd", "app-data"} & set(index.asked)


def test_closure_keeps_every_package_asked_for() -> None:
    closure = library_closure(["app", "app-tools"], FakeIndex(GRAPH))
    assert {"app-tools", "libbar2"} <= set(closure)
    assert "python3" not in closure
    assert "libpython3.11-stdlib" not in closure  # a "lib" name, but not in section libs


def test_closure_names_packages_apt_does_not_know() -> None:
    with pytest.raises(ImageError, match=r"package nosuchpkg not found .*apt-get update"):
        library_closure(["app", "nosuchpkg"], FakeIndex(GRAPH))


def test_download_error_names_the_package_and_suggests_apt_get_update() -> None:
    message = download_error(["nginx", "nosuchpkg"], "W: sandbox\nE: Unable to locate package nosuchpkg\n")
    assert message.startswith("cannot download nosuchpkg with apt-get: Unable to locate package nosuchpkg;")
    assert "apt-get update" in message
    fetch = (
        "E: Failed to fetch http://deb.debian.org/debian/pool/main/n/nginx/"
        "nginx-common_1.22.1-9_all.deb  404  Not Found\n"
    )
    assert download_error(["nginx", "nginx-common"], fetch).startswith("cannot download nginx-common with")
    # Nothing named: every package asked for.
    assert download_error(["a", "b"], "E: Temporary failure resolving 'deb.debian.org'").startswith(
        "cannot download a, b with"
    )


# -- the library check ------------------------------------------------------------------------

PT_LOAD, PT_DYNAMIC, PT_INTERP = 1, 2, 3
DT_NEEDED, DT_STRTAB, DT_RUNPATH = 1, 5, 29
INTERPRETER = "/lib64/ld-linux-x86-64.so.2"


def fake_elf(
    needed: Sequence[str] = (), *, interpreter: str | None = None, runpath: str | None = None
) -> bytes:
    """A minimal ELF64 LE file: one PT_LOAD mapping the whole file at address 0, PT_DYNAMIC with
    DT_NEEDED (and DT_RUNPATH) entries, and PT_INTERP if an interpreter is given."""
    strtab = b"\0"
    offsets = []
    for name in [*needed, *([runpath] if runpath else [])]:
        offsets.append(len(strtab))
        strtab += name.encode() + b"\0"
    interp = interpreter.encode() + b"\0" if interpreter else b""
    phnum = 3 if interpreter else 2
    strtab_at = 64 + 56 * phnum
    interp_at = strtab_at + len(strtab)
    dynamic_at = interp_at + len(interp)
    entries = [(DT_NEEDED, off) for off in offsets[: len(needed)]]
    if runpath:
        entries.append((DT_RUNPATH, offsets[-1]))
    entries += [(DT_STRTAB, strtab_at), (0, 0)]
    dynamic = b"".join(struct.pack("<qQ", tag, value) for tag, value in entries)
    size = dynamic_at + len(dynamic)
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header = ident + struct.pack("<HHIQQQIHHHHHH", 3, 62, 1, 0, 64, 0, 0, 64, 56, phnum, 64, 0, 0)
    programs = [(PT_LOAD, 0, size), (PT_DYNAMIC, dynamic_at, len(dynamic))]
    if interpreter:
        programs.append((PT_INTERP, interp_at, len(interp)))
    headers = b"".join(struct.pack("<IIQQQQQQ", kind, 4, at, at, at, n, n, 8) for kind, at, n in programs)
    return header + headers + strtab + interp + dynamic


def _put(root: Path, path: str, data: bytes = b"", *, link: str | None = None) -> None:
    target = root / path
    target.parent.mkdir(parents=True, exist_ok=True)
    if link is not None:
        target.symlink_to(link)
    else:
        target.write_bytes(data)


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    """A layer whose program finds every library: through a relative symlink, an absolute one
    (resolved in the image, not on the host), and its $ORIGIN-relative DT_RUNPATH."""
    root = tmp_path / "root"
    _put(root, "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", fake_elf())
    _put(root, "lib64/ld-linux-x86-64.so.2", link="/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
    _put(root, "lib/x86_64-linux-gnu/libc.so.6", fake_elf(interpreter=INTERPRETER))
    _put(root, "usr/lib/x86_64-linux-gnu/libfoo.so.1.2.3", fake_elf(["libc.so.6"]))
    _put(root, "usr/lib/x86_64-linux-gnu/libfoo.so.1", link="libfoo.so.1.2.3")
    _put(root, "usr/lib/x86_64-linux-gnu/app/libprivate.so", fake_elf(["libc.so.6"]))
    program = fake_elf(
        ["libfoo.so.1", "libprivate.so", "libc.so.6"],
        interpreter=INTERPRETER,
        runpath="$ORIGIN/../lib/x86_64-linux-gnu/app",
    )
    _put(root, "usr/bin/prog", program)
    _put(root, "usr/bin/script", b"#!/bin/sh\nexit 0\n")  # not ELF: not checked
    return root


def test_every_library_found_passes(rootfs: Path) -> None:
    check_libraries(rootfs)


def test_a_missing_library_names_the_binary_and_the_library(rootfs: Path) -> None:
    _put(rootfs, "usr/sbin/daemon", fake_elf(["libc.so.6", "libmissing.so.2"], interpreter=INTERPRETER))
    with pytest.raises(
        ImageError, match=r"^/usr/sbin/daemon needs libmissing\.so\.2, which is not in the image"
    ):
        check_libraries(rootfs)


def test_a_shared_library_is_checked_too(rootfs: Path) -> None:
    _put(rootfs, "usr/lib/x86_64-linux-gnu/libplugin.so", fake_elf(["libgone.so.7"]))
    with pytest.raises(ImageError, match=r"/usr/lib/x86_64-linux-gnu/libplugin\.so needs libgone\.so\.7"):
        check_libraries(rootfs)


def test_a_library_on_the_host_does_not_count(rootfs: Path) -> None:
    """An absolute symlink means the image's file, never the host's."""
    libc = rootfs / "lib/x86_64-linux-gnu/libc.so.6"
    libc.unlink()
    libc.symlink_to("/usr/lib/x86_64-linux-gnu/libc.so.6")  # exists on a Debian host, not in the image
    with pytest.raises(ImageError, match=r"needs libc\.so\.6, which is not in the image"):
        check_libraries(rootfs)


def test_runpath_is_relative_to_the_object(rootfs: Path) -> None:
    (rootfs / "usr/bin/prog").rename(rootfs / "prog")  # $ORIGIN/../lib/... now leads nowhere
    with pytest.raises(ImageError, match=r"^/prog needs libprivate\.so"):
        check_libraries(rootfs)


def test_a_missing_interpreter_is_named(rootfs: Path) -> None:
    (rootfs / "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2").unlink()
    with pytest.raises(ImageError, match=r"needs the ELF interpreter /lib64/ld-linux-x86-64\.so\.2"):
        check_libraries(rootfs)


def test_an_elf_file_it_cannot_read_is_an_error(rootfs: Path) -> None:
    _put(rootfs, "usr/lib/i386-linux-gnu/libold.so.1", b"\x7fELF\x01\x01\x01" + bytes(60))
    with pytest.raises(
        ImageError, match=r"^/usr/lib/i386-linux-gnu/libold\.so\.1: cannot read its ELF headers"
    ):
        check_libraries(rootfs)
    (rootfs / "usr/lib/i386-linux-gnu/libold.so.1").write_bytes(b"\x7fELF")  # truncated
    with pytest.raises(ImageError, match=r"cannot read its ELF headers"):
        check_libraries(rootfs)


# -- the layer --------------------------------------------------------------------------------


def _tree(root: Path, stamp: int) -> None:
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/tool").write_bytes(b"tool")
    (root / "usr/bin/tool").chmod(0o4755)
    (root / "usr/bin/alias").symlink_to("tool")
    os.link(root / "usr/bin/tool", root / "usr/bin/same")
    (root / "var/cache").mkdir(parents=True)
    (root / "var/cache").chmod(0o700)
    (root / "etc").mkdir()
    (root / "etc/conf").write_text("x = 1\n")
    for path in [*root.rglob("*"), root]:
        os.utime(path, (stamp, stamp), follow_symlinks=False)


def _tree_layer(tmp_path: Path, stamp: int) -> Layer:
    root = tmp_path / f"root{stamp}"
    _tree(root, stamp)
    return write_layer(tmp_path / f"layer{stamp}.tar.gz", "test", lambda tar: add_tree(tar, root))


def test_tree_layer_is_reproducible_and_keeps_modes_and_links(tmp_path: Path) -> None:
    # The same tree with other times (and inodes) gives the same layer.
    first, second = _tree_layer(tmp_path, 1_000_000), _tree_layer(tmp_path, 2_000_000)
    assert (first.digest, first.diff_id) == (second.digest, second.diff_id)
    data = first.path.read_bytes()
    assert first.digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert first.diff_id == "sha256:" + hashlib.sha256(gzip.decompress(data)).hexdigest()
    with tarfile.open(first.path) as tar:
        members = {m.name: m for m in tar.getmembers()}
        names = [m.name for m in tar.getmembers()]
    assert names == sorted(names)
    assert {(m.uid, m.gid, m.uname, m.gname, m.mtime) for m in members.values()} == {
        (0, 0, "root", "root", MTIME)
    }
    assert members["usr/bin/same"].mode == 0o4755
    assert members["var/cache"].mode == 0o700
    assert members["usr/bin/alias"].issym() and members["usr/bin/alias"].linkname == "tool"
    # A hard link: the first name in order is the file, the next a link to it.
    assert members["usr/bin/tool"].islnk() and members["usr/bin/tool"].linkname == "usr/bin/same"


def test_nginx_preset_files(tmp_path: Path) -> None:
    add_preset_files(NGINX, tmp_path)
    conf = (tmp_path / "etc/nginx/nginx.conf").read_text()
    for directive in (
        "daemon off;",
        "worker_processes 1;",
        "user www-data www-data;",
        "pid /run/nginx.pid;",
        "error_log stderr;",
        "include mime.types;",
        "access_log off;",
        "keepalive_requests 100000;",
        "listen 80 default_server;",
        "listen [::]:80 default_server;",
        "root /var/www/html;",
    ):
        assert directive in conf
    passwd = (tmp_path / "etc/passwd").read_text()
    assert passwd.startswith(PASSWD)
    assert "\nwww-data:x:33:33:" in passwd
    assert (tmp_path / "etc/group").read_text() == GROUP + "www-data:x:33:\n"
    assert (tmp_path / "var/www/html/index.html").read_text() == INDEX_HTML
    assert 580 <= len(INDEX_HTML.encode()) <= 650  # the size of Debian's default page, 615 bytes
    for directory in ("var/lib/nginx/body", "var/lib/nginx/scgi", "var/log/nginx", "run"):
        assert (tmp_path / directory).is_dir()


# -- the command line -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["nginx", "fio", "iperf3"])
def test_image_command_builds_and_prints_the_path(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[tuple[Path, bool]] = []

    def build(out: Path, *, tar: bool = False) -> Path:
        calls.append((out, tar))
        return out.with_name(out.name + ".tar")

    monkeypatch.setitem(info.IMAGE_BUILDERS, kind, (build, "test"))
    parser = argparse.ArgumentParser()
    info.add_parsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["image", kind, str(tmp_path / kind), "--tar"])
    assert args.func(args) == 0
    assert calls == [(tmp_path / kind, True)]
    assert capsys.readouterr().out == f"{tmp_path / kind}.tar\n"
