"""Regenerate rex_reapi/proto/*_pb2*.py from the .proto files next to them.

    python plugins/rex_reapi/scripts/generate_protos.py          # rewrite the generated code
    python plugins/rex_reapi/scripts/generate_protos.py --check  # exit 1 if it is stale

The generated modules are committed (installing rex-reapi needs no protoc); the test
suite runs ``--check`` so a .proto edit without regeneration fails CI. Generation uses
grpcio-tools (pinned in the ``testing`` extra, since its protoc decides the output) with
the .proto files of googleapis-common-protos for ``google.longrunning`` and ``google.rpc``.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

PLUGIN_ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = PLUGIN_ROOT / "rex_reapi" / "proto"
SOURCES = ["semver.proto", "bytestream.proto", "remote_execution.proto"]


def _googleapis_include(scratch: Path) -> Path:
    """googleapis-common-protos ships ``google/longrunning/operations_proto.proto`` but
    registers it as ``google/longrunning/operations.proto``; give protoc that name."""
    import google.rpc.status_pb2

    site = Path(google.rpc.status_pb2.__file__).resolve().parent.parent.parent
    include = scratch / "googleapis"
    for package in ("api", "rpc", "longrunning"):
        shutil.copytree(site / "google" / package, include / "google" / package,
                        ignore=shutil.ignore_patterns("*.py", "*.pyi", "__pycache__"))
    longrunning = include / "google" / "longrunning"
    (longrunning / "operations_proto.proto").rename(longrunning / "operations.proto")
    return include


def generate(out_dir: Path) -> list[Path]:
    """Run protoc; returns the files written under ``out_dir/rex_reapi/proto``."""
    import grpc_tools
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as scratch:
        include = _googleapis_include(Path(scratch))
        well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
        args = [
            "protoc", f"-I{PLUGIN_ROOT}", f"-I{include}", f"-I{well_known}",
            f"--python_out={out_dir}", f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}",
            *(f"rex_reapi/proto/{name}" for name in SOURCES),
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed; see the messages above")
    return sorted((out_dir / "rex_reapi" / "proto").glob("*_pb2*.py*"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="compare with the committed files instead of writing them")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        written = generate(Path(tmp))
        names = {path.name for path in written}
        committed = {path.name for path in PROTO_DIR.glob("*_pb2*.py*")}
        if args.check:
            stale = sorted(
                (names ^ committed)
                | {p.name for p in written if p.name in committed
                   and not filecmp.cmp(p, PROTO_DIR / p.name, shallow=False)}
            )
            if stale:
                print("generated protobuf code is stale: " + ", ".join(stale)
                      + "; run python plugins/rex_reapi/scripts/generate_protos.py",
                      file=sys.stderr)
                return 1
            print(f"generated protobuf code is up to date ({len(names)} files)")
            return 0
        for name in committed - names:
            (PROTO_DIR / name).unlink()
        for path in written:
            shutil.copyfile(path, PROTO_DIR / path.name)
        print(f"wrote {len(written)} files to {PROTO_DIR}")
        return 0


if __name__ == "__main__":
    sys.exit(main())
