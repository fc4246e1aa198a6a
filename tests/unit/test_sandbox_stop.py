"""How a sandbox stops: the guest shuts down first unless nothing of it is worth writing out."""

from __future__ import annotations

import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hako.hypervisor import Accelerator, Hypervisor
from hako.runtime import mounts
from hako.runtime.config import SandboxConfig
from hako.runtime.sandbox import Sandbox, _Container
from tests.unit.test_templates import _sandbox


class FakeVM(Hypervisor):
    def __init__(self, calls: list[str]) -> None:
        self.exited = threading.Event()
        self.calls = calls

    def start(self) -> None: ...
    def wait_started(self, timeout: float) -> None: ...

    def stop(self, timeout: float = 5.0) -> None:
        self.calls.append("vm.stop")
        self.exited.set()

    def kill(self) -> None:
        self.calls.append("vm.kill")
        self.exited.set()

    def pause(self) -> None: ...
    def resume(self) -> None: ...
    def attach_disk(self, slot: int, path: Path) -> None: ...
    def detach_disk(self, slot: int) -> None: ...

    @property
    def pid(self) -> int | None:
        return 1234

    @property
    def exit_status(self) -> int | None:
        return 0 if self.exited.is_set() else None

    def exit_reason(self) -> str:
        return "test"

    def on_exit(self, callback: Callable[[], None]) -> None: ...

    def agent_channel(self) -> socket.socket:
        raise NotImplementedError

    def check(self, timeout: float) -> None: ...


class FakeAgent:
    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def destroy_sandbox(self, timeout: float = 5.0) -> None:
        self.calls.append("agent.destroy_sandbox")

    def close(self) -> None:
        self.calls.append("agent.close")


@pytest.fixture
def calls() -> list[str]:
    return []


@pytest.fixture
def box(tmp_path: Path, files: dict[str, Path], calls: list[str]) -> Sandbox:
    config: SandboxConfig = _sandbox(tmp_path, files, accel=Accelerator("tcg", "test"))
    sandbox = Sandbox(config, FakeVM(calls))
    agent: Any = FakeAgent(calls)
    sandbox.agent = agent
    return sandbox


def test_a_kept_sandbox_shuts_its_guest_down_first(box: Sandbox, calls: list[str]) -> None:
    box._containers["c"] = _Container("c", [])
    box.stop()
    assert calls[:2] == ["agent.destroy_sandbox", "vm.stop"]


def test_a_discarded_sandbox_without_volumes_is_killed(box: Sandbox, calls: list[str]) -> None:
    box._containers["c"] = _Container("c", [], disk_slot=0)
    box.stop(discard=True)
    assert "agent.destroy_sandbox" not in calls
    assert calls[0] == "vm.kill"
    assert "teardown" in box.timing


def test_a_discarded_sandbox_with_a_volume_lets_the_guest_write_it_out(
    box: Sandbox, calls: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mounts, "umount", lambda target: None)
    box._containers["c"] = _Container("c", [box.shared_dir / "c" / "volumes" / "0"], volumes=1)
    box.stop(discard=True)
    assert calls[:2] == ["agent.destroy_sandbox", "vm.stop"]
    assert "vm.kill" not in calls


def test_sigterm_while_the_main_loop_holds_its_wake_lock_does_not_deadlock(
    tmp_path: Path, files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM's handler runs on the main thread, perhaps inside ``wake.wait()`` with the
    Event's lock held: the stop it asks for must not need that lock on that thread."""
    from hako.runtime.sandboxd import SandboxDaemon
    from hako.runtime.state import SandboxState

    monkeypatch.setenv("HAKO_RUN", str(tmp_path / "run"))
    state = SandboxState(
        id="e" * 64,
        name="sigterm",
        image="",
        command=[],
        created=0.0,
        kernel="trimmed",
        accel="tcg",
        accel_reason="test",
        memory_mib=256,
        vcpus=1,
    )
    state.dir.mkdir(parents=True)
    config = _sandbox(tmp_path, files, run_dir=state.dir)
    daemon = SandboxDaemon(state, config, FakeVM([]))
    try:
        held: threading.Condition = vars(daemon.wake)["_cond"]
        with held:  # as inside Event.wait() or .clear() in the main loop
            daemon._on_sigterm(signal.SIGTERM, None)  # must return: the stop waits for the lock
        assert daemon.exited.wait(5) and daemon.stop_requested.is_set()
        assert daemon.wake.wait(5)
    finally:
        daemon.log_file.close()


class ExitedVM(FakeVM):
    """A QEMU that is gone already when the sandbox is made: on_exit calls back at once."""

    def __init__(self) -> None:
        super().__init__([])
        self.exited.set()

    def on_exit(self, callback: Callable[[], None]) -> None:
        callback()


def test_a_clone_whose_qemu_exits_before_its_sandbox_exists_is_not_dead(
    tmp_path: Path, files: dict[str, Path]
) -> None:
    """A clone's QEMU starts loading its state at launch, before the daemon has built its
    Sandbox; a state QEMU refuses makes it exit then. That is a failed restore (wait_ready boots
    the VM instead), not a dead sandbox."""
    clone = Sandbox(_sandbox(tmp_path, files, template=tmp_path / "tpl"), ExitedVM())
    clone._watch(clone.vm)
    assert not clone.dead.is_set()
    booted = Sandbox(_sandbox(tmp_path, files), ExitedVM())
    booted._watch(booted.vm)
    assert booted.dead.is_set()


def test_a_restore_that_fails_because_the_sandbox_stops_boots_nothing_instead(
    tmp_path: Path, files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopping a clone kills its QEMU while it may still be restoring; the restore then fails.
    That must not boot a VM in its place (which recreated the run dir after it was removed)
    nor remove the template as if it were broken."""
    from hako.errors import AgentError, HakoError
    from hako.runtime import sandbox as sandbox_module
    from hako.runtime import templates

    template = tmp_path / "tpl"
    template.mkdir()
    clone = Sandbox(_sandbox(tmp_path, files, template=template), FakeVM([]))

    def check_fails(timeout: float) -> Any:
        raise AgentError("the agent channel closed")

    def no_boot(*args: object) -> Any:
        raise AssertionError("a VM was booted for a sandbox being stopped")

    monkeypatch.setattr(clone, "_check_agent", check_fails)
    monkeypatch.setattr(sandbox_module, "QemuVM", no_boot)
    monkeypatch.setattr(templates, "discard", no_boot)
    clone.stop(discard=True)
    with pytest.raises(HakoError):
        clone.wait_ready()
    assert template.is_dir()
