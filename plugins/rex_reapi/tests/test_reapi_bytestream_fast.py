"""ByteStream's hand-made wire format: WriteRequests decoded without protobuf (malformed
ones refused, unknown fields skipped, as protobuf would) and Reads served straight from the
disk store's files."""

from __future__ import annotations

import asyncio
import os
import random
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.message import DecodeError
from reapi_fixtures import Reapi, reapi, reapi_config, sha256_digest

_FIXTURES = (reapi, reapi_config)  # pytest finds them by name here
from rex_reapi import local_reads
from rex_reapi.local_reads import READ_BATCH
from rex_reapi.proto import bytestream_pb2 as bs_pb2
from rex_reapi.proto import remote_execution_pb2 as re_pb2
from rex_reapi.wire import MalformedMessageError, decode_write_request

from rexcore.artifacts.digest import Digest, DigestFunction

_WRITE = "/google.bytestream.ByteStream/Write"


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number: int, wire_type: int, body: bytes = b"") -> bytes:
    return _varint(number << 3 | wire_type) + body


def _bytes_field(number: int, data: bytes) -> bytes:
    return _field(number, 2, _varint(len(data)) + data)


def _request(name: str = "", offset: int = 0, data: bytes = b"", finish: bool = False) -> bytes:
    return bs_pb2.WriteRequest(resource_name=name, write_offset=offset, data=data,
                               finish_write=finish).SerializeToString()


def _upload_name(digest: re_pb2.Digest) -> str:
    return f"uploads/{uuid.uuid4()}/blobs/{digest.hash}/{digest.size_bytes}"


async def _raw_write(reapi: Reapi, messages: list[bytes]) -> bs_pb2.WriteResponse:
    call = reapi.channel.stream_unary(_WRITE, request_serializer=None,
                                      response_deserializer=bs_pb2.WriteResponse.FromString)

    async def stream() -> AsyncIterator[bytes]:
        for message in messages:
            yield message

    return await call(stream())


async def _raw_write_error(reapi: Reapi, messages: list[bytes]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _raw_write(reapi, messages)
    return raised.value


async def _read(reapi: Reapi, name: str, offset: int = 0, limit: int = 0) -> list[bytes]:
    request = bs_pb2.ReadRequest(resource_name=name, read_offset=offset, read_limit=limit)
    return [r.data async for r in reapi.bytestream.Read(request)]


async def _still_serving(reapi: Reapi) -> None:
    data = os.urandom(100)
    [digest] = await reapi.upload(data)
    assert b"".join(await _read(reapi, f"blobs/{digest.hash}/{digest.size_bytes}")) == data


# -- the decoder against protobuf -------------------------------------------------------


def _random_field(rng: random.Random, depth: int = 0) -> bytes:
    number = rng.choice([1, 2, 3, 10, 4, 11, 0, (1 << 29) - 1, rng.randrange(1, 1 << 29)])
    wire_type = rng.choice([0, 0, 2, 2, 1, 5, 3, 4, 6, 7])
    tag = _varint(number << 3 | wire_type)
    if rng.random() < 0.05:  # a tag padded to more bytes than it needs
        tag = tag[:-1] + bytes([tag[-1] | 0x80, 0])
    if rng.random() < 0.02:
        tag = _varint(rng.randrange(1 << 36))
    if wire_type == 0:
        body = _varint(rng.choice([0, 1, 2, rng.randrange(128), rng.randrange(1 << 64),
                                   (1 << 64) - 1, rng.randrange(1 << 70)]))
        if rng.random() < 0.05:
            body = b"\xff" * rng.randrange(9, 12) + b"\x01"
    elif wire_type == 2:
        payload = rng.choice([b"", b"abc", "ünï".encode(), rng.randbytes(rng.randrange(8)),
                              b"\xed\xa0\x80", b"\xc0\x80", b"\xf4\x90\x80\x80"])
        length = max(0, len(payload) + rng.choice([0, 0, 0, 1, -1, 1000]))
        body = _varint(length) + payload
    elif wire_type in (1, 5):
        body = rng.randbytes(rng.choice([8, 8, 3] if wire_type == 1 else [4, 4, 2]))
    elif wire_type == 3:
        inner = b"".join(_random_field(rng, depth + 1) for _ in range(rng.randrange(3))
                         ) if depth < 3 else b""
        end = number if rng.random() < 0.85 else number + 1
        body = inner + (_field(end, 4) if rng.random() < 0.9 else b"")
    else:
        body = b""
    return tag + body


def _decoded(raw: bytes) -> tuple[str, int, bool, bytes] | str:
    try:
        chunk = decode_write_request(raw)
    except MalformedMessageError:
        return "malformed"
    return chunk.resource_name, chunk.write_offset, chunk.finish_write, bytes(chunk.data)


def _by_protobuf(raw: bytes) -> tuple[str, int, bool, bytes] | str:
    try:
        message = bs_pb2.WriteRequest.FromString(raw)
    except DecodeError:
        return "malformed"
    return message.resource_name, message.write_offset, message.finish_write, message.data


def test_the_hand_decoder_reads_what_protobuf_reads_and_refuses_what_it_refuses() -> None:
    rng = random.Random(4)
    refused = 0
    for _ in range(20_000):
        raw = b"".join(_random_field(rng) for _ in range(rng.randrange(5)))
        if raw and rng.random() < 0.1:
            raw = raw[:rng.randrange(len(raw))]
        if raw and rng.random() < 0.05:
            scribbled = bytearray(raw)
            scribbled[rng.randrange(len(raw))] = rng.randrange(256)
            raw = bytes(scribbled)
        expected = _by_protobuf(raw)
        assert _decoded(raw) == expected, raw.hex()
        refused += expected == "malformed"
    assert 2_000 < refused < 18_000  # both kinds were tried


@pytest.mark.parametrize("raw", [
    b"\x10\x80",  # write_offset's varint ends with the message
    b"\x10" + b"\xff" * 10 + b"\x01",  # an 11-byte varint
    b"\x80\x80\x80\x80\x80\x01\x08",  # a tag of 6 bytes
    b"\x52\x05ab",  # data claims 5 bytes, 2 follow
    b"\x52\x80\x80\x80\x80\x10",  # a length of 2^32 with nothing after it
    b"\x0a\x02\xc3\x28",  # resource_name is not UTF-8
    b"\x00\x01",  # field number 0
    b"\x0e", b"\x0f",  # wire types 6 and 7 do not exist
    b"\x5c",  # the end of a group that never started
    b"\x5b\x08\x01",  # a group that never ends
    b"\x5b\x64",  # a group closed as another
    b"\x65abc",  # a fixed32 of 3 bytes
    b"\x5b" * 101 + b"\x5c" * 101,  # groups nested deeper than protobuf allows
], ids=["truncated-varint", "long-varint", "long-tag", "short-data", "huge-length",
        "bad-utf8", "field-0", "wire-type-6", "wire-type-7", "stray-group-end",
        "open-group", "crossed-groups", "short-fixed32", "deep-groups"])
def test_malformed_write_requests_are_refused_like_protobuf_refuses_them(raw: bytes) -> None:
    assert _by_protobuf(raw) == "malformed"
    with pytest.raises(MalformedMessageError):
        decode_write_request(raw)


def test_write_request_data_is_a_view_of_the_received_bytes() -> None:
    raw = _request("uploads/x/blobs/abc/3", 7, b"xyz", True)
    chunk = decode_write_request(raw)
    assert (chunk.resource_name, chunk.write_offset, chunk.finish_write) == (
        "uploads/x/blobs/abc/3", 7, True)
    assert isinstance(chunk.data, memoryview) and chunk.data.obj is raw
    assert chunk.data == b"xyz"


# -- Write over gRPC --------------------------------------------------------------------


@pytest.mark.parametrize("raw", [b"\x10\x80", b"\x52\x05ab", b"\x0a\x02\xc3\x28", b"\x0f",
                                 b"\x5b\x08\x01"],
                         ids=["truncated-varint", "short-data", "bad-utf8", "wire-type-7",
                              "open-group"])
async def test_malformed_first_write_request_is_invalid_argument(reapi: Reapi, raw: bytes) -> None:
    error = await _raw_write_error(reapi, [raw])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid message" in (error.details() or "")
    await _still_serving(reapi)


async def test_malformed_request_midway_fails_the_write_and_the_upload_resumes(
    reapi: Reapi,
) -> None:
    data = os.urandom(30_000)
    digest = sha256_digest(data)
    name = _upload_name(digest)
    error = await _raw_write_error(reapi, [_request(name, 0, data[:10_000]), b"\x10\x80"])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert name in (error.details() or "")
    status = await reapi.bytestream.QueryWriteStatus(
        bs_pb2.QueryWriteStatusRequest(resource_name=name))
    assert status.committed_size == 10_000
    response = await _raw_write(reapi, [_request(name, 10_000, data[10_000:], True)])
    assert response.committed_size == len(data)
    assert b"".join(await _read(reapi, f"blobs/{digest.hash}/{digest.size_bytes}")) == data


async def test_unknown_fields_and_known_numbers_of_another_wire_type_are_skipped(
    reapi: Reapi,
) -> None:
    data = os.urandom(3000)
    digest = sha256_digest(data)
    name = _upload_name(digest)
    noise = (_field(4, 0, _varint(99)) + _field(12, 1, b"8 bytes!") + _field(13, 5, b"4by!")
             + _bytes_field(14, b"unknown") + _field(15, 3) + _bytes_field(10, b"in a group")
             + _field(2, 0, _varint(5)) + _field(15, 4)
             + _field(10, 0, _varint(7))  # data as a varint: not data
             + _bytes_field(2, b"offset as bytes"))  # write_offset as bytes: not an offset
    first = noise + _request(name, 0, data[:1000]) + noise
    second = _bytes_field(10, b"replaced: the last data field wins") + _request(
        "", 1000, data[1000:], True)
    assert bs_pb2.WriteRequest.FromString(first).data == data[:1000]  # as protobuf reads it
    response = await _raw_write(reapi, [first, second])
    assert response.committed_size == len(data)
    assert b"".join(await _read(reapi, f"blobs/{digest.hash}/{digest.size_bytes}")) == data


async def test_negative_write_offset_is_invalid_argument(reapi: Reapi) -> None:
    data = os.urandom(100)
    name = _upload_name(sha256_digest(data))
    error = await _raw_write_error(reapi, [_request(name, -1, data, True)])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "write_offset -1" in (error.details() or "")


async def test_empty_first_write_request_must_name_the_resource(reapi: Reapi) -> None:
    error = await _raw_write_error(reapi, [b""])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "must name the resource" in (error.details() or "")


async def test_large_blob_written_in_big_messages_round_trips(reapi: Reapi) -> None:
    data = os.urandom(3 << 20) + bytes(1 << 20) + os.urandom(12_345)
    digest = sha256_digest(data)
    name = _upload_name(digest)
    step = 1 << 20
    messages = [_request(name if at == 0 else "", at, data[at:at + step], at + step >= len(data))
                for at in range(0, len(data), step)]
    assert (await _raw_write(reapi, messages)).committed_size == len(data)
    assert b"".join(await _read(reapi, f"blobs/{digest.hash}/{digest.size_bytes}")) == data


# -- Read from the store's files --------------------------------------------------------


async def _store_large(reapi: Reapi, data: bytes) -> re_pb2.Digest:
    digest = sha256_digest(data)
    name = _upload_name(digest)
    step = 1 << 20
    messages = [_request(name if at == 0 else "", at, data[at:at + step], at + step >= len(data))
                for at in range(0, len(data), step)]
    assert (await _raw_write(reapi, messages)).committed_size == len(data)
    return digest


@pytest.mark.parametrize(("offset", "limit"), [
    (0, 0), (1, 0), (READ_BATCH - 1, 2), (READ_BATCH, 0), (READ_BATCH + 7, READ_BATCH),
    (3, 2 * READ_BATCH + 5), (2 * READ_BATCH + 100, 0),
])
async def test_read_across_batches_returns_exactly_the_range(
    reapi: Reapi, offset: int, limit: int,
) -> None:
    data = os.urandom(2 * READ_BATCH + 4321)
    digest = await _store_large(reapi, data)
    pieces = await _read(reapi, f"blobs/{digest.hash}/{digest.size_bytes}", offset, limit)
    end = offset + limit if limit else len(data)
    assert b"".join(pieces) == data[offset:end]
    assert all(len(piece) <= 1 << 20 for piece in pieces)


@pytest.mark.parametrize("reapi_config", [{"protocols": {"reapi": {"read_chunk_size": 300_000}}}])
async def test_read_in_chunks_that_do_not_divide_a_batch(reapi: Reapi) -> None:
    data = os.urandom(READ_BATCH + 1_000_000)
    digest = await _store_large(reapi, data)
    pieces = await _read(reapi, f"blobs/{digest.hash}/{digest.size_bytes}")
    assert b"".join(pieces) == data
    assert {len(piece) for piece in pieces[:-1]} == {300_000}


def test_responses_read_from_a_file_hold_the_range_and_stop_where_the_file_ends(
    tmp_path: Path,
) -> None:
    data = os.urandom(3_000_000)
    path = tmp_path / "blob"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        for start, end, chunk in [(0, len(data), 1 << 20), (5, 2_500_005, 1 << 20),
                                  (7, 8, 1000), (100, 100_100, 333)]:
            messages, got = local_reads._encode_span(fd, start, end, chunk)
            assert got == end - start
            pieces = [bs_pb2.ReadResponse.FromString(m).data for m in messages]
            assert b"".join(pieces) == data[start:end]
            assert all(len(piece) == chunk for piece in pieces[:-1])
        _, got = local_reads._encode_span(fd, 2_000_000, 4_000_000, 1 << 20)
        assert got < 2_000_000  # the file ends first: the caller reports it
    finally:
        os.close(fd)


def _open_files(path: Path) -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == str(path)
        except OSError:
            pass
    return count


def _blob_path(reapi: Reapi, digest: re_pb2.Digest) -> Path:
    path = reapi.rexd.runtime.blob_store.local_path(
        Digest(DigestFunction.SHA256, digest.hash, digest.size_bytes))
    assert path is not None
    return path


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
async def test_read_cancelled_midway_closes_the_blob_file(reapi: Reapi) -> None:
    data = os.urandom(3 * READ_BATCH)
    digest = await _store_large(reapi, data)
    path = _blob_path(reapi, digest)
    call = reapi.bytestream.Read(
        bs_pb2.ReadRequest(resource_name=f"blobs/{digest.hash}/{digest.size_bytes}"))
    first = await call.read()
    assert first.data == data[:len(first.data)]
    call.cancel()
    for _ in range(200):
        if not _open_files(path):
            break
        await asyncio.sleep(0.01)
    assert _open_files(path) == 0
    await _still_serving(reapi)


async def test_blob_file_shorter_than_its_digest_fails_the_read_and_the_server_lives_on(
    reapi: Reapi,
) -> None:
    data = os.urandom(READ_BATCH + 1000)
    digest = await _store_large(reapi, data)
    path = _blob_path(reapi, digest)
    path.chmod(0o644)
    os.truncate(path, READ_BATCH + 10)  # rot on disk
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _read(reapi, f"blobs/{digest.hash}/{digest.size_bytes}")
    assert raised.value.code() == grpc.StatusCode.INTERNAL
    assert "shorter" in (raised.value.details() or "")
    await _still_serving(reapi)

