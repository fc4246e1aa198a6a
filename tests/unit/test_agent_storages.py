"""Sandbox-wide storages (the host's shared directory) are mounted by the first container that
uses one, and not at all in a sandbox whose containers need none."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from hako_agent import sandbox as sandbox_module
from hako_agent.errors import InvalidArgument
from hako_agent.sandbox import BlockDevices, Sandbox, Storage, block_device
from hako_agent.spec import parse_spec

SHARE = Storage("9p", "hako", "9p", ["trans=virtio"], "/run/hako/shared")


class IdleReaper:
    def start(self) -> None: ...


@pytest.fixture(autouse=True)
def no_guest_files(monkeypatch: pytest.MonkeyPatch) -> None:
    """setup() writes the sandbox's /etc files (under /run/hako in a guest): not on this host."""
    monkeypatch.setattr(sandbox_module, "write_hosts", lambda hostname, addresses: None)


@pytest.fixture
def mounted(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []

    def fake_mount(storage: Storage, field: str) -> str:
        calls.append(storage.mount_point)
        return storage.mount_point

    monkeypatch.setattr(sandbox_module, "mount_storage", fake_mount)
    return calls


def _sandbox() -> Sandbox:
    reaper: Any = IdleReaper()
    box = Sandbox(reaper=reaper, cgroup_root=None)
    box.setup("", [SHARE], [], 0)  # no hostname, clock or network: this is the host
    return box


def _spec(root: str, *binds: str) -> Any:
    mounts = [{"destination": f"/v{i}", "type": "bind", "source": s} for i, s in enumerate(binds)]
    doc = {
        "root": {"path": root},
        "process": {"args": ["true"], "cwd": "/"},
        "mounts": mounts,
        "linux": {"namespaces": [{"type": "mount"}]},
    }
    return parse_spec(json.dumps(doc).encode())


def test_setup_mounts_nothing_yet(mounted: list[str]) -> None:
    _sandbox()
    assert mounted == []


def test_a_block_rootfs_without_volumes_needs_no_share(mounted: list[str]) -> None:
    box = _sandbox()
    box._mount_used_storages(_spec("/run/hako/containers/c1/rootfs"))
    assert mounted == []


@pytest.mark.parametrize(
    "spec_args",
    [("/run/hako/shared/c1/rootfs",), ("/run/hako/containers/c1/rootfs", "/run/hako/shared/c1/volumes/0")],
)
def test_the_first_container_using_the_share_mounts_it_once(
    mounted: list[str], spec_args: tuple[str, ...]
) -> None:
    box = _sandbox()
    box._mount_used_storages(_spec(*spec_args))
    box._mount_used_storages(_spec("/run/hako/shared/c2/rootfs"))
    assert mounted == ["/run/hako/shared"]
    assert box.storages == ["/run/hako/shared"]


def test_a_path_that_only_starts_alike_is_not_under_it(mounted: list[str]) -> None:
    box = _sandbox()
    box._mount_used_storages(_spec("/run/hako/shared-not/rootfs"))
    assert mounted == []


def test_a_bad_mount_point_fails_setup() -> None:
    reaper: Any = IdleReaper()
    box = Sandbox(reaper=reaper, cgroup_root=None)
    with pytest.raises(InvalidArgument, match="mount_point"):
        box.setup("", [Storage("9p", "hako", "9p", [], "relative")], [], 0)


def _disk(sys_block: Path, name: str, serial: str) -> None:
    (sys_block / name).mkdir(parents=True)
    (sys_block / name / "serial").write_text(serial + "\n")


def test_disks_are_found_by_serial_from_one_reading(tmp_path: Path) -> None:
    sys_block = tmp_path / "block"
    _disk(sys_block, "vda", "hako-slot-0")
    _disk(sys_block, "vdb", "hako-slot-1")
    (sys_block / "loop0").mkdir()  # no serial: not a virtio disk
    devices = BlockDevices(str(sys_block))
    devices.load()
    (sys_block / "vdb" / "serial").unlink()  # not read again: a disk keeps its serial
    assert block_device("hako-slot-1", "storages[0]", devices) == "/dev/vdb"
    assert block_device("/dev/vdz", "storages[0]", devices) == "/dev/vdz"  # a node as it is


def test_a_serial_not_seen_is_looked_for_again(tmp_path: Path) -> None:
    sys_block = tmp_path / "block"
    _disk(sys_block, "vda", "hako-slot-0")
    devices = BlockDevices(str(sys_block))
    assert devices.find("hako-slot-0") == "/dev/vda"
    _disk(sys_block, "vdb", "hako-slot-1")
    assert devices.find("hako-slot-1") == "/dev/vdb"
    with pytest.raises(InvalidArgument, match=r"storages\[2\]\.source: no disk with serial 'nope'"):
        block_device("nope", "storages[2]", devices)
