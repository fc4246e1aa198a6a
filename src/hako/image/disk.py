"""An image as a disk: its rootfs as an ext4 filesystem image, and a writable layer over it.

A container's rootfs on a block device (``hako run --rootfs block``) needs no file server
between the guest and the host: the guest's own page cache and ext4 do the work that
virtio-9p sends to QEMU request by request (the seed's nginx table: 9p made a web server 38
times slower than runc, a block device brought it level).

The base is made once per image, next to its rootfs in the image store (``rootfs.ext4``), so it
goes with the image. ``mkfs.ext4 -d`` fills the filesystem from the unpacked rootfs: no loop
device, no mount, nothing only root may do. It has no journal (the writable layer lives as long
as its container; nothing needs to survive a crash) and no ``lost+found`` (the filesystem's root
is the container's ``/``). Its free space is sparse on the host.

Each container writes to its own qcow2 overlay of the base, made in the sandbox's run dir and
removed with it; the base is never written. Every overlay of one base is the same small file (a
qcow2 header naming the base, empty tables), so ``qemu-img create -b`` makes it once, next to the
base, and each container gets a copy: ~0.1 ms instead of ~10 ms of qemu-img on the way to every
container start.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from hako.errors import ImageError

DISK_IMAGE = "rootfs.ext4"
BLOCK_SIZE = 4096
FREE_BYTES = 1 << 30  # room for the container's writes; sparse on the host, so it costs nothing
SLACK = 1.1  # ext4's own metadata over what the files take
SPARE_INODES = 65536


def _tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ImageError(f"{name} not found: install {package} (apt-get install {package})")
    return path


def _run(argv: list[str], what: str) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise ImageError(f"{what} failed: {detail[-1] if detail else f'exit status {result.returncode}'}")


def usage(rootfs: Path) -> tuple[int, int]:
    """What the tree at ``rootfs`` takes in ext4 blocks (bytes) and how many inodes."""
    total = inodes = 0
    for directory, dirs, files in os.walk(rootfs):
        for name in (*dirs, *files):
            st = os.lstat(os.path.join(directory, name))
            total += -(-st.st_size // BLOCK_SIZE) * BLOCK_SIZE
            inodes += 1
    return total, inodes + 1


def filesystem_size(used: int) -> int:
    """The ext4 filesystem's size for ``used`` bytes of files: them, ext4's overhead, free room."""
    size = int(used * SLACK) + FREE_BYTES
    return -(-size // (1 << 20)) * (1 << 20)


def make_ext4(rootfs: Path, target: Path) -> None:
    """Write an ext4 image of the tree at ``rootfs`` to ``target`` (replacing it)."""
    mkfs = _tool("mkfs.ext4", "e2fsprogs")
    debugfs = _tool("debugfs", "e2fsprogs")
    used, inodes = usage(rootfs)
    with open(target, "wb") as f:
        f.truncate(filesystem_size(used))
    _run(
        [
            mkfs,
            *("-q", "-F", "-t", "ext4", "-b", str(BLOCK_SIZE), "-m", "0", "-L", "hako-rootfs"),
            *("-O", "^has_journal", "-N", str(inodes + SPARE_INODES), "-E", "root_owner=0:0"),
            *("-d", str(rootfs), str(target)),
        ],
        f"mkfs.ext4 of {rootfs}",
    )
    # The filesystem's root is the container's /: lost+found would be a stray directory there.
    _run([debugfs, "-w", "-R", "rmdir lost+found", str(target)], f"removing lost+found from {target}")


def create_overlay(base: Path, overlay: Path) -> None:
    """A qcow2 image at ``overlay`` that reads ``base`` (raw) and keeps its own writes."""
    overlay.parent.mkdir(parents=True, exist_ok=True)
    base = base.resolve()
    try:
        pristine = _pristine_overlay(base)
    except OSError:  # the base's directory is read-only to us: make this one directly
        _qemu_img_overlay(base, overlay)
        return
    shutil.copyfile(pristine, overlay)


def _pristine_overlay(base: Path) -> Path:
    """The empty overlay of ``base`` that overlays are copied from, made on first use. Its name
    carries the base's size and modification time: a base made anew gets a new one (and the
    old one goes)."""
    st = base.stat()
    prefix = f".{base.name}."
    pristine = base.with_name(f"{prefix}{st.st_size}-{st.st_mtime_ns}.overlay.qcow2")
    if pristine.is_file():
        return pristine
    staging = pristine.with_name(f"{pristine.name}.{os.getpid()}-{os.urandom(4).hex()}")
    try:
        _qemu_img_overlay(base, staging)
        os.rename(staging, pristine)  # atomic: a racing maker's copy is as good as ours
    finally:
        staging.unlink(missing_ok=True)
    for stale in base.parent.glob(f"{prefix}*.overlay.qcow2"):
        if stale != pristine:
            stale.unlink(missing_ok=True)
    return pristine


def _qemu_img_overlay(base: Path, overlay: Path) -> None:
    qemu_img = _tool("qemu-img", "qemu-utils")
    _run(
        [qemu_img, "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(base), str(overlay)],
        f"creating the writable layer {overlay}",
    )
