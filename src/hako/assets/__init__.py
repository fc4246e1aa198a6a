"""Guest assets: the kernels and the guest image every sandbox VM boots.

Two kernels (``kind``), both uncompressed ELF ``vmlinux`` files that QEMU's microvm boots directly
by their PVH entry (no firmware, no decompression; see :class:`Kernel` for the machine options and
kernel args each one wants):

``trimmed``
    Debian's linux-source-6.1 built with guest/kernel/hako.config (no modules, no ACPI).
``debian``
    Debian's stock ``linux-image-amd64``, its vmlinux extracted from the bzImage (booting the
    bzImage through microvm's qboot works too but costs ~5 s more under TCG); the modules the guest
    needs are in the image, listed in load order in /etc/hako/modules.load.

One guest image per kernel (the same files, plus the modules for ``debian``) in two formats:
``erofs`` (a read-only root on the first virtio-blk device; trimmed kernel only, Debian's
virtio_blk and erofs being modules) and ``initramfs`` (cpio, optionally gzip/lz4). See
:mod:`hako.assets._image` for what the image holds and :mod:`hako.assets._cache` for the layout.

Everything is cached under ``$HAKO_CACHE`` (default /var/cache/hako), keyed by its inputs, built by
``hako assets build`` (or ``build=True``). Lookups without ``build`` never run apt or
make: they raise AssetError when the asset for the current inputs is missing.

Format choice, measured (TCG, QEMU 7.2 microvm, -cpu max, 1 vCPU, 256 MiB, trimmed kernel, args
``Kernel.cmdline_for("tcg")``, a stub /init that prints the uptime, imports the protobuf runtime
and hako_api.agent_pb2 like the agent, prints it again and reboots; medians of 21 interleaved
boots; bench/image_formats.py)::

    image               size    QEMU start to:  /init   imports done   exit   guest uptime at /init
    erofs               21.5 MB                 1.16 s  2.42 s         2.58 s  1.05 s
    initramfs           21.5 MB                 1.41 s  2.46 s         2.61 s  1.29 s
    initramfs, lz4       9.9 MB                 1.37 s  2.54 s         2.70 s  1.26 s
    initramfs, gzip      8.6 MB (11 boots)      2.03 s  3.34 s         3.51 s  1.92 s

With the stub, erofs reaches /init 0.25 s sooner (nothing to unpack). With the real agent the
order flips: Python's start and imports fault their pages in over virtio-blk, which costs more than
the unpack saves. Measured with the agent (``hako run --rm IMG true``, 8 interleaved pairs, medians,
same machine and accelerator)::

    image       guest kernel  python start  agent init  boot total  whole command
    erofs       1.08 s        0.75 s        1.07 s      3.22 s      4.05 s
    initramfs   1.28 s        0.61 s        0.86 s      2.99 s      3.85 s

So the initramfs (uncompressed) is the default for both kernels, chosen by that measurement; erofs
stays buildable (``--format erofs``): it keeps no full copy of the image in guest RAM, which may
matter more once VM templates share guest memory. The debian kernel can only use an initramfs
(lz4 made no measurable difference there either: 5.13 s vs 5.07 s to exit).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

from hako.errors import AssetError

from . import _cache, _debs, _image, _trimmed  # _debian: only for that kernel (its imports cost)
from ._progress import Reporter
from ._types import IMAGE_FORMATS, KERNEL_KINDS, AssetStatus, GuestImage, Kernel

__all__ = [
    "DEFAULT_FORMAT",
    "IMAGE_FORMATS",
    "KERNEL_KINDS",
    "AssetStatus",
    "GuestImage",
    "Kernel",
    "build_all",
    "guest_image",
    "kernel",
    "status",
]

# The default image format per kernel, and the initramfs compression (measured: module docstring).
DEFAULT_FORMAT = {"trimmed": "initramfs", "debian": "initramfs"}
INITRAMFS_COMPRESSION = "none"
KEEP_IMAGES = 2  # per (kernel, format, compression, agent or stub /init): older ones are deleted
_HINT = "run `hako assets build`"


def _check_kind(kind: str) -> None:
    if kind not in KERNEL_KINDS:
        raise AssetError(f"unknown kernel kind {kind!r}; use one of {', '.join(KERNEL_KINDS)}")


def kernel(kind: str, *, build: bool = False, progress: bool = False) -> Kernel:
    """The guest kernel of ``kind``; with ``build``, build (or fetch) it first if it is missing."""
    _check_kind(kind)
    if kind == "trimmed":
        found = _trimmed.build(Reporter(progress)) if build else _trimmed.find()
    else:
        from . import _debian

        found = _debian.build(Reporter(progress)) if build else _debian.find()
    if found is None:
        raise AssetError(f"the {kind} guest kernel is not built; {_HINT}")
    return found


def guest_image(
    kernel_kind: str,
    *,
    build: bool = False,
    format: str | None = None,
    progress: bool = False,
    init: str | None = None,
    compression: str | None = None,
) -> GuestImage:
    """The guest image for ``kernel_kind`` in ``format`` (default: :data:`DEFAULT_FORMAT`).

    ``init`` replaces /init (tests boot a stub instead of the agent); ``compression`` is the
    initramfs compression (none, gzip, lz4; default :data:`INITRAMFS_COMPRESSION`).
    Without ``build``, the newest image built from the current guest sources is returned, or
    AssetError; with ``build``, the kernel and the image are built if missing.
    """
    _check_kind(kernel_kind)
    fmt = format or DEFAULT_FORMAT[kernel_kind]
    if fmt not in IMAGE_FORMATS:
        raise AssetError(f"unknown image format {fmt!r}; use one of {', '.join(IMAGE_FORMATS)}")
    if kernel_kind == "debian" and fmt == "erofs":
        raise AssetError(
            "the debian kernel cannot boot an erofs root (virtio_blk and erofs are modules); "
            "use format initramfs"
        )
    comp = "none" if fmt == "erofs" else (compression or INITRAMFS_COMPRESSION)
    k = kernel(kernel_kind, build=build, progress=progress)
    kernel_entry = k.path.parent.name if kernel_kind == "debian" else None
    digest = _image.sources_digest(init)
    match = {
        "kernel": kernel_kind,
        "format": fmt,
        "compression": comp,
        "recipe": _image.RECIPE,
        "sources_sha256": digest,
        "kernel_entry": kernel_entry,
    }
    images = _cache.cache_root() / "image"
    if not build:
        entry = _cache.newest_entry(images, match)
        if entry is None:
            raise AssetError(
                f"no {fmt} guest image for the {kernel_kind} kernel built from the current "
                f"guest sources; {_HINT}"
            )
        return _image_of(entry, kernel_kind, fmt, comp)
    versions = _debs.candidate_versions(_image.PACKAGES)
    key = _cache.cache_key(
        _image.RECIPE, json.dumps(match, sort_keys=True), json.dumps(versions, sort_keys=True)
    )
    final = images / key
    reporter = Reporter(progress)
    if _cache.read_info(final) is None:
        modules = []
        kernel_info: dict[str, object] = {}
        if kernel_kind == "debian":
            from . import _debian

            kernel_info = _cache.read_info(k.path.parent) or {}
            modules = [
                (p, "/" + p.relative_to(k.path.parent / "modules").as_posix())
                for p in _debian.module_paths(k)
            ]
        with _cache.new_entry(final) as tmp:
            out = _image.build_image(
                tmp,
                kernel_kind=kernel_kind,
                fmt=fmt,
                compression=comp,
                versions=versions,
                modules=modules,
                kernel_info=kernel_info,
                init=init,
                reporter=reporter,
            )
            _cache.write_info(
                tmp,
                {**match, "stub_init": init is not None, "packages": versions, "file": out.name,
                 "built_at": time.time()},
            )  # fmt: skip
        group = {"kernel": kernel_kind, "format": fmt, "compression": comp, "stub_init": init is not None}
        _cache.prune(images, group, keep=KEEP_IMAGES)
    else:
        reporter.note(f"image {kernel_kind}/{fmt}: cached at {final}")
    return _image_of(final, kernel_kind, fmt, comp)


def _image_of(entry: Path, kernel_kind: str, fmt: str, compression: str) -> GuestImage:
    path = entry / _image.image_filename(fmt, compression)
    return GuestImage(kernel_kind, fmt, path, path.stat().st_size)


def build_all(kinds: Sequence[str] = KERNEL_KINDS, progress: bool = True) -> None:
    """Build (or find cached) the kernel and the default image of each kind."""
    for kind in kinds:
        _check_kind(kind)
    for kind in kinds:
        guest_image(kind, build=True, progress=progress)  # builds the kernel first


def status() -> list[AssetStatus]:
    """What is built, where, how big (for `hako check`); runs neither apt nor make."""
    rows: list[AssetStatus] = []
    for kind in KERNEL_KINDS:
        try:
            k: Kernel | None = kernel(kind)
        except AssetError as e:
            k = None
            why = str(e)
        if k is None:
            rows.append(AssetStatus(f"kernel/{kind}", False, None, 0, why))
        else:
            rows.append(AssetStatus(f"kernel/{kind}", True, k.path, k.path.stat().st_size, k.release))
    for kind in KERNEL_KINDS:
        for fmt in IMAGE_FORMATS:
            if kind == "debian" and fmt == "erofs":
                continue
            name = f"image/{kind}/{fmt}"
            required = fmt == DEFAULT_FORMAT[kind]
            try:
                img = guest_image(kind, format=fmt)
            except AssetError:
                hint = f"run `hako assets build --kernel {kind} --format {fmt}`"
                rows.append(AssetStatus(name, False, None, 0, hint, required))
                continue
            detail = "from the current guest sources"
            rows.append(AssetStatus(name, True, img.path, img.size_bytes, detail, required))
    return rows
