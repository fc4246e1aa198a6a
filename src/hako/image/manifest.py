"""Descriptors and the unpack plan of one image found in a layout or archive."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from hako.errors import ImageError
from hako.image.digest import Digest


def parse_json(data: bytes, what: str) -> dict[str, Any]:
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise ImageError(f"{what}: invalid JSON: {err}") from err
    if not isinstance(document, dict):
        raise ImageError(f"{what}: expected a JSON object")
    return document


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor: what a blob is, its digest and size."""

    media_type: str
    digest: Digest
    size: int
    annotations: dict[str, str] = field(default_factory=dict, hash=False)
    platform: dict[str, Any] | None = field(default=None, hash=False)

    @classmethod
    def parse(cls, obj: object, what: str) -> Descriptor:
        if not isinstance(obj, dict):
            raise ImageError(f"{what}: a descriptor must be an object")
        media_type = obj.get("mediaType", "")
        size = obj.get("size")
        annotations = obj.get("annotations") or {}
        platform = obj.get("platform")
        if not isinstance(media_type, str):
            raise ImageError(f"{what}: mediaType must be a string")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ImageError(f"{what}: descriptor of {obj.get('digest')} has no valid size")
        if not isinstance(annotations, dict):
            raise ImageError(f"{what}: annotations must be an object")
        if platform is not None and not isinstance(platform, dict):
            raise ImageError(f"{what}: platform must be an object")
        return cls(
            media_type=media_type,
            digest=Digest.parse(obj.get("digest")),
            size=size,
            annotations={str(k): str(v) for k, v in annotations.items()},
            platform=platform,
        )


@dataclass(frozen=True)
class LayerRef:
    """One layer to apply: where its blob is in the source and what it must hash to."""

    path: str
    digest: Digest
    size: int
    media_type: str
    diff_id: Digest | None = None


@dataclass(frozen=True)
class SourceImage:
    """An image found in a source, ready to unpack; ``id`` is its manifest digest."""

    id: Digest
    manifest: bytes
    config: bytes
    layers: tuple[LayerRef, ...]
    names: tuple[str, ...] = ()


def diff_ids(config: dict[str, Any], layer_count: int, what: str) -> list[Digest | None]:
    """The uncompressed-layer digests the config promises, one per layer (None when absent)."""
    rootfs = config.get("rootfs")
    if rootfs is None:
        return [None] * layer_count
    if not isinstance(rootfs, dict) or not isinstance(rootfs.get("diff_ids", []), list):
        raise ImageError(f"{what}: rootfs.diff_ids must be a list")
    ids = [Digest.parse(d) for d in rootfs.get("diff_ids", [])]
    if len(ids) != layer_count:
        raise ImageError(
            f"{what}: the config lists {len(ids)} layers (diff_ids) but the image has {layer_count}"
        )
    return list(ids)
