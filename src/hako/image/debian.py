"""Build images of Debian programs for benchmarks (nginx, fio, iperf3): busybox's layer, then one
layer of Debian packages.

The second layer holds every file of the packages a :class:`Preset` names, of the library packages
they depend on, and the preset's own files (configuration, directories, users, single files taken
from packages it does not ship). The dependency walk follows ``Depends`` and ``Pre-Depends`` only
through library packages (archive section "libs": libc6, libssl3, zlib1g, ...): what only
maintainer scripts use (debconf, adduser, perl, init-system-helpers) stays out, and with it its
own libraries. apt chooses (``apt-cache depends``) and fetches (``apt-get download``, into a
scratch directory), dpkg-deb unpacks; nothing is installed on the host and no maintainer script
runs, which is why the preset supplies what those scripts would have made.

The walk is a choice of packages, not a proof that the programs run: before anything is written,
every ELF executable and shared object of the layer must find its interpreter and each library it
needs (DT_NEEDED, searched where the dynamic loader searches without an ld.so.cache: the object's
DT_RUNPATH, then Debian's system directories) inside the layer; a miss is an ImageError naming the
file and the library. Like busybox's, the layer is sorted, owned by root and dated to a fixed time
(file modes and symlinks kept), so a rebuild from the same package versions gives the same
digests. ``apt-get update`` is the caller's business.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import tarfile
import tempfile
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from hako.assets import _elf
from hako.errors import ImageError
from hako.image.busybox import (
    GROUP,
    PASSWD,
    busybox_layer,
    image_config,
    reproducible,
    run,
    write_image,
    write_layer,
)
from hako.image.securejoin import resolve_in_root

# Where ld.so looks when neither the object's DT_RUNPATH nor an ld.so.cache names a directory
# (Debian's amd64 loader, as `ld.so --help` lists them).
SYSTEM_LIBRARY_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib", "usr/lib")
DEPENDS_OPTIONS = (
    "--no-recommends",
    "--no-suggests",
    "--no-conflicts",
    "--no-breaks",
    "--no-replaces",
    "--no-enhances",
)
_DEPENDENCY = re.compile(r"^ ([ |])(?:Pre)?Depends: (\S+)$")
_PROVIDER = re.compile(r"^ {4}(\S+)$")


@dataclass(frozen=True)
class Preset:
    """One image: its packages, what their maintainer scripts would have made, and how it runs."""

    title: str  # the image's title label
    packages: tuple[str, ...]  # shipped whole, with their library closure; the first one versions the image
    process: dict[str, list[str]]  # Entrypoint and/or Cmd
    exposed_ports: tuple[str, ...] = ()
    borrowed: tuple[tuple[str, str], ...] = ()  # (package, path): one file of a package not shipped
    files: tuple[tuple[str, str], ...] = ()  # (path, text), written with mode 0644
    directories: tuple[str, ...] = ()  # made with mode 0755
    users: tuple[str, ...] = ()  # /etc/passwd lines after busybox's
    groups: tuple[str, ...] = ()  # /etc/group lines after busybox's


@dataclass(frozen=True)
class Deb:
    """A downloaded package file."""

    package: str
    version: str
    path: Path


@dataclass
class _Walk:
    """The state of :func:`parse_depends` within one dependency (a group of alternatives)."""

    open: bool = False  # the previous dependency line ended with "|": more alternatives follow
    chosen: bool = False  # this group's package is picked
    awaiting_provider: bool = False  # its first alternative is virtual: take the first provider
    choices: list[str] = field(default_factory=list)


def build_debian_image(out: Path, preset: Preset, *, tar: bool = False, name: str) -> Path:
    """Write the image layout of ``preset`` to ``out`` (replacing a layout already there); return
    ``out``, or with ``tar`` the tar of it written beside it as ``<out>.tar``."""
    packages = library_closure(preset.packages)
    borrowed = sorted({package for package, _ in preset.borrowed} - set(packages))
    with tempfile.TemporaryDirectory(prefix=f"hako-{preset.title}-") as tmp:
        scratch = Path(tmp)
        (scratch / "debs").mkdir()
        debs = download([*packages, *borrowed], scratch / "debs")
        root = scratch / "root"
        for package in packages:
            extract(debs[package], root)
        _borrow(preset, debs, root, scratch / "borrowed")
        add_preset_files(preset, root)
        check_libraries(root)
        base, _ = busybox_layer(scratch)
        built_from = ", ".join(f"{p} {debs[p].version}" for p in sorted(debs))
        layer = write_layer(
            scratch / "debian.tar.gz", f"hako.image.debian from {built_from}", lambda t: add_tree(t, root)
        )
        main = debs[preset.packages[0]]
        config = image_config(
            [base, layer],
            title=preset.title,
            version=main.version,
            source="Debian packages " + ", ".join(f"{p} {debs[p].version}" for p in preset.packages),
            process=preset.process,
            exposed_ports=preset.exposed_ports,
        )
        return write_image(Path(out), [base, layer], config, name=name, tar=tar)


# -- choosing packages ------------------------------------------------------------------------


class PackageIndex(Protocol):
    """What the dependency walk asks of apt, for candidate versions; packages it does not know are
    left out of the answers."""

    def depends(self, packages: Sequence[str]) -> Mapping[str, Sequence[str]]:
        """{package: the package apt would pick for each of its Depends and Pre-Depends}."""
        ...

    def sections(self, packages: Sequence[str]) -> Mapping[str, str]:
        """{package: its archive section}, such as "libs" or "non-free/libs"."""
        ...


class AptCache:
    """:class:`PackageIndex` from the host's apt lists (``apt-cache``)."""

    def depends(self, packages: Sequence[str]) -> dict[str, list[str]]:
        return parse_depends(_apt_cache(["depends", *DEPENDS_OPTIONS, *packages]))

    def sections(self, packages: Sequence[str]) -> dict[str, str]:
        return parse_sections(_apt_cache(["show", "--no-all-versions", *packages]))


def is_library(section: str) -> bool:
    """Whether the dependency walk keeps (and goes on through) a package of this archive section:
    Debian files shared libraries, and the data they need (libtirpc-common), under "libs"."""
    return section.rpartition("/")[2] == "libs"


def library_closure(packages: Sequence[str], index: PackageIndex | None = None) -> list[str]:
    """``packages`` and, recursively, the library packages they depend on, sorted."""
    index = index or AptCache()
    wanted = set(packages)
    seen = set(packages)
    frontier = sorted(wanted)
    while frontier:
        found = index.depends(frontier)
        unknown = [p for p in frontier if p not in found]
        if unknown:
            raise ImageError(
                f"package {', '.join(unknown)} not found in the apt lists; "
                "run `apt-get update` (a Debian 12 archive) and retry"
            )
        candidates = sorted({d for p in frontier for d in found[p]} - seen)
        seen.update(candidates)
        sections = index.sections(candidates) if candidates else {}
        frontier = [p for p in candidates if is_library(sections.get(p, ""))]
        wanted.update(frontier)
    return sorted(wanted)


def _apt_cache(args: list[str]) -> str:
    """The output of ``apt-cache ARGS``; that none of the packages asked about is known is not an error."""
    argv = ["apt-cache", *args]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
    except FileNotFoundError as err:
        raise ImageError("cannot run apt-cache: not installed; run on Debian (apt)") from err
    if done.returncode != 0 and "No packages found" not in done.stderr:
        raise ImageError(f"{' '.join(argv)} failed: {done.stderr.strip() or done.returncode}")
    return done.stdout


def parse_sections(text: str) -> dict[str, str]:
    """{package: section} from ``apt-cache show`` output (one paragraph per package)."""
    sections: dict[str, str] = {}
    for paragraph in text.split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in paragraph.splitlines() if ": " in line and not line[0].isspace()
        )
        if "Package" in fields and "Section" in fields:
            sections[fields["Package"]] = fields["Section"]
    return sections


def parse_depends(text: str) -> dict[str, list[str]]:
    """{package: [one package per dependency]} from ``apt-cache depends`` output. Of alternatives
    (``|Depends:`` lines) the first is taken, as apt does on a system with none of them installed;
    of a virtual package (``<name>``), its first provider, or the next alternative if none."""
    result: dict[str, list[str]] = {}
    walk = _Walk()
    for line in text.splitlines():
        if line and not line[0].isspace():
            walk = _Walk(choices=result.setdefault(line.strip(), []))
        elif m := _DEPENDENCY.match(line):
            if not walk.open:
                walk.chosen = False
            walk.open = m.group(1) == "|"
            walk.awaiting_provider = False
            if not walk.chosen:
                if m.group(2).startswith("<"):
                    walk.awaiting_provider = True
                else:
                    walk.choices.append(m.group(2))
                    walk.chosen = True
        elif (m := _PROVIDER.match(line)) and walk.awaiting_provider:
            walk.choices.append(m.group(1))
            walk.chosen, walk.awaiting_provider = True, False
    return result


# -- fetching and unpacking -------------------------------------------------------------------


def download(packages: Sequence[str], dest: Path) -> dict[str, Deb]:
    """{package: its .deb}, apt's candidate version of each, downloaded into ``dest``."""
    args = ["apt-get", "download", "-q", *packages]
    try:
        done = subprocess.run(args, cwd=dest, capture_output=True, text=True, check=False)
    except FileNotFoundError as err:
        raise ImageError("cannot run apt-get: not installed; run on Debian (apt)") from err
    if done.returncode != 0:
        raise ImageError(download_error(packages, done.stderr))
    debs = {deb.package: deb for deb in map(_deb, sorted(dest.glob("*.deb")))}
    missing = [p for p in packages if p not in debs]
    if missing:
        raise ImageError(f"apt-get download left no .deb for {', '.join(missing)}")
    return debs


def download_error(packages: Sequence[str], stderr: str) -> str:
    """The one-line message for a failed ``apt-get download``: the packages apt's errors name (a
    name, or a file name in a URL), apt's own errors, and what to do."""
    errors = [line.removeprefix("E: ").strip() for line in stderr.splitlines() if line.startswith("E: ")]
    detail = "; ".join(errors) or stderr.strip() or "no error message"
    # A package name on its own, or a file name in a URL (".../nginx/nginx-common_1.22.1_all.deb":
    # not nginx, whose name is only the source directory there).
    named = [p for p in packages if re.search(rf"(?<![\w.+-]){re.escape(p)}(?=[\s'\":;,_]|$)", detail)]
    return (
        f"cannot download {', '.join(named or packages)} with apt-get: {detail}; "
        "run `apt-get update` and check that the Debian archive is reachable"
    )


def _deb(path: Path) -> Deb:
    """A .deb named as apt-get download names it: ``<package>_<version, %-quoted>_<arch>.deb``."""
    package, version, _arch = path.stem.split("_")
    return Deb(package, urllib.parse.unquote(version), path)


def extract(deb: Deb, root: Path) -> None:
    """Unpack the files of ``deb`` under ``root`` (modes and symlinks as packaged; no scripts run)."""
    root.mkdir(parents=True, exist_ok=True)
    run(["dpkg-deb", "-x", str(deb.path), str(root)])


def _borrow(preset: Preset, debs: Mapping[str, Deb], root: Path, scratch: Path) -> None:
    """Copy the files the preset takes from packages it does not ship whole."""
    for package, path in preset.borrowed:
        unpacked = scratch / package
        if not unpacked.exists():
            extract(debs[package], unpacked)
        source = unpacked / path
        if not source.is_file():
            raise ImageError(f"Debian package {package} has no /{path}; the package layout changed")
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, root / path)
        (root / path).chmod(0o644)


def add_preset_files(preset: Preset, root: Path) -> None:
    """Write the preset's directories, files and users under ``root``: what the maintainer scripts
    that never run here would have made, and the configuration the image runs with."""
    for directory in preset.directories:
        (root / directory).mkdir(mode=0o755, parents=True, exist_ok=True)
    files = dict(preset.files)
    if preset.users:
        files["etc/passwd"] = PASSWD + "".join(line + "\n" for line in preset.users)
    if preset.groups:
        files["etc/group"] = GROUP + "".join(line + "\n" for line in preset.groups)
    for path, text in files.items():
        target = root / path
        target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(0o644)


# -- checking and packing ---------------------------------------------------------------------


def check_libraries(root: Path) -> None:
    """Raise ImageError unless every ELF file under ``root`` finds its interpreter and each library
    it needs under ``root``, where the dynamic loader would look for them in the container."""
    for path in _files(root):
        if not _elf.is_elf(path):
            continue
        name = "/" + path.relative_to(root).as_posix()
        try:
            dynamic = _elf.dynamic(path)
        except (ValueError, IndexError, struct.error) as err:  # not ELF64 LE, or truncated
            raise ImageError(f"{name}: cannot read its ELF headers ({err})") from err
        if dynamic.interpreter and not resolve_in_root(root, dynamic.interpreter).is_file():
            raise ImageError(
                f"{name} needs the ELF interpreter {dynamic.interpreter}, which is not in the image"
            )
        dirs = [*(_runpath_dir(d, name) for d in dynamic.runpath), *SYSTEM_LIBRARY_DIRS]
        for soname in dynamic.needed:
            if not any(resolve_in_root(root, f"{d}/{soname}").is_file() for d in dirs):
                raise ImageError(
                    f"{name} needs {soname}, which is not in the image; add the Debian package "
                    "that ships it to the preset"
                )


def _runpath_dir(directory: str, name: str) -> str:
    """A DT_RUNPATH entry as a path in the image, with $ORIGIN (the object's own directory) expanded."""
    origin = os.path.dirname(name)
    return directory.replace("${ORIGIN}", origin).replace("$ORIGIN", origin)


def _files(root: Path) -> Iterator[Path]:
    """Regular files under ``root`` (symlinks not followed), in a stable order."""
    for directory, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for filename in sorted(filenames):
            path = Path(directory, filename)
            if path.is_file() and not path.is_symlink():
                yield path


def add_tree(tar: tarfile.TarFile, root: Path) -> None:
    """Add everything under ``root`` to ``tar``, sorted by name and made reproducible: modes,
    symlinks and hard links as they are, owner root, the fixed mtime."""
    names = sorted(path.relative_to(root).as_posix() for path in root.rglob("*"))
    for name in names:
        info = reproducible(tar.gettarinfo(root / name, arcname=name))
        if info.isreg():
            with (root / name).open("rb") as f:
                tar.addfile(info, f)
        else:
            tar.addfile(info)


# -- the images -------------------------------------------------------------------------------

NGINX_CONF = """\
# hako.image.debian: nginx in the foreground for benchmarks; errors to stderr, no access log.
daemon off;
worker_processes 1;
user www-data www-data;
pid /run/nginx.pid;
error_log stderr;

events {
    worker_connections 1024;
}

http {
    include mime.types;
    default_type application/octet-stream;
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 65;
    keepalive_requests 100000;

    server {
        listen 80 default_server;
        listen [::]:80 default_server;
        root /var/www/html;
        index index.html;
    }
}
"""
# About the size of Debian's default page (615 bytes), so that benchmarks move the same bytes.
INDEX_HTML = """\
<!DOCTYPE html>
<html>
<head>
<title>hako: nginx</title>
<style>
    body { width: 35em; margin: 0 auto; font-family: Tahoma, Verdana, Arial, sans-serif; }
</style>
</head>
<body>
<h1>nginx in a hako micro-VM</h1>
<p>This page is served by Debian's nginx, running as a container in its own QEMU
micro-VM. It is a static file of about the size of nginx's default welcome page,
so that a benchmark fetching it moves the same number of bytes as one run against
a stock nginx image: requests and responses are what is measured.</p>
<p>Configuration: /etc/nginx/nginx.conf; document root: /var/www/html.</p>
</body>
</html>
"""

NGINX = Preset(
    title="nginx",
    packages=("nginx",),
    process={"Cmd": ["nginx"]},
    exposed_ports=("80/tcp",),
    borrowed=(("nginx-common", "etc/nginx/mime.types"),),
    files=(("etc/nginx/nginx.conf", NGINX_CONF), ("var/www/html/index.html", INDEX_HTML)),
    # Made by nginx-common's postinst, or needed by nginx at start (its temp paths, built in).
    directories=(
        *(f"var/lib/nginx/{temp}" for temp in ("body", "proxy", "fastcgi", "uwsgi", "scgi")),
        "var/log/nginx",
        "run",
    ),
    users=("www-data:x:33:33:www-data:/var/www:/bin/false",),
    groups=("www-data:x:33:",),
)
FIO = Preset(title="fio", packages=("fio",), process={"Cmd": ["fio", "--version"]})
IPERF3 = Preset(
    title="iperf3", packages=("iperf3",), process={"Cmd": ["iperf3", "-s"]}, exposed_ports=("5201/tcp",)
)


def build_nginx_image(out: Path, *, tar: bool = False, name: str = "hako.local/nginx:latest") -> Path:
    """Debian's nginx serving /var/www/html on port 80 (see :data:`NGINX_CONF`)."""
    return build_debian_image(out, NGINX, tar=tar, name=name)


def build_fio_image(out: Path, *, tar: bool = False, name: str = "hako.local/fio:latest") -> Path:
    """Debian's fio, with every I/O engine library it links (librbd, libglusterfs, ...)."""
    return build_debian_image(out, FIO, tar=tar, name=name)


def build_iperf3_image(out: Path, *, tar: bool = False, name: str = "hako.local/iperf3:latest") -> Path:
    """Debian's iperf3, as a server on port 5201 by default."""
    return build_debian_image(out, IPERF3, tar=tar, name=name)
