"""Stand-ins for the shim's unit tests: guest agent, sandbox without a VM, containerd's events service.

The shim's Pod talks to its Sandbox (the VM) and to the Sandbox's AgentClient; these fakes
keep the same method names and signatures, record what they were asked, and let a test
decide when a process writes output and exits.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import Message

from hako.errors import HakoError
from hako.runtime.agent import AgentClient
from hako.runtime.sandbox import Sandbox
from hako.runtime.sockets import listen_unix
from hako.shim.events import Publisher
from hako.shim.pod import Pod
from hako_api import agent_pb2
from hako_containerd.containerd.api.services.ttrpc.events.v1 import events_pb2
from hako_ttrpc import CallContext, Server, TtrpcError, codes

EVENTS = events_pb2.DESCRIPTOR.services_by_name["Events"]
Key = tuple[str, str]  # container id, exec id ("" for the init process)


class FakeAgent:
    """The guest agent's host-side client: output is fed by the test, stdin is recorded."""

    def __init__(self) -> None:
        self._streams: dict[tuple[str, str, str], queue.Queue[bytes | HakoError]] = {}
        self._lock = threading.Lock()
        self.stdin: dict[Key, bytearray] = {}
        self.stdin_closed: list[Key] = []
        self.reads: list[tuple[str, str, str]] = []
        self.signals: list[tuple[str, str, int, bool]] = []
        self.calls: list[tuple[str, tuple[object, ...]]] = []
        self.close_stdin_error: HakoError | None = None

    def _stream(self, container_id: str, exec_id: str, name: str) -> queue.Queue[bytes | HakoError]:
        with self._lock:
            return self._streams.setdefault((container_id, exec_id, name), queue.Queue())

    def feed(self, container_id: str, exec_id: str, name: str, *chunks: bytes | HakoError) -> None:
        """Queue what the process "writes" on ``name`` (stdout/stderr); b"" is the end of the stream."""
        for chunk in chunks:
            self._stream(container_id, exec_id, name).put(chunk)

    def _read(self, container_id: str, exec_id: str, name: str) -> bytes:
        self.reads.append((container_id, exec_id, name))
        try:
            item = self._stream(container_id, exec_id, name).get(timeout=10)
        except queue.Empty:
            return b""  # never leave a pump thread behind for ever
        if isinstance(item, HakoError):
            raise item
        return item

    def read_stdout(self, container_id: str, exec_id: str = "", size: int = 65536) -> bytes:
        return self._read(container_id, exec_id, "stdout")

    def read_stderr(self, container_id: str, exec_id: str = "", size: int = 65536) -> bytes:
        return self._read(container_id, exec_id, "stderr")

    def write_stdin(self, container_id: str, exec_id: str, data: bytes) -> int:
        self.stdin.setdefault((container_id, exec_id), bytearray()).extend(data)
        return len(data)

    def close_stdin(self, container_id: str, exec_id: str = "") -> None:
        self.stdin_closed.append((container_id, exec_id))
        if self.close_stdin_error is not None:
            raise self.close_stdin_error

    def signal_process(self, container_id: str, exec_id: str, signal: int, all: bool = False) -> None:
        self.signals.append((container_id, exec_id, signal, all))

    def exec_process(self, container_id: str, exec_id: str, process: Mapping[str, Any], stdin: bool) -> int:
        self.calls.append(("exec_process", (container_id, exec_id, dict(process), stdin)))
        return 77

    def pause_container(self, container_id: str) -> None:
        self.calls.append(("pause_container", (container_id,)))

    def resume_container(self, container_id: str) -> None:
        self.calls.append(("resume_container", (container_id,)))

    def update_container(self, container_id: str, resources: bytes) -> None:
        self.calls.append(("update_container", (container_id, resources)))

    def resize_tty(self, container_id: str, exec_id: str, rows: int, columns: int) -> None:
        self.calls.append(("resize_tty", (container_id, exec_id, rows, columns)))

    def list_processes(self, container_id: str) -> list[int]:
        return [1, 7, 12]

    def stats(self, container_id: str) -> agent_pb2.StatsContainerResponse:
        stats = agent_pb2.StatsContainerResponse()
        stats.pids.current, stats.pids.limit = 3, 100
        stats.cpu.usage_usec, stats.cpu.user_usec, stats.cpu.system_usec = 1500, 1000, 500
        stats.cpu.nr_throttled, stats.cpu.throttled_usec = 2, 40
        stats.memory.usage_bytes, stats.memory.limit_bytes, stats.memory.oom_kills = 4096, 1 << 28, 1
        return stats


class FakeSandbox:
    """A booted VM as far as the Pod can tell; processes exit when the test says so."""

    def __init__(self, pid: int = 4321) -> None:
        self.agent = FakeAgent()
        self.vm = SimpleNamespace(pid=pid)
        self.dead = threading.Event()
        self.death_reason = ""
        self.added: dict[str, tuple[dict[str, Any], bool, bool]] = {}
        self.started: list[str] = []
        self.removed: list[str] = []
        self.stopped = 0
        self.add_error: HakoError | None = None
        self._exits: dict[Key, queue.Queue[int]] = {}
        self._lock = threading.Lock()

    def _exit_queue(self, container_id: str, exec_id: str) -> queue.Queue[int]:
        with self._lock:
            return self._exits.setdefault((container_id, exec_id), queue.Queue())

    def add_container(
        self, container_id: str, spec: dict[str, Any], *, stdin: bool, rootfs_writable: bool
    ) -> None:
        if self.add_error is not None:
            raise self.add_error
        self.added[container_id] = (spec, stdin, rootfs_writable)

    def start_container(self, container_id: str) -> int:
        self.started.append(container_id)
        return 1

    def wait(self, container_id: str, exec_id: str = "") -> int:
        # Until the test finishes the process, or stops the sandbox (as a VM dying would).
        return self._exit_queue(container_id, exec_id).get()

    def finish(self, container_id: str, exec_id: str, status: int, stdout: bytes = b"") -> None:
        """The process writes ``stdout`` and exits with ``status``: its streams end, then its wait."""
        if stdout:
            self.agent.feed(container_id, exec_id, "stdout", stdout)
        self.agent.feed(container_id, exec_id, "stdout", b"")
        self.agent.feed(container_id, exec_id, "stderr", b"")
        self._exit_queue(container_id, exec_id).put(status)

    def remove_container(self, container_id: str) -> None:
        self.removed.append(container_id)

    def stop(self) -> None:
        self.stopped += 1
        with self._lock:
            waiting = list(self._exits.values())
        for exits in waiting:
            exits.put(137)


class RecordingPublisher(Publisher):
    """The real Publisher's typed helpers, recording (topic, event) instead of sending them.

    ``delays`` holds a topic's publishing back, as if the thread publishing it was descheduled
    just before: the order the pod announces things in must not depend on luck.
    """

    def __init__(self, delays: Mapping[str, float] | None = None) -> None:  # no sending thread
        self.published: list[tuple[str, Message]] = []
        self.delays = dict(delays or {})
        self._record_lock = threading.Lock()

    def publish(self, topic: str, event: Message) -> None:
        time.sleep(self.delays.get(topic, 0.0))
        with self._record_lock:
            self.published.append((topic, event))

    @property
    def topics(self) -> list[str]:
        with self._record_lock:
            return [topic for topic, _ in self.published]

    def wait_for(self, count: int, timeout: float = 5.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while len(self.topics) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.topics

    def close(self, timeout: float = 10.0) -> None:
        pass


def as_agent(agent: FakeAgent) -> AgentClient:
    return cast(AgentClient, agent)


def pod_with(sandbox: FakeSandbox, events: Publisher, state_dir: Path, log: list[str]) -> Pod:
    """A Pod whose VM is already up (the fake), so that nothing boots."""
    pod = Pod("f" * 64, state_dir, events, log.append)
    pod.sandbox = cast(Sandbox, sandbox)
    return pod


class EventsService:
    """containerd's ttRPC events service, recording what it is forwarded."""

    def __init__(self, failures: int = 0) -> None:
        self.envelopes: list[events_pb2.Envelope] = []
        self.failures = failures  # answer this many calls with UNAVAILABLE first
        self.calls = 0
        self._cond = threading.Condition()

    def Forward(self, request: events_pb2.ForwardRequest, ctx: CallContext) -> Empty:
        with self._cond:
            self.calls += 1
            if self.calls <= self.failures:
                raise TtrpcError(codes.UNAVAILABLE, "containerd is busy")
            self.envelopes.append(request.envelope)
            self._cond.notify_all()
        return Empty()

    def wait_for(self, count: int, timeout: float = 10.0) -> list[events_pb2.Envelope]:
        with self._cond:
            self._cond.wait_for(lambda: len(self.envelopes) >= count, timeout)
            return list(self.envelopes)


class EventsServer:
    def __init__(self, path: Path, service: EventsService) -> None:
        self.path = path
        self.service = service
        self.server = Server()
        self.server.register_service(EVENTS, service)
        self.listener = listen_unix(path)
        self.thread = threading.Thread(target=self.server.serve_listener, args=(self.listener,), daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join(5)
        assert not self.thread.is_alive()
