"""A synchronous handle on QEMU's QMP monitor for hako's threaded runtime.

`qemu.qmp` is asyncio-based; the runtime is not. :class:`QmpBridge` runs a
private event loop in a daemon thread, connects a :class:`qemu.qmp.QMPClient`
over the socket QEMU was given, and lets any thread execute commands with a
timeout. QMP errors are translated to :mod:`hako.errors` here and nowhere else.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import socket
import threading
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar

from qemu.qmp import ExecuteError, QMPClient, QMPError

from hako.errors import HypervisorError

T = TypeVar("T")
EventHandler = Callable[[str, Mapping[str, object]], None]


class QmpBridge:
    def __init__(self, name: str, on_event: EventHandler | None = None) -> None:
        self._name = name
        self._on_event = on_event
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name=f"qmp-{name}")
        self._thread.start()
        self._client = QMPClient(name)
        self._drain: concurrent.futures.Future[None] | None = None

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None, what: str) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except TimeoutError as exc:
            future.cancel()
            raise HypervisorError(f"QEMU ({self._name}) did not answer {what} within {timeout:g} s") from exc
        except ExecuteError as exc:
            raise HypervisorError(f"QMP {what} failed: {exc.error.error.desc}") from exc
        except (QMPError, OSError, EOFError) as exc:
            raise HypervisorError(f"QMP {what} failed: {exc}") from exc

    def connect(self, sock: socket.socket, timeout: float = 10.0) -> None:
        """Greeting and capabilities negotiation over an already connected socket."""
        self._run(self._client.connect(sock), timeout, "connect")
        self._drain = asyncio.run_coroutine_threadsafe(self._dispatch_events(), self._loop)

    async def _dispatch_events(self) -> None:
        # The default listener keeps every event; drain it so a long-lived VM does not accumulate them.
        async for event in self._client.events:
            if self._on_event is not None:
                data = event.get("data", {})
                self._on_event(str(event["event"]), data if isinstance(data, dict) else {})

    def execute(
        self, command: str, arguments: Mapping[str, object] | None = None, timeout: float = 10.0
    ) -> object:
        return self._run(self._client.execute(command, dict(arguments or {})), timeout, command)

    def send_fd(self, fd: int, name: str, timeout: float = 10.0) -> None:
        """Hand QEMU a file descriptor, known to later commands as ``name`` (``getfd``)."""

        async def send() -> None:
            self._client.send_fd_scm(fd)
            await self._client.execute("getfd", {"fdname": name})

        self._run(send(), timeout, "getfd")

    def close(self) -> None:
        """Disconnect and stop the loop thread (idempotent)."""
        if not self._loop.is_running():
            return
        if self._drain is not None:
            self._drain.cancel()
        # The VM may already be gone: there is nothing left to tell it then.
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._client.disconnect(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()
