"""The shim's pod: guest specs, rootfs mounts, the task lifecycle and its events (fake VM, no root)."""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hako.errors import ConfigError, ContainerError, ContainerExists, ContainerNotFound, SandboxError
from hako.runtime import mounts
from hako.shim import pod as pod_module
from hako.shim.pod import GUEST_NAMESPACES, Status, guest_spec, mount_rootfs, unmount_rootfs
from hako_containerd.containerd.api.events import task_pb2 as ev
from hako_containerd.containerd.api.types.task import task_pb2
from tests.unit.shim_fakes import FakeSandbox, RecordingPublisher, pod_with

SPEC: dict[str, Any] = {
    "ociVersion": "1.0.2",
    "hostname": "web",
    "process": {"args": ["sh"], "cwd": "/"},
    "root": {"path": "rootfs", "readonly": True},
    "hooks": {"createRuntime": [{"path": "/usr/bin/nvidia-hook"}]},
    "linux": {
        "namespaces": [
            {"type": "pid"},
            {"type": "network", "path": "/var/run/netns/cni-1234"},
            {"type": "ipc", "path": "/proc/42/ns/ipc"},
            {"type": "uts"},
            {"type": "user"},
            {"type": "cgroup"},
        ],
        "cgroupsPath": "kubepods-besteffort-pod1.slice:cri-containerd:c1",
        "seccomp": {"defaultAction": "SCMP_ACT_ERRNO"},
        "resources": {"memory": {"limit": 1 << 28}},
        "maskedPaths": ["/proc/kcore"],
    },
}


# -- the guest's spec ---------------------------------------------------------------------------


def test_guest_spec_drops_what_belongs_to_the_host() -> None:
    original = copy.deepcopy(SPEC)
    guest = guest_spec(SPEC, "c1", Path("/run/hako/shim/x/rootfs"))
    assert original == SPEC  # the caller's spec is not touched
    assert guest["root"] == {"path": "/run/hako/shim/x/rootfs", "readonly": True}
    assert "hooks" not in guest
    assert "seccomp" not in guest["linux"]
    assert guest["linux"]["cgroupsPath"] == "/hako/c1"
    # no network/user namespace, no host namespace paths; mount is always there; in a fixed order
    assert guest["linux"]["namespaces"] == [
        {"type": "pid"},
        {"type": "ipc"},
        {"type": "uts"},
        {"type": "mount"},
        {"type": "cgroup"},
    ]
    # the rest passes through unchanged
    assert guest["linux"]["resources"] == SPEC["linux"]["resources"]
    assert guest["linux"]["maskedPaths"] == ["/proc/kcore"]
    assert guest["process"] == SPEC["process"]
    assert guest["hostname"] == "web"


def test_guest_spec_of_a_minimal_spec() -> None:
    guest = guest_spec({"process": {"args": ["true"]}}, "c2", Path("/r"))
    assert guest["root"] == {"path": "/r"}
    assert guest["linux"] == {"namespaces": [{"type": "mount"}], "cgroupsPath": "/hako/c2"}
    assert set(GUEST_NAMESPACES) >= {"pid", "mount"}


def test_pod_status_numbers_are_containerds() -> None:
    for status in Status:
        assert task_pb2.Status.Value(status.name) == int(status)


# -- containerd's rootfs mount ------------------------------------------------------------------


@pytest.fixture
def mount_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """mounts.mount and mounts.umount, recorded instead of done: nothing is mounted on this host."""
    calls: list[tuple[Any, ...]] = []

    def mount(source: Any, target: Path, fstype: str | None, flags: int = 0, data: str | None = None) -> None:
        calls.append(("mount", source, target, fstype, flags, data))

    def umount(target: Path) -> None:
        calls.append(("umount", target))

    monkeypatch.setattr(mounts, "mount", mount)
    monkeypatch.setattr(mounts, "umount", umount)
    return calls


def test_an_overlay_snapshot_is_mounted_with_its_data(
    tmp_path: Path, mount_calls: list[tuple[Any, ...]]
) -> None:
    target = tmp_path / "bundle" / "rootfs"
    options = ["index=off", "workdir=/w", "upperdir=/u", "lowerdir=/l1:/l2", "rw", "nosuid", "nodev"]
    mount_rootfs([("overlay", "overlay", options)], target)
    assert target.is_dir()
    flags = mounts.MS_NOSUID | mounts.MS_NODEV
    assert mount_calls == [
        ("mount", "overlay", target, "overlay", flags, "index=off,workdir=/w,upperdir=/u,lowerdir=/l1:/l2")
    ]


def test_a_bind_snapshot_is_a_bind_mount_without_fstype(
    tmp_path: Path, mount_calls: list[tuple[Any, ...]]
) -> None:
    mount_rootfs([("bind", "/var/lib/snap/1/fs", ["rbind", "ro"])], tmp_path / "r")
    assert mount_calls == [
        (
            "mount",
            "/var/lib/snap/1/fs",
            tmp_path / "r",
            None,
            mounts.MS_BIND | mounts.MS_REC | mounts.MS_RDONLY,
            None,
        )
    ]


def test_rootfs_mount_edge_cases(tmp_path: Path, mount_calls: list[tuple[Any, ...]]) -> None:
    mount_rootfs([], tmp_path / "r")  # containerd prepared the rootfs itself
    assert mount_calls == []
    assert not (tmp_path / "r").exists()
    with pytest.raises(ConfigError, match="hako takes one rootfs mount, containerd gave 2"):
        mount_rootfs([("bind", "/a", []), ("bind", "/b", [])], tmp_path / "r")
    unmount_rootfs(tmp_path / "r", mounted=False)
    assert mount_calls == []
    unmount_rootfs(tmp_path / "r", mounted=True)
    assert mount_calls == [("umount", tmp_path / "r")]


def test_a_failed_unmount_does_not_raise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def umount(target: Path) -> None:
        raise SandboxError(f"umount {target}: Device or resource busy")

    monkeypatch.setattr(mounts, "umount", umount)
    unmount_rootfs(tmp_path, mounted=True)


# -- the lifecycle, on a fake VM ----------------------------------------------------------------


class World:
    def __init__(self, tmp_path: Path, delays: dict[str, float] | None = None) -> None:
        self.tmp_path = tmp_path
        self.sandbox = FakeSandbox(pid=4321)
        self.events = RecordingPublisher(delays)
        self.log: list[str] = []
        self.vm_pids: list[int | None] = []
        self.pod = pod_with(self.sandbox, self.events, tmp_path / "state", self.log)
        self.pod._on_vm = self.vm_pids.append

    def bundle(self, name: str, spec: dict[str, Any] | None = None) -> Path:
        bundle = self.tmp_path / "bundles" / name
        bundle.mkdir(parents=True)
        (bundle / "config.json").write_text(json.dumps(SPEC if spec is None else spec))
        return bundle

    def create(self, container_id: str, terminal: bool = False) -> int:
        return self.pod.create(container_id, self.bundle(container_id), [], ("", "", ""), terminal, None)

    def exited(self, container_id: str, exec_id: str = "") -> None:
        assert self.pod.process(container_id, exec_id).exited.wait(5)


@pytest.fixture
def world(tmp_path: Path, mount_calls: list[tuple[Any, ...]]) -> Iterator[World]:
    world = World(tmp_path)
    yield world
    world.pod.close()


def test_create_start_exit_delete(world: World) -> None:
    assert world.create("c1") == 4321  # containerd's pid for the task: the VM's QEMU
    spec, stdin, writable = world.sandbox.added["c1"]
    assert spec == guest_spec(SPEC, "c1", world.tmp_path / "bundles" / "c1" / "rootfs")
    assert (stdin, writable) == (False, True)
    init = world.pod.process("c1")
    assert (init.status, init.pid, init.id) == (Status.CREATED, 4321, "c1")

    assert world.pod.start("c1") == 4321
    assert world.sandbox.started == ["c1"]
    assert init.status == Status.RUNNING
    world.sandbox.finish("c1", "", 3, stdout=b"bye\n")
    world.exited("c1")
    assert (init.status, init.exit_status) == (Status.STOPPED, 3)
    assert init.exited_at_ns > 0

    deleted = world.pod.delete("c1")
    assert deleted is init
    assert world.sandbox.removed == ["c1"]
    assert world.pod.containers == {}
    assert world.sandbox.stopped == 1  # the last container is gone: so is the VM
    assert world.pod.sandbox is None
    assert world.vm_pids == [None]

    assert world.events.wait_for(4) == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"]
    create, start, exit_, delete = (event for _, event in world.events.published)
    assert isinstance(create, ev.TaskCreate)
    assert (create.container_id, create.bundle, create.pid) == (
        "c1",
        str(world.tmp_path / "bundles/c1"),
        4321,
    )
    assert start == ev.TaskStart(container_id="c1", pid=4321)
    assert isinstance(exit_, ev.TaskExit)
    assert (exit_.container_id, exit_.id, exit_.pid, exit_.exit_status) == ("c1", "c1", 4321, 3)
    assert exit_.exited_at.ToNanoseconds() == init.exited_at_ns
    assert isinstance(delete, ev.TaskDelete)
    assert (delete.container_id, delete.exit_status) == ("c1", 3)


def test_exec_lifecycle(world: World) -> None:
    world.create("c1")
    world.pod.start("c1")
    spec = {"args": ["ls", "-l"], "cwd": "/", "terminal": False}
    world.pod.exec("c1", "e1", ("", "", ""), False, spec)
    with pytest.raises(ContainerExists, match="process e1 already exists in container c1"):
        world.pod.exec("c1", "e1", ("", "", ""), False, spec)
    assert world.pod.start("c1", "e1") == 4321
    assert world.sandbox.agent.calls[-1] == ("exec_process", ("c1", "e1", spec, False))
    world.sandbox.finish("c1", "e1", 0)
    world.exited("c1", "e1")
    assert world.pod.delete("c1", "e1").exit_status == 0
    assert world.pod.containers["c1"].execs == {}
    assert world.sandbox.removed == []  # deleting an exec leaves the container alone
    with pytest.raises(ContainerNotFound, match="process e1 not found in container c1"):
        world.pod.process("c1", "e1")
    assert world.events.wait_for(5) == [
        "/tasks/create",
        "/tasks/start",
        "/tasks/exec-added",
        "/tasks/exec-started",
        "/tasks/exit",
    ]
    exit_ = world.events.published[-1][1]
    assert isinstance(exit_, ev.TaskExit) and (exit_.container_id, exit_.id) == ("c1", "e1")


def test_wrong_states_are_refused(world: World) -> None:
    with pytest.raises(ContainerNotFound, match="container nope not found"):
        world.pod.start("nope")
    world.create("c1")
    with pytest.raises(ContainerExists, match="container c1 already exists"):
        world.pod.create("c1", world.tmp_path / "bundles" / "c1", [], ("", "", ""), False, None)
    with pytest.raises(ContainerError, match="container c1 is not running"):
        world.pod.exec("c1", "e1", ("", "", ""), False, {})
    with pytest.raises(ContainerError, match="container c1 is not running"):
        world.pod.pause("c1")
    with pytest.raises(ContainerError, match="process c1 has no terminal"):
        world.pod.resize("c1", "", 80, 24)
    world.pod.start("c1")
    with pytest.raises(ContainerError, match="process c1 cannot start: it is running"):
        world.pod.start("c1")
    with pytest.raises(ContainerError, match="cannot delete process c1: it is running"):
        world.pod.delete("c1")
    with pytest.raises(ContainerError, match="container c1 is not paused"):
        world.pod.resume("c1")
    world.sandbox.finish("c1", "", 0)
    world.exited("c1")
    with pytest.raises(ContainerNotFound, match="process c1 already finished"):
        world.pod.kill("c1", "", 9, False)
    assert world.sandbox.agent.signals == []


def test_kill_pause_resume_resize_and_queries_reach_the_agent(world: World) -> None:
    world.pod.create("t1", world.bundle("t1"), [], ("", "", ""), True, None)
    world.pod.start("t1")
    world.pod.kill("t1", "", 15, True)
    assert world.sandbox.agent.signals == [("t1", "", 15, True)]
    world.pod.pause("t1")
    assert world.pod.process("t1").status == Status.PAUSED
    world.pod.resume("t1")
    assert world.pod.process("t1").status == Status.RUNNING
    world.pod.resize("t1", "", 120, 40)
    world.pod.update("t1", b"resources")
    assert world.sandbox.agent.calls == [
        ("pause_container", ("t1",)),
        ("resume_container", ("t1",)),
        ("resize_tty", ("t1", "", 40, 120)),  # rows, columns
        ("update_container", ("t1", b"resources")),
    ]
    assert world.pod.pids("t1") == [1, 7, 12]
    assert world.pod.stats("t1").pids.current == 3
    assert world.events.topics == ["/tasks/create", "/tasks/start", "/tasks/paused", "/tasks/resumed"]
    with pytest.raises(ContainerNotFound):
        world.pod.pids("other")


def test_the_vm_stays_while_a_container_remains(world: World) -> None:
    world.create("sandbox")
    world.create("app")
    world.pod.delete("app")  # never started: may be deleted
    assert world.sandbox.stopped == 0 and world.pod.sandbox is not None
    world.pod.delete("sandbox")
    assert world.sandbox.stopped == 1 and world.pod.sandbox is None
    assert world.sandbox.removed == ["app", "sandbox"]


def test_a_dead_vm_refuses_new_containers_but_lets_old_ones_go(world: World) -> None:
    world.create("c1")
    world.sandbox.dead.set()
    world.sandbox.death_reason = "QEMU was killed"
    with pytest.raises(ContainerError, match="the pod's VM is dead: QEMU was killed"):
        world.create("c2")
    assert "c2" not in world.pod.containers
    world.pod.delete("c1")
    assert world.pod.containers == {}


def test_a_failed_add_container_leaves_nothing_behind(
    world: World, mount_calls: list[tuple[Any, ...]]
) -> None:
    world.sandbox.add_error = ContainerError("the agent refused")
    snapshot = [("bind", "/snap", ["rbind"])]
    bundle = world.bundle("c1")
    with pytest.raises(ContainerError, match="the agent refused"):
        world.pod.create("c1", bundle, snapshot, ("", "", ""), False, None)
    assert world.pod.containers == {}
    assert [call[0] for call in mount_calls] == ["mount", "umount"]
    assert world.sandbox.stopped == 1  # it was the pod's first container
    assert world.events.topics == []


def test_create_checks_its_input_before_touching_the_vm(world: World, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unsupported stdio URI 'binary:///usr/bin/logger'"):
        world.pod.create("c1", world.bundle("c1"), [], ("", "binary:///usr/bin/logger", ""), False, None)
    empty = tmp_path / "empty-bundle"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"empty-bundle/config\.json"):
        world.pod.create("c2", empty, [], ("", "", ""), False, None)
    (empty / "config.json").write_text("{")
    with pytest.raises(ConfigError, match=r"empty-bundle/config\.json"):
        world.pod.create("c2", empty, [], ("", "", ""), False, None)
    assert world.sandbox.added == {} and world.events.topics == []


def test_the_first_container_reads_the_config_before_booting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mount_calls: list[tuple[Any, ...]]
) -> None:
    """Without a VM, create goes as far as the config: a bad one fails cleanly, nothing booted."""

    def no_vm(*args: object, **kwargs: object) -> None:
        raise AssertionError("tried to boot a VM")

    monkeypatch.setattr(pod_module, "Sandbox", no_vm)
    bad = tmp_path / "hako.toml"
    bad.write_text('[hypervisor]\nkernel = "vmlinuz"\n')
    world = World(tmp_path)
    world.pod.sandbox = None
    with pytest.raises(ConfigError, match=rf"{bad}: \[hypervisor\] kernel = 'vmlinuz'"):
        world.pod.create("c1", world.bundle("c1"), [], ("", "", ""), False, str(bad))
    assert world.pod.containers == {} and world.pod.sandbox is None


def test_close_stops_the_vm_and_forgets_everything(world: World, mount_calls: list[tuple[Any, ...]]) -> None:
    world.pod.create("c1", world.bundle("c1"), [("bind", "/snap", ["rbind"])], ("", "", ""), False, None)
    world.create("c2")
    world.pod.close()
    world.pod.close()  # idempotent
    assert world.pod.containers == {} and world.pod.sandbox is None
    assert world.sandbox.stopped == 1
    assert [call for call in mount_calls if call[0] == "umount"] == [
        ("umount", world.tmp_path / "bundles" / "c1" / "rootfs")  # only what the pod mounted
    ]


def test_wait_returns_the_exited_process_or_gives_up_with_the_caller(world: World) -> None:
    world.create("c1")
    world.pod.start("c1")
    gone = threading.Event()
    gone.set()
    with pytest.raises(ContainerError, match="the caller went away"):
        world.pod.wait("c1", "", gone)
    world.sandbox.finish("c1", "", 7)
    assert world.pod.wait("c1", "", threading.Event()).exit_status == 7


# -- the order of events does not depend on thread scheduling -----------------------------------


def test_a_quick_exit_is_announced_after_the_start(
    tmp_path: Path, mount_calls: list[tuple[Any, ...]]
) -> None:
    """The process exits at once; the thread announcing the start is descheduled before it does."""
    world = World(tmp_path, delays={"/tasks/start": 0.3})
    world.create("c1")
    world.sandbox.finish("c1", "", 0)  # exits as soon as it starts
    world.pod.start("c1")
    assert world.events.wait_for(3) == ["/tasks/create", "/tasks/start", "/tasks/exit"]
    world.pod.close()


def test_a_quick_exec_exit_is_announced_after_exec_started(
    tmp_path: Path, mount_calls: list[tuple[Any, ...]]
) -> None:
    world = World(tmp_path, delays={"/tasks/exec-started": 0.3})
    world.create("c1")
    world.pod.start("c1")
    world.pod.exec("c1", "e1", ("", "", ""), False, {"args": ["true"]})
    world.sandbox.finish("c1", "e1", 0)
    world.pod.start("c1", "e1")
    topics = world.events.wait_for(5)
    assert topics[2:] == ["/tasks/exec-added", "/tasks/exec-started", "/tasks/exit"]
    world.pod.close()


def test_delete_right_after_wait_is_announced_after_the_exit(
    tmp_path: Path, mount_calls: list[tuple[Any, ...]]
) -> None:
    """containerd waits, then deletes at once; the exit's announcer is descheduled meanwhile."""
    world = World(tmp_path, delays={"/tasks/exit": 0.3})
    world.create("c1")
    world.pod.start("c1")
    world.sandbox.finish("c1", "", 0)
    world.pod.wait("c1", "", threading.Event())
    world.pod.delete("c1")
    assert world.events.wait_for(4) == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"]
