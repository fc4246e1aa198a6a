"""ttRPC errors.

    TtrpcError            a call failed with a status (code, message, details)
    └── ConnectionClosed  the connection ended before the call was answered

A handler raises :class:`TtrpcError` to answer with that status; the client
raises it when the answer carries a non-zero status. Any other exception in a
handler is answered as INTERNAL.
"""

from __future__ import annotations

from hako_ttrpc import codes

TYPE_CHECKING = False  # not `typing.TYPE_CHECKING`: importing typing costs guest boot time

if TYPE_CHECKING:
    from collections.abc import Sequence

    from google.protobuf.any_pb2 import Any


class TtrpcError(Exception):
    def __init__(self, code: int, message: str, details: Sequence[Any] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details: list[Any] = list(details)

    def __str__(self) -> str:
        return f"{codes.name(self.code)}: {self.message}"


class ConnectionClosed(TtrpcError):
    def __init__(self, message: str = "ttrpc: connection closed") -> None:
        super().__init__(codes.UNAVAILABLE, message)
