"""The image configuration a container starts from (the ``config`` object of an OCI image config)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from hako.errors import ImageError
from hako.image.manifest import parse_json

PLATFORM_OS = "linux"
PLATFORM_ARCH = "amd64"


@dataclass(frozen=True)
class ImageConfig:
    """What the image says about how to run it. ``None`` means the image does not set it."""

    entrypoint: tuple[str, ...] | None = None
    cmd: tuple[str, ...] | None = None
    env: tuple[str, ...] = ()
    working_dir: str = ""
    user: str = ""
    labels: dict[str, str] = field(default_factory=dict, hash=False)
    exposed_ports: tuple[str, ...] = ()
    volumes: tuple[str, ...] = ()
    stop_signal: str | None = None
    os: str = PLATFORM_OS
    architecture: str = PLATFORM_ARCH

    @classmethod
    def from_json(cls, data: bytes | str, what: str = "image config") -> ImageConfig:
        """Parse an OCI (or Docker) image config document and check it is for linux/amd64."""
        return cls.from_document(parse_json(data.encode() if isinstance(data, str) else data, what), what)

    @classmethod
    def from_document(cls, document: dict[str, Any], what: str = "image config") -> ImageConfig:
        os_name = _string(document, "os", what, default=PLATFORM_OS)
        arch = _string(document, "architecture", what, default=PLATFORM_ARCH)
        if (os_name, arch) != (PLATFORM_OS, PLATFORM_ARCH):
            raise ImageError(
                f"{what}: the image is for {os_name}/{arch}; hako runs {PLATFORM_OS}/{PLATFORM_ARCH}"
            )
        config = document.get("config") or {}
        if not isinstance(config, dict):
            raise ImageError(f"{what}: config must be an object")
        stop_signal = _string(config, "StopSignal", what, default="")
        return cls(
            entrypoint=_strings_or_none(config, "Entrypoint", what),
            cmd=_strings_or_none(config, "Cmd", what),
            env=_strings_or_none(config, "Env", what) or (),
            working_dir=_string(config, "WorkingDir", what),
            user=_string(config, "User", what),
            labels=_string_map(config, "Labels", what),
            exposed_ports=tuple(sorted(_object_keys(config, "ExposedPorts", what))),
            volumes=tuple(sorted(_object_keys(config, "Volumes", what))),
            stop_signal=stop_signal or None,
            os=os_name,
            architecture=arch,
        )


def _string(obj: dict[str, Any], key: str, what: str, default: str = "") -> str:
    value = obj.get(key)
    if value is None:
        return default
    if not isinstance(value, str):
        raise ImageError(f"{what}: {key} must be a string, got {json.dumps(value)}")
    return value


def _strings_or_none(obj: dict[str, Any], key: str, what: str) -> tuple[str, ...] | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, str):  # Docker accepts a bare string for Cmd/Entrypoint in old configs
        return (value,)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ImageError(f"{what}: {key} must be a list of strings")
    return tuple(value)


def _string_map(obj: dict[str, Any], key: str, what: str) -> dict[str, str]:
    value = obj.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ImageError(f"{what}: {key} must be an object of strings")
    return dict(value)


def _object_keys(obj: dict[str, Any], key: str, what: str) -> list[str]:
    value = obj.get(key)
    if value is None:
        return []
    if not isinstance(value, dict):
        raise ImageError(f"{what}: {key} must be an object")
    return [str(k) for k in value]
