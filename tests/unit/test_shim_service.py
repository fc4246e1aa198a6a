"""containerd's Task API over real ttRPC, on a pod with a fake VM (no root, no VM, no containerd)."""

from __future__ import annotations

import json
import os
import re
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.any_pb2 import Any as AnyPb

import hako
from hako.errors import (
    AgentError,
    ConfigError,
    ContainerError,
    ContainerExists,
    ContainerNotFound,
    ExecNotFound,
    HakoError,
    SandboxError,
    UsageError,
    VMDied,
)
from hako.runtime import mounts
from hako.shim import config as shim_config
from hako.shim import pod as pod_module
from hako.shim.config import config_path, config_path_of
from hako.shim.events import Publisher
from hako.shim.pod import Pod
from hako.shim.service import PROCESS_SPEC, SERVICE, TaskService, json_spec, metrics, status_of
from hako_containerd.cgroups.v2.stats import metrics_pb2 as cgroups_v2
from hako_containerd.containerd.api.types.task import task_pb2
from hako_containerd.containerd.pkg.runtimeoptions.v1 import api_pb2 as runtimeoptions
from hako_containerd.containerd.runtime.v2.task import shim_pb2 as pb
from hako_ttrpc import Client, Server, SocketTransport, Stub, TtrpcError, codes
from tests.unit.shim_fakes import (
    EventsServer,
    EventsService,
    FakeAgent,
    FakeSandbox,
    RecordingPublisher,
    pod_with,
)

SPEC = {"ociVersion": "1.0.2", "process": {"args": ["sh"], "cwd": "/"}, "root": {"path": "rootfs"}}


# -- conversions --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (ContainerNotFound("container x not found"), codes.NOT_FOUND),
        (ContainerExists("container x already exists"), codes.ALREADY_EXISTS),
        (ConfigError("bad config"), codes.INVALID_ARGUMENT),
        (UsageError("bad usage"), codes.INVALID_ARGUMENT),
        (ContainerError("container x is not running"), codes.FAILED_PRECONDITION),
        (AgentError("lost the agent", codes.UNAVAILABLE), codes.UNAVAILABLE),
        (AgentError("agent said no"), codes.UNKNOWN),
        (VMDied("QEMU exited"), codes.UNKNOWN),
        (SandboxError("no VM"), codes.UNKNOWN),
        (ExecNotFound('exec: "nope": ENOENT'), codes.UNKNOWN),
    ],
)
def test_hako_errors_become_statuses_containerd_understands(error: HakoError, code: int) -> None:
    status = status_of(error)
    assert isinstance(status, TtrpcError)
    assert (status.code, status.message) == (code, str(error))


def _options(path: str, type_url: str | None = None) -> AnyPb:
    options = runtimeoptions.Options(config_path=path)
    return AnyPb(
        type_url=type_url or runtimeoptions.Options.DESCRIPTOR.full_name, value=options.SerializeToString()
    )


def test_config_path_from_runtime_options() -> None:
    assert config_path(AnyPb()) is None  # containerd sent no options
    assert config_path(_options("/etc/hako/pod.toml")) == "/etc/hako/pod.toml"
    assert config_path(_options("/x.toml", "types.containerd.io/runtimeoptions.v1.Options")) == "/x.toml"
    assert config_path(_options("")) is None
    # as `shim start` reads them on stdin: the same Any, serialized
    assert config_path_of(_options("/etc/hako/pod.toml").SerializeToString()) == "/etc/hako/pod.toml"
    assert config_path_of(b"") is None
    with pytest.raises(ConfigError, match=r"runtime options of type runtimeoptions\.v1\.Options, not .*runc"):
        config_path(AnyPb(type_url="containerd.runc.v1.Options", value=b""))


def test_json_spec() -> None:
    value = AnyPb(type_url=PROCESS_SPEC, value=json.dumps({"args": ["ls"]}).encode())
    assert json_spec(value, "exec e1") == {"args": ["ls"]}
    with pytest.raises(ConfigError, match=r"exec e1: not the JSON containerd sends \(types\.containerd\.io/"):
        json_spec(AnyPb(type_url=PROCESS_SPEC, value=b"\x0a\x03abc"), "exec e1")


def test_metrics_are_containerds_cgroup_v2_metrics() -> None:
    packed = metrics(FakeAgent().stats("c1"))
    assert packed.type_url == "io.containerd.cgroups.v2.Metrics"
    out = cgroups_v2.Metrics.FromString(packed.value)
    assert (out.pids.current, out.pids.limit) == (3, 100)
    assert (out.cpu.usage_usec, out.cpu.user_usec, out.cpu.system_usec) == (1500, 1000, 500)
    assert (out.cpu.nr_throttled, out.cpu.throttled_usec) == (2, 40)
    assert (out.memory.usage, out.memory.usage_limit) == (4096, 1 << 28)
    assert out.memory_events.oom_kill == 1


def test_the_service_is_containerds_task_v2_with_every_rpc() -> None:
    assert SERVICE.full_name == "containerd.task.v2.Task"
    missing = [m.name for m in SERVICE.methods if not callable(getattr(TaskService, m.name, None))]
    assert missing == []


# -- the service, served -----------------------------------------------------------------------


class Shim:
    """A TaskService on a pod with a fake VM, called through ttRPC as containerd does."""

    def __init__(self, tmp_path: Path, events: Publisher | None = None) -> None:
        self.tmp_path = tmp_path
        self.sandbox = FakeSandbox(pid=4321)
        self.events = events or RecordingPublisher()
        self.log: list[str] = []
        self.pod: Pod = pod_with(self.sandbox, self.events, tmp_path / "state", self.log)
        self.shutdowns = threading.Event()
        self.service = TaskService(self.pod, "k8s.io", self.shutdowns.set, self.log.append)

    def bundle(self, name: str) -> str:
        bundle = self.tmp_path / "bundles" / name
        bundle.mkdir(parents=True)
        (bundle / "config.json").write_text(json.dumps(SPEC))
        return str(bundle)


@contextmanager
def served(shim: Shim) -> Iterator[Any]:
    server = Server()
    server.register_service(SERVICE, shim.service)
    ours, theirs = socket.socketpair()
    thread = threading.Thread(target=server.serve, args=(SocketTransport(theirs),), daemon=True)
    thread.start()
    client = Client(SocketTransport(ours))
    try:
        yield Stub(client, SERVICE)
    finally:
        client.close()
        thread.join(5)
        shim.pod.close()


@pytest.fixture(autouse=True)
def nothing_real(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No mounts, no VM, no config from the host."""
    monkeypatch.setattr(mounts, "mount", lambda *args, **kwargs: None)
    monkeypatch.setattr(mounts, "umount", lambda target: None)

    def no_vm(*args: object, **kwargs: object) -> None:
        raise AssertionError("tried to boot a VM")

    monkeypatch.setattr(pod_module, "Sandbox", no_vm)
    monkeypatch.delenv("HAKO_CONFIG", raising=False)
    monkeypatch.setattr(shim_config, "DEFAULT_PATH", tmp_path / "no-default.toml")


def _status(call: Any, request: Any, code: int, message: str) -> None:
    with pytest.raises(TtrpcError) as info:
        call(request)
    assert codes.name(info.value.code) == codes.name(code), info.value.message
    assert re.search(message, info.value.message), info.value.message


def test_checkpoints_are_unimplemented_with_a_reason(tmp_path: Path) -> None:
    shim = Shim(tmp_path)
    with served(shim) as task:
        _status(task.Checkpoint, pb.CheckpointTaskRequest(id="c1"), codes.UNIMPLEMENTED, "cannot checkpoint")
        restore = pb.CreateTaskRequest(id="c1", bundle=shim.bundle("c1"), checkpoint="/cp")
        _status(task.Create, restore, codes.UNIMPLEMENTED, "hako cannot restore checkpoints")
    assert shim.pod.containers == {}


def test_unknown_containers_are_not_found(tmp_path: Path) -> None:
    shim = Shim(tmp_path)
    with served(shim) as task:
        for call, request in [
            (task.State, pb.StateRequest(id="nope")),
            (task.Start, pb.StartRequest(id="nope")),
            (task.Delete, pb.DeleteRequest(id="nope")),
            (task.Kill, pb.KillRequest(id="nope", signal=9)),
            (task.Wait, pb.WaitRequest(id="nope")),
            (task.Pids, pb.PidsRequest(id="nope")),
            (task.Pause, pb.PauseRequest(id="nope")),
            (task.ResizePty, pb.ResizePtyRequest(id="nope")),
            (task.CloseIO, pb.CloseIORequest(id="nope", stdin=True)),
        ]:
            _status(call, request, codes.NOT_FOUND, "^container nope not found$")
    assert "state: container nope not found" in shim.log


def test_bad_create_requests_are_invalid_arguments(tmp_path: Path) -> None:
    shim = Shim(tmp_path)
    with served(shim) as task:
        bad_uri = pb.CreateTaskRequest(id="c1", bundle=shim.bundle("c1"), stdout="binary:///bin/logger")
        _status(task.Create, bad_uri, codes.INVALID_ARGUMENT, "unsupported stdio URI 'binary:///bin/logger'")
        runc_options = pb.CreateTaskRequest(id="c2", bundle=shim.bundle("c2"))
        runc_options.options.type_url = "containerd.runc.v1.Options"
        _status(task.Create, runc_options, codes.INVALID_ARGUMENT, "runtime options of type runtimeoptions")
        no_bundle = pb.CreateTaskRequest(id="c3", bundle=str(tmp_path / "missing"))
        _status(task.Create, no_bundle, codes.INVALID_ARGUMENT, r"missing/config\.json")
    assert shim.pod.containers == {} and shim.sandbox.added == {}


def test_the_config_path_option_is_the_config_the_pod_boots_with(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No VM here: a bad config proves which file the first Create read."""
    env_config = tmp_path / "env.toml"
    env_config.write_text("[hypervisor]\nvcpus = 0\n")
    monkeypatch.setenv("HAKO_CONFIG", str(env_config))
    option_config = tmp_path / "option.toml"
    option_config.write_text("[hypervisor]\nmemory_mib = 1\n")
    shim = Shim(tmp_path)
    shim.pod.sandbox = None  # the pod's first container: it would boot the VM
    with served(shim) as task:
        request = pb.CreateTaskRequest(
            id="c1", bundle=shim.bundle("c1"), options=_options(str(option_config))
        )
        _status(
            task.Create, request, codes.INVALID_ARGUMENT, rf"^{option_config}: .*memory_mib must be at least"
        )
        request = pb.CreateTaskRequest(id="c2", bundle=shim.bundle("c2"))
        _status(task.Create, request, codes.INVALID_ARGUMENT, rf"^{env_config}: .*vcpus must be at least 1")


def test_exec_with_a_spec_that_is_not_json_is_an_invalid_argument(tmp_path: Path) -> None:
    shim = Shim(tmp_path)
    with served(shim) as task:
        task.Create(pb.CreateTaskRequest(id="c1", bundle=shim.bundle("c1")))
        task.Start(pb.StartRequest(id="c1"))
        request = pb.ExecProcessRequest(
            id="c1", exec_id="e1", spec=AnyPb(type_url=PROCESS_SPEC, value=b"\x01")
        )
        _status(task.Exec, request, codes.INVALID_ARGUMENT, "exec e1: not the JSON containerd sends")
        shim.sandbox.finish("c1", "", 0)


def test_wrong_states_are_failed_preconditions(tmp_path: Path) -> None:
    shim = Shim(tmp_path)
    with served(shim) as task:
        task.Create(pb.CreateTaskRequest(id="c1", bundle=shim.bundle("c1")))
        _status(task.Resume, pb.ResumeRequest(id="c1"), codes.FAILED_PRECONDITION, "c1 is not paused")
        _status(task.Pause, pb.PauseRequest(id="c1"), codes.FAILED_PRECONDITION, "c1 is not running")
        _status(
            task.ResizePty, pb.ResizePtyRequest(id="c1", width=80), codes.FAILED_PRECONDITION, "no terminal"
        )
        _status(
            task.Create,
            pb.CreateTaskRequest(id="c1", bundle=str(tmp_path / "bundles" / "c1")),
            codes.ALREADY_EXISTS,
            "container c1 already exists",
        )


def test_connect_reports_the_shim_and_the_vm(tmp_path: Path) -> None:
    shim = Shim(tmp_path)
    with served(shim) as task:
        response = task.Connect(pb.ConnectRequest(id="c1"))
    assert (response.shim_pid, response.task_pid, response.version) == (os.getpid(), 4321, hako.__version__)


def test_a_task_through_its_life(tmp_path: Path) -> None:
    """Create, start, exec, stats, kill, wait, delete, shutdown: as containerd drives a task, with a
    real event publisher forwarding to a real ttRPC events service."""
    containerd = EventsServer(tmp_path / "containerd.sock.ttrpc", EventsService())
    publisher = Publisher(f"unix://{containerd.path}", "k8s.io", lambda line: None)
    shim = Shim(tmp_path, events=publisher)
    try:
        with served(shim) as task:
            bundle = shim.bundle("c1")
            created = task.Create(pb.CreateTaskRequest(id="c1", bundle=bundle, stdout="", stderr=""))
            assert created.pid == 4321
            state = task.State(pb.StateRequest(id="c1"))
            assert (state.id, state.bundle, state.pid, state.status) == ("c1", bundle, 4321, task_pb2.CREATED)
            assert task.Start(pb.StartRequest(id="c1")).pid == 4321
            assert task.State(pb.StateRequest(id="c1")).status == task_pb2.RUNNING

            task.Pause(pb.PauseRequest(id="c1"))
            assert task.State(pb.StateRequest(id="c1")).status == task_pb2.PAUSED
            task.Resume(pb.ResumeRequest(id="c1"))

            process = {"args": ["cat"], "cwd": "/", "terminal": False}
            spec = AnyPb(type_url=PROCESS_SPEC, value=json.dumps(process).encode())
            task.Exec(pb.ExecProcessRequest(id="c1", exec_id="e1", spec=spec))
            exec_state = task.State(pb.StateRequest(id="c1", exec_id="e1"))
            assert (exec_state.id, exec_state.exec_id, exec_state.status) == ("e1", "e1", task_pb2.CREATED)
            assert task.Start(pb.StartRequest(id="c1", exec_id="e1")).pid == 4321
            assert shim.sandbox.agent.calls[-1] == ("exec_process", ("c1", "e1", process, False))
            shim.sandbox.finish("c1", "e1", 1)
            assert task.Wait(pb.WaitRequest(id="c1", exec_id="e1")).exit_status == 1
            assert task.Delete(pb.DeleteRequest(id="c1", exec_id="e1")).exit_status == 1

            assert [p.pid for p in task.Pids(pb.PidsRequest(id="c1")).processes] == [1, 7, 12]
            stats = task.Stats(pb.StatsRequest(id="c1")).stats
            assert cgroups_v2.Metrics.FromString(stats.value).memory.usage == 4096

            task.Shutdown(pb.ShutdownRequest(id="c1"))  # a container remains: keep serving
            task.Kill(pb.KillRequest(id="c1", signal=15, all=True))
            assert shim.sandbox.agent.signals == [("c1", "", 15, True)]
            shim.sandbox.finish("c1", "", 143)
            waited = task.Wait(pb.WaitRequest(id="c1"))
            assert waited.exit_status == 143 and waited.exited_at.seconds > 0
            stopped = task.State(pb.StateRequest(id="c1"))
            assert (stopped.status, stopped.exit_status) == (task_pb2.STOPPED, 143)
            assert stopped.exited_at == waited.exited_at
            deleted = task.Delete(pb.DeleteRequest(id="c1"))
            assert (deleted.pid, deleted.exit_status, deleted.exited_at) == (4321, 143, waited.exited_at)
            assert not shim.shutdowns.is_set()
            task.Shutdown(pb.ShutdownRequest(id="c1"))
            assert shim.shutdowns.wait(5)
        envelopes = containerd.service.wait_for(9)
    finally:
        publisher.close()
        containerd.stop()
    assert [e.topic for e in envelopes] == [
        "/tasks/create",
        "/tasks/start",
        "/tasks/paused",
        "/tasks/resumed",
        "/tasks/exec-added",
        "/tasks/exec-started",
        "/tasks/exit",
        "/tasks/exit",
        "/tasks/delete",
    ]
    assert {e.namespace for e in envelopes} == {"k8s.io"}
    assert shim.sandbox.stopped == 1


def test_shutdown_now_stops_even_with_containers(tmp_path: Path) -> None:
    shim = Shim(tmp_path)
    with served(shim) as task:
        task.Create(pb.CreateTaskRequest(id="c1", bundle=shim.bundle("c1")))
        task.Shutdown(pb.ShutdownRequest(id="c1", now=True))
        assert shim.shutdowns.wait(5)


def test_close_io_ends_stdin(tmp_path: Path) -> None:
    shim = Shim(tmp_path)
    stdin = tmp_path / "stdin"
    os.mkfifo(stdin)
    writer_ready = threading.Event()

    def containerd_side() -> None:  # containerd holds the FIFO's write end open
        fd = os.open(stdin, os.O_WRONLY)
        writer_ready.set()
        shim.sandbox.dead.wait(10)
        os.close(fd)

    writer = threading.Thread(target=containerd_side, daemon=True)
    writer.start()
    with served(shim) as task:
        task.Create(pb.CreateTaskRequest(id="c1", bundle=shim.bundle("c1"), stdin=str(stdin)))
        assert writer_ready.wait(5)
        task.CloseIO(pb.CloseIORequest(id="c1", stdin=False))
        assert shim.sandbox.agent.stdin_closed == []
        task.CloseIO(pb.CloseIORequest(id="c1", stdin=True))
        assert shim.sandbox.agent.stdin_closed == [("c1", "")]
        shim.sandbox.dead.set()
    writer.join(5)
