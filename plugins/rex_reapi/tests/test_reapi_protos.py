"""The committed generated protobuf code matches the .proto files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "generate_protos.py"


def test_generated_protobuf_code_is_up_to_date_with_the_proto_files() -> None:
    result = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr + result.stdout


def test_our_messages_keep_the_spec_field_numbers() -> None:
    from rex_reapi.proto import remote_execution_pb2 as re_pb2

    fields = {
        "Action": {"command_digest": 1, "input_root_digest": 2, "timeout": 6,
                   "do_not_cache": 7, "salt": 9, "platform": 10},
        "Command": {"arguments": 1, "environment_variables": 2, "output_files": 3,
                    "output_directories": 4, "platform": 5, "working_directory": 6,
                    "output_paths": 7},
        "ActionResult": {"output_files": 2, "output_directories": 3, "exit_code": 4,
                         "stdout_digest": 6, "stderr_digest": 8, "execution_metadata": 9,
                         "output_file_symlinks": 10, "output_directory_symlinks": 11,
                         "output_symlinks": 12},
        "ExecuteRequest": {"instance_name": 1, "skip_cache_lookup": 3, "action_digest": 6,
                           "execution_policy": 7, "digest_function": 9},
        "Digest": {"hash": 1, "size_bytes": 2},
    }
    for message, expected in fields.items():
        descriptor = getattr(re_pb2, message).DESCRIPTOR
        assert {name: descriptor.fields_by_name[name].number for name in expected} == expected
    assert re_pb2.DigestFunction.Value.Value("BLAKE3") == 9
    assert re_pb2.Compressor.Value.Value("ZSTD") == 1


def test_read_responses_built_by_hand_are_what_protobuf_would_send() -> None:
    from rex_reapi.proto import bytestream_pb2
    from rex_reapi.wire import encode_read_response

    for size in (1, 127, 128, 300, 16_383, 16_384, (1 << 20) + 5):
        data = bytes(range(256)) * (size // 256) + bytes(size % 256)
        expected = bytestream_pb2.ReadResponse(data=data).SerializeToString()
        assert encode_read_response(data) == expected
        assert encode_read_response(memoryview(data)) == expected
    assert bytestream_pb2.ReadResponse.FromString(encode_read_response(b"")).data == b""
