"""ByteStream's bulk messages in the protobuf wire format, by hand.

Uploads and downloads are nearly all payload, and protobuf copies a payload into its
message and out again. ``WriteRequest``s are decoded here instead, their ``data`` a view
of the received bytes (no copy), and ``ReadResponse``s are encoded with one copy of the
chunk; ``server.py`` registers both with gRPC. The decoder accepts exactly the messages
protobuf accepts and reads the same values from them (the tests compare the two).
"""

from __future__ import annotations

__all__ = [
    "MalformedMessageError",
    "WriteChunk",
    "decode_write_request",
    "encode_read_response",
    "read_response_header",
]

_MASK64 = (1 << 64) - 1
_SIGN64 = 1 << 63
#: Field numbers of ``google.bytestream.WriteRequest``.
_RESOURCE_NAME, _WRITE_OFFSET, _FINISH_WRITE, _DATA = 1, 2, 3, 10
_VARINT, _FIXED64, _LENGTH_DELIMITED, _START_GROUP, _END_GROUP, _FIXED32 = 0, 1, 2, 3, 4, 5
#: Unknown groups nest at most this deep, as in protobuf's own decoder.
_MAX_GROUP_DEPTH = 100
#: ReadResponse.data is field 10, length-delimited: tag byte (10 << 3) | 2.
_READ_DATA_TAG = b"\x52"


class MalformedMessageError(ValueError):
    """The bytes are not a valid protobuf message (truncated, a bad tag or length...)."""


class WriteChunk:
    """One decoded ``WriteRequest``; ``data`` is a view into the message's bytes."""

    __slots__ = ("data", "finish_write", "resource_name", "write_offset")

    def __init__(self, resource_name: str, write_offset: int, finish_write: bool,
                 data: memoryview) -> None:
        self.resource_name = resource_name
        self.write_offset = write_offset
        self.finish_write = finish_write
        self.data = data


def _varint(raw: bytes, pos: int) -> tuple[int, int]:
    """The varint at ``pos`` (at most 10 bytes; bits past 64 are dropped, as protobuf
    does) and the position after it."""
    result = shift = 0
    end = len(raw)
    while pos < end:
        byte = raw[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result & _MASK64, pos
        shift += 7
        if shift >= 70:
            raise MalformedMessageError("a varint runs over 10 bytes")
    raise MalformedMessageError("the message ends inside a varint")


def decode_write_request(raw: bytes) -> WriteChunk:
    """Decode a serialized ``google.bytestream.WriteRequest``; unknown fields (and known
    field numbers with another wire type, as protobuf treats them) are skipped. Raises
    :class:`MalformedMessageError`."""
    view = memoryview(raw)
    name = ""
    offset = 0
    finish = False
    data = view[:0]
    groups: list[int] = []  # field numbers of the unknown groups being skipped
    pos, end = 0, len(raw)
    while pos < end:
        tag_start = pos
        tag, pos = _varint(raw, pos)
        if pos - tag_start > 5 or tag > 0xFFFFFFFF:
            raise MalformedMessageError("a field tag runs over 32 bits")
        field, wire_type = tag >> 3, tag & 7
        if field == 0 and not groups:  # protobuf lets it pass inside an unknown group
            raise MalformedMessageError("field number 0 is not valid")
        if wire_type == _VARINT:
            value, pos = _varint(raw, pos)
            if groups:
                continue
            if field == _WRITE_OFFSET:
                offset = value - (1 << 64) if value & _SIGN64 else value
            elif field == _FINISH_WRITE:
                finish = value != 0
        elif wire_type == _LENGTH_DELIMITED:
            length, pos = _varint(raw, pos)
            start, pos = pos, pos + length
            if pos > end:
                raise MalformedMessageError(
                    f"field {field} claims {length} bytes, {end - start} are left")
            if groups:
                continue
            if field == _RESOURCE_NAME:
                try:
                    name = str(raw[start:pos], "utf-8")
                except UnicodeDecodeError:
                    raise MalformedMessageError("resource_name is not valid UTF-8") from None
            elif field == _DATA:
                data = view[start:pos]
        elif wire_type == _FIXED64 or wire_type == _FIXED32:
            pos += 8 if wire_type == _FIXED64 else 4
            if pos > end:
                raise MalformedMessageError(f"the message ends inside field {field}")
        elif wire_type == _START_GROUP:
            groups.append(field)
            if len(groups) > _MAX_GROUP_DEPTH:
                raise MalformedMessageError("groups nest too deeply")
        elif wire_type == _END_GROUP:
            if not groups or groups.pop() != field:
                raise MalformedMessageError(f"an end of group {field} that was never started")
        else:
            raise MalformedMessageError(f"field {field} has wire type {wire_type}, which "
                                        "does not exist")
    if groups:
        raise MalformedMessageError(f"the message ends inside group {groups[-1]}")
    return WriteChunk(name, offset, finish, data)


def read_response_header(size: int) -> bytes:
    """The bytes of a serialized ``ReadResponse`` that precede ``size`` bytes of data."""
    header = bytearray(_READ_DATA_TAG)
    while size > 0x7F:
        header.append((size & 0x7F) | 0x80)
        size >>= 7
    header.append(size)
    return bytes(header)


def encode_read_response(data: bytes | memoryview) -> bytes:
    """A serialized ``ReadResponse(data=data)``, built directly: one copy of the chunk
    instead of one into a message object and another out of it. ByteStream.Read is
    registered with an identity serializer for these (see ``server.py``)."""
    return b"".join((read_response_header(len(data)), data))
