"""Task events to containerd: a real ttRPC events service on a unix socket (no root, no VM)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf.message import Message

from hako.shim import events
from hako.shim.events import SERVICE, Publisher, pack
from hako_containerd.containerd.api.events import task_pb2 as ev
from hako_containerd.containerd.api.services.ttrpc.events.v1 import events_pb2
from tests.unit.shim_fakes import EVENTS, EventsServer, EventsService


@pytest.fixture
def containerd(tmp_path: Path) -> Iterator[EventsServer]:
    server = EventsServer(tmp_path / "containerd.sock.ttrpc", EventsService())
    yield server
    server.stop()


@pytest.fixture
def logged() -> list[str]:
    return []


def _unpack(envelope: events_pb2.Envelope) -> Message:
    kinds: list[type[Message]] = [ev.TaskCreate, ev.TaskStart, ev.TaskExit, ev.TaskDelete, ev.TaskExecAdded]
    kinds += [ev.TaskExecStarted, ev.TaskPaused, ev.TaskResumed, ev.TaskOOM]
    by_name = {kind.DESCRIPTOR.full_name: kind for kind in kinds}
    kind = by_name[envelope.event.type_url]
    return kind.FromString(envelope.event.value)


def test_the_service_name_is_containerds() -> None:
    assert SERVICE == EVENTS.full_name == "containerd.services.events.ttrpc.v1.Events"


def test_pack_uses_the_bare_message_name_as_typeurl_does() -> None:
    any_ = pack(ev.TaskStart(container_id="c", pid=3))
    assert any_.type_url == "containerd.events.TaskStart"
    assert ev.TaskStart.FromString(any_.value) == ev.TaskStart(container_id="c", pid=3)


def test_a_task_lifecycle_arrives_in_order_with_its_fields(
    containerd: EventsServer, logged: list[str]
) -> None:
    publisher = Publisher(f"unix://{containerd.path}", "k8s.io", logged.append)
    exited_at = 1_700_000_000_123_456_789
    before = time.time()
    try:
        publisher.create(
            "c1",
            "/run/containerd/bundle/c1",
            [("overlay", "overlay", ["lowerdir=/l", "upperdir=/u"])],
            ("/fifo/in", "/fifo/out", "/fifo/err"),
            False,
            4321,
        )
        publisher.start("c1", 4321)
        publisher.exit("c1", "c1", 4321, 137, exited_at)
        publisher.delete("c1", 4321, 137, exited_at)
        envelopes = containerd.service.wait_for(4)
    finally:
        publisher.close()
    assert [e.topic for e in envelopes] == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"]
    assert {e.namespace for e in envelopes} == {"k8s.io"}
    assert [e.event.type_url for e in envelopes] == [
        "containerd.events.TaskCreate",
        "containerd.events.TaskStart",
        "containerd.events.TaskExit",
        "containerd.events.TaskDelete",
    ]
    for envelope in envelopes:
        assert before - 1 <= envelope.timestamp.ToNanoseconds() / 1e9 <= time.time() + 1

    create, start, exit_, delete = (_unpack(e) for e in envelopes)
    assert isinstance(create, ev.TaskCreate)
    assert (create.container_id, create.bundle, create.pid) == ("c1", "/run/containerd/bundle/c1", 4321)
    assert [(m.type, m.source, list(m.options)) for m in create.rootfs] == [
        ("overlay", "overlay", ["lowerdir=/l", "upperdir=/u"])
    ]
    assert (create.io.stdin, create.io.stdout, create.io.stderr) == ("/fifo/in", "/fifo/out", "/fifo/err")
    assert create.io.terminal is False
    assert start == ev.TaskStart(container_id="c1", pid=4321)
    assert isinstance(exit_, ev.TaskExit)
    assert (exit_.container_id, exit_.id, exit_.pid, exit_.exit_status) == ("c1", "c1", 4321, 137)
    assert exit_.exited_at.ToNanoseconds() == exited_at
    assert isinstance(delete, ev.TaskDelete)
    assert (delete.container_id, delete.pid, delete.exit_status) == ("c1", 4321, 137)
    assert delete.exited_at.ToNanoseconds() == exited_at
    assert logged == []


def test_exec_and_state_events(containerd: EventsServer, logged: list[str]) -> None:
    publisher = Publisher(str(containerd.path), "default", logged.append)  # a bare path works too
    try:
        publisher.exec_added("c1", "e1")
        publisher.exec_started("c1", "e1", 99)
        publisher.exit("c1", "e1", 99, 0, 5)
        publisher.paused("c1")
        publisher.resumed("c1")
        publisher.oom("c1")
        envelopes = containerd.service.wait_for(6)
    finally:
        publisher.close()
    assert [(e.topic, _unpack(e)) for e in envelopes] == [
        ("/tasks/exec-added", ev.TaskExecAdded(container_id="c1", exec_id="e1")),
        ("/tasks/exec-started", ev.TaskExecStarted(container_id="c1", exec_id="e1", pid=99)),
        ("/tasks/exit", ev.TaskExit(container_id="c1", id="e1", pid=99, exited_at={"nanos": 5})),
        ("/tasks/paused", ev.TaskPaused(container_id="c1")),
        ("/tasks/resumed", ev.TaskResumed(container_id="c1")),
        ("/tasks/oom", ev.TaskOOM(container_id="c1")),
    ]


def test_many_events_from_many_threads_keep_each_threads_order(
    containerd: EventsServer, logged: list[str]
) -> None:
    publisher = Publisher(str(containerd.path), "default", logged.append)

    def burst(name: str) -> None:
        for pid in range(50):
            publisher.start(name, pid)

    threads = [threading.Thread(target=burst, args=(f"c{n}",)) for n in range(4)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        envelopes = containerd.service.wait_for(200)
    finally:
        publisher.close()
    assert len(envelopes) == 200
    starts = [ev.TaskStart.FromString(e.event.value) for e in envelopes]
    for n in range(4):
        assert [s.pid for s in starts if s.container_id == f"c{n}"] == list(range(50))


def test_close_sends_what_is_queued_first(containerd: EventsServer, logged: list[str]) -> None:
    publisher = Publisher(str(containerd.path), "default", logged.append)
    for pid in range(20):
        publisher.start("c", pid)
    publisher.close()
    assert [ev.TaskStart.FromString(e.event.value).pid for e in containerd.service.envelopes] == list(
        range(20)
    )


def test_a_failed_forward_is_retried_in_order(tmp_path: Path, logged: list[str]) -> None:
    server = EventsServer(tmp_path / "busy.sock", EventsService(failures=2))
    publisher = Publisher(str(server.path), "default", logged.append)
    try:
        publisher.start("c", 1)
        publisher.start("c", 2)
        envelopes = server.service.wait_for(2)
    finally:
        publisher.close()
        server.stop()
    assert [ev.TaskStart.FromString(e.event.value).pid for e in envelopes] == [1, 2]
    assert server.service.calls == 4  # two refusals, then each event once
    assert logged == []


def test_events_wait_for_containerd_to_come_back(tmp_path: Path, logged: list[str]) -> None:
    path = tmp_path / "later.sock"
    publisher = Publisher(str(path), "default", logged.append)
    server: EventsServer | None = None
    try:
        publisher.create("c", "/b", [], ("", "", ""), True, 7)
        publisher.start("c", 7)
        time.sleep(0.3)  # containerd is restarting: several attempts fail
        server = EventsServer(path, EventsService())
        envelopes = server.service.wait_for(2)
    finally:
        publisher.close()
        if server is not None:
            server.stop()
    assert [e.topic for e in envelopes] == ["/tasks/create", "/tasks/start"]
    assert logged == []


def test_no_server_neither_blocks_nor_raises_into_the_caller(tmp_path: Path, logged: list[str]) -> None:
    publisher = Publisher(f"unix://{tmp_path / 'nobody.sock'}", "default", logged.append)
    started = time.monotonic()
    publisher.create("c", "/b", [], ("", "", ""), False, 1)
    publisher.start("c", 1)
    publisher.exit("c", "c", 1, 0, 0)
    publisher.delete("c", 1, 0, 0)
    assert time.monotonic() - started < 0.5  # publishing only queues
    publisher.close(timeout=0.3)
    assert time.monotonic() - started < 3.0  # close gives up after its timeout (plus the join's grace)
    assert logged == []  # nothing was given up for good yet: the retries were only cut short


def test_an_event_is_dropped_and_logged_only_after_the_give_up_time(
    tmp_path: Path, logged: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(events, "GIVE_UP_AFTER", 0.2)
    publisher = Publisher(str(tmp_path / "nobody.sock"), "default", logged.append)
    try:
        publisher.start("c", 1)
        publisher.oom("c")
        deadline = time.monotonic() + 10
        while len(logged) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        publisher.close(timeout=0.1)
    assert len(logged) == 2
    assert logged[0].startswith("dropping event /tasks/start: containerd unreachable: ")
    assert logged[1].startswith("dropping event /tasks/oom: containerd unreachable: ")
