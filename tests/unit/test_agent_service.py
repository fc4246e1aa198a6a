"""The agent's ttRPC handlers over a fake sandbox: conversions and error mapping."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from google.protobuf import any_pb2

from hako_agent import errors
from hako_agent.cgroups import CgroupStats
from hako_agent.service import AgentService, BootTimes, to_status
from hako_api import agent_pb2
from hako_ttrpc import CallContext, Client, Code, Server, SocketTransport, Stub, TtrpcError

AGENT = agent_pb2.DESCRIPTOR.services_by_name["Agent"]


class FakeSandbox:
    """Records calls; raises what a test puts in ``fail``."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.fail: errors.AgentError | None = None

    def __getattr__(self, name: str) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            self.calls.append((name, args))
            if self.fail is not None:
                raise self.fail
            if name == "start_container":
                return 42
            if name == "wait_process":
                cancelled = args[2]
                while not cancelled():
                    time.sleep(0.01)
                raise errors.Cancelled("gave up")
            if name == "stats":
                stats = CgroupStats()
                stats.memory_usage, stats.pids_limit = 4096, 9
                return stats
            if name == "read_output":
                return b"out" if not args[2] else b"err"
            if name == "list_processes":
                return [1, 2]
            return None

        return call


def ctx(deadline: float | None = None) -> CallContext:
    return CallContext("hako.agent.v1.Agent", "X", {}, deadline, threading.Event(), 1)


def test_exec_failure_details() -> None:
    status = to_status(errors.ExecFailed(2, "foo", 'exec: "foo": executable file not found in $PATH'))
    assert status.code == Code.FAILED_PRECONDITION
    assert status.message == 'exec: "foo": executable file not found in $PATH'
    assert len(status.details) == 1 and isinstance(status.details[0], any_pb2.Any)
    failure = agent_pb2.ExecFailure()
    assert status.details[0].Unpack(failure)
    assert (failure.errno, failure.path) == (2, "foo")


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.NotFound("no container 'x'"), Code.NOT_FOUND),
        (errors.AlreadyExists("x"), Code.ALREADY_EXISTS),
        (errors.InvalidArgument("process.args: must name the program to run"), Code.INVALID_ARGUMENT),
        (errors.FailedPrecondition("container c is running: cannot start it"), Code.FAILED_PRECONDITION),
        (errors.Unsupported("no cgroup v2"), Code.UNIMPLEMENTED),
        (errors.AgentError("boom"), Code.INTERNAL),
        (errors.Cancelled("gave up"), Code.CANCELLED),
    ],
)
def test_errors_map_to_codes(error: errors.AgentError, code: int) -> None:
    fake = FakeSandbox()
    fake.fail = error
    service = AgentService(sandbox=fake)  # type: ignore[arg-type]
    with pytest.raises(TtrpcError) as info:
        service.StartContainer(agent_pb2.ContainerRequest(container_id="c1"), ctx())
    assert info.value.code == code
    assert info.value.message == str(error)


def test_handlers_convert() -> None:
    fake = FakeSandbox()
    service = AgentService(BootTimes(1.5), sandbox=fake)  # type: ignore[arg-type]
    assert service.StartContainer(agent_pb2.ContainerRequest(container_id="c1"), ctx()).pid == 42
    service.RemoveContainer(agent_pb2.RemoveContainerRequest(container_id="c1", timeout_ms=2500), ctx())
    storage = agent_pb2.Storage(
        driver="9p", source="share", fstype="9p", options=["trans=virtio"], mount_point="/m"
    )
    service.CreateContainer(
        agent_pb2.CreateContainerRequest(container_id="c1", oci_spec=b"{}", storages=[storage], stdin=True),
        ctx(),
    )
    stats = service.StatsContainer(agent_pb2.ContainerRequest(container_id="c1"), ctx())
    assert stats.memory.usage_bytes == 4096 and stats.pids.limit == 9
    assert service.ReadStderr(agent_pb2.ReadStreamRequest(container_id="c1"), ctx()).data == b"err"
    assert service.ListProcesses(agent_pb2.ContainerRequest(container_id="c1"), ctx()).pids == [1, 2]
    names = [name for name, _ in fake.calls]
    assert names == ["start_container", "remove_container", "create_container", "stats", "read_output",
                     "list_processes"]  # fmt: skip
    assert fake.calls[1][1] == ("c1", 2.5)
    created = fake.calls[2][1]
    assert created[0] == "c1" and created[3] is True
    assert (created[2][0].driver, created[2][0].options, created[2][0].mount_point) == (
        "9p",
        ["trans=virtio"],
        "/m",
    )
    read = fake.calls[4][1]
    assert read[2] is True and read[3] == 32 * 1024  # stderr, default size

    check = service.Check(agent_pb2.CheckRequest(), ctx())
    assert check.agent_version and check.boot.agent_start == 1.5 and check.uptime > 0
    with pytest.raises(TtrpcError) as info:
        service.TtyWinResize(agent_pb2.TtyWinResizeRequest(container_id="c1", rows=70000), ctx())
    assert info.value.code == Code.INVALID_ARGUMENT


@pytest.fixture
def stub() -> Iterator[tuple[Stub, FakeSandbox]]:
    fake = FakeSandbox()
    server = Server()
    server.register_service(AGENT, AgentService(sandbox=fake))  # type: ignore[arg-type]
    near, far = socket.socketpair()
    thread = threading.Thread(target=server.serve, args=(SocketTransport(far),), daemon=True)
    thread.start()
    client = Client(SocketTransport(near))
    try:
        yield Stub(client, AGENT), fake
    finally:
        client.close()
        thread.join(5)


def test_over_ttrpc_deadline_exceeded(stub: tuple[Stub, FakeSandbox]) -> None:
    s, _ = stub
    with pytest.raises(TtrpcError) as info:
        s.WaitProcess(agent_pb2.ProcessRequest(container_id="c1"), timeout=0.3)
    assert info.value.code in (Code.DEADLINE_EXCEEDED,)


def test_over_ttrpc_exec_failure(stub: tuple[Stub, FakeSandbox]) -> None:
    s, fake = stub
    fake.fail = errors.ExecFailed(13, "/etc", 'exec: "/etc": permission denied')
    with pytest.raises(TtrpcError) as info:
        s.StartContainer(agent_pb2.ContainerRequest(container_id="c1"), timeout=5)
    assert info.value.code == Code.FAILED_PRECONDITION
    failure = agent_pb2.ExecFailure()
    assert info.value.details[0].Unpack(failure) and failure.errno == 13
