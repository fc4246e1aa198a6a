"""The shim's configuration: a TOML file, chosen by containerd's runtime options.

Where it comes from, first match wins: the ``ConfigPath`` of the runtime
options containerd passes (``runtimeoptions.v1.Options``, set in containerd's
config as ``[...runtimes.hako.options] ConfigPath = "..."``), then
``$HAKO_CONFIG``, then /etc/hako/hako.toml; defaults otherwise. Example::

    [hypervisor]
    kernel = "trimmed"      # or "debian"
    image = "initramfs"     # guest image format: "initramfs" or "erofs"; default: per kernel
    memory_mib = 256
    vcpus = 1
    accel = "auto"          # "kvm", "tcg"

    [runtime]
    debug = false           # verbose guest agent log
    boot_timeout = 60       # seconds
    template = "auto"       # restore VMs from a template: "auto" (pages shared), "private", "off"
    pool = true             # take a pod's VM from the warm pool (hako pool fill --network none)
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hako.errors import ConfigError

if TYPE_CHECKING:
    from google.protobuf.any_pb2 import Any as AnyPb

DEFAULT_PATH = Path("/etc/hako/hako.toml")
RUNTIME_OPTIONS = "runtimeoptions.v1.Options"


@dataclass(frozen=True)
class ShimConfig:
    kernel: str = "trimmed"
    image: str | None = None
    memory_mib: int = 256
    vcpus: int = 1
    accel: str = "auto"
    debug: bool = False
    boot_timeout: float = 60.0
    template: str = "auto"
    pool: bool = True
    source: str = "defaults"  # where it was read from, for the log


_SECTIONS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "hypervisor": {"kernel": str, "image": str, "memory_mib": int, "vcpus": int, "accel": str},
    "runtime": {"debug": bool, "boot_timeout": (int, float), "template": str, "pool": bool},
}
_CHOICES = {
    "kernel": ("trimmed", "debian"),
    "image": ("initramfs", "erofs"),
    "accel": ("auto", "kvm", "tcg"),
    "template": ("auto", "private", "off"),
}


def parse(text: str, source: str) -> ShimConfig:
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from exc
    values: dict[str, Any] = {}
    for section, table in document.items():
        known = _SECTIONS.get(section)
        if known is None or not isinstance(table, dict):
            raise ConfigError(f"{source}: unknown section [{section}]; use {', '.join(_SECTIONS)}")
        for key, value in table.items():
            kind = known.get(key)
            if kind is None:
                raise ConfigError(f"{source}: unknown key {key!r} in [{section}]; use {', '.join(known)}")
            if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
                raise ConfigError(f"{source}: [{section}] {key} has the wrong type: {value!r}")
            if key in _CHOICES and value not in _CHOICES[key]:
                raise ConfigError(f"{source}: [{section}] {key} = {value!r}; use {', '.join(_CHOICES[key])}")
            values[key] = value
    if values.get("memory_mib", 256) < 128:
        raise ConfigError(f"{source}: [hypervisor] memory_mib must be at least 128")
    if values.get("vcpus", 1) < 1:
        raise ConfigError(f"{source}: [hypervisor] vcpus must be at least 1")
    if values.get("boot_timeout", 60) <= 0:
        raise ConfigError(f"{source}: [runtime] boot_timeout must be more than 0 (seconds)")
    known_fields = {f.name for f in fields(ShimConfig)}
    return ShimConfig(**{k: v for k, v in values.items() if k in known_fields}, source=source)


def load(config_path: str | None = None) -> ShimConfig:
    """The configuration for ``config_path`` (from the runtime options), or the default file."""
    path = Path(config_path) if config_path else None
    if path is None and os.environ.get("HAKO_CONFIG"):
        path = Path(os.environ["HAKO_CONFIG"])
    if path is None and DEFAULT_PATH.exists():
        path = DEFAULT_PATH
    if path is None:
        return ShimConfig()
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read the hako config {path}: {exc.strerror}") from exc
    return parse(text, str(path))


def config_path(options: AnyPb) -> str | None:
    """The ConfigPath of containerd's runtime options (``runtimeoptions.v1.Options``), if any."""
    from hako_containerd.containerd.pkg.runtimeoptions.v1 import api_pb2 as runtimeoptions

    if not options.type_url:
        return None
    if options.type_url.rsplit("/", 1)[-1] != RUNTIME_OPTIONS:
        raise ConfigError(f"hako takes runtime options of type {RUNTIME_OPTIONS}, not {options.type_url}")
    return runtimeoptions.Options.FromString(options.value).config_path or None


def config_path_of(data: bytes) -> str | None:
    """:func:`config_path` of the runtime options as ``shim start`` reads them on stdin (an Any)."""
    from google.protobuf.any_pb2 import Any as AnyPb

    return config_path(AnyPb.FromString(data)) if data else None


def network_namespace(spec: dict[str, Any]) -> str:
    """The path of the network namespace a container's ``spec`` joins ("" if it makes a new one
    or has none): the pod's, whose VM then runs in it."""
    for namespace in spec.get("linux", {}).get("namespaces", []):
        if namespace.get("type") == "network":
            return str(namespace.get("path") or "")
    return ""
