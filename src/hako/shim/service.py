"""containerd's Task service (``containerd.task.v2.Task``), the 17 RPCs.

Each handler converts the request to plain values, asks the pod, and converts
the answer: protobuf stays in this module (and in events.py). hako's errors
become ttRPC statuses containerd understands (NotFound, AlreadyExists,
FailedPrecondition...), which it turns into its own errdefs.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from google.protobuf.any_pb2 import Any as AnyPb
from google.protobuf.empty_pb2 import Empty

import hako
from hako.errors import (
    AgentError,
    ConfigError,
    ContainerError,
    ContainerExists,
    ContainerNotFound,
    HakoError,
    UsageError,
)
from hako.shim.config import config_path
from hako.shim.events import pack
from hako.shim.pod import Pod, Process
from hako.shim.stdio import Log
from hako_containerd.cgroups.v2.stats import metrics_pb2 as cgroups_v2
from hako_containerd.containerd.api.types.task import task_pb2
from hako_containerd.containerd.runtime.v2.task import shim_pb2 as pb
from hako_ttrpc import CallContext, TtrpcError, codes

SERVICE = pb.DESCRIPTOR.services_by_name["Task"]
PROCESS_SPEC = "types.containerd.io/opencontainers/runtime-spec/1/Process"

R = TypeVar("R")


def status_of(exc: HakoError) -> TtrpcError:
    if isinstance(exc, ContainerNotFound):
        return TtrpcError(codes.NOT_FOUND, str(exc))
    if isinstance(exc, ContainerExists):
        return TtrpcError(codes.ALREADY_EXISTS, str(exc))
    if isinstance(exc, ConfigError | UsageError):
        return TtrpcError(codes.INVALID_ARGUMENT, str(exc))
    if isinstance(exc, ContainerError):
        return TtrpcError(codes.FAILED_PRECONDITION, str(exc))
    if isinstance(exc, AgentError):
        return TtrpcError(exc.code, str(exc))
    return TtrpcError(codes.UNKNOWN, str(exc))


def json_spec(value: AnyPb, what: str) -> Any:
    """An OCI type in an Any: containerd's typeurl carries them as JSON."""
    import json

    try:
        return json.loads(value.value)
    except ValueError as exc:
        raise ConfigError(f"{what}: not the JSON containerd sends ({value.type_url}): {exc}") from exc


def metrics(stats: Any) -> AnyPb:
    """The guest's cgroup v2 figures as containerd's io.containerd.cgroups.v2.Metrics."""
    out = cgroups_v2.Metrics()
    out.pids.current, out.pids.limit = stats.pids.current, stats.pids.limit
    out.cpu.usage_usec, out.cpu.user_usec = stats.cpu.usage_usec, stats.cpu.user_usec
    out.cpu.system_usec, out.cpu.nr_throttled = stats.cpu.system_usec, stats.cpu.nr_throttled
    out.cpu.throttled_usec = stats.cpu.throttled_usec
    out.memory.usage, out.memory.usage_limit = stats.memory.usage_bytes, stats.memory.limit_bytes
    out.memory_events.oom_kill = stats.memory.oom_kills
    return pack(out)


class TaskService:
    def __init__(self, pod: Pod, namespace: str, shutdown: Callable[[], None], log: Log) -> None:
        self.pod = pod
        self.namespace = namespace
        self._shutdown = shutdown
        self._log = log

    def _call(self, what: str, work: Callable[[], R]) -> R:
        try:
            return work()
        except HakoError as exc:
            self._log(f"{what}: {exc}")
            raise status_of(exc) from exc

    # -- lifecycle -----------------------------------------------------------------------------
    def Create(self, request: pb.CreateTaskRequest, ctx: CallContext) -> pb.CreateTaskResponse:
        if request.checkpoint:
            raise TtrpcError(codes.UNIMPLEMENTED, "hako cannot restore checkpoints")
        mounts = [(m.type, m.source, list(m.options)) for m in request.rootfs]
        stdio = (request.stdin, request.stdout, request.stderr)
        pid = self._call(
            f"create {request.id}",
            lambda: self.pod.create(
                request.id,
                Path(request.bundle),
                mounts,
                stdio,
                request.terminal,
                config_path(request.options),
            ),
        )
        return pb.CreateTaskResponse(pid=pid)

    def Start(self, request: pb.StartRequest, ctx: CallContext) -> pb.StartResponse:
        pid = self._call(f"start {request.id}", lambda: self.pod.start(request.id, request.exec_id))
        return pb.StartResponse(pid=pid)

    def Delete(self, request: pb.DeleteRequest, ctx: CallContext) -> pb.DeleteResponse:
        process = self._call(f"delete {request.id}", lambda: self.pod.delete(request.id, request.exec_id))
        response = pb.DeleteResponse(pid=process.pid, exit_status=process.exit_status)
        response.exited_at.FromNanoseconds(process.exited_at_ns)
        return response

    def Exec(self, request: pb.ExecProcessRequest, ctx: CallContext) -> Empty:
        spec = self._call(f"exec {request.id}", lambda: json_spec(request.spec, f"exec {request.exec_id}"))
        stdio = (request.stdin, request.stdout, request.stderr)
        self._call(
            f"exec {request.id}",
            lambda: self.pod.exec(request.id, request.exec_id, stdio, request.terminal, spec),
        )
        return Empty()

    def Wait(self, request: pb.WaitRequest, ctx: CallContext) -> pb.WaitResponse:
        process = self._call("wait", lambda: self.pod.wait(request.id, request.exec_id, ctx.closed))
        response = pb.WaitResponse(exit_status=process.exit_status)
        response.exited_at.FromNanoseconds(process.exited_at_ns)
        return response

    def Kill(self, request: pb.KillRequest, ctx: CallContext) -> Empty:
        self._call(
            f"kill {request.id}",
            lambda: self.pod.kill(request.id, request.exec_id, request.signal, request.all),
        )
        return Empty()

    # -- state ---------------------------------------------------------------------------------
    def State(self, request: pb.StateRequest, ctx: CallContext) -> pb.StateResponse:
        process: Process = self._call("state", lambda: self.pod.process(request.id, request.exec_id))
        response = pb.StateResponse(
            id=process.id,
            bundle=str(self.pod.containers[request.id].bundle),
            pid=process.pid,
            status=task_pb2.Status.Name(int(process.status)),
            stdin=process.stdin,
            stdout=process.stdout,
            stderr=process.stderr,
            terminal=process.terminal,
            exit_status=process.exit_status,
            exec_id=process.exec_id,
        )
        if process.exited_at_ns:
            response.exited_at.FromNanoseconds(process.exited_at_ns)
        return response

    def Pids(self, request: pb.PidsRequest, ctx: CallContext) -> pb.PidsResponse:
        pids = self._call("pids", lambda: self.pod.pids(request.id))
        return pb.PidsResponse(processes=[task_pb2.ProcessInfo(pid=pid) for pid in pids])

    def Stats(self, request: pb.StatsRequest, ctx: CallContext) -> pb.StatsResponse:
        stats = self._call("stats", lambda: self.pod.stats(request.id))
        return pb.StatsResponse(stats=metrics(stats))

    def Connect(self, request: pb.ConnectRequest, ctx: CallContext) -> pb.ConnectResponse:
        return pb.ConnectResponse(shim_pid=os.getpid(), task_pid=self.pod.vm_pid, version=hako.__version__)

    # -- changes -------------------------------------------------------------------------------
    def Pause(self, request: pb.PauseRequest, ctx: CallContext) -> Empty:
        self._call(f"pause {request.id}", lambda: self.pod.pause(request.id))
        return Empty()

    def Resume(self, request: pb.ResumeRequest, ctx: CallContext) -> Empty:
        self._call(f"resume {request.id}", lambda: self.pod.resume(request.id))
        return Empty()

    def Update(self, request: pb.UpdateTaskRequest, ctx: CallContext) -> Empty:
        self._call(f"update {request.id}", lambda: self.pod.update(request.id, request.resources.value))
        return Empty()

    def ResizePty(self, request: pb.ResizePtyRequest, ctx: CallContext) -> Empty:
        self._call(
            "resize",
            lambda: self.pod.resize(request.id, request.exec_id, request.width, request.height),
        )
        return Empty()

    def CloseIO(self, request: pb.CloseIORequest, ctx: CallContext) -> Empty:
        if request.stdin:
            self._call("close io", lambda: self.pod.close_io(request.id, request.exec_id))
        return Empty()

    def Checkpoint(self, request: pb.CheckpointTaskRequest, ctx: CallContext) -> Empty:
        raise TtrpcError(
            codes.UNIMPLEMENTED,
            "hako cannot checkpoint a container: its processes live in a VM CRIU cannot reach",
        )

    def Shutdown(self, request: pb.ShutdownRequest, ctx: CallContext) -> Empty:
        if self.pod.containers and not request.now:
            return Empty()  # containers remain: the shim keeps serving them
        threading.Thread(target=self._shutdown, daemon=True, name="shutdown").start()
        return Empty()
