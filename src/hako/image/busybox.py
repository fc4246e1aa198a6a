"""Build the small busybox image the demo and the tests run, from Debian's busybox-static.

One layer: /bin/busybox (the binary shipped by the Debian package, checked against dpkg's md5sums,
or downloaded with ``apt-get download`` when the package is not installed), a symlink per applet
under /bin, /etc/passwd and /etc/group (root, nobody, tty), /tmp (1777), /root, /home and empty
/proc, /sys and /dev. Entries are sorted, owned by root and dated to a fixed time, the gzip header
carries no name or time, and JSON is canonical, so a rebuild gives the same digests.

The layer and layout writing (:func:`busybox_layer`, :func:`write_layer`, :func:`image_config`,
:func:`write_image`) is shared with the images built on this layer: ``hako.image.pause`` and
``hako.image.debian``.

    python -m hako.image.busybox OUTDIR [--tar] [--name NAME]

writes an OCI image layout to OUTDIR (and, with --tar, OUTDIR.tar, a tar of that layout).
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hako.errors import HakoError, ImageError
from hako.image import mediatypes as mt

DEFAULT_NAME = "hako.local/busybox:latest"
PACKAGE = "busybox-static"
CREATED = "2024-01-01T00:00:00Z"
MTIME = 1_704_067_200  # CREATED as a timestamp: every entry carries it
ENV_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_CHUNK = 1 << 20  # copy buffer for layer blobs

PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
GROUP = "root:x:0:\ntty:x:5:\nnobody:x:65534:\n"
DIRECTORIES = {
    "bin": 0o755,
    "dev": 0o755,
    "etc": 0o755,
    "home": 0o755,
    "proc": 0o555,
    "root": 0o700,
    "sys": 0o555,
    "tmp": 0o1777,
}


def build_busybox_image(out: Path, *, tar: bool = False, name: str = DEFAULT_NAME) -> Path:
    """Write the image layout to ``out`` (replacing a layout already there); return ``out``,
    or with ``tar`` the tar of it written beside it as ``<out>.tar``."""
    return build_image_from_busybox(out, tar=tar, name=name, title="busybox", process={"Cmd": ["sh"]})


def build_image_from_busybox(
    out: Path, *, tar: bool, name: str, title: str, process: dict[str, list[str]]
) -> Path:
    """Like :func:`build_busybox_image`, with the same layer, for an image whose config titles it
    ``title`` and whose ``process`` (``Entrypoint`` and/or ``Cmd``) is given (``hako.image.pause``)."""
    with tempfile.TemporaryDirectory(prefix="hako-image-") as scratch:
        layer, version = busybox_layer(Path(scratch))
        config = image_config(
            [layer],
            title=title,
            version=version,
            source=f"Debian package {PACKAGE} {version}",
            process=process,
        )
        return write_image(Path(out), [layer], config, name=name, tar=tar)


def busybox_layer(scratch: Path) -> tuple[Layer, str]:
    """The busybox layer, written under ``scratch``, and the busybox-static version it holds: the
    base of every image built here, so that a store unpacks it once for all of them."""
    with _debian_busybox() as (binary, version):
        applets = _applets(binary)
        created_by = f"hako.image.busybox from {PACKAGE} {version}"
        layer = write_layer(
            scratch / "busybox.tar.gz", created_by, lambda tar: _add_busybox(tar, binary, applets)
        )
    return layer, version


# -- the busybox binary -----------------------------------------------------------------------


def run(args: list[str], cwd: Path | None = None) -> str:
    """Run a host tool and return its output; a failure is an ImageError with its stderr."""
    try:
        done = subprocess.run(args, cwd=cwd, check=True, capture_output=True, text=True)
    except FileNotFoundError as err:
        raise ImageError(f"cannot run {args[0]}: not installed") from err
    except subprocess.CalledProcessError as err:
        raise ImageError(f"{' '.join(args)} failed: {err.stderr.strip() or err.returncode}") from err
    return done.stdout


@contextlib.contextmanager
def _debian_busybox() -> Iterator[tuple[Path, str]]:
    """Yield Debian's busybox binary and the package version it came from."""
    installed = _installed_busybox()
    if installed is not None:
        yield installed
        return
    with tempfile.TemporaryDirectory(prefix="hako-busybox-") as tmp:
        yield _downloaded_busybox(Path(tmp))


def _installed_busybox() -> tuple[Path, str] | None:
    try:
        status, _, version = run(
            ["dpkg-query", "-W", "-f=${db:Status-Status}\t${Version}", PACKAGE]
        ).partition("\t")
    except ImageError:
        return None
    if status != "installed":
        return None
    listed = run(["dpkg", "-L", PACKAGE]).splitlines()
    binary = next((Path(line) for line in listed if line.endswith("/bin/busybox")), None)
    if binary is None or not binary.is_file():
        return None
    md5sums = Path(run(["dpkg-query", "--control-path", PACKAGE, "md5sums"]).strip())
    relative = str(binary).lstrip("/")
    expected = next(
        (line.split()[0] for line in md5sums.read_text().splitlines() if line.split()[1:] == [relative]), None
    )
    actual = hashlib.md5(binary.read_bytes(), usedforsecurity=False).hexdigest()
    if expected is not None and actual != expected:
        raise ImageError(f"{binary} differs from Debian's {PACKAGE} package; reinstall {PACKAGE}")
    return binary, version


def _downloaded_busybox(tmp: Path) -> tuple[Path, str]:
    try:
        run(["apt-get", "download", PACKAGE], cwd=tmp)
    except ImageError as err:
        raise ImageError(
            f"{PACKAGE} is not installed and could not be downloaded ({err}); install {PACKAGE}"
        ) from err
    deb = next(tmp.glob(f"{PACKAGE}_*.deb"))
    version = run(["dpkg-deb", "-f", str(deb), "Version"]).strip()
    run(["dpkg-deb", "-x", str(deb), str(tmp / "root")])
    binary = tmp / "root" / "bin" / "busybox"
    if not binary.is_file():
        raise ImageError(f"{deb.name} has no bin/busybox")
    return binary, version


def _applets(binary: Path) -> list[str]:
    names = {line.strip() for line in run([str(binary), "--list"]).splitlines()}
    return sorted(n for n in names if n and "/" not in n and n not in (".", "..", "busybox"))


# -- layers -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layer:
    """A gzipped layer blob in a scratch file, with what the manifest and config say of it."""

    path: Path
    digest: str  # "sha256:..." of the gzipped blob
    size: int
    diff_id: str  # "sha256:..." of the uncompressed tar
    created_by: str  # its line in the config's history


def reproducible(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """``info`` owned by root and dated :data:`MTIME`, so that a rebuild gives the same bytes."""
    info.mtime = MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def _info(name: str, kind: bytes, mode: int, size: int = 0, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.size = size
    info.linkname = linkname
    return reproducible(info)


def write_layer(path: Path, created_by: str, add: Callable[[tarfile.TarFile], None]) -> Layer:
    """Write the layer whose entries ``add`` puts in the tar (sorted by name, and made
    :func:`reproducible`) to ``path``, gzipped without a name or time in the header."""
    raw = path.with_name(path.name + ".uncompressed")
    try:
        with tarfile.open(raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            add(tar)
        with (
            raw.open("rb") as source,
            path.open("wb") as blob,
            gzip.GzipFile(filename="", mode="wb", fileobj=blob, mtime=0, compresslevel=9) as out,
        ):
            shutil.copyfileobj(source, out, _CHUNK)
        diff_id = _sha256(raw)
    finally:
        raw.unlink(missing_ok=True)
    return Layer(path, _sha256(path), path.stat().st_size, diff_id, created_by)


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()


def _add_busybox(tar: tarfile.TarFile, binary: Path, applets: list[str]) -> None:
    files: dict[str, tuple[bytes, int]] = {
        "bin/busybox": (binary.read_bytes(), 0o755),
        "etc/passwd": (PASSWD.encode(), 0o644),
        "etc/group": (GROUP.encode(), 0o644),
    }
    entries: dict[str, tuple[tarfile.TarInfo, bytes | None]] = {}
    for name, mode in DIRECTORIES.items():
        entries[name] = (_info(name, tarfile.DIRTYPE, mode), None)
    for name, (data, mode) in files.items():
        entries[name] = (_info(name, tarfile.REGTYPE, mode, len(data)), data)
    for applet in applets:
        name = f"bin/{applet}"
        entries.setdefault(name, (_info(name, tarfile.SYMTYPE, 0o777, linkname="busybox"), None))
    for name in sorted(entries):
        info, content = entries[name]
        tar.addfile(info, io.BytesIO(content) if content is not None else None)


# -- the layout -------------------------------------------------------------------------------


def image_config(
    layers: Sequence[Layer],
    *,
    title: str,
    version: str,
    source: str,
    process: Mapping[str, list[str]],
    exposed_ports: Sequence[str] = (),
) -> dict[str, Any]:
    """The image config of ``layers``: ``process`` is its ``Entrypoint`` and/or ``Cmd``; ``title``,
    ``version`` and ``source`` (what it was built from) become its OCI labels."""
    config: dict[str, Any] = {
        "Env": [ENV_PATH],
        **process,
        "Labels": {
            "org.opencontainers.image.title": title,
            "org.opencontainers.image.version": version,
            "org.opencontainers.image.source": source,
        },
    }
    if exposed_ports:
        config["ExposedPorts"] = {port: {} for port in exposed_ports}
    return {
        "created": CREATED,
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [{"created": CREATED, "created_by": layer.created_by} for layer in layers],
    }


def write_image(out: Path, layers: Sequence[Layer], config: dict[str, Any], *, name: str, tar: bool) -> Path:
    """Write the image layout of ``layers`` and ``config`` to ``out`` (replacing a layout already
    there) and return ``out``, or with ``tar`` the tar of it written beside it as ``<out>.tar``."""
    _write_layout(out, layers, _canonical(config), name)
    if not tar:
        return out
    tar_path = out.with_name(out.name + ".tar")
    _write_layout_tar(out, tar_path)
    return tar_path


def _canonical(document: dict[str, Any]) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def _descriptor(media_type: str, data: bytes) -> dict[str, Any]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    return {"mediaType": media_type, "digest": digest, "size": len(data)}


def _write_layout(out: Path, layers: Sequence[Layer], config: bytes, name: str) -> None:
    manifest = _canonical(
        {
            "schemaVersion": 2,
            "mediaType": mt.OCI_MANIFEST,
            "config": _descriptor(mt.OCI_CONFIG, config),
            "layers": [
                {"mediaType": mt.OCI_LAYER_GZIP, "digest": layer.digest, "size": layer.size}
                for layer in layers
            ],
        }
    )
    index = _canonical(
        {
            "schemaVersion": 2,
            "mediaType": mt.OCI_INDEX,
            "manifests": [
                {
                    **_descriptor(mt.OCI_MANIFEST, manifest),
                    "platform": {"architecture": "amd64", "os": "linux"},
                    "annotations": {mt.REF_NAME: name},
                }
            ],
        }
    )
    if out.exists() and not (out / "oci-layout").is_file() and (not out.is_dir() or any(out.iterdir())):
        raise ImageError(f"{out} exists and is not an image layout; refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        blobs = staging / "blobs" / "sha256"
        blobs.mkdir(parents=True)
        for layer in layers:
            shutil.copyfile(layer.path, blobs / layer.digest.partition(":")[2])
        for blob in (config, manifest):
            (blobs / hashlib.sha256(blob).hexdigest()).write_bytes(blob)
        (staging / "oci-layout").write_bytes(_canonical({"imageLayoutVersion": "1.0.0"}))
        (staging / "index.json").write_bytes(index)
        staging.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _write_layout_tar(layout: Path, tar_path: Path) -> None:
    """A tar of the layout (what skopeo's oci-archive is), deterministic like the layer."""
    tmp = tar_path.with_name(f".{tar_path.name}.tmp")
    try:
        with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for path in sorted(layout.rglob("*")):
                name = path.relative_to(layout).as_posix()
                if path.is_dir():
                    tar.addfile(_info(name, tarfile.DIRTYPE, 0o755))
                else:
                    with path.open("rb") as blob:
                        tar.addfile(_info(name, tarfile.REGTYPE, 0o644, path.stat().st_size), blob)
        os.replace(tmp, tar_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    return image_main(
        argv,
        prog="python -m hako.image.busybox",
        description="Build the busybox OCI image from Debian's busybox-static.",
        build=build_busybox_image,
        default_name=DEFAULT_NAME,
    )


def image_main(
    argv: list[str] | None,
    *,
    prog: str,
    description: str,
    build: Callable[..., Path],
    default_name: str,
) -> int:
    """The command line of an image builder: ``OUTDIR [--tar] [--name NAME]``."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("outdir", type=Path, help="where to write the OCI image layout")
    parser.add_argument("--tar", action="store_true", help="also write OUTDIR.tar, a tar of the layout")
    parser.add_argument("--name", default=default_name, help=f"image name to record (default {default_name})")
    args = parser.parse_args(argv)
    try:
        path = build(args.outdir, tar=args.tar, name=args.name)
    except HakoError as err:
        print(f"hako: {err}", file=sys.stderr)
        return err.exit_code
    index = json.loads((args.outdir / "index.json").read_text())
    print(f"{path} {index['manifests'][0]['digest']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
