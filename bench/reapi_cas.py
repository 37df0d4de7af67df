"""REAPI CAS and action cache: rex against BuildGrid in the same run; prints one JSON object.

    python bench/reapi_cas.py                     # starts rexd and BuildGrid, 5 runs
    python bench/reapi_cas.py --runs 3 --skip-buildgrid

One client (grpcio, rex-reapi's generated stubs, which use the spec's package names, so
they talk to BuildGrid as well) measures each server in turn, interleaved run by run:

- ``bytestream_write_MBps``: ByteStream Write of a fresh 64 MiB random blob (the same
  one to both servers in a run) in 1 MiB messages, as Bazel sends them (SHA-256, the
  server verifies the digest);
- ``bytestream_read_MBps``: ByteStream Read of that blob (MB = 10^6 bytes);
- ``bytestream_write_cpu_ms`` / ``bytestream_read_cpu_ms``: CPU time the server process
  (all its threads) spent on that Write / Read, from ``/proc`` (Linux only): the cost
  behind the throughput, which other load on a shared machine sways less;
- ``find_missing_10k_ms``: FindMissingBlobs of 10,000 digests, half of them present;
- ``get_action_result_p50_us`` / ``_p99_us``: ~1,000 sequential GetActionResult calls
  for a cached ActionResult with two output files and a stdout digest.

Every figure is the median over ``--runs`` runs (``*_spread`` is [min, max]). Ratios name
their direction: ``*_rex_over_buildgrid`` for throughput, ``*_buildgrid_over_rex`` for
latency, so above 1 always means rex is faster. Targets (issue 4): ByteStream at least 2x
BuildGrid, action-cache p50 no slower than BuildGrid.

BuildGrid (``--buildgrid-version``, default 0.4.4) is installed into ``.bench/buildgrid-venv``
on first use and serves CAS + ByteStream from its disk storage (one file per blob, as
rex's disk store) and the action cache from its in-memory LRU action cache (it has no
local on-disk one); rexd runs ``--workers 0`` with its default disk store and on-disk
action cache. Both data dirs are under ``--dir`` (default: a temp dir), same file system.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import grpc
from _buildgrid import VERSION, start_buildgrid, stop_buildgrid
from _rexd import start_rexd, stop_rexd
from rex_reapi.proto import bytestream_pb2 as bs_pb2
from rex_reapi.proto import bytestream_pb2_grpc as bs_grpc
from rex_reapi.proto import remote_execution_pb2 as re_pb2
from rex_reapi.proto import remote_execution_pb2_grpc as re_grpc

from rexcore.protocol.client import tune_malloc_for_streaming

_CHUNK = 1 << 20
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 8 << 20),
    ("grpc.max_send_message_length", 8 << 20),
]


def _digest(data: bytes) -> re_pb2.Digest:
    return re_pb2.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


class Client:
    """The same calls against any REAPI server (instance name "", SHA-256)."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)
        self.bytestream = bs_grpc.ByteStreamStub(self.channel)
        # Write and Read move bytes encoded before / decoded after the clock runs, so the
        # client's own protobuf copies do not cap what a server can show.
        self.raw_write = self.channel.stream_unary(
            "/google.bytestream.ByteStream/Write", request_serializer=None,
            response_deserializer=bs_pb2.WriteResponse.FromString)
        self.raw_read = self.channel.unary_stream(
            "/google.bytestream.ByteStream/Read",
            request_serializer=bs_pb2.ReadRequest.SerializeToString,
            response_deserializer=None)
        self.cas = re_grpc.ContentAddressableStorageStub(self.channel)
        self.action_cache = re_grpc.ActionCacheStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def write(self, data: bytes) -> float:
        """Seconds to ByteStream-Write ``data`` in 1 MiB messages."""
        digest = _digest(data)
        resource = f"uploads/{uuid.uuid4()}/blobs/{digest.hash}/{digest.size_bytes}"
        chunks = [data[start:start + _CHUNK] for start in range(0, len(data), _CHUNK)]
        requests = [
            bs_pb2.WriteRequest(resource_name=resource if index == 0 else "",
                                write_offset=index * _CHUNK, data=chunk,
                                finish_write=index == len(chunks) - 1).SerializeToString()
            for index, chunk in enumerate(chunks)]
        del chunks
        started = time.perf_counter()
        response = self.raw_write(iter(requests))
        elapsed = time.perf_counter() - started
        if response.committed_size not in (len(data), -1):
            raise SystemExit(f"bench: Write committed {response.committed_size} of {len(data)}")
        return elapsed

    def read(self, data: bytes) -> float:
        """Seconds to ByteStream-Read ``data`` back (checked after the clock stops)."""
        digest = _digest(data)
        request = bs_pb2.ReadRequest(resource_name=f"blobs/{digest.hash}/{digest.size_bytes}")
        started = time.perf_counter()
        messages = list(self.raw_read(request))
        elapsed = time.perf_counter() - started
        if b"".join(bs_pb2.ReadResponse.FromString(m).data for m in messages) != data:
            raise SystemExit("bench: ByteStream Read returned other bytes")
        return elapsed

    def upload(self, blobs: list[bytes]) -> None:
        for start in range(0, len(blobs), 500):
            request = re_pb2.BatchUpdateBlobsRequest(requests=[
                re_pb2.BatchUpdateBlobsRequest.Request(digest=_digest(blob), data=blob)
                for blob in blobs[start:start + 500]])
            for response in self.cas.BatchUpdateBlobs(request).responses:
                if response.status.code:
                    raise SystemExit(f"bench: BatchUpdateBlobs: {response.status}")

    def find_missing(self, digests: list[re_pb2.Digest], expect: int) -> float:
        request = re_pb2.FindMissingBlobsRequest(blob_digests=digests)
        started = time.perf_counter()
        response = self.cas.FindMissingBlobs(request)
        elapsed = time.perf_counter() - started
        if len(response.missing_blob_digests) != expect:
            raise SystemExit(f"bench: FindMissingBlobs said {len(response.missing_blob_digests)} "
                             f"missing, expected {expect}")
        return elapsed

    def cache_result(self) -> tuple[re_pb2.Digest, re_pb2.ActionResult]:
        """A cached ActionResult with two output files and a stdout, for a fresh action."""
        outputs = [os.urandom(1024), os.urandom(4096)]
        stdout = b"compiled\n" + os.urandom(16).hex().encode()
        self.upload([*outputs, stdout])
        action = _digest(os.urandom(64))
        result = re_pb2.ActionResult(
            output_files=[re_pb2.OutputFile(path=f"out/file{i}.o", digest=_digest(blob),
                                            is_executable=i == 1)
                          for i, blob in enumerate(outputs)],
            exit_code=0, stdout_digest=_digest(stdout))
        self.action_cache.UpdateActionResult(
            re_pb2.UpdateActionResultRequest(action_digest=action, action_result=result))
        return action, result

    def get_action_result(self, action: re_pb2.Digest, calls: int) -> list[float]:
        request = re_pb2.GetActionResultRequest(action_digest=action)
        get = self.action_cache.GetActionResult
        times = []
        for _ in range(calls):
            started = time.perf_counter()
            get(request)
            times.append(time.perf_counter() - started)
        return times


def _cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system, all threads) of process ``pid`` so far; None off Linux."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


class Subject:
    """One server under test and the figures gathered from it, run by run."""

    def __init__(self, name: str, address: str, find_count: int, pid: int) -> None:
        self.name = name
        self.pid = pid
        self.client = Client(address)
        self.figures: dict[str, list[float]] = {}
        # Half of the FindMissingBlobs digests are present, interleaved with the absent.
        present = [os.urandom(48) + i.to_bytes(4, "big") for i in range(find_count // 2)]
        self.client.upload(present)
        self.find_digests: list[re_pb2.Digest] = []
        for blob in present:
            self.find_digests.append(_digest(blob))
            self.find_digests.append(_digest(os.urandom(52)))
        self.find_absent = len(self.find_digests) - len(present)
        self.action, expected = self.client.cache_result()
        got = self.client.action_cache.GetActionResult(
            re_pb2.GetActionResultRequest(action_digest=self.action))
        if [f.digest for f in got.output_files] != [f.digest for f in expected.output_files]:
            raise SystemExit(f"bench: {name} returned another ActionResult than was cached")

    def note(self, figure: str, value: float) -> None:
        self.figures.setdefault(figure, []).append(value)

    def run(self, data: bytes, find_calls: int, ac_calls: int) -> None:
        size = len(data)
        before = _cpu_seconds(self.pid)
        self.note("bytestream_write_MBps", size / self.client.write(data) / 1e6)
        written = _cpu_seconds(self.pid)
        self.note("bytestream_read_MBps", size / self.client.read(data) / 1e6)
        read = _cpu_seconds(self.pid)
        if before is not None and written is not None and read is not None:
            self.note("bytestream_write_cpu_ms", (written - before) * 1e3)
            self.note("bytestream_read_cpu_ms", (read - written) * 1e3)
        finds = [self.client.find_missing(self.find_digests, self.find_absent)
                 for _ in range(find_calls)]
        self.note("find_missing_10k_ms", statistics.median(finds) * 1e3)
        self.client.get_action_result(self.action, 50)  # warm-up
        times = self.client.get_action_result(self.action, ac_calls)
        self.note("get_action_result_p50_us", _percentile(times, 0.5) * 1e6)
        self.note("get_action_result_p99_us", _percentile(times, 0.99) * 1e6)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for figure, values in self.figures.items():
            digits = 1 if figure.endswith(("MBps", "_us")) else 2
            if figure.endswith("_cpu_ms"):
                digits = 0
            out[figure] = round(statistics.median(values), digits)
            out[f"{figure}_spread"] = [round(min(values), digits), round(max(values), digits)]
        return out


def _ratio(numerator: float, denominator: float) -> float:
    return round(numerator / denominator, 2) if denominator else float("inf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--find-count", type=int, default=10_000)
    parser.add_argument("--find-calls", type=int, default=5,
                        help="FindMissingBlobs calls per run (their median is the run's figure)")
    parser.add_argument("--ac-calls", type=int, default=1000)
    parser.add_argument("--dir", type=Path, default=None,
                        help="where both servers keep their data (default: a temp dir)")
    parser.add_argument("--buildgrid-version", default=VERSION,
                        help="BuildGrid from PyPI, installed on first use into "
                             ".bench/buildgrid-venv (python3.11 -m venv; needs python3.11)")
    parser.add_argument("--skip-buildgrid", action="store_true")
    args = parser.parse_args()
    tune_malloc_for_streaming()  # as the rex CLI does; the client costs both servers less

    work = Path(tempfile.mkdtemp(prefix="rex-bench-reapi-", dir=args.dir))
    processes: list[Callable[[], None]] = []
    try:
        rexd, rex_url = start_rexd(work / "rex", "--listen", "127.0.0.1:0", "--workers", "0",
                                   "--log-level", "warning", protocol="reapi")
        rex_address = rex_url.removeprefix("grpc://")
        processes.append(lambda: stop_rexd(rexd))
        subjects = [Subject("rex", rex_address, args.find_count, rexd.pid)]
        if not args.skip_buildgrid:
            bgd, bgd_address = start_buildgrid(work / "buildgrid", args.buildgrid_version)
            processes.append(lambda: stop_buildgrid(bgd))
            subjects.append(Subject("buildgrid", bgd_address, args.find_count, bgd.pid))
        warm_up = os.urandom(4 << 20)
        for subject in subjects:  # warm-up: connections, page cache, first-call paths
            subject.run(warm_up, 1, 100)
            subject.figures.clear()
        load_before = round(os.getloadavg()[0], 2)
        for run in range(args.runs):
            # The same fresh blob for both servers; alternate who goes first so drifting
            # load on the shared machine evens out.
            data = os.urandom(args.size_mib << 20)
            for subject in subjects if run % 2 == 0 else subjects[::-1]:
                subject.run(data, args.find_calls, args.ac_calls)
            del data
        result: dict[str, Any] = {
            "runs": args.runs,
            "load_average_1m": [load_before, round(os.getloadavg()[0], 2)],
            "blob_MiB": args.size_mib,
            "data_dir": str(work.parent),
            **{subject.name: subject.summary() for subject in subjects},
        }
        if len(subjects) == 2:
            rex, bgd_figures = result["rex"], result["buildgrid"]
            ratios = {
                "bytestream_write_rex_over_buildgrid": _ratio(
                    rex["bytestream_write_MBps"], bgd_figures["bytestream_write_MBps"]),
                "bytestream_read_rex_over_buildgrid": _ratio(
                    rex["bytestream_read_MBps"], bgd_figures["bytestream_read_MBps"]),
                "find_missing_buildgrid_over_rex": _ratio(
                    bgd_figures["find_missing_10k_ms"], rex["find_missing_10k_ms"]),
                "get_action_result_p50_buildgrid_over_rex": _ratio(
                    bgd_figures["get_action_result_p50_us"], rex["get_action_result_p50_us"]),
                "get_action_result_p99_buildgrid_over_rex": _ratio(
                    bgd_figures["get_action_result_p99_us"], rex["get_action_result_p99_us"]),
            }
            for figure in ("bytestream_write_cpu_ms", "bytestream_read_cpu_ms"):
                if figure in rex and figure in bgd_figures:  # Linux only
                    ratios[f"{figure.removesuffix('_ms')}_buildgrid_over_rex"] = _ratio(
                        bgd_figures[figure], rex[figure])
            # The same ratios run by run (each pair measured back to back): [min, max].
            rex_runs, bgd_runs = subjects[0].figures, subjects[1].figures
            for name, figure, rex_over in (
                    ("bytestream_write_rex_over_buildgrid", "bytestream_write_MBps", True),
                    ("bytestream_read_rex_over_buildgrid", "bytestream_read_MBps", True),
                    ("get_action_result_p50_buildgrid_over_rex", "get_action_result_p50_us",
                     False)):
                paired = [r / b if rex_over else b / r
                          for r, b in zip(rex_runs[figure], bgd_runs[figure])]
                ratios[f"{name}_per_run_spread"] = [round(min(paired), 2), round(max(paired), 2)]
            result["ratios"] = ratios
            result["targets_met"] = {
                "bytestream_write_2x": ratios["bytestream_write_rex_over_buildgrid"] >= 2.0,
                "bytestream_read_2x": ratios["bytestream_read_rex_over_buildgrid"] >= 2.0,
                "get_action_result_p50_no_slower":
                    ratios["get_action_result_p50_buildgrid_over_rex"] >= 1.0,
            }
            result["buildgrid"] = {
                "version": args.buildgrid_version,
                "storage": "disk-storage (CAS, ByteStream), lru-action-cache (AC)",
                **bgd_figures,
            }
        result["rex"] = {"storage": "disk (CAS, ByteStream), on-disk action cache", **result["rex"]}
        for subject in subjects:
            subject.client.close()
        text = json.dumps(result, indent=2)
        # [min, max] spreads on one line each
        print(re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text))
    finally:
        for stop in reversed(processes):
            stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
