"""ttRPC server: unary calls, each handled in its own thread.

One :class:`Server` holds the method table; :meth:`Server.serve` runs one
connection (a read loop in the calling thread), :meth:`Server.serve_listener`
accepts connections on a listening socket. Handlers get the decoded request and
a :class:`CallContext`, and return the response message or raise
:class:`TtrpcError`. A fallback handler sees the raw payload of any method not
in the table, which is how a proxy forwards calls without decoding them.
"""

from __future__ import annotations

import threading
import time

from hako_ttrpc import codes, framing
from hako_ttrpc._proto import message_class
from hako_ttrpc.errors import TtrpcError
from hako_ttrpc.transport import SocketTransport
from hako_ttrpc.ttrpc_pb2 import Request, Response

TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket
    from collections.abc import Callable, Sequence
    from typing import TypeVar

    from google.protobuf.descriptor import ServiceDescriptor
    from google.protobuf.message import Message

    from hako_ttrpc.transport import Transport

    Req = TypeVar("Req", bound=Message)

    Handler = Callable[[Message, "CallContext"], Message]
    RawHandler = Callable[["CallContext", bytes], bytes]
    Log = Callable[[str], None]


class CallContext:
    """What a handler knows about its call."""

    __slots__ = ("closed", "deadline", "metadata", "method", "service", "stream_id")

    def __init__(
        self,
        service: str,
        method: str,
        metadata: dict[str, list[str]],
        deadline: float | None,
        closed: threading.Event,
        stream_id: int,
    ) -> None:
        self.service = service
        self.method = method
        self.metadata = metadata
        self.deadline = deadline  # time.monotonic() value, or None
        self.closed = closed  # set when the connection drops: long calls should give up
        self.stream_id = stream_id

    def first(self, key: str) -> str | None:
        values = self.metadata.get(key)
        return values[0] if values else None


def _status_response(code: int, message: str, details: Sequence[object] = ()) -> bytes:
    response = Response()
    response.status.code = code
    response.status.message = message
    for detail in details:
        response.status.details.add().CopyFrom(detail)  # type: ignore[arg-type]
    return response.SerializeToString()


class Server:
    def __init__(self, *, log: Log | None = None) -> None:
        self._methods: dict[tuple[str, str], tuple[type[Message] | None, Callable[..., object]]] = {}
        self._fallback: RawHandler | None = None
        self._log = log
        self._lock = threading.Lock()
        self._connections: set[_Connection] = set()
        self._listeners: list[socket.socket] = []
        self._shutdown = False
        self.on_disconnect: Callable[[], None] | None = None

    # -- method table -------------------------------------------------------------------------
    def register_service(self, service: ServiceDescriptor, impl: object) -> None:
        """Serve every method of ``service`` that ``impl`` has, by the RPC's own name."""
        for method in service.methods:
            handler = getattr(impl, method.name, None)
            if handler is not None:
                self.register_method(
                    service.full_name, method.name, message_class(method.input_type), handler
                )

    def register_method(
        self,
        service: str,
        method: str,
        request_type: type[Req],
        handler: Callable[[Req, CallContext], Message],
    ) -> None:
        self._methods[(service, method)] = (request_type, handler)

    def register_raw(self, service: str, method: str, handler: RawHandler) -> None:
        """A handler of one method that takes and returns serialized payloads."""
        self._methods[(service, method)] = (None, handler)

    def set_fallback(self, handler: RawHandler | None) -> None:
        """Raw handler for every method not registered (e.g. to forward it elsewhere)."""
        self._fallback = handler

    # -- serving ----------------------------------------------------------------------------
    def serve(self, transport: Transport) -> None:
        """Serve one connection until the peer closes it; closes the transport."""
        connection = _Connection(self, transport)
        with self._lock:
            if self._shutdown:
                transport.close()
                return
            self._connections.add(connection)
        try:
            connection.run()
        finally:
            with self._lock:
                self._connections.discard(connection)
            if self.on_disconnect is not None:
                self.on_disconnect()

    def serve_listener(self, listener: socket.socket) -> None:
        """Accept connections until :meth:`shutdown`; each is served in its own thread."""
        with self._lock:
            self._listeners.append(listener)
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                with self._lock:
                    if self._shutdown:
                        return
                raise
            threading.Thread(
                target=self.serve, args=(SocketTransport(sock),), daemon=True, name="ttrpc-conn"
            ).start()

    @property
    def connection_count(self) -> int:
        with self._lock:
            return len(self._connections)

    def shutdown(self) -> None:
        """Stop accepting and drop every connection (their in-flight calls see ctx.closed)."""
        with self._lock:
            self._shutdown = True
            listeners, self._listeners = self._listeners, []
            connections = list(self._connections)
        for listener in listeners:
            try:
                listener.shutdown(2)
            except OSError:
                pass
            listener.close()
        for connection in connections:
            connection.transport.shutdown()

    # -- dispatch ---------------------------------------------------------------------------
    def _dispatch(self, request: Request, ctx: CallContext) -> bytes:
        entry = self._methods.get((request.service, request.method))
        if entry is not None:
            request_type, handler = entry
            if request_type is None:
                raw: bytes = handler(ctx, request.payload)  # type: ignore[assignment]
                return raw
            try:
                message = request_type.FromString(request.payload)
            except Exception as exc:  # protobuf's DecodeError differs between implementations
                raise TtrpcError(
                    codes.INVALID_ARGUMENT, f"cannot decode {request_type.__name__}: {exc}"
                ) from exc
            response: Message = handler(message, ctx)  # type: ignore[assignment]
            return response.SerializeToString()
        if self._fallback is not None:
            return self._fallback(ctx, request.payload)
        raise TtrpcError(codes.UNIMPLEMENTED, f"{request.service}/{request.method}: not implemented")

    def _report(self, message: str) -> None:
        if self._log is not None:
            self._log(message)


class _Connection:
    def __init__(self, server: Server, transport: Transport) -> None:
        self.server = server
        self.transport = transport
        self.closed = threading.Event()
        self._write_lock = threading.Lock()
        self._dead = False

    def run(self) -> None:
        try:
            while True:
                frame = framing.read_frame(self.transport)
                if frame is None:
                    break
                if frame.type != framing.TYPE_REQUEST:
                    continue  # data frames belong to streaming calls, which hako does not use
                if frame.oversize:
                    self._send(
                        frame.stream_id,
                        _status_response(
                            codes.RESOURCE_EXHAUSTED,
                            f"message length {frame.oversize} exceeds maximum message size of "
                            f"{framing.MAX_PAYLOAD}",
                        ),
                    )
                    continue
                threading.Thread(target=self._handle, args=(frame,), daemon=True, name="ttrpc-call").start()
        except (OSError, EOFError) as exc:
            if not self.closed.is_set():
                self.server._report(f"ttrpc: connection ended: {exc}")
        finally:
            self.closed.set()
            with self._write_lock:
                self._dead = True
            self.transport.close()

    def _handle(self, frame: framing.Frame) -> None:
        try:
            request = Request.FromString(frame.payload)
        except Exception as exc:
            self._send(frame.stream_id, _status_response(codes.INVALID_ARGUMENT, f"bad ttrpc request: {exc}"))
            return
        deadline = None
        if request.timeout_nano > 0:
            deadline = time.monotonic() + request.timeout_nano / 1e9
        metadata: dict[str, list[str]] = {}
        for pair in request.metadata:
            metadata.setdefault(pair.key, []).append(pair.value)
        ctx = CallContext(request.service, request.method, metadata, deadline, self.closed, frame.stream_id)
        try:
            payload = self.server._dispatch(request, ctx)
            response = Response(payload=payload)
            response.status.SetInParent()  # code OK, present on the wire as Go's ttrpc sends it
            encoded = response.SerializeToString()
            if len(encoded) > framing.MAX_PAYLOAD:
                encoded = _status_response(
                    codes.RESOURCE_EXHAUSTED,
                    f"response of {len(encoded)} bytes exceeds {framing.MAX_PAYLOAD}",
                )
        except TtrpcError as exc:
            encoded = _status_response(exc.code, exc.message, exc.details)
        except Exception as exc:
            import traceback

            self.server._report(
                f"ttrpc: {request.service}/{request.method} failed:\n{traceback.format_exc().rstrip()}"
            )
            encoded = _status_response(codes.INTERNAL, f"{type(exc).__name__}: {exc}")
        self._send(frame.stream_id, encoded)

    def _send(self, stream_id: int, payload: bytes) -> None:
        data = framing.encode(stream_id, framing.TYPE_RESPONSE, payload)
        with self._write_lock:
            if self._dead:
                return
            try:
                self.transport.write(data)
            except OSError as exc:
                self.server._report(f"ttrpc: cannot send response: {exc}")
                self.transport.shutdown()
