"""HTTP/2 and gRPC on the wire, for `disagg.epp.h2grpc`: frame and settings constants (RFC 9113),
frame and message encoding, the few HPACK fields our responses need (literals only, so no
encoder state), and a scan telling whether a header block changes the decoder's table."""

from __future__ import annotations

import struct

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types and flags (RFC 9113 section 6).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
# Error codes.
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR, STREAM_CLOSED, FRAME_SIZE_ERROR = 0, 1, 2, 3, 5, 6
REFUSED_STREAM, CANCEL, COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 7, 8, 9, 11
# Settings.
SETTINGS_HEADER_TABLE_SIZE, SETTINGS_MAX_CONCURRENT_STREAMS, SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE = 1, 3, 4, 5

MAX_WINDOW = 2**31 - 1
DEFAULT_WINDOW = 65_535
DEFAULT_FRAME_SIZE = 16_384
MAX_STREAMS = 1024
# A peer's window is topped up once this much of it is used: rare, small WINDOW_UPDATEs.
WINDOW_REFILL_AT = 2**30
# gRPC status codes used here.
OK, INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED, UNIMPLEMENTED, INTERNAL = 0, 3, 5, 8, 12, 13
MAX_HEADER_BLOCK = 1024 * 1024

# A frame header read as: length (24 bits) and type packed in one word, flags, stream id.
FRAME_HEADER = struct.Struct(">IBI")
# ... and written as: length high 16 bits, length low 8 bits, type, flags, stream id.
_WRITE_HEADER = struct.Struct(">HBBBI")


def _int(value: int, prefix_bits: int, flags: int) -> bytes:
    """HPACK integer representation (RFC 7541 section 5.1)."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([flags | value])
    out = bytearray([flags | limit])
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(name: bytes, value: bytes) -> bytes:
    """A literal header field without indexing, new name, no Huffman coding."""
    return b"\x00" + _int(len(name), 7, 0) + name + _int(len(value), 7, 0) + value


def grpc_message(text: str) -> bytes:
    """grpc-message is percent-encoded UTF-8 (the gRPC over HTTP/2 spec)."""
    return b"".join(bytes([b]) if 0x20 <= b <= 0x7E and b != 0x25 else b"%%%02X" % b for b in text.encode())


# ":status: 200" is entry 8 of HPACK's static table.
RESPONSE_HEADERS = b"\x88" + _literal(b"content-type", b"application/grpc")


def trailers(code: int, message: str = "") -> bytes:
    block = _literal(b"grpc-status", str(code).encode())
    return block + _literal(b"grpc-message", grpc_message(message)) if message else block


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return _WRITE_HEADER.pack(n >> 8, n & 0xFF, kind, flags, stream_id) + payload


def grpc_frame(message: bytes) -> bytes:
    return b"\x00" + len(message).to_bytes(4, "big") + message


def _read_int(block: bytes, pos: int, prefix_bits: int) -> tuple[int, int]:
    """An HPACK integer at `pos`: (value, position after it)."""
    limit = (1 << prefix_bits) - 1
    value = block[pos] & limit
    pos += 1
    if value < limit:
        return value, pos
    shift = 0
    while True:
        byte = block[pos]
        pos += 1
        value += (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def keeps_table(block: bytes) -> bool:
    """Whether decoding this header block leaves the HPACK dynamic table unchanged: it holds
    only indexed fields and literals without indexing (RFC 7541 section 6)."""
    pos, end = 0, len(block)
    try:
        while pos < end:
            first = block[pos]
            if first & 0x80:  # indexed field
                _, pos = _read_int(block, pos, 7)
            elif first & 0xE0 == 0x20 or first & 0xC0 == 0x40:  # table size update, incremental indexing
                return False
            else:  # literal without indexing or never indexed
                index, pos = _read_int(block, pos, 4)
                for _ in range(1 if index else 2):  # the value, after the name when not indexed
                    length, pos = _read_int(block, pos, 7)
                    pos += length
    except IndexError:
        return False
    return pos == end
