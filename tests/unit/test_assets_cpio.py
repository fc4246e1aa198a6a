"""The cpio "newc" writer, checked with Debian's cpio(1); no root needed for device nodes."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import pytest

from hako.assets._cpio import CpioWriter

pytestmark = pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio(1) is not installed")


def _archive(tmp_path: Path) -> bytes:
    tree = tmp_path / "tree"
    (tree / "bin").mkdir(parents=True)
    (tree / "bin" / "busybox").write_bytes(b"\x7fELF fake")
    (tree / "bin" / "busybox").chmod(0o755)
    (tree / "bin" / "sh").symlink_to("busybox")
    (tree / "etc").mkdir()
    (tree / "etc" / "odd.txt").write_bytes(b"12345")  # not a multiple of 4: exercises padding
    buf = io.BytesIO()
    w = CpioWriter(buf)
    w.add_tree(tree)
    w.add_dir("dev")
    w.add_char_device("dev/console", 5, 1, 0o600)
    w.add_char_device("dev/null", 1, 3)
    w.add_char_device("dev/urandom", 1, 9)
    w.add_file("init", b"#!/bin/sh\necho hi\n", 0o755)
    w.close()
    return buf.getvalue()


def test_cpio_lists_modes_links_and_device_nodes(tmp_path: Path) -> None:
    data = _archive(tmp_path)
    assert len(data) % 512 == 0
    out = subprocess.run(["cpio", "-t", "-v", "--quiet"], input=data, capture_output=True, check=True)
    rows = {
        line.split()[-1] if "->" not in line else line.split()[-3]: line
        for line in out.stdout.decode().splitlines()
    }
    assert rows["bin"].startswith("drwxr-xr-x")
    assert rows["bin/busybox"].startswith("-rwxr-xr-x")
    assert rows["bin/sh"].startswith("lrwxrwxrwx") and rows["bin/sh"].endswith("-> busybox")
    assert rows["dev/console"].startswith("crw-------") and "5,   1" in rows["dev/console"]
    assert rows["dev/null"].startswith("crw-rw-rw-") and "1,   3" in rows["dev/null"]
    assert rows["dev/urandom"].startswith("crw-rw-rw-") and "1,   9" in rows["dev/urandom"]
    assert rows["init"].startswith("-rwxr-xr-x")
    assert all(" root " in row for row in rows.values())


def test_cpio_contents_extract_intact(tmp_path: Path) -> None:
    data = _archive(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    # Regular files only: device nodes would need root to create.
    subprocess.run(
        ["cpio", "-i", "-d", "--quiet", "--no-absolute-filenames", "etc/odd.txt", "init"],
        input=data,
        cwd=out,
        check=True,
    )
    assert (out / "etc" / "odd.txt").read_bytes() == b"12345"
    assert (out / "init").read_bytes() == b"#!/bin/sh\necho hi\n"


def test_duplicate_entries_are_refused() -> None:
    w = CpioWriter(io.BytesIO())
    w.add_dir("dev")
    with pytest.raises(ValueError, match="duplicate entry dev"):
        w.add_dir("/dev/")
