"""The image store: importing layouts, layout tars and docker-archives; names; integrity; concurrency."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import subprocess
import tarfile
import threading
from pathlib import Path
from typing import Any

import pytest

from hako.errors import ImageError, ImageNotFound
from hako.image import mediatypes as mt
from hako.image.store import Image, ImageStore
from hako.oci.bundle import Bundle

from .test_image_layer import directory, file, layer_tar, symlink, tree

LAYERS = [
    layer_tar(
        directory("bin"),
        file("bin/app", b"app v1", mode=0o755),
        symlink("bin/sh", "/bin/app"),
        directory("etc"),
        file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"),
        file("etc/old", b"old"),
        directory("data"),
        file("data/lower", b"lower"),
    ),
    layer_tar(file("etc/.wh.old"), file("bin/app", b"app v2", mode=0o755), file("data/.wh..wh..opq")),
    layer_tar(file("data/upper", b"upper"), directory("tmp", mode=0o1777)),
]
CONFIG: dict[str, Any] = {
    "architecture": "amd64",
    "os": "linux",
    "config": {
        "Entrypoint": ["/bin/app"],
        "Cmd": ["--serve"],
        "Env": ["PATH=/bin", "APP=1"],
        "WorkingDir": "/data",
        "User": "root",
        "Labels": {"org.example": "yes"},
        "ExposedPorts": {"80/tcp": {}},
        "StopSignal": "SIGINT",
    },
}
NAME = "hako.test/app:1"


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _blob(layout: Path, data: bytes, media_type: str) -> dict[str, Any]:
    digest = _sha(data)
    path = layout / "blobs" / "sha256" / digest.partition(":")[2]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"mediaType": media_type, "digest": digest, "size": len(data)}


def write_layout(
    layout: Path,
    layers: list[bytes] = LAYERS,
    *,
    config: dict[str, Any] = CONFIG,
    compression: str = "gzip",
    annotations: dict[str, str] | None = None,
    platform: dict[str, str] | None = None,
) -> str:
    """Write a one-image OCI layout; return the manifest digest."""
    layout.mkdir(parents=True, exist_ok=True)
    layer_descs = []
    for data in layers:
        if compression == "gzip":
            layer_descs.append(_blob(layout, gzip.compress(data, mtime=0), mt.OCI_LAYER_GZIP))
        elif compression == "zstd":
            packed = subprocess.run(["zstd", "-q", "-c"], input=data, capture_output=True, check=True).stdout
            layer_descs.append(_blob(layout, packed, mt.OCI_LAYER_ZSTD))
        else:
            layer_descs.append(_blob(layout, data, mt.OCI_LAYER_TAR))
    full_config = {**config, "rootfs": {"type": "layers", "diff_ids": [_sha(d) for d in layers]}}
    config_desc = _blob(layout, json.dumps(full_config).encode(), mt.OCI_CONFIG)
    manifest = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "config": config_desc,
        "layers": layer_descs,
    }
    manifest_desc = _blob(layout, json.dumps(manifest).encode(), mt.OCI_MANIFEST)
    entry: dict[str, Any] = {**manifest_desc, "annotations": annotations or {mt.REF_NAME: NAME}}
    if platform is not None:
        entry["platform"] = platform
    index = {"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": [entry]}
    (layout / "index.json").write_text(json.dumps(index))
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    return str(manifest_desc["digest"])


def tar_directory(source: Path, tar_path: Path) -> Path:
    with tarfile.open(tar_path, "w") as tar:
        for path in sorted(source.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(source)), recursive=False)
    return tar_path


def write_docker_archive(
    tar_path: Path, layers: list[bytes] = LAYERS, *, config: dict[str, Any] = CONFIG
) -> Path:
    """The pre-Docker-25 `docker save` format: <id>.json, <layer-id>/layer.tar, manifest.json."""
    full_config = json.dumps({**config, "rootfs": {"type": "layers", "diff_ids": [_sha(d) for d in layers]}})
    config_name = hashlib.sha256(full_config.encode()).hexdigest() + ".json"
    files: dict[str, bytes] = {config_name: full_config.encode()}
    layer_names = []
    for i, data in enumerate(layers):
        name = f"{i:064x}/layer.tar"
        files[name] = data
        layer_names.append(name)
    manifest = [{"Config": config_name, "RepoTags": ["example/app:1"], "Layers": layer_names}]
    files["manifest.json"] = json.dumps(manifest).encode()
    with tarfile.open(tar_path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return tar_path


def assert_store_is_clean(store: ImageStore) -> None:
    for sub in ("images", "tmp"):
        directory_ = store.root / sub
        assert not directory_.exists() or list(directory_.iterdir()) == [], sub


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "store")


EXPECTED_TREE = {
    "bin": "dir",
    "bin/app": "app v2",
    "bin/sh": "link:/bin/app",
    "etc": "dir",
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\n",
    "data": "dir",
    "data/upper": "upper",
    "tmp": "dir",
}


def test_import_layout_directory(store: ImageStore, tmp_path: Path) -> None:
    digest = write_layout(tmp_path / "layout")
    image = store.import_path(tmp_path / "layout")
    assert image.id == digest
    assert image.names == (NAME,)
    assert image.sources == (str(tmp_path / "layout"),)
    assert tree(image.rootfs) == EXPECTED_TREE
    assert image.config.entrypoint == ("/bin/app",)
    assert image.config.cmd == ("--serve",)
    assert image.config.env == ("PATH=/bin", "APP=1")
    assert image.config.working_dir == "/data"
    assert image.config.labels == {"org.example": "yes"}
    assert image.config.exposed_ports == ("80/tcp",)
    assert image.config.stop_signal == "SIGINT"
    on_disk = {p.name for p in image.path.iterdir()}
    assert on_disk == {"image.json", "manifest.json", "config.json", "rootfs"}


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_layout_tar_and_docker_archive_give_the_same_rootfs(tmp_path: Path, compression: str) -> None:
    if compression == "zstd" and shutil.which("zstd") is None:
        pytest.skip("zstd not installed")
    write_layout(tmp_path / "layout", compression=compression)
    tar_directory(tmp_path / "layout", tmp_path / "layout.tar")
    write_docker_archive(tmp_path / "docker.tar")
    from_dir = ImageStore(tmp_path / "s1").import_path(tmp_path / "layout")
    from_tar = ImageStore(tmp_path / "s2").import_path(tmp_path / "layout.tar")
    from_docker = ImageStore(tmp_path / "s3").import_path(tmp_path / "docker.tar")
    assert from_dir.id == from_tar.id
    assert from_docker.names == ("example/app:1",)
    assert tree(from_dir.rootfs) == tree(from_tar.rootfs) == tree(from_docker.rootfs) == EXPECTED_TREE
    assert from_docker.config == from_dir.config


def test_compressed_docker_archive(store: ImageStore, tmp_path: Path) -> None:
    plain = write_docker_archive(tmp_path / "docker.tar").read_bytes()
    (tmp_path / "docker.tar.gz").write_bytes(gzip.compress(plain))
    image = store.import_path(tmp_path / "docker.tar.gz")
    assert tree(image.rootfs) == EXPECTED_TREE


def test_unreadable_store_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ImageError, match="cannot read the image store"):
        ImageStore(blocker).list()


def test_docker_25_save_format_records_repo_tags(store: ImageStore, tmp_path: Path) -> None:
    layout = tmp_path / "saved"
    write_layout(
        layout,
        annotations={mt.CONTAINERD_NAME: "docker.io/library/app:1", mt.REF_NAME: "1"},
    )
    index = json.loads((layout / "index.json").read_text())
    manifest_hex = index["manifests"][0]["digest"].partition(":")[2]
    manifest = json.loads((layout / "blobs" / "sha256" / manifest_hex).read_text())
    config_blob = "blobs/sha256/" + manifest["config"]["digest"].partition(":")[2]
    (layout / "manifest.json").write_text(
        json.dumps([{"Config": config_blob, "RepoTags": ["app:1"], "Layers": []}])
    )
    image = store.import_path(tar_directory(layout, tmp_path / "saved.tar"))
    assert image.names == ("docker.io/library/app:1", "app:1")  # the bare tag "1" is not a name
    assert store.get("app:1").id == image.id


def test_repeat_import_is_a_no_op(store: ImageStore, tmp_path: Path) -> None:
    write_layout(tmp_path / "layout")
    first = store.import_path(tmp_path / "layout")
    marker = first.rootfs / "marker"
    marker.write_text("still the same unpack")
    second = store.import_path(tar_directory(tmp_path / "layout", tmp_path / "layout.tar"))
    assert second.id == first.id
    assert marker.exists()
    assert second.sources == (str(tmp_path / "layout"), str(tmp_path / "layout.tar"))
    assert len(store.list()) == 1


def test_corrupt_layer_blob_is_detected(store: ImageStore, tmp_path: Path) -> None:
    write_layout(tmp_path / "layout", compression="none")
    manifest = _manifest(tmp_path / "layout")
    blob = tmp_path / "layout" / "blobs" / "sha256" / manifest["layers"][1]["digest"].partition(":")[2]
    data = bytearray(blob.read_bytes())
    data[data.index(b"app v2")] = ord("X")  # still a valid tar, different content
    blob.write_bytes(bytes(data))
    with pytest.raises(ImageError, match="digest mismatch"):
        store.import_path(tmp_path / "layout")
    assert_store_is_clean(store)


def test_corrupt_gzip_layer_reports_the_digest(store: ImageStore, tmp_path: Path) -> None:
    write_layout(tmp_path / "layout")
    manifest = _manifest(tmp_path / "layout")
    blob = tmp_path / "layout" / "blobs" / "sha256" / manifest["layers"][0]["digest"].partition(":")[2]
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(ImageError, match="digest mismatch"):
        store.import_path(tmp_path / "layout")
    assert_store_is_clean(store)


def test_corrupt_config_is_detected(store: ImageStore, tmp_path: Path) -> None:
    write_layout(tmp_path / "layout")
    manifest = _manifest(tmp_path / "layout")
    blob = tmp_path / "layout" / "blobs" / "sha256" / manifest["config"]["digest"].partition(":")[2]
    blob.write_bytes(blob.read_bytes().replace(b"APP=1", b"APP=2"))
    with pytest.raises(ImageError, match="digest mismatch"):
        store.import_path(tmp_path / "layout")


def test_docker_archive_layer_must_match_diff_id(store: ImageStore, tmp_path: Path) -> None:
    tampered = [LAYERS[0], LAYERS[1].replace(b"app v2", b"app v3"), LAYERS[2]]
    archive = write_docker_archive(tmp_path / "docker.tar", LAYERS)
    with tarfile.open(archive) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    members[f"{1:064x}/layer.tar"] = tampered[1]
    with tarfile.open(archive, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ImageError, match=r"\(uncompressed\): digest mismatch"):
        store.import_path(archive)
    assert_store_is_clean(store)


def test_failed_import_leaves_nothing_behind(store: ImageStore, tmp_path: Path) -> None:
    evil = [LAYERS[0], layer_tar(file("../../escape", b"x"))]
    write_layout(tmp_path / "layout", evil)
    with pytest.raises(ImageError, match="outside the rootfs"):
        store.import_path(tmp_path / "layout")
    assert_store_is_clean(store)
    assert not (tmp_path / "escape").exists()


def test_resolve_by_path_name_id_and_unknown(store: ImageStore, tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    write_layout(layout)
    (tmp_path / "empty-dir-for-tar").mkdir()
    (tmp_path / "empty-dir-for-tar" / "readme").write_text("hi")
    imported = store.resolve(str(layout))
    assert isinstance(imported, Image)
    assert store.resolve(NAME) == imported
    assert store.resolve("hako.test/app:1") == imported
    assert store.get("app:1") == imported  # no registry given: matched on repository and tag
    assert store.get(imported.id) == imported
    assert store.get(imported.short_id) == imported
    shutil.rmtree(layout)
    assert store.resolve(str(layout)) == imported  # the path it came from is remembered
    with pytest.raises(
        ImageNotFound, match='image "nope" not found: not an OCI image layout, image tar, bundle'
    ):
        store.resolve("nope")
    with pytest.raises(ImageNotFound):
        store.get("app:2")
    plain_tar = tar_directory(tmp_path / "empty-dir-for-tar", tmp_path / "plain.tar")
    with pytest.raises(ImageError, match="is a tar but not an image"):
        store.resolve(str(plain_tar))
    not_an_image = tmp_path / "plain"
    not_an_image.mkdir()
    with pytest.raises(ImageNotFound, match="is not an OCI image layout, image tar or bundle"):
        store.resolve(str(not_an_image))


def test_docker_hub_short_names_match(store: ImageStore, tmp_path: Path) -> None:
    write_layout(tmp_path / "layout", annotations={mt.REF_NAME: "docker.io/library/busybox:latest"})
    image = store.import_path(tmp_path / "layout")
    assert store.get("busybox") == image
    assert store.get("library/busybox:latest") == image
    assert store.get("docker.io/library/busybox") == image


def test_ambiguous_short_name_is_an_error(store: ImageStore, tmp_path: Path) -> None:
    write_layout(tmp_path / "a", annotations={mt.REF_NAME: "one.example/app:1"})
    write_layout(tmp_path / "b", [LAYERS[0]], annotations={mt.REF_NAME: "two.example/app:1"})
    store.import_path(tmp_path / "a")
    store.import_path(tmp_path / "b")
    with pytest.raises(ImageError, match="ambiguous"):
        store.get("app:1")
    assert store.get("two.example/app:1").names == ("two.example/app:1",)


def test_a_name_moves_to_the_latest_import(store: ImageStore, tmp_path: Path) -> None:
    write_layout(tmp_path / "v1", [LAYERS[0]])
    write_layout(tmp_path / "v2")
    old = store.import_path(tmp_path / "v1")
    new = store.import_path(tmp_path / "v2", name="extra/name:tag")
    assert old.id != new.id
    assert store.get(NAME).id == new.id
    assert store.get("extra/name:tag").id == new.id
    remaining = {image.id: image for image in store.list()}
    assert remaining[old.id].names == ()


def test_remove(store: ImageStore, tmp_path: Path) -> None:
    write_layout(tmp_path / "layout")
    image = store.import_path(tmp_path / "layout")
    assert store.remove(NAME).id == image.id
    assert store.list() == []
    assert not image.path.exists()
    with pytest.raises(ImageNotFound):
        store.get(NAME)
    assert_store_is_clean(store)


def test_concurrent_imports_of_one_tar_unpack_once(store: ImageStore, tmp_path: Path) -> None:
    write_layout(tmp_path / "layout")
    tar_path = tar_directory(tmp_path / "layout", tmp_path / "layout.tar")
    results: list[Image] = []
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def run() -> None:
        start.wait()
        try:
            results.append(store.import_path(tar_path))
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len({image.id for image in results}) == 1
    assert [p.name for p in (store.root / "images").iterdir()] == [results[0].path.name]
    assert list((store.root / "tmp").iterdir()) == []
    assert tree(results[0].rootfs) == EXPECTED_TREE


def test_nested_index_picks_linux_amd64(store: ImageStore, tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    amd64 = write_layout(layout, platform={"os": "linux", "architecture": "amd64"})
    amd64_entry = json.loads((layout / "index.json").read_text())["manifests"][0]
    arm_config = {**CONFIG, "architecture": "arm64"}
    write_layout(layout, [LAYERS[0]], config=arm_config, platform={"os": "linux", "architecture": "arm64"})
    arm_entry = json.loads((layout / "index.json").read_text())["manifests"][0]
    nested = {"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": [arm_entry, amd64_entry]}
    nested_desc = _blob(layout, json.dumps(nested).encode(), mt.OCI_INDEX)
    top = {"schemaVersion": 2, "manifests": [{**nested_desc, "annotations": {mt.REF_NAME: "multi/arch:1"}}]}
    (layout / "index.json").write_text(json.dumps(top))
    image = store.import_path(layout)
    assert image.id == amd64
    assert "multi/arch:1" in image.names


def test_artifact_manifests_are_skipped(store: ImageStore, tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    image_digest = write_layout(layout)
    image_entry = json.loads((layout / "index.json").read_text())["manifests"][0]
    signature_config = _blob(layout, b"{}", "application/vnd.dev.cosign.simplesigning.v1+json")
    signature = {"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST, "config": signature_config, "layers": []}
    signature_entry = _blob(layout, json.dumps(signature).encode(), mt.OCI_MANIFEST)
    index = {"schemaVersion": 2, "manifests": [signature_entry, image_entry]}
    (layout / "index.json").write_text(json.dumps(index))
    assert store.import_path(layout).id == image_digest


def test_only_other_platforms_is_an_error(store: ImageStore, tmp_path: Path) -> None:
    arm_config = {**CONFIG, "architecture": "arm64"}
    write_layout(tmp_path / "layout", config=arm_config, platform={"os": "linux", "architecture": "arm64"})
    with pytest.raises(ImageError, match="no linux/amd64 image"):
        store.import_path(tmp_path / "layout")
    write_layout(tmp_path / "unlabelled", config=arm_config)
    with pytest.raises(ImageError, match="the image is for linux/arm64"):
        store.import_path(tmp_path / "unlabelled")


def test_zstd_without_the_program_is_a_clear_error(
    store: ImageStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if shutil.which("zstd") is None:
        pytest.skip("zstd not installed (needed to write the test image)")
    write_layout(tmp_path / "layout", compression="zstd")
    monkeypatch.setattr("hako.image.decompress.shutil.which", lambda name: None)
    with pytest.raises(ImageError, match="zstd program is not installed"):
        store.import_path(tmp_path / "layout")
    assert_store_is_clean(store)


def test_unsupported_layer_media_type(store: ImageStore, tmp_path: Path) -> None:
    write_layout(tmp_path / "layout")
    manifest_path, manifest = _manifest_path(tmp_path / "layout")
    manifest["layers"][0]["mediaType"] = "application/vnd.example.weights"
    desc = _blob(tmp_path / "layout", json.dumps(manifest).encode(), mt.OCI_MANIFEST)
    (tmp_path / "layout" / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [desc]}))
    with pytest.raises(ImageError, match="unsupported layer media type"):
        store.import_path(tmp_path / "layout")


def test_resolve_bundle(store: ImageStore, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    (bundle / "rootfs").mkdir(parents=True)
    spec = {"ociVersion": "1.0.2", "root": {"path": "rootfs"}, "process": {"args": ["sh"], "cwd": "/"}}
    spec["process"]["user"] = {"uid": 0, "gid": 0}  # type: ignore[index]
    (bundle / "config.json").write_text(json.dumps(spec))
    resolved = store.resolve(str(bundle))
    assert isinstance(resolved, Bundle)
    assert resolved.rootfs == bundle / "rootfs"
    with pytest.raises(ImageError, match="is an OCI bundle"):
        store.import_path(bundle)


def test_store_root_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HAKO_IMAGES", str(tmp_path / "env-store"))
    assert ImageStore().root == tmp_path / "env-store"
    assert ImageStore(tmp_path / "explicit").root == tmp_path / "explicit"
    monkeypatch.delenv("HAKO_IMAGES")
    assert ImageStore().root == Path("/var/lib/hako/images")


def _manifest_path(layout: Path) -> tuple[Path, dict[str, Any]]:
    index = json.loads((layout / "index.json").read_text())
    path = layout / "blobs" / "sha256" / index["manifests"][0]["digest"].partition(":")[2]
    return path, json.loads(path.read_text())


def _manifest(layout: Path) -> dict[str, Any]:
    return _manifest_path(layout)[1]
