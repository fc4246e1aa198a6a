"""The ttRPC frame: a 10-byte header and a payload.

Header (big-endian): payload length u32, stream id u32, message type u8, flags u8.
Client-initiated streams have odd ids. See containerd/ttrpc channel.go.
"""

from __future__ import annotations

import struct

TYPE_CHECKING = False  # not `typing.TYPE_CHECKING`: importing typing costs guest boot time

if TYPE_CHECKING:
    from hako_ttrpc.transport import Transport

HEADER = struct.Struct(">IIBB")
HEADER_SIZE = HEADER.size  # 10
MAX_PAYLOAD = 4 << 20  # containerd/ttrpc messageLengthMax

TYPE_REQUEST = 1
TYPE_RESPONSE = 2
TYPE_DATA = 3

FLAG_REMOTE_CLOSED = 0x1
FLAG_REMOTE_OPEN = 0x2
FLAG_NO_DATA = 0x4


class Frame:
    __slots__ = ("flags", "oversize", "payload", "stream_id", "type")

    def __init__(self, stream_id: int, mtype: int, flags: int, payload: bytes, oversize: int = 0) -> None:
        self.stream_id = stream_id
        self.type = mtype
        self.flags = flags
        self.payload = payload
        # Non-zero when the peer sent more than MAX_PAYLOAD: the payload was discarded.
        self.oversize = oversize


def encode(stream_id: int, mtype: int, payload: bytes, flags: int = 0) -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"ttrpc: message length {len(payload)} exceeds maximum of {MAX_PAYLOAD}")
    return HEADER.pack(len(payload), stream_id, mtype, flags) + payload


def read_exactly(transport: Transport, size: int) -> bytes | None:
    """Read ``size`` bytes; None on a clean end of stream before the first byte."""
    chunks: list[bytes] = []
    missing = size
    while missing:
        chunk = transport.read(missing)
        if not chunk:
            if missing == size:
                return None
            raise EOFError(f"ttrpc: connection closed mid-frame ({size - missing} of {size} bytes)")
        chunks.append(chunk)
        missing -= len(chunk)
    return b"".join(chunks)


def read_frame(transport: Transport) -> Frame | None:
    """The next frame, or None at end of stream. Oversized payloads are skipped."""
    header = read_exactly(transport, HEADER_SIZE)
    if header is None:
        return None
    length, stream_id, mtype, flags = HEADER.unpack(header)
    if length > MAX_PAYLOAD:
        remaining = length
        while remaining:
            skipped = read_exactly(transport, min(remaining, 1 << 16))
            if skipped is None:
                raise EOFError("ttrpc: connection closed mid-frame")
            remaining -= len(skipped)
        return Frame(stream_id, mtype, flags, b"", oversize=length)
    payload = read_exactly(transport, length) if length else b""
    if payload is None:
        raise EOFError("ttrpc: connection closed mid-frame")
    return Frame(stream_id, mtype, flags, payload)
