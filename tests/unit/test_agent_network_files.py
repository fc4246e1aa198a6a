"""The sandbox's /etc/hosts, /etc/hostname and /etc/resolv.conf, bound into its containers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from hako_agent import linux, sandbox
from hako_agent.spec import parse_spec


def spec_with(mounts: list[dict[str, Any]]) -> bytes:
    return json.dumps(
        {
            "ociVersion": "1.0.2",
            "root": {"path": "/rootfs"},
            "process": {"args": ["true"], "cwd": "/"},
            "mounts": mounts,
            "linux": {"namespaces": [{"type": "mount"}, {"type": "pid"}]},
        }
    ).encode()


def test_hosts_name_the_sandbox_at_each_address(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox, "ETC", str(tmp_path))
    sandbox.write_hosts("box", ["10.210.0.7", "fd00::7"])
    hosts = (tmp_path / "hosts").read_text().splitlines()
    assert hosts[0].split() == ["127.0.0.1", "localhost"]
    assert ["10.210.0.7", "box"] in [line.split() for line in hosts]
    assert ["fd00::7", "box"] in [line.split() for line in hosts]
    assert (tmp_path / "hostname").read_text() == "box\n"


def test_containers_get_the_files_they_do_not_mount_themselves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sandbox, "ETC", str(tmp_path))
    sandbox.write_hosts("box", [])
    (tmp_path / "resolv.conf").write_text("nameserver 10.0.0.53\n")
    own = {"destination": "/etc/hosts", "type": "bind", "source": "/elsewhere/hosts", "options": ["rbind"]}
    spec = parse_spec(spec_with([own]))
    sandbox.add_network_files(spec)
    by_destination = {m.destination: m.source for m in spec.mounts}
    assert by_destination["/etc/hosts"] == "/elsewhere/hosts"  # the spec's own wins
    assert by_destination["/etc/hostname"] == f"{tmp_path}/hostname"
    assert by_destination["/etc/resolv.conf"] == f"{tmp_path}/resolv.conf"
    assert all(m.options.bind for m in spec.mounts)


def test_no_resolv_conf_without_nameservers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox, "ETC", str(tmp_path))
    sandbox.write_hosts("box", [])
    spec = parse_spec(spec_with([]))
    sandbox.add_network_files(spec)
    assert "/etc/resolv.conf" not in {m.destination for m in spec.mounts}


def test_write_file_replaces_the_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "resolv.conf"
    sandbox.write_file(str(target), "nameserver 10.0.0.53\nnameserver 10.0.0.54\n")
    sandbox.write_file(str(target), "nameserver 1.1.1.1\n")  # shorter: nothing of the old is left
    assert target.read_text() == "nameserver 1.1.1.1\n"
    assert target.stat().st_mode & 0o777 == 0o644 & ~_umask()


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_resolv_conf_written_again_is_mounted_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pooled sandbox a pod takes is given its DNS a second time (UpdateSandbox)."""
    system = tmp_path / "etc-resolv.conf"
    system.write_text("# the image's\n")
    monkeypatch.setattr(sandbox, "ETC", str(tmp_path / "etc"))
    monkeypatch.setattr(sandbox, "SYSTEM_RESOLV_CONF", str(system))
    mounts: list[tuple[str, str]] = []

    def bind(source: str, target: str, fstype: None, flags: int) -> None:  # a bind: the same inode
        mounts.append((source, target))
        system.unlink()
        system.hardlink_to(source)

    monkeypatch.setattr(linux, "mount", bind)
    sandbox.write_resolv_conf(["10.0.0.53"])
    sandbox.write_resolv_conf(["10.0.0.54", "10.0.0.55"])
    assert mounts == [(f"{tmp_path}/etc/resolv.conf", str(system))]
    assert system.read_text() == "nameserver 10.0.0.54\nnameserver 10.0.0.55\n"
