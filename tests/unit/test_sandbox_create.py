"""Creating a container: the host's part (rootfs disk, shares) may run while the guest is still
being set up; the guest's part waits for ``before_create``. And the sandbox says when its VM has
settled, so that the host's part can start."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hako.errors import AgentError, HakoError
from hako.hypervisor import Accelerator
from hako.runtime.sandbox import Sandbox
from tests.unit.test_sandbox_stop import FakeVM
from tests.unit.test_templates import _sandbox


class DiskVM(FakeVM):
    def attach_disk(self, slot: int, path: Path) -> None:
        self.calls.append(f"attach {slot}")

    def detach_disk(self, slot: int) -> None:
        self.calls.append(f"detach {slot}")


class CreatingAgent:
    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def create_container(self, container_id: str, spec: Any, stdin: bool, storages: Any = ()) -> None:
        self.calls.append("agent.create_container")


@pytest.fixture
def calls() -> list[str]:
    return []


@pytest.fixture
def box(tmp_path: Path, files: dict[str, Path], calls: list[str], monkeypatch: pytest.MonkeyPatch) -> Sandbox:
    from hako.image import disk

    monkeypatch.setattr(disk, "create_overlay", lambda base, overlay: overlay.parent.mkdir(parents=True))
    config = _sandbox(tmp_path, files, accel=Accelerator("tcg", "test"))
    sandbox = Sandbox(config, DiskVM(calls))
    agent: Any = CreatingAgent(calls)
    sandbox.agent = agent
    return sandbox


SPEC = {"root": {"path": "/unused"}, "mounts": [], "process": {"args": ["true"]}}


def test_the_hosts_part_comes_before_before_create_and_the_guests_after(
    box: Sandbox, calls: list[str], tmp_path: Path
) -> None:
    box.add_container(
        "c1", SPEC, False, disk=tmp_path / "image.ext4", before_create=lambda: calls.append("ready")
    )
    assert calls == ["attach 0", "ready", "agent.create_container"]
    assert "container_create" in box.timing


def test_a_failing_before_create_gives_back_what_the_host_prepared(
    box: Sandbox, calls: list[str], tmp_path: Path
) -> None:
    def boot_failed() -> None:
        raise HakoError("the VM died while booting")

    with pytest.raises(HakoError, match="died while booting"):
        box.add_container("c1", SPEC, False, disk=tmp_path / "image.ext4", before_create=boot_failed)
    assert calls == ["attach 0", "detach 0"]  # the guest was never asked
    assert box._containers == {}
    # and its slot is free again
    box.add_container("c2", SPEC, False, disk=tmp_path / "image.ext4")
    assert calls[-2:] == ["attach 0", "agent.create_container"]


def test_the_vm_settles_before_the_guest_is_set_up(
    tmp_path: Path, files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Settled once the agent answered: CreateSandbox (the guest's set-up) runs after it."""
    sandbox = Sandbox(_sandbox(tmp_path, files), FakeVM([]))
    seen: list[bool] = []

    class SettingUpAgent:
        def create_sandbox(self, *args: object, **kwargs: object) -> None:
            seen.append(sandbox.settled.is_set())

    def answered(timeout: float) -> Any:
        agent: Any = SettingUpAgent()
        sandbox.agent = agent
        boot = type("Boot", (), {"kernel_done": 0.1, "agent_start": 0.2, "agent_ready": 0.3})()
        return type("Check", (), {"kernel_release": "6.1-test", "uptime": 0.5, "boot": boot})(), 1.0

    monkeypatch.setattr(sandbox, "_check_agent", answered)
    assert not sandbox.settled.is_set()
    sandbox.wait_ready()
    assert seen == [True]


def test_a_failed_boot_settles_too(
    tmp_path: Path, files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whoever waits for the VM to settle must not wait forever for one that never will."""
    sandbox = Sandbox(_sandbox(tmp_path, files), FakeVM([]))

    def no_answer(timeout: float) -> Any:
        raise AgentError("the agent channel closed")

    monkeypatch.setattr(sandbox, "_check_agent", no_answer)
    with pytest.raises(HakoError):
        sandbox.wait_ready()
    assert sandbox.settled.is_set()
