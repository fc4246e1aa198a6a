"""The Debian stock kernel: linux-image-amd64's concrete linux-image-6.1.0-N-amd64, never installed.

Build: `apt-get download` the package, `dpkg-deb -x` it into a temporary directory of the cache,
run `depmod -b` there (the package does not ship modules.dep), and keep ``vmlinuz``, the config
and the modules the guest needs (plus their dependencies), decompressed, under
``modules/lib/modules/<release>/...``; ``info.json`` lists them in load order.

Booting: QEMU's microvm boots the bzImage through its default firmware (qboot), but under TCG that
costs ~5 s (qboot loading it, then the kernel decompressing itself, both emulated). The kernel has
CONFIG_PVH, so the build also extracts the uncompressed ELF ``vmlinux`` from the bzImage payload,
and that is what :class:`Kernel` points at: QEMU loads it directly, like the trimmed kernel.

Not the cloud flavour: linux-image-cloud-amd64 lacks 9p. virtio, virtio-blk and erofs are modules
here, so this kernel can only boot an initramfs image. It lacks CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES,
so on microvm it finds virtio-mmio devices only through ACPI (keep microvm's ACPI on). Under TCG
its PIT calibration of the TSC fails at random and, with ACPI, it then hangs waiting for the
timer; ``tsc_early_khz=<host TSC kHz>`` (see :meth:`Kernel.cmdline_for`) avoids that.
"""

from __future__ import annotations

import gzip
import lzma
import shutil
import struct
import time
import zlib
from pathlib import Path

from hako.errors import AssetError

from . import _cache, _debs, _modules
from ._progress import Reporter
from ._run import run
from ._types import BASE_CMDLINE, Kernel

RECIPE = "debian-2"
METAPACKAGE = "linux-image-amd64"
# What the guest needs, by module name; dependencies are added from modules.dep. Names that are
# built into the kernel (modules.builtin) are fine and skipped.
NEEDED_MODULES = (
    # First: libcrc32c (erofs, ext4) asks the crypto API for "crc32c" when it loads, and the guest
    # has no modprobe to load it on demand (a softdep, not in modules.dep).
    "crc32c_generic",
    "virtio_mmio",
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "virtio_rng",
    "9pnet_virtio",
    "9p",
    "overlay",
    "erofs",
    "ext4",
    "vmw_vsock_virtio_transport",
)
# No lpj= (see _trimmed.CMDLINE). The i8042 args skip probing for a PS/2 controller microvm does
# not have (~0.5 s under TCG).
CMDLINE = (
    *BASE_CMDLINE,
    "i8042.noaux",
    "i8042.nokbd",
    "i8042.nopnp",
)
# Keep microvm's ACPI (the only way this kernel finds virtio-mmio devices); rtc=on as for trimmed.
MICROVM_OPTIONS = ("rtc=on",)


def find() -> Kernel | None:
    """The most recently built Debian kernel of this recipe, or None (no apt query: this is fast)."""
    path = _cache.newest_entry(_cache.cache_root() / "kernel", {"kind": "debian", "recipe": RECIPE})
    if path is None:
        return None
    info = _cache.read_info(path)
    assert info is not None
    return Kernel("debian", path / "vmlinux", str(info["release"]), CMDLINE, MICROVM_OPTIONS)


def module_paths(kernel: Kernel) -> list[Path]:
    """The module files of a built Debian kernel in load order (host paths inside its entry)."""
    info = _cache.read_info(kernel.path.parent) or {}
    base = kernel.path.parent / "modules"
    return [base / rel.lstrip("/") for rel in info.get("modules", [])]


def build(reporter: Reporter) -> Kernel:
    """Fetch and unpack the current Debian kernel unless already cached."""
    package = _debs.resolve_metapackage(METAPACKAGE, "linux-image-")
    version = _debs.candidate_versions([package])[package]
    final = _cache.cache_root() / "kernel" / _cache.cache_key(RECIPE, package, version, *NEEDED_MODULES)
    info = _cache.read_info(final)
    if info is not None:
        reporter.note(f"kernel debian {info['release']}: cached at {final}")
        return Kernel("debian", final / "vmlinux", str(info["release"]), CMDLINE, MICROVM_OPTIONS)
    started = time.monotonic()
    reporter.note(f"kernel debian: fetching {package} {version}")
    [deb] = _debs.fetch([package], _cache.cache_root() / "debs", {package: version})
    with _cache.new_entry(final) as tmp:
        root = tmp / "unpacked"
        _debs.extract(deb, root)
        releases = sorted(p.name for p in (root / "lib" / "modules").iterdir())
        if len(releases) != 1:
            raise AssetError(f"{package}: expected one /lib/modules/<release>, found {releases}")
        release = releases[0]
        run(["depmod", "-b", root, release], what=f"depmod -b for {package}")
        moddir = root / "lib" / "modules" / release
        deps = _modules.parse_modules_dep((moddir / "modules.dep").read_text())
        builtin = _modules.parse_builtin((moddir / "modules.builtin").read_text())
        plan = _modules.load_order(NEEDED_MODULES, deps, builtin)
        guest_paths = []
        for rel in plan.order:
            guest_rel = _decompressed_name(rel)
            dest = tmp / "modules" / "lib" / "modules" / release / guest_rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(_read_module(moddir / rel))
            guest_paths.append(f"/lib/modules/{release}/{guest_rel}")
        for name in ("modules.dep", "modules.builtin", "modules.softdep"):
            shutil.copy2(moddir / name, tmp / name)
        shutil.copy2(root / "boot" / f"vmlinuz-{release}", tmp / "vmlinuz")
        (tmp / "vmlinux").write_bytes(extract_vmlinux((tmp / "vmlinuz").read_bytes()))
        shutil.copy2(root / "boot" / f"config-{release}", tmp / "config")
        shutil.rmtree(root)
        _cache.write_info(
            tmp,
            {
                "kind": "debian",
                "recipe": RECIPE,
                "release": release,
                "package": {package: version},
                "modules": guest_paths,
                "builtin": list(plan.builtin),
                "built_at": time.time(),
            },
        )
    _cache.prune(final.parent, {"kind": "debian"}, keep=2)
    reporter.note(
        f"kernel debian {release}: {len(guest_paths)} modules, ready in "
        f"{round(time.monotonic() - started)}s at {final}"
    )
    return Kernel("debian", final / "vmlinux", release, CMDLINE, MICROVM_OPTIONS)


def _decompressed_name(rel: str) -> str:
    for suffix in (".xz", ".gz", ".zst"):
        if rel.endswith(".ko" + suffix):
            return rel[: -len(suffix)]
    return rel


def _read_module(path: Path) -> bytes:
    """The module's ELF bytes; finit_module in the guest gets them uncompressed."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        raise AssetError(
            f"{path.name} is zstd-compressed and Python cannot decompress it; "
            "teach hako.assets._debian to call unzstd"
        )
    return data


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The uncompressed ELF kernel inside a bzImage (what the kernel's own decompressor unpacks).

    The boot protocol header gives the payload's place (``payload_offset``/``payload_length`` at
    0x248, relative to the protected-mode code after the setup sectors). The payload is the
    stripped vmlinux followed by relocation data, which is cut off at the end of the ELF file.
    """
    if len(bzimage) < 0x250 or bzimage[0x202:0x206] != b"HdrS":
        raise AssetError("the Debian kernel is not a bzImage (no HdrS header); cannot extract vmlinux")
    setup_sects = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + offset
    payload = bzimage[start : start + length]
    if payload.startswith(b"\xfd7zXZ\x00"):
        data = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    elif payload.startswith(b"\x1f\x8b"):
        data = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS).decompress(payload)
    else:
        raise AssetError(
            f"the Debian kernel payload is compressed with an unsupported method "
            f"(magic {payload[:4].hex()}); teach hako.assets._debian.extract_vmlinux"
        )
    if data[:4] != b"\x7fELF":
        raise AssetError("the Debian kernel payload is not an ELF file; cannot boot it by PVH")
    phoff, shoff = struct.unpack_from("<QQ", data, 0x20)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", data, 0x36)
    end = max(shoff + shentsize * shnum, phoff + phentsize * phnum)
    for i in range(phnum):
        _type, _flags, p_offset, _vaddr, _paddr, p_filesz = struct.unpack_from(
            "<IIQQQQ", data, phoff + i * phentsize
        )
        end = max(end, p_offset + p_filesz)
    return data[:end]
