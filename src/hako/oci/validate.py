"""Check an OCI runtime spec (config.json) before anything acts on it.

Only what hako relies on is checked: required fields, types, absolute paths, known namespace
types. Each error names the file and the JSON path at fault, e.g.
``config.json: process.cwd must be an absolute path, got "tmp"``.
"""

from __future__ import annotations

import json
from typing import Any, NoReturn

from hako.errors import ConfigError

NAMESPACE_TYPES = frozenset({"cgroup", "ipc", "mount", "network", "pid", "time", "user", "uts"})
CAPABILITY_SETS = ("bounding", "effective", "permitted", "inheritable", "ambient")


def validate_spec(spec: object, source: str = "config.json", *, require_process: bool = True) -> None:
    """Raise ConfigError for the first problem found in ``spec``; ``source`` prefixes the message."""
    _Checker(source).spec(spec, require_process)


def _show(value: object) -> str:
    return json.dumps(value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Checker:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, path: str, problem: str) -> NoReturn:
        raise ConfigError(f"{self.source}: {path} {problem}")

    # -- generic shapes -----------------------------------------------------------------------

    def obj(self, value: object, path: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(path, f"must be an object, got {_show(value)}")
        return value

    def field(self, parent: dict[str, Any], key: str, path: str, *, required: bool = False) -> Any:
        full = f"{path}.{key}" if path else key
        if key not in parent or parent[key] is None:
            if required:
                self.fail(full, "is required")
            return None
        return parent[key]

    def string(self, value: object, path: str) -> str:
        if not isinstance(value, str):
            self.fail(path, f"must be a string, got {_show(value)}")
        return value

    def boolean(self, value: object, path: str) -> None:
        if value is not None and not isinstance(value, bool):
            self.fail(path, f"must be true or false, got {_show(value)}")

    def integer(self, value: object, path: str, *, minimum: int | None = None) -> None:
        if value is None:
            return
        if not _is_int(value):
            self.fail(path, f"must be an integer, got {_show(value)}")
        assert isinstance(value, int)
        if minimum is not None and value < minimum:
            self.fail(path, f"must be at least {minimum}, got {value}")

    def strings(self, value: object, path: str) -> list[str]:
        if value is None:
            return []
        if not isinstance(value, list):
            self.fail(path, f"must be a list of strings, got {_show(value)}")
        for i, item in enumerate(value):
            self.string(item, f"{path}[{i}]")
        return value

    def absolute(self, value: object, path: str) -> None:
        if not self.string(value, path).startswith("/"):
            self.fail(path, f"must be an absolute path, got {_show(value)}")

    # -- the spec -----------------------------------------------------------------------------

    def spec(self, spec: object, require_process: bool) -> None:
        spec = self.obj(spec, "the document")
        version = self.string(self.field(spec, "ociVersion", "", required=True), "ociVersion")
        if not version.startswith("1."):
            self.fail("ociVersion", f"{_show(version)} is not supported (hako implements runtime-spec 1.x)")
        root = self.obj(self.field(spec, "root", "", required=True), "root")
        if not self.string(self.field(root, "path", "root", required=True), "root.path"):
            self.fail("root.path", "must not be empty")
        self.boolean(root.get("readonly"), "root.readonly")
        process = self.field(spec, "process", "", required=require_process)
        if process is not None:
            self.process(self.obj(process, "process"))
        if (hostname := spec.get("hostname")) is not None:
            self.string(hostname, "hostname")
        for i, mount in enumerate(self.list_of(spec.get("mounts"), "mounts")):
            self.mount(self.obj(mount, f"mounts[{i}]"), f"mounts[{i}]")
        if (linux := spec.get("linux")) is not None:
            self.linux(self.obj(linux, "linux"))
        if (annotations := spec.get("annotations")) is not None:
            for key, value in self.obj(annotations, "annotations").items():
                self.string(value, f"annotations.{key}")

    def list_of(self, value: object, path: str) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            self.fail(path, f"must be a list, got {_show(value)}")
        return value

    def process(self, process: dict[str, Any]) -> None:
        args = self.strings(self.field(process, "args", "process", required=True), "process.args")
        if not args:
            self.fail("process.args", "must not be empty")
        self.absolute(self.field(process, "cwd", "process", required=True), "process.cwd")
        for i, item in enumerate(self.strings(process.get("env"), "process.env")):
            if "=" not in item or item.startswith("="):
                self.fail(f"process.env[{i}]", f"must be KEY=VALUE, got {_show(item)}")
        self.boolean(process.get("terminal"), "process.terminal")
        self.boolean(process.get("noNewPrivileges"), "process.noNewPrivileges")
        user = self.obj(self.field(process, "user", "process", required=True), "process.user")
        self.integer(self.field(user, "uid", "process.user", required=True), "process.user.uid", minimum=0)
        self.integer(self.field(user, "gid", "process.user", required=True), "process.user.gid", minimum=0)
        self.integer(user.get("umask"), "process.user.umask", minimum=0)
        for i, gid in enumerate(self.list_of(user.get("additionalGids"), "process.user.additionalGids")):
            self.integer(gid, f"process.user.additionalGids[{i}]", minimum=0)
        if (caps := process.get("capabilities")) is not None:
            caps = self.obj(caps, "process.capabilities")
            for name in CAPABILITY_SETS:
                for i, cap in enumerate(self.strings(caps.get(name), f"process.capabilities.{name}")):
                    if not cap.startswith("CAP_"):
                        self.fail(
                            f"process.capabilities.{name}[{i}]", f"must be a CAP_* name, got {_show(cap)}"
                        )
        for i, item in enumerate(self.list_of(process.get("rlimits"), "process.rlimits")):
            path = f"process.rlimits[{i}]"
            rlimit = self.obj(item, path)
            kind = self.string(self.field(rlimit, "type", path, required=True), f"{path}.type")
            if not kind.startswith("RLIMIT_"):
                self.fail(f"{path}.type", f"must be an RLIMIT_* name, got {_show(kind)}")
            self.integer(self.field(rlimit, "soft", path, required=True), f"{path}.soft", minimum=0)
            self.integer(self.field(rlimit, "hard", path, required=True), f"{path}.hard", minimum=0)

    def mount(self, mount: dict[str, Any], path: str) -> None:
        self.absolute(self.field(mount, "destination", path, required=True), f"{path}.destination")
        for key in ("type", "source"):
            if (value := mount.get(key)) is not None:
                self.string(value, f"{path}.{key}")
        self.strings(mount.get("options"), f"{path}.options")

    def linux(self, linux: dict[str, Any]) -> None:
        seen: set[str] = set()
        for i, item in enumerate(self.list_of(linux.get("namespaces"), "linux.namespaces")):
            path = f"linux.namespaces[{i}]"
            ns = self.obj(item, path)
            kind = self.string(self.field(ns, "type", path, required=True), f"{path}.type")
            if kind not in NAMESPACE_TYPES:
                known = ", ".join(sorted(NAMESPACE_TYPES))
                self.fail(f"{path}.type", f"{_show(kind)} is not a known namespace type ({known})")
            if kind in seen:
                self.fail(f"{path}.type", f"{_show(kind)} is listed twice")
            seen.add(kind)
            if (ns_path := ns.get("path")) is not None:
                self.absolute(ns_path, f"{path}.path")
        for key in ("maskedPaths", "readonlyPaths"):
            for i, item in enumerate(self.strings(linux.get(key), f"linux.{key}")):
                self.absolute(item, f"linux.{key}[{i}]")
        if (cgroups_path := linux.get("cgroupsPath")) is not None:
            self.string(cgroups_path, "linux.cgroupsPath")
        if (resources := linux.get("resources")) is not None:
            self.resources(self.obj(resources, "linux.resources"))

    def resources(self, resources: dict[str, Any]) -> None:
        base = "linux.resources"
        if (memory := resources.get("memory")) is not None:
            memory = self.obj(memory, f"{base}.memory")
            for key in ("limit", "reservation", "swap"):
                self.integer(memory.get(key), f"{base}.memory.{key}", minimum=-1)
        if (cpu := resources.get("cpu")) is not None:
            cpu = self.obj(cpu, f"{base}.cpu")
            self.integer(cpu.get("quota"), f"{base}.cpu.quota", minimum=-1)
            self.integer(cpu.get("period"), f"{base}.cpu.period", minimum=1)
            self.integer(cpu.get("shares"), f"{base}.cpu.shares", minimum=0)
        if (pids := resources.get("pids")) is not None:
            pids = self.obj(pids, f"{base}.pids")
            self.integer(self.field(pids, "limit", f"{base}.pids", required=True), f"{base}.pids.limit")
