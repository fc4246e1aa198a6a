"""The host's image store: images imported from layouts and archives, unpacked once, found by name.

On disk (root: ``/var/lib/hako/images``, or ``$HAKO_IMAGES``; mode 0700, since rootfs trees hold
setuid binaries and device nodes)::

    store.lock                  held while names move between images
    locks/<hex>.lock            held while image <hex> is imported or removed
    tmp/<hex>.<random>/         an import in progress (or the remains of a crashed one)
    images/<hex>/               one image, <hex> = its manifest digest
        image.json              id, names, sources (paths it was imported from), layers, import time
        manifest.json           the manifest, as imported (synthesised for docker-archive)
        config.json             the image config, as imported
        rootfs/                 every layer applied, in order
        rootfs.ext4             rootfs as a disk image, made on first use (``hako.image.disk``)

An import unpacks into ``tmp/`` and renames into ``images/`` under the per-image lock, so a
reader sees a complete image or none, two concurrent imports of one image unpack it once, and a
failed import leaves nothing behind. A name belongs to one image: importing another image under
it moves it, as ``docker load`` does.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hako.errors import ImageError, ImageNotFound, UsageError
from hako.image.config import ImageConfig
from hako.image.filelock import exclusive_lock
from hako.image.reference import matches, matches_short
from hako.oci.bundle import Bundle, load_bundle

if TYPE_CHECKING:
    from hako.image.digest import Digest
    from hako.image.manifest import LayerRef, SourceImage
    from hako.image.source import ImageSource

# Importing an image (archives, layouts, layers, decompression) needs modules that finding one
# does not: they are imported where they are used, since every `hako run` resolves its image.

DEFAULT_ROOT = Path("/var/lib/hako/images")
ENV_ROOT = "HAKO_IMAGES"
_MIN_ID_PREFIX = 6


@dataclass(frozen=True)
class Image:
    """An imported image; ``id`` is its manifest digest ("sha256:..."). Treat ``rootfs`` as read-only."""

    id: str
    names: tuple[str, ...]
    sources: tuple[str, ...]
    rootfs: Path
    config: ImageConfig
    path: Path
    layers: tuple[str, ...]
    imported: str

    @property
    def short_id(self) -> str:
        return self.id.partition(":")[2][:12]


def image_kind(path: Path) -> str | None:
    """What is at ``path``: "layout", "docker-archive", "tar", "bundle", or None."""
    if path.is_dir():
        if (path / "index.json").is_file():
            return "layout"
        if (path / "config.json").is_file():
            return "bundle"
        if (path / "manifest.json").is_file():
            return "docker-archive"
        return None
    if path.is_file():
        import tarfile

        try:
            return "tar" if tarfile.is_tarfile(path) else None
        except OSError:
            return None
    return None


class ImageStore:
    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root or os.environ.get(ENV_ROOT) or DEFAULT_ROOT)
        self._images = self.root / "images"
        self._tmp = self.root / "tmp"
        self._locks = self.root / "locks"

    # -- public API ---------------------------------------------------------------------------

    def resolve(self, ref: str) -> Image | Bundle:
        """What ``hako run REF`` runs: a path (layout, tar, bundle) if one exists, else a stored image."""
        if not ref:
            raise UsageError("no image given; name an image, an image layout or tar, or a bundle directory")
        path = Path(ref)
        if path.exists():
            kind = image_kind(path)
            if kind == "bundle":
                return load_bundle(path)
            if kind is not None:
                return self.import_path(path)
            raise ImageNotFound(
                f'image "{ref}" not found: {path} is not an OCI image layout, image tar or bundle'
            )
        return self.get(ref)

    def get(self, ref: str) -> Image:
        """A stored image by name, id (or unique id prefix), or the path it was imported from."""
        images = self.list()
        source = os.path.abspath(ref) if ref else ""
        for image in images:
            if source in image.sources or any(matches(ref, name) for name in image.names):
                return image
        hexpart = ref.removeprefix("sha256:")
        if len(hexpart) >= _MIN_ID_PREFIX:
            by_id = [image for image in images if image.id.partition(":")[2].startswith(hexpart)]
            if len(by_id) == 1:
                return by_id[0]
        short = [image for image in images if any(matches_short(ref, name) for name in image.names)]
        if len(short) == 1:
            return short[0]
        if len(short) > 1:
            names = ", ".join(
                sorted(name for image in short for name in image.names if matches_short(ref, name))
            )
            raise ImageError(f'image name "{ref}" is ambiguous: it matches {names}; use the full name')
        raise ImageNotFound(
            f'image "{ref}" not found: not an OCI image layout, image tar, bundle or imported name'
        )

    def import_path(self, path: Path | str, name: str | None = None) -> Image:
        """Import an image layout directory or tar (OCI or docker-archive); a repeat import is a no-op."""
        path = Path(path)
        kind = image_kind(path)
        if kind is None:
            raise ImageNotFound(f'image "{path}" not found: not an OCI image layout or image tar')
        if kind == "bundle":
            raise ImageError(
                f"{path} is an OCI bundle, not an image: run it directly instead of importing it"
            )
        from hako.image.docker_archive import read_docker_archive
        from hako.image.layout import read_oci_layout

        with self._open(path, kind) as source:
            if source.exists("index.json"):
                found = read_oci_layout(source)
            elif source.exists("manifest.json"):
                found = read_docker_archive(source)
            else:
                raise ImageError(f"{path} is a tar but not an image: it has no index.json or manifest.json")
            self._unpack_once(source, found)
        names = ([name] if name else []) + list(found.names)
        return self._add_names(found.id, names, [os.path.abspath(path)])

    def list(self) -> list[Image]:
        """Every stored image, most recently imported first."""
        try:
            entries = sorted(self._images.iterdir())
        except FileNotFoundError:
            return []
        except OSError as err:
            raise ImageError(
                f"cannot read the image store at {self.root}: {err.strerror}; "
                f"run as root or point {ENV_ROOT} at a directory you can read"
            ) from err
        images = []
        for entry in entries:
            try:
                images.append(self._load(entry))
            except (OSError, ValueError, KeyError, ImageError) as err:
                import logging

                logging.getLogger(__name__).warning("skipping unreadable image %s: %s", entry, err)
        return sorted(images, key=lambda image: image.imported, reverse=True)

    def remove(self, ref: str) -> Image:
        """Delete a stored image (found as :meth:`get` finds it) and return what was removed."""
        image = self.get(ref)
        key = image.path.name
        with exclusive_lock(self._locks / f"{key}.lock"):
            if not image.path.exists():
                return image
            doomed = self._tmp / f"{key}.removed.{_unique()}"
            os.rename(image.path, doomed)  # gone from the store at once; the delete can take its time
            shutil.rmtree(doomed)
        return image

    def disk(self, image: Image) -> Path:
        """The image's rootfs as an ext4 disk image (``rootfs.ext4`` in its directory, so it goes
        with the image), made on first use."""
        from hako.image.disk import DISK_IMAGE, make_ext4

        target = image.path / DISK_IMAGE
        if target.is_file():
            return target
        with exclusive_lock(self._locks / f"{image.path.name}.lock"):
            if target.is_file():
                return target  # made meanwhile
            if not image.path.is_dir():
                raise ImageNotFound(f"image {image.short_id} was removed")
            staging = image.path / f".{DISK_IMAGE}.{_unique()}"
            try:
                make_ext4(image.rootfs, staging)
                os.rename(staging, target)
            finally:
                staging.unlink(missing_ok=True)
        return target

    # -- import -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _open(self, path: Path, kind: str) -> Iterator[ImageSource]:
        from hako.image.source import DirSource, TarSource

        source: ImageSource = TarSource(path) if kind == "tar" else DirSource(path)
        try:
            yield source
        finally:
            source.close()

    def _ensure_dirs(self) -> None:
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            for directory in (self._images, self._tmp, self._locks):
                directory.mkdir(mode=0o700, exist_ok=True)
        except OSError as err:
            raise ImageError(
                f"cannot create the image store at {self.root}: {err.strerror}; "
                f"run as root or point {ENV_ROOT} at a writable directory"
            ) from err

    def _unpack_once(self, source: ImageSource, found: SourceImage) -> None:
        self._ensure_dirs()
        key = found.id.hex
        final = self._images / key
        with exclusive_lock(self._locks / f"{key}.lock"):
            if (final / "image.json").is_file():
                return
            for stale in self._tmp.glob(f"{key}.*"):  # a crashed import of this image; we hold its lock
                shutil.rmtree(stale, ignore_errors=True)
            import datetime
            import tempfile

            staging = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=self._tmp))
            try:
                rootfs = staging / "rootfs"
                rootfs.mkdir(mode=0o755)
                for layer in found.layers:
                    self._apply(source, layer, rootfs)
                (staging / "manifest.json").write_bytes(found.manifest)
                (staging / "config.json").write_bytes(found.config)
                meta = {
                    "id": str(found.id),
                    "names": [],
                    "sources": [],
                    "layers": [str(layer.digest) for layer in found.layers],
                    "imported": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                }
                _write_json(staging / "image.json", meta)
                if final.exists():  # an incomplete image dir (no image.json): replace it
                    shutil.rmtree(final)
                os.rename(staging, final)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise

    def _apply(self, source: ImageSource, layer: LayerRef, rootfs: Path) -> None:
        import gzip
        import tarfile
        import zlib

        from hako.image.decompress import decompressed
        from hako.image.digest import HashingReader, exhaust
        from hako.image.layer import apply_layer

        what = f"{source.description}: layer {layer.digest}"
        with source.open(layer.path) as raw:
            blob = HashingReader(raw, layer.digest.algorithm)
            try:
                with decompressed(blob, what) as stream:
                    diff = HashingReader(stream, layer.diff_id.algorithm if layer.diff_id else "sha256")
                    with tarfile.open(fileobj=diff, mode="r|") as tar:  # type: ignore[call-overload]
                        apply_layer(tar, rootfs, what=what)
                    exhaust(diff)
            except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as err:
                exhaust(blob)  # a corrupt blob is better reported as a digest mismatch
                blob.check(what, layer.digest, layer.size)
                raise ImageError(f"{what}: not a valid layer tar: {err}") from err
            blob.check(what, layer.digest, layer.size)
            diff.check(f"{what} (uncompressed)", layer.diff_id)

    # -- metadata -----------------------------------------------------------------------------

    def _load(self, directory: Path) -> Image:
        meta = json.loads((directory / "image.json").read_text())
        config = ImageConfig.from_json((directory / "config.json").read_bytes(), f"{directory}/config.json")
        return Image(
            id=meta["id"],
            names=tuple(meta.get("names", [])),
            sources=tuple(meta.get("sources", [])),
            rootfs=directory / "rootfs",
            config=config,
            path=directory,
            layers=tuple(meta.get("layers", [])),
            imported=meta.get("imported", ""),
        )

    def _add_names(self, image_id: Digest, names: Sequence[str], sources: Sequence[str]) -> Image:
        """Give ``names`` and ``sources`` to one image, taking them from any other that had them."""
        own = self._images / image_id.hex
        with exclusive_lock(self.root / "store.lock"):
            for directory in sorted(self._images.iterdir()):
                meta_path = directory / "image.json"
                if directory == own or not meta_path.is_file():
                    continue
                meta = json.loads(meta_path.read_text())
                kept_names = [n for n in meta.get("names", []) if n not in names]
                kept_sources = [s for s in meta.get("sources", []) if s not in sources]
                if kept_names != meta.get("names", []) or kept_sources != meta.get("sources", []):
                    _write_json(meta_path, {**meta, "names": kept_names, "sources": kept_sources})
            meta = json.loads((own / "image.json").read_text())
            meta["names"] = list(dict.fromkeys([*meta.get("names", []), *names]))
            meta["sources"] = list(dict.fromkeys([*meta.get("sources", []), *sources]))
            _write_json(own / "image.json", meta)
        return self._load(own)


def _write_json(path: Path, document: dict[str, Any]) -> None:
    """Replace ``path`` atomically, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{_unique()}")
    tmp.write_text(json.dumps(document, indent=2) + "\n")
    os.replace(tmp, tmp.with_name(path.name))


def _unique() -> str:
    """A suffix for a temporary name nobody else picks."""
    return os.urandom(16).hex()
