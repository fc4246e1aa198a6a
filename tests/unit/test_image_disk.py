"""Writable layers over an image's disk: copies of one empty overlay per base, made by qemu-img."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from hako.image import disk

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img (qemu-utils)")


def _info(path: Path) -> dict[str, object]:
    out = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", str(path)], capture_output=True, text=True, check=True
    )
    info: dict[str, object] = json.loads(out.stdout)
    return info


def _pristines(directory: Path) -> list[Path]:
    return sorted(directory.glob(".base.raw.*.overlay.qcow2"))


def test_overlays_are_copies_of_one_made_by_qemu_img(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = tmp_path / "images" / "base.raw"
    base.parent.mkdir()
    base.write_bytes(b"\0" * (1 << 20))
    made: list[Path] = []
    real = disk._qemu_img_overlay

    def counted(base: Path, overlay: Path) -> None:
        made.append(overlay)
        real(base, overlay)

    monkeypatch.setattr(disk, "_qemu_img_overlay", counted)

    first, second = tmp_path / "c1" / "rootfs.qcow2", tmp_path / "c2" / "rootfs.qcow2"
    disk.create_overlay(base, first)
    disk.create_overlay(base, second)

    assert len(made) == 1  # qemu-img ran once; the second overlay is a copy
    for overlay in (first, second):
        info = _info(overlay)
        assert info["format"] == "qcow2" and info["virtual-size"] == 1 << 20
        assert info["backing-filename"] == str(base) and info["backing-filename-format"] == "raw"
    assert first.read_bytes() == second.read_bytes()
    assert len(_pristines(base.parent)) == 1


def test_a_base_made_anew_gets_a_new_pristine_overlay(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"\0" * (1 << 20))
    disk.create_overlay(base, tmp_path / "a.qcow2")
    old = _pristines(tmp_path)

    base.write_bytes(b"\0" * (2 << 20))  # the image's disk made again, bigger
    os.utime(base, ns=(1, 1))
    disk.create_overlay(base, tmp_path / "b.qcow2")

    assert _info(tmp_path / "b.qcow2")["virtual-size"] == 2 << 20
    new = _pristines(tmp_path)
    assert len(new) == 1 and new != old  # the stale one is gone


def test_a_read_only_base_directory_still_gets_an_overlay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"\0" * (1 << 20))

    def refuse(base: Path) -> Path:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(disk, "_pristine_overlay", refuse)
    disk.create_overlay(base, tmp_path / "c" / "rootfs.qcow2")
    assert _info(tmp_path / "c" / "rootfs.qcow2")["backing-filename"] == str(base)
