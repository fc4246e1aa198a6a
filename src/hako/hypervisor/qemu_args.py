"""The QEMU command line, built from typed pieces that each render their own arguments."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

OptionValue = str | int | bool | Path


def escape(value: str) -> str:
    """QEMU option values double their commas."""
    return value.replace(",", ",,")


def options(head: str | None, opts: Mapping[str, OptionValue | None]) -> str:
    parts = [escape(head)] if head else []
    for key, value in opts.items():
        if value is None:
            continue
        if isinstance(value, bool):
            rendered = "on" if value else "off"
        else:
            rendered = escape(str(value))
        parts.append(f"{key}={rendered}")
    return ",".join(parts)


class Arg(Protocol):
    def render(self) -> list[str]: ...


@dataclass(frozen=True)
class Machine:
    type: str
    opts: Mapping[str, OptionValue | None] = field(default_factory=dict)

    def render(self) -> list[str]:
        return ["-machine", options(self.type, self.opts)]


@dataclass(frozen=True)
class Accel:
    name: str  # "kvm" | "tcg"
    tb_size_mib: int | None = None  # TCG translation cache; bounds QEMU's memory per VM

    def render(self) -> list[str]:
        return ["-accel", options(self.name, {"tb-size": self.tb_size_mib if self.name == "tcg" else None})]


@dataclass(frozen=True)
class Cpu:
    model: str

    def render(self) -> list[str]:
        return ["-cpu", self.model]


@dataclass(frozen=True)
class Memory:
    mib: int

    def render(self) -> list[str]:
        return ["-m", f"{self.mib}M"]


@dataclass(frozen=True)
class Smp:
    cpus: int

    def render(self) -> list[str]:
        return ["-smp", str(self.cpus)]


@dataclass(frozen=True)
class Kernel:
    path: Path
    cmdline: str
    initrd: Path | None = None

    def render(self) -> list[str]:
        args = ["-kernel", str(self.path), "-append", self.cmdline]
        if self.initrd is not None:
            args += ["-initrd", str(self.initrd)]
        return args


@dataclass(frozen=True)
class Chardev:
    backend: str  # "socket", "file", ...
    id: str
    opts: Mapping[str, OptionValue | None] = field(default_factory=dict)

    def render(self) -> list[str]:
        return ["-chardev", options(self.backend, {"id": self.id, **self.opts})]


@dataclass(frozen=True)
class Device:
    driver: str
    props: Mapping[str, OptionValue | None] = field(default_factory=dict)

    def render(self) -> list[str]:
        return ["-device", options(self.driver, self.props)]


@dataclass(frozen=True)
class Fsdev:
    id: str
    path: Path
    security_model: str = "passthrough"
    multidevs: str = "remap"

    def render(self) -> list[str]:
        opts: dict[str, OptionValue | None] = {
            "id": self.id,
            "path": self.path,
            "security_model": self.security_model,
            "multidevs": self.multidevs,
        }
        return ["-fsdev", options("local", opts)]


@dataclass(frozen=True)
class Drive:
    id: str
    path: Path
    readonly: bool = True
    format: str = "raw"

    def render(self) -> list[str]:
        opts: dict[str, OptionValue | None] = {
            "file": self.path,
            "if": "none",
            "id": self.id,
            "format": self.format,
            "readonly": self.readonly,
        }
        return ["-drive", options(None, opts)]


@dataclass(frozen=True)
class Blockdev:
    """A block node (``-blockdev``): a format or protocol driver and its options."""

    opts: Mapping[str, OptionValue | None]

    def render(self) -> list[str]:
        return ["-blockdev", options(None, self.opts)]


@dataclass(frozen=True)
class Netdev:
    """A network backend (``-netdev``), e.g. a tap given as a descriptor."""

    backend: str
    id: str
    opts: Mapping[str, OptionValue | None] = field(default_factory=dict)

    def render(self) -> list[str]:
        return ["-netdev", options(self.backend, {"id": self.id, **self.opts})]


@dataclass(frozen=True)
class Object:
    type: str
    id: str
    props: Mapping[str, OptionValue | None] = field(default_factory=dict)

    def render(self) -> list[str]:
        return ["-object", options(self.type, {"id": self.id, **self.props})]


@dataclass(frozen=True)
class Global:
    """A default for a device or object property (``-global driver.property=value``)."""

    driver: str
    property: str
    value: OptionValue

    def render(self) -> list[str]:
        return ["-global", f"{self.driver}.{self.property}={options(None, {'v': self.value})[2:]}"]


@dataclass(frozen=True)
class Incoming:
    """Load a saved VM state (a migration stream) from ``uri`` at start-up, then run."""

    uri: str

    def render(self) -> list[str]:
        return ["-incoming", self.uri]


@dataclass(frozen=True)
class Monitor:
    chardev: str

    def render(self) -> list[str]:
        return ["-mon", options(None, {"chardev": self.chardev, "mode": "control"})]


@dataclass(frozen=True)
class Serial:
    spec: str  # e.g. "chardev:console"

    def render(self) -> list[str]:
        return ["-serial", self.spec]


@dataclass(frozen=True)
class Flags:
    """Arguments without values (-nodefaults, -no-reboot, ...)."""

    flags: tuple[str, ...]

    def render(self) -> list[str]:
        return list(self.flags)


@dataclass(frozen=True)
class Name:
    name: str

    def render(self) -> list[str]:
        return ["-name", options(self.name, {"debug-threads": True})]


@dataclass(frozen=True)
class Sandbox:
    """QEMU's own seccomp filter: no spawning, no privilege changes, no obsolete syscalls."""

    def render(self) -> list[str]:
        opts: dict[str, OptionValue | None] = {
            "obsolete": "deny",
            "elevateprivileges": "deny",
            "spawn": "deny",
            "resourcecontrol": "deny",
        }
        return ["-sandbox", options("on", opts)]


def render(binary: str, parts: Iterable[Arg]) -> list[str]:
    argv = [binary]
    for part in parts:
        argv += part.render()
    return argv
