"""ttRPC (containerd's RPC protocol) for hako's host and guest alike.

Pure standard library plus protobuf, because the guest agent runs it on the
guest image's own Python. Threads, not asyncio: every call runs in its own
thread on the server, and clients may call from any thread.

    Server / CallContext    serve methods registered from service descriptors
    Client / Stub           call them
    TtrpcError              a status (code, message, details)
    ConnectionClosed        the connection ended under a call
    SocketTransport, FdTransport
    codes                   gRPC status codes (module)
"""

from hako_ttrpc import codes
from hako_ttrpc import codes as Code
from hako_ttrpc.client import Client
from hako_ttrpc.errors import ConnectionClosed, TtrpcError
from hako_ttrpc.server import CallContext, Server
from hako_ttrpc.stub import Stub
from hako_ttrpc.transport import FdTransport, SocketTransport

__all__ = [
    "CallContext",
    "Client",
    "Code",
    "ConnectionClosed",
    "FdTransport",
    "Server",
    "SocketTransport",
    "Stub",
    "TtrpcError",
    "codes",
]
