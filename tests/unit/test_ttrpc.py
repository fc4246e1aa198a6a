"""ttRPC: wire format, concurrency, errors, timeouts, connection loss, proxying."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from google.protobuf.any_pb2 import Any as AnyPb

from hako_api import agent_pb2
from hako_ttrpc import (
    CallContext,
    Client,
    ConnectionClosed,
    FdTransport,
    Server,
    SocketTransport,
    Stub,
    TtrpcError,
    codes,
    framing,
)
from hako_ttrpc.ttrpc_pb2 import Request, Response

AGENT = agent_pb2.DESCRIPTOR.services_by_name["Agent"]
SERVICE = AGENT.full_name


class FakeAgent:
    def __init__(self) -> None:
        self.release = threading.Event()
        self.seen_closed = threading.Event()
        self.contexts: list[CallContext] = []

    def Check(self, request: agent_pb2.CheckRequest, ctx: CallContext) -> agent_pb2.CheckResponse:
        self.contexts.append(ctx)
        return agent_pb2.CheckResponse(agent_version="test", uptime=1.5)

    def WaitProcess(
        self, request: agent_pb2.ProcessRequest, ctx: CallContext
    ) -> agent_pb2.WaitProcessResponse:
        # Blocks until released or the connection drops, like a real wait.
        while not self.release.wait(0.01):
            if ctx.closed.is_set():
                self.seen_closed.set()
                raise TtrpcError(codes.CANCELLED, "connection closed")
        return agent_pb2.WaitProcessResponse(exit_status=int(request.exec_id or "0"))

    def ReadStdout(
        self, request: agent_pb2.ReadStreamRequest, ctx: CallContext
    ) -> agent_pb2.ReadStreamResponse:
        return agent_pb2.ReadStreamResponse(data=b"x" * request.len)

    def StartContainer(
        self, request: agent_pb2.ContainerRequest, ctx: CallContext
    ) -> agent_pb2.StartContainerResponse:
        if request.container_id == "missing":
            detail = AnyPb()
            detail.Pack(agent_pb2.ExecFailure(errno=2, path="nope", message="not found"))
            raise TtrpcError(codes.FAILED_PRECONDITION, "exec failed", details=[detail])
        if request.container_id == "crash":
            raise RuntimeError("boom")
        return agent_pb2.StartContainerResponse(pid=42)


@contextmanager
def served(impl: object, *, server: Server | None = None) -> Iterator[tuple[Client, Server]]:
    server = server or Server()
    server.register_service(AGENT, impl)
    ours, theirs = socket.socketpair()
    thread = threading.Thread(target=server.serve, args=(SocketTransport(theirs),), daemon=True)
    thread.start()
    client = Client(SocketTransport(ours))
    try:
        yield client, server
    finally:
        client.close()
        thread.join(5)
        assert not thread.is_alive()


def test_frame_header_is_big_endian_length_stream_type_flags() -> None:
    assert framing.encode(1, framing.TYPE_REQUEST, b"abc") == b"\x00\x00\x00\x03\x00\x00\x00\x01\x01\x00abc"
    empty = framing.encode(0x01020304, framing.TYPE_RESPONSE, b"", flags=5)
    assert empty == b"\0\0\0\0\x01\x02\x03\x04\x02\x05"


def test_unary_call_through_stub() -> None:
    with served(FakeAgent()) as (client, _):
        stub = Stub(client, AGENT)
        response = stub.Check(agent_pb2.CheckRequest())
        assert response.agent_version == "test"
        assert response.uptime == 1.5


def test_raw_wire_exchange_matches_ttrpc_format() -> None:
    """Speak the protocol by hand: a request frame in, a response frame with an OK status out."""
    server = Server()
    server.register_service(AGENT, FakeAgent())
    ours, theirs = socket.socketpair()
    thread = threading.Thread(target=server.serve, args=(SocketTransport(theirs),), daemon=True)
    thread.start()
    request = Request(service=SERVICE, method="Check", payload=b"").SerializeToString()
    ours.sendall(struct.pack(">IIBB", len(request), 7, 1, 0) + request)
    header = ours.recv(10, socket.MSG_WAITALL)
    length, stream_id, mtype, flags = struct.unpack(">IIBB", header)
    assert (stream_id, mtype, flags) == (7, framing.TYPE_RESPONSE, 0)
    response = Response.FromString(ours.recv(length, socket.MSG_WAITALL))
    assert response.HasField("status") and response.status.code == 0
    assert agent_pb2.CheckResponse.FromString(response.payload).agent_version == "test"
    ours.close()
    thread.join(5)


def test_stream_ids_are_odd_and_increasing() -> None:
    seen: list[int] = []
    agent = FakeAgent()
    with served(agent) as (client, _):
        stub = Stub(client, AGENT)
        for _ in range(3):
            stub.Check(agent_pb2.CheckRequest())
        seen = [ctx.stream_id for ctx in agent.contexts]
    assert seen == [1, 3, 5]


def test_blocking_call_does_not_hold_up_others() -> None:
    agent = FakeAgent()
    with served(agent) as (client, _):
        stub = Stub(client, AGENT)
        result: dict[str, Any] = {}
        waiter = threading.Thread(
            target=lambda: result.setdefault("wait", stub.WaitProcess(agent_pb2.ProcessRequest(exec_id="3")))
        )
        waiter.start()
        # Many concurrent calls complete while WaitProcess is still blocked.
        answers: list[int] = []
        lock = threading.Lock()

        def read(n: int) -> None:
            data = stub.ReadStdout(agent_pb2.ReadStreamRequest(len=n)).data
            with lock:
                answers.append(len(data))

        threads = [threading.Thread(target=read, args=(n,)) for n in range(1, 41)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert sorted(answers) == list(range(1, 41))
        assert waiter.is_alive()
        agent.release.set()
        waiter.join(5)
        assert result["wait"].exit_status == 3


def test_error_status_with_details_reaches_the_client() -> None:
    with served(FakeAgent()) as (client, _):
        stub = Stub(client, AGENT)
        with pytest.raises(TtrpcError) as info:
            stub.StartContainer(agent_pb2.ContainerRequest(container_id="missing"))
        assert info.value.code == codes.FAILED_PRECONDITION
        assert info.value.message == "exec failed"
        failure = agent_pb2.ExecFailure()
        assert info.value.details[0].Unpack(failure)
        assert (failure.errno, failure.path) == (2, "nope")
        # The connection stays usable after an error.
        assert stub.StartContainer(agent_pb2.ContainerRequest(container_id="ok")).pid == 42


def test_handler_exception_is_internal_and_logged() -> None:
    logged: list[str] = []
    server = Server(log=logged.append)
    with served(FakeAgent(), server=server) as (client, _), pytest.raises(TtrpcError) as info:
        Stub(client, AGENT).StartContainer(agent_pb2.ContainerRequest(container_id="crash"))
    assert info.value.code == codes.INTERNAL
    assert "boom" in info.value.message
    assert any("RuntimeError: boom" in line for line in logged)


def test_unknown_method_is_unimplemented() -> None:
    with served(FakeAgent()) as (client, _):
        with pytest.raises(TtrpcError) as info:
            client.call_raw(SERVICE, "Nope", b"")
        assert info.value.code == codes.UNIMPLEMENTED
        # Registered RPC that the implementation lacks is unimplemented too.
        with pytest.raises(TtrpcError) as info2:
            Stub(client, AGENT).PauseContainer(agent_pb2.ContainerRequest())
        assert info2.value.code == codes.UNIMPLEMENTED


def test_undecodable_request_is_invalid_argument() -> None:
    with served(FakeAgent()) as (client, _):
        with pytest.raises(TtrpcError) as info:
            client.call_raw(SERVICE, "StartContainer", b"\xff\xff\xff")
        assert info.value.code == codes.INVALID_ARGUMENT


def test_timeout_is_sent_and_enforced_locally() -> None:
    agent = FakeAgent()
    with served(agent) as (client, _):
        stub = Stub(client, AGENT)
        started = time.monotonic()
        with pytest.raises(TtrpcError) as info:
            stub.WaitProcess(agent_pb2.ProcessRequest(), timeout=0.2)
        assert info.value.code == codes.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 2
        stub.Check(agent_pb2.CheckRequest(), timeout=5)
        assert agent.contexts[-1].deadline is not None
        agent.release.set()  # let the abandoned wait finish; its late answer is dropped
        stub.Check(agent_pb2.CheckRequest())


def test_metadata_is_delivered() -> None:
    agent = FakeAgent()
    with served(agent) as (client, _):
        Stub(client, AGENT).Check(
            agent_pb2.CheckRequest(), metadata={"containerd-namespace-ttrpc": "k8s.io", "multi": ["a", "b"]}
        )
    ctx = agent.contexts[-1]
    assert ctx.first("containerd-namespace-ttrpc") == "k8s.io"
    assert ctx.metadata["multi"] == ["a", "b"]


def test_connection_loss_fails_pending_and_later_calls() -> None:
    agent = FakeAgent()
    server = Server()
    server.register_service(AGENT, agent)
    ours, theirs = socket.socketpair()
    thread = threading.Thread(target=server.serve, args=(SocketTransport(theirs),), daemon=True)
    thread.start()
    closed = threading.Event()
    client = Client(SocketTransport(ours), on_close=closed.set)
    stub = Stub(client, AGENT)
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            stub.WaitProcess(agent_pb2.ProcessRequest())
        except BaseException as exc:
            errors.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.1)
    server.shutdown()  # the server side goes away under the call
    waiter.join(5)
    assert closed.wait(5)
    assert len(errors) == 1 and isinstance(errors[0], ConnectionClosed)
    assert errors[0].code == codes.UNAVAILABLE
    with pytest.raises(ConnectionClosed):
        stub.Check(agent_pb2.CheckRequest())
    assert agent.seen_closed.wait(5), "the server handler saw ctx.closed"
    thread.join(5)
    client.close()


def test_fallback_forwards_raw_calls_like_a_proxy() -> None:
    backend_agent = FakeAgent()
    with served(backend_agent) as (backend, _):
        proxy = Server()

        def forward(ctx: CallContext, payload: bytes) -> bytes:
            return backend.call_raw(ctx.service, ctx.method, payload)

        proxy.set_fallback(forward)
        proxy.register_method(
            SERVICE,
            "Check",
            agent_pb2.CheckRequest,
            lambda request, ctx: agent_pb2.CheckResponse(agent_version="proxy"),
        )
        ours, theirs = socket.socketpair()
        thread = threading.Thread(target=proxy.serve, args=(SocketTransport(theirs),), daemon=True)
        thread.start()
        client = Client(SocketTransport(ours))
        stub = Stub(client, AGENT)
        assert stub.Check(agent_pb2.CheckRequest()).agent_version == "proxy"  # intercepted
        assert stub.StartContainer(agent_pb2.ContainerRequest(container_id="x")).pid == 42  # forwarded
        with pytest.raises(TtrpcError) as info:  # the backend's status passes through, details included
            stub.StartContainer(agent_pb2.ContainerRequest(container_id="missing"))
        assert info.value.code == codes.FAILED_PRECONDITION and len(info.value.details) == 1
        client.close()
        thread.join(5)


def test_oversized_messages_are_refused_without_breaking_the_connection() -> None:
    with served(FakeAgent()) as (client, _):
        with pytest.raises(TtrpcError) as info:
            client.call_raw(SERVICE, "Check", b"x" * (framing.MAX_PAYLOAD + 1))
        assert info.value.code == codes.RESOURCE_EXHAUSTED
        # A response too big for a frame becomes an error status.
        with pytest.raises(TtrpcError) as info2:
            Stub(client, AGENT).ReadStdout(agent_pb2.ReadStreamRequest(len=framing.MAX_PAYLOAD + 10))
        assert info2.value.code == codes.RESOURCE_EXHAUSTED
        assert Stub(client, AGENT).Check(agent_pb2.CheckRequest()).agent_version == "test"


def test_server_skips_an_oversized_incoming_frame() -> None:
    server = Server()
    server.register_service(AGENT, FakeAgent())
    ours, theirs = socket.socketpair()
    thread = threading.Thread(target=server.serve, args=(SocketTransport(theirs),), daemon=True)
    thread.start()
    size = framing.MAX_PAYLOAD + 100
    sender = threading.Thread(target=ours.sendall, args=(struct.pack(">IIBB", size, 9, 1, 0) + b"\0" * size,))
    sender.start()
    header = ours.recv(10, socket.MSG_WAITALL)
    length, stream_id, _, _ = struct.unpack(">IIBB", header)
    response = Response.FromString(ours.recv(length, socket.MSG_WAITALL))
    sender.join(5)
    assert stream_id == 9 and response.status.code == codes.RESOURCE_EXHAUSTED
    ours.close()
    thread.join(5)


def test_fd_transport_serves_like_a_virtio_serial_port() -> None:
    ours, theirs = socket.socketpair()
    fd = os.dup(theirs.fileno())
    theirs.close()
    server = Server()
    server.register_service(AGENT, FakeAgent())
    thread = threading.Thread(target=server.serve, args=(FdTransport(fd),), daemon=True)
    thread.start()
    client = Client(SocketTransport(ours))
    assert Stub(client, AGENT).Check(agent_pb2.CheckRequest()).agent_version == "test"
    client.close()
    thread.join(5)
    assert not thread.is_alive()
    with pytest.raises(OSError):
        os.fstat(fd)  # serve() closed the fd when the peer went away


def test_serve_listener_accepts_many_clients_and_shuts_down(tmp_path: Any) -> None:
    server = Server()
    server.register_service(AGENT, FakeAgent())
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "s.sock"))
    listener.listen()
    thread = threading.Thread(target=server.serve_listener, args=(listener,), daemon=True)
    thread.start()
    clients = []
    for _ in range(3):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(tmp_path / "s.sock"))
        clients.append(Client(SocketTransport(sock)))
    for client in clients:
        assert Stub(client, AGENT).Check(agent_pb2.CheckRequest()).agent_version == "test"
    deadline = time.monotonic() + 5
    while server.connection_count != 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.connection_count == 3
    server.shutdown()
    thread.join(5)
    assert not thread.is_alive()
    for client in clients:
        assert client.closed.wait(5)
        client.close()
