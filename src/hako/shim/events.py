"""Task events for containerd, in the order they happened.

containerd learns about exits only from events (``/tasks/exit``), and expects
them in order: create, start, exit, delete; exec-added, exec-started, exit. A
single thread sends them, one at a time, over ttRPC to containerd's events
service (``TTRPC_ADDRESS``). If containerd is away (restarting), the thread
waits and retries, keeping the order; it gives up on an event only after
minutes.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from pathlib import Path

from google.protobuf.any_pb2 import Any
from google.protobuf.message import Message

from hako.runtime.sockets import connect_unix
from hako_containerd.containerd.api.events import task_pb2 as ev
from hako_containerd.containerd.api.services.ttrpc.events.v1 import events_pb2
from hako_containerd.containerd.api.types import mount_pb2
from hako_ttrpc import Client, SocketTransport, TtrpcError

SERVICE = "containerd.services.events.ttrpc.v1.Events"
GIVE_UP_AFTER = 300.0  # seconds an event may wait for containerd to come back


def pack(message: Message) -> Any:
    """An Any as containerd's typeurl writes it: the bare message name as the type URL."""
    return Any(type_url=message.DESCRIPTOR.full_name, value=message.SerializeToString())


class Publisher:
    def __init__(self, address: str, namespace: str, log: Callable[[str], None]) -> None:
        self._path = Path(address.removeprefix("unix://"))
        self._namespace = namespace
        self._log = log
        self._queue: collections.deque[events_pb2.Envelope] = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self._client: Client | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="events")
        self._thread.start()

    def publish(self, topic: str, event: Message) -> None:
        envelope = events_pb2.Envelope(namespace=self._namespace, topic=topic, event=pack(event))
        envelope.timestamp.GetCurrentTime()
        with self._cond:
            self._queue.append(envelope)
            self._cond.notify()

    # -- the task events, by topic ---------------------------------------------------------------
    def create(
        self,
        container_id: str,
        bundle: str,
        rootfs: list[tuple[str, str, list[str]]],
        stdio: tuple[str, str, str],
        terminal: bool,
        pid: int,
    ) -> None:
        event = ev.TaskCreate(container_id=container_id, bundle=bundle, pid=pid)
        for kind, source, options in rootfs:
            event.rootfs.append(mount_pb2.Mount(type=kind, source=source, options=options))
        event.io.stdin, event.io.stdout, event.io.stderr = stdio
        event.io.terminal = terminal
        self.publish("/tasks/create", event)

    def start(self, container_id: str, pid: int) -> None:
        self.publish("/tasks/start", ev.TaskStart(container_id=container_id, pid=pid))

    def exec_added(self, container_id: str, exec_id: str) -> None:
        self.publish("/tasks/exec-added", ev.TaskExecAdded(container_id=container_id, exec_id=exec_id))

    def exec_started(self, container_id: str, exec_id: str, pid: int) -> None:
        event = ev.TaskExecStarted(container_id=container_id, exec_id=exec_id, pid=pid)
        self.publish("/tasks/exec-started", event)

    def exit(self, container_id: str, process_id: str, pid: int, status: int, exited_at_ns: int) -> None:
        event = ev.TaskExit(container_id=container_id, id=process_id, pid=pid, exit_status=status)
        event.exited_at.FromNanoseconds(exited_at_ns)
        self.publish("/tasks/exit", event)

    def delete(self, container_id: str, pid: int, status: int, exited_at_ns: int) -> None:
        event = ev.TaskDelete(container_id=container_id, pid=pid, exit_status=status)
        event.exited_at.FromNanoseconds(exited_at_ns)
        self.publish("/tasks/delete", event)

    def paused(self, container_id: str) -> None:
        self.publish("/tasks/paused", ev.TaskPaused(container_id=container_id))

    def resumed(self, container_id: str) -> None:
        self.publish("/tasks/resumed", ev.TaskResumed(container_id=container_id))

    def oom(self, container_id: str) -> None:
        self.publish("/tasks/oom", ev.TaskOOM(container_id=container_id))

    def close(self, timeout: float = 10.0) -> None:
        """Send what is queued (for at most ``timeout`` seconds), then stop."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue and time.monotonic() < deadline:
                self._cond.wait(0.05)
            self._closing = True
            self._cond.notify_all()
        self._thread.join(max(0.0, deadline - time.monotonic()) + 1)
        if self._client is not None:
            self._client.close()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return
                envelope = self._queue[0]
            self._send(envelope)
            with self._cond:
                self._queue.popleft()
                self._cond.notify_all()

    def _send(self, envelope: events_pb2.Envelope) -> None:
        request = events_pb2.ForwardRequest(envelope=envelope).SerializeToString()
        started = time.monotonic()
        delay = 0.05
        while not self._closing:
            try:
                client = self._connect()
                client.call_raw(SERVICE, "Forward", request, timeout=10)
                return
            except (OSError, TtrpcError) as exc:
                if self._client is not None:
                    self._client.close()
                    self._client = None
                if time.monotonic() - started > GIVE_UP_AFTER:
                    self._log(f"dropping event {envelope.topic}: containerd unreachable: {exc}")
                    return
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _connect(self) -> Client:
        if self._client is None or self._client.closed.is_set():
            self._client = Client(SocketTransport(connect_unix(self._path)))
        return self._client
