"""ttRPC client: concurrent unary calls over one connection.

Calls may come from any thread. A reader thread matches responses to calls by
stream id. When the connection ends, every pending call fails with
:class:`ConnectionClosed`, and so does every later call.
"""

from __future__ import annotations

import threading

from hako_ttrpc import codes, framing
from hako_ttrpc.errors import ConnectionClosed, TtrpcError
from hako_ttrpc.ttrpc_pb2 import KeyValue, Request, Response

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from typing import TypeVar

    from google.protobuf.message import Message

    from hako_ttrpc.transport import Transport

    M = TypeVar("M", bound=Message)
    Metadata = Mapping[str, str | Sequence[str]]


class _Call:
    __slots__ = ("done", "error", "payload")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.payload = b""
        self.error: TtrpcError | None = None


class Client:
    def __init__(self, transport: Transport, *, on_close: Callable[[], None] | None = None) -> None:
        self._transport = transport
        self._on_close = on_close
        self._lock = threading.Lock()  # _next_id, _pending, _close_reason
        self._write_lock = threading.Lock()
        self._next_id = 1
        self._pending: dict[int, _Call] = {}
        self._close_reason: str | None = None
        self.closed = threading.Event()
        self._reader = threading.Thread(target=self._read_loop, daemon=True, name="ttrpc-client")
        self._reader.start()

    def call(
        self,
        service: str,
        method: str,
        request: Message,
        response_type: type[M],
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> M:
        payload = self.call_raw(
            service, method, request.SerializeToString(), timeout=timeout, metadata=metadata
        )
        return response_type.FromString(payload)

    def call_raw(
        self,
        service: str,
        method: str,
        payload: bytes,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> bytes:
        request = Request(service=service, method=method, payload=payload)
        if timeout is not None:
            request.timeout_nano = max(1, int(timeout * 1e9))
        for key, value in (metadata or {}).items():
            for item in [value] if isinstance(value, str) else value:
                request.metadata.append(KeyValue(key=key, value=item))
        call = _Call()
        with self._lock:
            if self._close_reason is not None:
                raise ConnectionClosed(self._close_reason)
            stream_id = self._next_id
            self._next_id += 2
            self._pending[stream_id] = call
        try:
            data = framing.encode(stream_id, framing.TYPE_REQUEST, request.SerializeToString())
        except ValueError as exc:
            self._forget(stream_id)
            raise TtrpcError(codes.RESOURCE_EXHAUSTED, str(exc)) from exc
        try:
            with self._write_lock:
                self._transport.write(data)
        except OSError as exc:
            self._forget(stream_id)
            self._transport.shutdown()
            raise ConnectionClosed(f"ttrpc: cannot send {service}/{method}: {exc}") from exc
        if not call.done.wait(timeout):
            self._forget(stream_id)
            raise TtrpcError(codes.DEADLINE_EXCEEDED, f"{service}/{method}: no answer within {timeout:g} s")
        if call.error is not None:
            raise call.error
        return call.payload

    def close(self) -> None:
        """End the connection; pending calls fail with ConnectionClosed."""
        self._transport.shutdown()
        if threading.current_thread() is not self._reader:
            self._reader.join()

    def _forget(self, stream_id: int) -> None:
        with self._lock:
            self._pending.pop(stream_id, None)

    def _read_loop(self) -> None:
        reason = "ttrpc: connection closed"
        try:
            while True:
                frame = framing.read_frame(self._transport)
                if frame is None:
                    break
                if frame.type != framing.TYPE_RESPONSE:
                    continue
                with self._lock:
                    call = self._pending.pop(frame.stream_id, None)
                if call is None:
                    continue  # the caller gave up (timeout)
                if frame.oversize:
                    call.error = TtrpcError(
                        codes.RESOURCE_EXHAUSTED,
                        f"response of {frame.oversize} bytes exceeds maximum of {framing.MAX_PAYLOAD}",
                    )
                else:
                    self._complete(call, frame.payload)
                call.done.set()
        except (OSError, EOFError) as exc:
            reason = f"ttrpc: connection lost: {exc}"
        finally:
            with self._lock:
                self._close_reason = reason
                pending, self._pending = self._pending, {}
            for call in pending.values():
                call.error = ConnectionClosed(reason)
                call.done.set()
            self._transport.close()
            self.closed.set()
            if self._on_close is not None:
                self._on_close()

    @staticmethod
    def _complete(call: _Call, payload: bytes) -> None:
        try:
            response = Response.FromString(payload)
        except Exception as exc:
            call.error = TtrpcError(codes.INTERNAL, f"bad ttrpc response: {exc}")
            return
        if response.status.code != codes.OK:
            status = response.status
            call.error = TtrpcError(status.code, status.message, list(status.details))
        else:
            call.payload = response.payload
