"""Find the linux/amd64 image in an OCI image layout (index.json -> [index ->] manifest -> config)."""

from __future__ import annotations

import json
from typing import Any

from hako.errors import ImageError
from hako.image import mediatypes as mt
from hako.image.config import PLATFORM_ARCH, PLATFORM_OS, ImageConfig
from hako.image.digest import verify_bytes
from hako.image.manifest import Descriptor, LayerRef, SourceImage, diff_ids, parse_json
from hako.image.source import ImageSource

_MAX_INDEX_DEPTH = 4


def read_oci_layout(source: ImageSource) -> SourceImage:
    what = f"{source.description}: index.json"
    index = parse_json(source.read("index.json"), what)
    found = _select(source, index, what, depth=0)
    if found is None:
        raise ImageError(f"{source.description}: the image layout has no {PLATFORM_OS}/{PLATFORM_ARCH} image")
    chain, manifest_bytes = found
    chosen = chain[-1]
    names = [n for desc in chain for n in _names(desc.annotations)]
    image = _read_manifest(source, chosen, manifest_bytes)
    names += _docker_repo_tags(source, image)
    return SourceImage(
        id=image.id,
        manifest=image.manifest,
        config=image.config,
        layers=image.layers,
        names=tuple(dict.fromkeys(names)),
    )


def _names(annotations: dict[str, str]) -> list[str]:
    """Image names an index entry carries; a bare tag ("latest") is not a name on its own."""
    names = []
    if full := annotations.get(mt.CONTAINERD_NAME):
        names.append(full)
    ref = annotations.get(mt.REF_NAME, "")
    if ":" in ref or "/" in ref:
        names.append(ref)
    return names


def _read_blob(source: ImageSource, desc: Descriptor, what: str) -> bytes:
    data = source.read(desc.digest.blob_path)
    if len(data) != desc.size:
        raise ImageError(
            f"{what}: size mismatch, expected {desc.size} bytes, got {len(data)}; the image is corrupt"
        )
    verify_bytes(data, desc.digest, what)
    return data


def _kind(desc: Descriptor, data: bytes, what: str) -> str:
    if desc.media_type in mt.INDEXES:
        return "index"
    if desc.media_type in mt.MANIFESTS:
        return "manifest"
    if desc.media_type:
        return "other"
    # No mediaType on the descriptor: the document says what it is.
    document = parse_json(data, what)
    own = document.get("mediaType")
    if own in mt.INDEXES or (own is None and "manifests" in document):
        return "index"
    if own in mt.MANIFESTS or (own is None and "layers" in document):
        return "manifest"
    return "other"


def _is_container_image(data: bytes, what: str) -> bool:
    """False for artifacts (signatures, SBOMs) stored as manifests: their config is not an image config."""
    config = parse_json(data, what).get("config")
    media_type = config.get("mediaType", "") if isinstance(config, dict) else ""
    return not media_type or media_type in mt.CONFIGS


def _matches(platform: dict[str, Any] | None) -> bool | None:
    """True for linux/amd64, False for another platform, None when the entry names none."""
    if platform is None:
        return None
    return platform.get("os") == PLATFORM_OS and platform.get("architecture") == PLATFORM_ARCH


def _select(
    source: ImageSource, index: dict[str, Any], what: str, depth: int
) -> tuple[list[Descriptor], bytes] | None:
    """Walk an index depth-first; return the descriptor chain to the chosen manifest and its bytes.

    An entry for linux/amd64 wins at once; otherwise the first manifest without a platform (a
    single-image layout written by skopeo or buildah) is taken.
    """
    if depth > _MAX_INDEX_DEPTH:
        raise ImageError(f"{what}: image indexes nested too deeply")
    entries = index.get("manifests")
    if not isinstance(entries, list):
        raise ImageError(f"{what}: manifests must be a list")
    fallback: tuple[list[Descriptor], bytes] | None = None
    for i, entry in enumerate(entries):
        desc = Descriptor.parse(entry, f"{what}: manifests[{i}]")
        match = _matches(desc.platform)
        if match is False:
            continue
        blob_what = f"{source.description}: {desc.digest}"
        data = _read_blob(source, desc, blob_what)
        kind = _kind(desc, data, blob_what)
        if kind == "index":
            nested = _select(source, parse_json(data, blob_what), blob_what, depth + 1)
            if nested is not None:
                return [desc, *nested[0]], nested[1]
        elif kind == "manifest" and _is_container_image(data, blob_what):
            if match:
                return [desc], data
            if fallback is None:
                fallback = ([desc], data)
    return fallback


def _read_manifest(source: ImageSource, desc: Descriptor, data: bytes) -> SourceImage:
    what = f"{source.description}: manifest {desc.digest}"
    manifest = parse_json(data, what)
    if manifest.get("schemaVersion") != 2:
        raise ImageError(f"{what}: unsupported schemaVersion {manifest.get('schemaVersion')!r}")
    config_desc = Descriptor.parse(manifest.get("config"), f"{what}: config")
    if config_desc.media_type and config_desc.media_type not in mt.CONFIGS:
        raise ImageError(f"{what}: not a container image (config media type {config_desc.media_type})")
    config_what = f"{source.description}: config {config_desc.digest}"
    config = _read_blob(source, config_desc, config_what)
    config_doc = parse_json(config, config_what)
    ImageConfig.from_document(config_doc, config_what)  # platform and field types checked up front
    raw_layers = manifest.get("layers")
    if not isinstance(raw_layers, list):
        raise ImageError(f"{what}: layers must be a list")
    layer_descs = [Descriptor.parse(d, f"{what}: layers[{i}]") for i, d in enumerate(raw_layers)]
    expected = diff_ids(config_doc, len(layer_descs), config_what)
    layers = []
    for layer, diff_id in zip(layer_descs, expected, strict=True):
        if layer.media_type not in mt.LAYERS:
            raise ImageError(f"{what}: unsupported layer media type {layer.media_type!r} ({layer.digest})")
        layers.append(LayerRef(layer.digest.blob_path, layer.digest, layer.size, layer.media_type, diff_id))
    return SourceImage(id=desc.digest, manifest=data, config=config, layers=tuple(layers))


def _docker_repo_tags(source: ImageSource, image: SourceImage) -> list[str]:
    """``docker save`` (Docker 25+) writes manifest.json beside index.json; its RepoTags are names too."""
    if not source.exists("manifest.json"):
        return []
    try:
        entries = json.loads(source.read("manifest.json"))
    except (ValueError, UnicodeDecodeError):
        return []
    config_hex = str(parse_json(image.manifest, "manifest")["config"]["digest"]).partition(":")[2]
    if not isinstance(entries, list):
        return []
    tags: list[str] = []
    for entry in entries:
        if isinstance(entry, dict) and str(entry.get("Config", "")).endswith(config_hex):
            tags += [t for t in entry.get("RepoTags") or [] if isinstance(t, str)]
    return tags
