"""Checking a given config.json (bundles) and loading bundles: errors name the file and the JSON path."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from hako.errors import ConfigError
from hako.oci.bundle import load_bundle
from hako.oci.spec import RunOptions, build_spec
from hako.oci.validate import validate_spec

GOOD: dict[str, Any] = {
    "ociVersion": "1.0.2",
    "process": {
        "user": {"uid": 0, "gid": 0, "additionalGids": [1]},
        "args": ["sh"],
        "env": ["PATH=/bin"],
        "cwd": "/",
        "capabilities": {"bounding": ["CAP_KILL"]},
        "rlimits": [{"type": "RLIMIT_NOFILE", "soft": 1, "hard": 2}],
    },
    "root": {"path": "rootfs"},
    "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
    "linux": {
        "namespaces": [{"type": "pid"}, {"type": "mount"}],
        "maskedPaths": ["/proc/kcore"],
        "resources": {"memory": {"limit": 1024}, "cpu": {"quota": 1, "period": 100000}, "pids": {"limit": 3}},
    },
    "annotations": {"a": "b"},
}


def broken(path: str, value: Any) -> dict[str, Any]:
    """GOOD with the value at a dotted path replaced (or deleted when value is ...)."""
    spec = copy.deepcopy(GOOD)
    *parents, last = path.split(".")
    node: Any = spec
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if value is ...:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return spec


def test_good_spec_and_generated_spec_pass() -> None:
    validate_spec(GOOD)
    validate_spec(build_spec("x", RunOptions(args=["sh"])))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ([], "config.json: the document must be an object"),
        (broken("ociVersion", ...), "config.json: ociVersion is required"),
        (broken("ociVersion", "2.0.0"), 'config.json: ociVersion "2.0.0" is not supported'),
        (broken("root", ...), "config.json: root is required"),
        (broken("root.path", ""), "config.json: root.path must not be empty"),
        (broken("process", ...), "config.json: process is required"),
        (broken("process.cwd", "tmp"), 'config.json: process.cwd must be an absolute path, got "tmp"'),
        (broken("process.args", []), "config.json: process.args must not be empty"),
        (broken("process.args", "sh"), 'config.json: process.args must be a list of strings, got "sh"'),
        (broken("process.args", ["sh", 3]), "config.json: process.args\\[1\\] must be a string, got 3"),
        (
            broken("process.env", ["NOVALUE"]),
            'config.json: process.env\\[0\\] must be KEY=VALUE, got "NOVALUE"',
        ),
        (broken("process.terminal", "yes"), "config.json: process.terminal must be true or false"),
        (broken("process.user.uid", -1), "config.json: process.user.uid must be at least 0, got -1"),
        (broken("process.user.gid", True), "config.json: process.user.gid must be an integer, got true"),
        (
            broken("process.capabilities.bounding", ["KILL"]),
            "process.capabilities.bounding\\[0\\] must be a CAP_",
        ),
        (
            broken("process.rlimits.0.type", "NOFILE"),
            "process.rlimits\\[0\\].type must be an RLIMIT_\\* name",
        ),
        (
            broken("mounts.0.destination", "proc"),
            'mounts\\[0\\].destination must be an absolute path, got "proc"',
        ),
        (broken("mounts.0", "proc"), 'mounts\\[0\\] must be an object, got "proc"'),
        (
            broken("linux.namespaces.1.type", "net"),
            'linux.namespaces\\[1\\].type "net" is not a known namespace',
        ),
        (broken("linux.namespaces.1.type", "pid"), 'linux.namespaces\\[1\\].type "pid" is listed twice'),
        (broken("linux.maskedPaths.0", "proc/kcore"), "linux.maskedPaths\\[0\\] must be an absolute path"),
        (broken("linux.resources.cpu.period", 0), "linux.resources.cpu.period must be at least 1"),
        (broken("linux.resources.memory.limit", "1g"), "linux.resources.memory.limit must be an integer"),
        (broken("annotations.a", 1), "annotations.a must be a string"),
    ],
)
def test_errors_name_the_json_path(spec: Any, message: str) -> None:
    prefix = "" if message.startswith("config.json: ") else "config.json: "
    with pytest.raises(ConfigError, match=f"^{prefix}{message}"):
        validate_spec(spec)


def test_process_is_optional_when_not_required() -> None:
    validate_spec(broken("process", ...), require_process=False)


def _write_bundle(path: Path, config: str | dict[str, Any], rootfs: bool = True) -> Path:
    path.mkdir()
    if rootfs:
        (path / "rootfs").mkdir()
    (path / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return path


def test_load_bundle(tmp_path: Path) -> None:
    bundle = load_bundle(_write_bundle(tmp_path / "b", GOOD))
    assert bundle.path == tmp_path / "b"
    assert bundle.rootfs == tmp_path / "b" / "rootfs"
    assert bundle.spec == GOOD


def test_bundle_with_absolute_root_path(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    bundle = load_bundle(_write_bundle(tmp_path / "b", broken("root.path", str(elsewhere)), rootfs=False))
    assert bundle.rootfs == elsewhere


def test_bundle_errors_name_the_file(tmp_path: Path) -> None:
    config = tmp_path / "bad-json" / "config.json"
    with pytest.raises(ConfigError, match=f"^{config}: invalid JSON at line 1 column 2"):
        load_bundle(_write_bundle(tmp_path / "bad-json", "{oops"))
    config = tmp_path / "no-process" / "config.json"
    with pytest.raises(ConfigError, match=f"^{config}: process is required"):
        load_bundle(_write_bundle(tmp_path / "no-process", broken("process", ...)))
    with pytest.raises(ConfigError, match="ociVersion is required"):
        load_bundle(_write_bundle(tmp_path / "no-version", broken("ociVersion", ...)))
    with pytest.raises(ConfigError, match='root.path "rootfs" is not a directory'):
        load_bundle(_write_bundle(tmp_path / "no-rootfs", GOOD, rootfs=False))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="needs a config.json"):
        load_bundle(tmp_path / "empty")
