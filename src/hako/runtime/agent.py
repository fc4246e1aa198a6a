"""The host's client of the guest agent.

Typed methods over the agent's ttRPC API. This is the edge where ttRPC errors
become :mod:`hako.errors`: a failed exec becomes ExecNotFound/ExecNotExecutable
(exit 127/126 as Docker), an unknown container ContainerNotFound, a lost
connection AgentError with code UNAVAILABLE.
"""

from __future__ import annotations

import errno
import json
import socket
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from hako.errors import AgentError, ContainerNotFound, ExecNotExecutable, ExecNotFound, HakoError
from hako_api import agent_pb2 as pb
from hako_ttrpc import Client, ConnectionClosed, SocketTransport, Stub, TtrpcError, codes

SERVICE = pb.DESCRIPTOR.services_by_name["Agent"]
SERVICE_NAME = SERVICE.full_name


def translate(exc: TtrpcError, what: str) -> HakoError:
    """The hako error for a failed agent call."""
    if isinstance(exc, ConnectionClosed):
        return AgentError(f"{what}: lost the connection to the guest agent", codes.UNAVAILABLE)
    for detail in exc.details:
        failure = pb.ExecFailure()
        if detail.Is(failure.DESCRIPTOR) and detail.Unpack(failure):
            message = failure.message or f'exec: "{failure.path}": {errno.errorcode.get(failure.errno, "?")}'
            if failure.errno == errno.ENOENT:
                return ExecNotFound(message)
            return ExecNotExecutable(message)
    if exc.code == codes.NOT_FOUND:
        return ContainerNotFound(exc.message)
    # A daemon's answer is an agent's error it translated already: name the call once.
    message = exc.message if exc.message.startswith(f"{what}: ") else f"{what}: {exc.message}"
    return AgentError(message, exc.code)


class AgentClient:
    def __init__(self, sock: socket.socket, *, on_close: Callable[[], None] | None = None) -> None:
        self.client = Client(SocketTransport(sock), on_close=on_close)
        self._stub = Stub(self.client, SERVICE)

    def close(self) -> None:
        self.client.close()

    def _call(
        self,
        method: str,
        request: Any,
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> Any:
        try:
            return getattr(self._stub, method)(request, timeout=timeout, metadata=metadata)
        except TtrpcError as exc:
            raise translate(exc, method) from exc

    def call_raw(self, method: str, payload: bytes, timeout: float | None = None) -> bytes:
        """Forward a serialized request (the sandbox daemon proxies its clients this way)."""
        return self.client.call_raw(SERVICE_NAME, method, payload, timeout=timeout)

    # -- sandbox -------------------------------------------------------------------------------
    def check(self, timeout: float | None = None) -> pb.CheckResponse:
        response: pb.CheckResponse = self._call("Check", pb.CheckRequest(), timeout)
        return response

    def create_sandbox(
        self,
        sandbox_id: str,
        hostname: str,
        storages: Sequence[pb.Storage] = (),
        dns: Sequence[str] = (),
        time_unix_ns: int = 0,
        entropy: bytes = b"",
        *,
        interfaces: Sequence[pb.Interface] = (),
        routes: Sequence[pb.Route] = (),
    ) -> None:
        request = pb.CreateSandboxRequest(
            sandbox_id=sandbox_id,
            hostname=hostname,
            storages=storages,
            dns=dns,
            time_unix_ns=time_unix_ns,
            entropy=entropy,
            interfaces=interfaces,
            routes=routes,
        )
        self._call("CreateSandbox", request, 30)

    def update_sandbox(
        self,
        hostname: str,
        dns: Sequence[str] = (),
        *,
        interfaces: Sequence[pb.Interface] = (),
        routes: Sequence[pb.Route] = (),
    ) -> None:
        request = pb.UpdateSandboxRequest(hostname=hostname, dns=dns, interfaces=interfaces, routes=routes)
        self._call("UpdateSandbox", request, 30)

    def set_clock(self, unix_ns: int) -> None:
        seconds, rest = divmod(unix_ns, 1_000_000_000)
        self._call("SetGuestDateTime", pb.SetGuestDateTimeRequest(sec=seconds, usec=rest // 1000), 10)

    def reseed_random(self, data: bytes) -> None:
        self._call("ReseedRandomDev", pb.ReseedRandomDevRequest(data=data), 10)

    def destroy_sandbox(self, timeout: float = 5.0) -> None:
        self._call("DestroySandbox", pb.DestroySandboxRequest(), timeout)

    # -- containers ----------------------------------------------------------------------------
    def create_container(
        self,
        container_id: str,
        spec: Mapping[str, Any],
        stdin: bool,
        storages: Sequence[pb.Storage] = (),
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        request = pb.CreateContainerRequest(
            container_id=container_id, oci_spec=json.dumps(spec).encode(), stdin=stdin, storages=storages
        )
        self._call("CreateContainer", request, 120, metadata)

    def start_container(self, container_id: str) -> int:
        response: pb.StartContainerResponse = self._call(
            "StartContainer", pb.ContainerRequest(container_id=container_id), 60
        )
        return response.pid

    def exec_process(self, container_id: str, exec_id: str, process: Mapping[str, Any], stdin: bool) -> int:
        request = pb.ExecProcessRequest(
            container_id=container_id, exec_id=exec_id, process=json.dumps(process).encode(), stdin=stdin
        )
        response: pb.ExecProcessResponse = self._call("ExecProcess", request, 60)
        return response.pid

    def wait_process(self, container_id: str, exec_id: str = "") -> int:
        response: pb.WaitProcessResponse = self._call(
            "WaitProcess", pb.ProcessRequest(container_id=container_id, exec_id=exec_id)
        )
        return response.exit_status

    def signal_process(self, container_id: str, exec_id: str, signal: int, all: bool = False) -> None:
        request = pb.SignalProcessRequest(container_id=container_id, exec_id=exec_id, signal=signal, all=all)
        self._call("SignalProcess", request, 10)

    def remove_container(self, container_id: str, timeout_ms: int = 2000) -> None:
        request = pb.RemoveContainerRequest(container_id=container_id, timeout_ms=timeout_ms)
        self._call("RemoveContainer", request, timeout_ms / 1000 + 10)

    def stats(self, container_id: str) -> pb.StatsContainerResponse:
        response: pb.StatsContainerResponse = self._call(
            "StatsContainer", pb.ContainerRequest(container_id=container_id), 10
        )
        return response

    def pause_container(self, container_id: str) -> None:
        self._call("PauseContainer", pb.ContainerRequest(container_id=container_id), 30)

    def resume_container(self, container_id: str) -> None:
        self._call("ResumeContainer", pb.ContainerRequest(container_id=container_id), 30)

    def update_container(self, container_id: str, resources: bytes) -> None:
        """``resources``: OCI linux.resources as JSON."""
        request = pb.UpdateContainerRequest(container_id=container_id, resources=resources)
        self._call("UpdateContainer", request, 30)

    def list_processes(self, container_id: str) -> list[int]:
        response: pb.ListProcessesResponse = self._call(
            "ListProcesses", pb.ContainerRequest(container_id=container_id), 10
        )
        return list(response.pids)

    # -- I/O -----------------------------------------------------------------------------------
    def read_stdout(self, container_id: str, exec_id: str = "", size: int = 65536) -> bytes:
        request = pb.ReadStreamRequest(container_id=container_id, exec_id=exec_id, len=size)
        response: pb.ReadStreamResponse = self._call("ReadStdout", request)
        return response.data

    def read_stderr(self, container_id: str, exec_id: str = "", size: int = 65536) -> bytes:
        request = pb.ReadStreamRequest(container_id=container_id, exec_id=exec_id, len=size)
        response: pb.ReadStreamResponse = self._call("ReadStderr", request)
        return response.data

    def write_stdin(self, container_id: str, exec_id: str, data: bytes) -> int:
        request = pb.WriteStreamRequest(container_id=container_id, exec_id=exec_id, data=data)
        response: pb.WriteStreamResponse = self._call("WriteStdin", request, 30)
        return response.len

    def close_stdin(self, container_id: str, exec_id: str = "") -> None:
        self._call("CloseStdin", pb.ProcessRequest(container_id=container_id, exec_id=exec_id), 10)

    def resize_tty(self, container_id: str, exec_id: str, rows: int, columns: int) -> None:
        request = pb.TtyWinResizeRequest(
            container_id=container_id, exec_id=exec_id, rows=rows, columns=columns
        )
        self._call("TtyWinResize", request, 10)
