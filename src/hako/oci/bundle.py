"""An OCI bundle: a directory with config.json (the runtime spec) and the rootfs it names."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hako.errors import ConfigError
from hako.oci.validate import validate_spec


@dataclass(frozen=True)
class Bundle:
    path: Path
    spec: dict[str, Any]
    rootfs: Path


def load_bundle(path: Path | str) -> Bundle:
    """Read and check ``path/config.json``; the rootfs is ``root.path``, relative to the bundle."""
    path = Path(path).absolute()
    config = path / "config.json"
    try:
        text = config.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{config}: not found; a bundle directory needs a config.json") from None
    except OSError as err:
        raise ConfigError(f"{config}: cannot read it: {err.strerror}") from err
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"{config}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}"
        ) from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"{config}: not UTF-8 text: {err.reason}") from err
    validate_spec(spec, str(config))
    root = spec["root"]["path"]
    rootfs = path / root  # an absolute root.path replaces the bundle path, as the spec says
    if not rootfs.is_dir():
        raise ConfigError(f"{config}: root.path {json.dumps(root)} is not a directory ({rootfs})")
    return Bundle(path=path, spec=spec, rootfs=rootfs)
