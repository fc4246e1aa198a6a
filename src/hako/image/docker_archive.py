"""Read the docker-archive format ``docker save`` wrote before Docker 25 (manifest.json + layer tars).

There is no OCI manifest in such an archive, so one is synthesised (canonical JSON, OCI media
types) from the config and the layers' digests; its digest is the image id. Layers are checked
against the config's ``rootfs.diff_ids``, and the config against its file name when that is a
digest, which is all the integrity information the format carries.
"""

from __future__ import annotations

import io
import json
import re
from typing import Any

from hako.errors import ImageError
from hako.image import mediatypes as mt
from hako.image.config import ImageConfig
from hako.image.decompress import sniff
from hako.image.digest import CHUNK, Digest, HashingReader, verify_bytes
from hako.image.manifest import LayerRef, SourceImage, diff_ids, parse_json
from hako.image.source import ImageSource

_CONFIG_NAME = re.compile(r"(?:^|/)(?:blobs/sha256/)?([0-9a-f]{64})(?:\.json)?$")
_MEDIA_TYPES = {"tar": mt.OCI_LAYER_TAR, "gzip": mt.OCI_LAYER_GZIP, "zstd": mt.OCI_LAYER_ZSTD}


def read_docker_archive(source: ImageSource) -> SourceImage:
    what = f"{source.description}: manifest.json"
    try:
        entries = json.loads(source.read("manifest.json"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ImageError(f"{what}: invalid JSON: {err}") from err
    if not isinstance(entries, list) or not entries or not isinstance(entries[0], dict):
        raise ImageError(f"{what}: expected a list with at least one image")
    entry: dict[str, Any] = entries[0]  # `docker save a b` holds several; the first is the one run
    config_name = entry.get("Config")
    layer_names = entry.get("Layers")
    if not isinstance(config_name, str):
        raise ImageError(f"{what}: Config must be a file name")
    if not isinstance(layer_names, list) or not all(isinstance(n, str) for n in layer_names):
        raise ImageError(f"{what}: Layers must be a list of file names")

    config_what = f"{source.description}: {config_name}"
    config = source.read(config_name)
    if named := _CONFIG_NAME.search(config_name):
        verify_bytes(config, Digest("sha256", named.group(1)), config_what)
    config_doc = parse_json(config, config_what)
    ImageConfig.from_document(config_doc, config_what)
    expected = diff_ids(config_doc, len(layer_names), config_what)

    layers = [_layer_ref(source, name, diff_id) for name, diff_id in zip(layer_names, expected, strict=True)]
    manifest = _synthesise_manifest(Digest.of_bytes(config), len(config), layers)
    repo_tags = [t for t in entry.get("RepoTags") or [] if isinstance(t, str)]
    return SourceImage(
        id=Digest.of_bytes(manifest),
        manifest=manifest,
        config=config,
        layers=tuple(layers),
        names=tuple(dict.fromkeys(repo_tags)),
    )


def _layer_ref(source: ImageSource, name: str, diff_id: Digest | None) -> LayerRef:
    """Hash the layer file (its digest is not written anywhere in the archive)."""
    with source.open(name) as raw:
        hashing = HashingReader(raw)
        buffered = io.BufferedReader(hashing, CHUNK)
        kind = sniff(buffered)
        while buffered.read(CHUNK):
            pass
    return LayerRef(name, hashing.digest(), hashing.size, _MEDIA_TYPES[kind], diff_id)


def _synthesise_manifest(config_digest: Digest, config_size: int, layers: list[LayerRef]) -> bytes:
    manifest = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "config": {"mediaType": mt.OCI_CONFIG, "digest": str(config_digest), "size": config_size},
        "layers": [
            {"mediaType": layer.media_type, "digest": str(layer.digest), "size": layer.size}
            for layer in layers
        ],
    }
    return json.dumps(manifest, separators=(",", ":")).encode()
