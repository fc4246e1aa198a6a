"""The busybox test image: built from Debian's busybox-static, deterministic, and a valid OCI layout."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

from hako.errors import ImageError
from hako.image import mediatypes as mt
from hako.image.busybox import DEFAULT_NAME, build_busybox_image, main
from hako.image.store import ImageStore

pytestmark = pytest.mark.skipif(
    shutil.which("dpkg-query") is None, reason="needs Debian's dpkg to find busybox-static"
)


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_busybox_image(tmp_path_factory.mktemp("busybox") / "busybox")


def _blob(layout: Path, desc: dict[str, Any]) -> bytes:
    algorithm, _, hexpart = str(desc["digest"]).partition(":")
    data = (layout / "blobs" / algorithm / hexpart).read_bytes()
    assert len(data) == desc["size"]
    assert hashlib.new(algorithm, data).hexdigest() == hexpart
    return data


def _installed() -> bool:
    done = subprocess.run(
        ["dpkg-query", "-W", "-f=${db:Status-Status}", "busybox-static"],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout == "installed"


def _manifest_digest(layout: Path) -> str:
    return str(json.loads((layout / "index.json").read_text())["manifests"][0]["digest"])


def test_layout_is_valid(layout: Path) -> None:
    assert json.loads((layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((layout / "index.json").read_text())
    assert index["schemaVersion"] == 2
    [entry] = index["manifests"]
    assert entry["mediaType"] == mt.OCI_MANIFEST
    assert entry["platform"] == {"architecture": "amd64", "os": "linux"}
    assert entry["annotations"][mt.REF_NAME] == DEFAULT_NAME
    manifest = json.loads(_blob(layout, entry))
    assert manifest["config"]["mediaType"] == mt.OCI_CONFIG
    config = json.loads(_blob(layout, manifest["config"]))
    assert config["config"]["Cmd"] == ["sh"]
    assert any(e.startswith("PATH=") for e in config["config"]["Env"])
    [layer_desc] = manifest["layers"]
    assert layer_desc["mediaType"] == mt.OCI_LAYER_GZIP
    layer = gzip.decompress(_blob(layout, layer_desc))
    assert config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(layer).hexdigest()]
    # Every blob in the layout is referenced.
    referenced = {entry["digest"], manifest["config"]["digest"], layer_desc["digest"]}
    assert {f"sha256:{p.name}" for p in (layout / "blobs" / "sha256").iterdir()} == referenced


def test_layer_contents(layout: Path) -> None:
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads(_blob(layout, index["manifests"][0]))
    layer = gzip.decompress(_blob(layout, manifest["layers"][0]))
    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        members = {m.name: m for m in tar.getmembers()}
        names = [m.name for m in tar.getmembers()]
        passwd = tar.extractfile("etc/passwd").read().decode()  # type: ignore[union-attr]
        busybox = tar.extractfile("bin/busybox").read()  # type: ignore[union-attr]
    assert names == sorted(names)
    assert {m.mtime for m in members.values()} == {members["bin"].mtime}
    assert {(m.uid, m.gid) for m in members.values()} == {(0, 0)}
    for name in ("proc", "sys", "dev", "root", "home", "etc", "bin"):
        assert members[name].isdir(), name
    assert members["tmp"].mode == 0o1777
    assert members["bin/busybox"].mode == 0o755
    assert members["bin/sh"].issym() and members["bin/sh"].linkname == "busybox"
    assert members["bin/ls"].issym()
    assert passwd.startswith("root:x:0:0:")
    assert "nobody:x:65534:65534:" in passwd
    assert "etc/group" in members
    assert busybox.startswith(b"\x7fELF")
    if _installed():
        assert busybox == Path("/bin/busybox").read_bytes()  # Debian's binary, as installed


def test_rebuild_gives_the_same_digest(layout: Path, tmp_path: Path) -> None:
    again = build_busybox_image(tmp_path / "again")
    assert _manifest_digest(again) == _manifest_digest(layout)
    # Rebuilding over an existing layout replaces it, with the same result.
    build_busybox_image(again)
    assert _manifest_digest(again) == _manifest_digest(layout)


def test_tar_output_is_deterministic_and_importable(tmp_path: Path) -> None:
    first = build_busybox_image(tmp_path / "one" / "busybox", tar=True)
    second = build_busybox_image(tmp_path / "two" / "busybox", tar=True)
    assert first == tmp_path / "one" / "busybox.tar"
    assert first.read_bytes() == second.read_bytes()
    store = ImageStore(tmp_path / "store")
    image = store.import_path(first)
    assert image.id == _manifest_digest(tmp_path / "one" / "busybox")
    assert store.get("busybox").id == image.id
    assert os.readlink(image.rootfs / "bin" / "sh") == "busybox"
    assert stat.S_IMODE(os.stat(image.rootfs / "tmp").st_mode) == 0o1777
    assert image.config.cmd == ("sh",)


def test_refuses_to_replace_a_directory_that_is_not_a_layout(tmp_path: Path) -> None:
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "file").write_text("keep me")
    with pytest.raises(ImageError, match="not an image layout"):
        build_busybox_image(tmp_path / "precious")
    assert (tmp_path / "precious" / "file").read_text() == "keep me"


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "cli"), "--name", "example.test/bb:1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{tmp_path / 'cli'} sha256:")
    index = json.loads((tmp_path / "cli" / "index.json").read_text())
    assert index["manifests"][0]["annotations"][mt.REF_NAME] == "example.test/bb:1"
