"""``rex``: the command-line client of a rex server.

::

    rex cas put FILE [--digest-function blake3|sha256]   # prints function/hash/size
    rex cas get DIGEST -o FILE
    rex run [--input PATH]... [--output PATH]... [--timeout S] [--memory SIZE]
            [--cpus N] [--property k=v]... [--env K=V]... [-v] -- ARGV...
    rex status [--json] [--watch [--interval S]]

The server is ``--server URL``, else ``$REX_SERVER``, else ``http://127.0.0.1:8981``.
Exit status: 0 on success, 1 when the operation failed, 2 on a usage error; ``rex run``
exits with the action's own exit code, ``rex status`` with 1 when the server is unhealthy
(and ``--watch`` with 0 on Ctrl-C).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from rexcore import __version__
from rexcore.artifacts.digest import DigestFunction, InvalidDigestError, parse_digest
from rexcore.config.types import parse_size
from rexcore.core.loop import run as run_loop
from rexcore.core.remote_action import execute_remotely
from rexcore.protocol.client import (
    Progress,
    RexClient,
    RexClientError,
    resolve_server,
    tune_malloc_for_streaming,
)
from rexcore.serialization.sandbox_spec import SandboxSpec

__all__ = ["main"]

#: Transfers smaller than this finish before a progress bar would be worth drawing.
PROGRESS_MIN_BYTES = 8 << 20


class _UsageError(Exception):
    """A bad argument value found after parsing (exit status 2)."""


class _LocalError(Exception):
    """A problem on this machine's side, e.g. an unreadable file (exit status 1)."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rex", description="client of a rex remote build execution server"
    )
    parser.add_argument("--version", action="version", version=f"rex {__version__}")
    parser.add_argument(
        "--server",
        metavar="URL",
        help="rex server, http://HOST:PORT or HOST:PORT "
        "(default: $REX_SERVER, else http://127.0.0.1:8981)",
    )
    parser.add_argument(
        "--token",
        metavar="TOKEN",
        help="bearer token for a server with auth_tokens_file (default: $REX_TOKEN); "
        "prefer the environment variable, which no process listing shows",
    )
    parser.add_argument(
        "--ca-file",
        metavar="PEM",
        help="CA certificates to trust for an https:// server (default: $REX_CA_FILE, else "
        "the system's)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    cas = commands.add_parser("cas", help="content-addressed storage: upload and download blobs")
    cas_commands = cas.add_subparsers(dest="cas_command", metavar="ACTION", required=True)

    functions = [f.value for f in DigestFunction]
    progress_help = "show a progress bar (default: for files of 8 MiB or more on a terminal)"

    put = cas_commands.add_parser("put", help="upload a file and print its digest")
    put.add_argument("file", metavar="FILE", type=Path, help="file to upload")
    put.add_argument(
        "--digest-function",
        choices=functions,
        default=DigestFunction.BLAKE3.value,
        help="hash function of the digest (default: blake3)",
    )
    put.add_argument("--progress", action=argparse.BooleanOptionalAction, help=progress_help)

    get = cas_commands.add_parser("get", help="download a blob to a file")
    get.add_argument(
        "digest", metavar="DIGEST", help="function/hash/size, or hash/size with --digest-function"
    )
    get.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        type=Path,
        required=True,
        help="where to write the blob (replaced atomically)",
    )
    get.add_argument(
        "--digest-function",
        choices=functions,
        default=DigestFunction.BLAKE3.value,
        help="hash function when DIGEST is hash/size (default: blake3)",
    )
    get.add_argument("--progress", action=argparse.BooleanOptionalAction, help=progress_help)

    run = commands.add_parser(
        "run", help="run a command remotely with inputs from, and outputs into, this directory",
        description="Uploads the inputs the server lacks, runs ARGV on a worker, writes the "
        "outputs back, relays stdout and stderr, and exits with the command's exit code. "
        "An identical second run is answered from the action cache.",
    )
    run.add_argument("--input", "-i", action="append", default=[], metavar="PATH",
                     help="file or directory (relative to the current directory) to send")
    run.add_argument("--output", "-o", action="append", default=[], metavar="PATH",
                     help="file or directory the command produces, to bring back")
    run.add_argument("--timeout", type=float, metavar="S", help="seconds before the action is killed")
    run.add_argument("--memory", metavar="SIZE", help="memory limit, e.g. 512MiB")
    run.add_argument("--cpus", type=float, metavar="N", help="CPU limit")
    run.add_argument("--property", action="append", default=[], metavar="K=V",
                     help="platform property the worker must offer")
    run.add_argument("--env", action="append", default=[], metavar="K=V",
                     help="environment variable of the action (default: only PATH)")
    run.add_argument("--no-cache", action="store_true", help="neither read nor write the action cache")
    run.add_argument("-v", "--verbose", action="store_true",
                     help="say where the result came from and how long it took")
    run.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- ARGV...",
                     help="the command to run")

    status = commands.add_parser(
        "status", help="the server's worker pool, queue and health",
        description="Shows the worker pool, the queue and every health check as tables; "
        "exits 1 when the server is unhealthy.",
    )
    status.add_argument("--json", action="store_true",
                        help="print JSON (with --watch: one document per line)")
    status.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    status.add_argument("--interval", type=float, default=2.0, metavar="S",
                        help="seconds between refreshes with --watch (default: 2)")
    return parser


def _pairs(values: Sequence[str], flag: str) -> dict[str, str]:
    pairs = {}
    for value in values:
        key, sep, rest = value.partition("=")
        if not sep or not key:
            raise _UsageError(f"{flag} {value!r} must look like KEY=VALUE")
        pairs[key] = rest
    return pairs


async def _remote_run(client: RexClient, args: argparse.Namespace) -> int:
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        raise _UsageError("rex run needs a command after --, e.g. rex run -- make all")
    builder = SandboxSpec.builder()
    try:
        for path in args.input:
            builder.input(path)
        for path in args.output:
            builder.output(path)
        if args.timeout is not None:
            builder.timeout(args.timeout)
        if args.memory is not None:
            builder.max_memory(parse_size(args.memory))
        if args.cpus is not None:
            builder.max_cpu(args.cpus)
        spec = builder.build()
    except ValueError as exc:
        raise _UsageError(str(exc)) from None
    environment = {"PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin")}
    environment |= _pairs(args.env, "--env")
    started = time.monotonic()
    result = await execute_remotely(
        client, argv, workdir=Path.cwd(), spec=spec, environment=environment,
        properties=_pairs(args.property, "--property"),
        skip_cache_lookup=args.no_cache, do_not_cache=args.no_cache,
    )
    sys.stdout.buffer.write(result.stdout)
    sys.stdout.flush()
    sys.stderr.buffer.write(result.stderr)
    sys.stderr.flush()
    if args.verbose:
        source = "the action cache" if result.cached else f"a worker ({result.result.execution_metadata.worker or 'unknown'})"
        print(f"rex: action {result.action_digest} answered by {source} in "
              f"{time.monotonic() - started:.3f} s", file=sys.stderr)
    if result.status != "ok":
        raise RexClientError(f"the action did not complete ({result.status}): {result.message}")
    return result.exit_code


@contextlib.contextmanager
def _progress_bar(description: str, size: int, wanted: bool | None) -> Iterator[Progress | None]:
    show = wanted if wanted is not None else size >= PROGRESS_MIN_BYTES and sys.stderr.isatty()
    if not show:
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )
    from rich.progress import (
        Progress as RichProgress,
    )

    with RichProgress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task(description, total=size)
        yield lambda done, total: bar.update(task, completed=done, total=total)


async def _cas_put(client: RexClient, args: argparse.Namespace) -> int:
    path: Path = args.file
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise _UsageError(f"{path} is not a regular file; rex cas put uploads one file")
    except OSError as exc:
        raise _LocalError(f"cannot read {path}: {exc.strerror}; check the path") from None
    with _progress_bar(f"put {path.name}", size, args.progress) as progress:
        digest = await client.upload_file(path, DigestFunction(args.digest_function), progress)
    print(digest)
    return 0


async def _cas_get(client: RexClient, args: argparse.Namespace) -> int:
    try:
        digest = parse_digest(args.digest, DigestFunction(args.digest_function))
    except InvalidDigestError as exc:
        raise _UsageError(f"{exc}; e.g. blake3/<64 hex>/<size> as printed by rex cas put") from None
    output: Path = args.output
    if output.is_dir():
        raise _UsageError(f"{output} is a directory; give -o the path of the file to write")
    if not output.parent.is_dir():
        raise _LocalError(
            f"cannot write {output}: directory {output.parent} does not exist; create it first"
        )
    with _progress_bar(f"get {output.name}", digest.size, args.progress) as progress:
        await client.download_file(digest, output, progress)
    return 0


async def _run(args: argparse.Namespace) -> int:
    token = args.token if args.token is not None else os.environ.get("REX_TOKEN", "")
    ca_file = args.ca_file if args.ca_file is not None else os.environ.get("REX_CA_FILE", "")
    async with RexClient(resolve_server(args.server), token=token, ca_file=ca_file) as client:
        if args.command == "status":
            from rich.console import Console

            from rexcore.monitoring.report import show_status

            if not args.interval > 0:
                raise _UsageError(f"--interval {args.interval:g} must be a positive number "
                                  "of seconds")
            return await show_status(client, Console(), as_json=args.json, watch=args.watch,
                                     interval_s=args.interval)
        if args.command == "run":
            return await _remote_run(client, args)
        if args.cas_command == "put":
            return await _cas_put(client, args)
        return await _cas_get(client, args)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    tune_malloc_for_streaming()
    try:
        return run_loop(_run(args))
    except _UsageError as exc:
        return _fail(str(exc), 2)
    except (RexClientError, _LocalError) as exc:
        return _fail(str(exc), 1)
    except OSError as exc:  # the local file side: permissions, disk full, ...
        where = f"{exc.filename}: " if exc.filename else ""
        return _fail(f"{where}{exc.strerror or exc}; check the path and its permissions", 1)
    except KeyboardInterrupt:
        if getattr(args, "watch", False):
            return 0  # how a watch ends
        print("rex: interrupted", file=sys.stderr)
        return 130


def _fail(message: str, status: int) -> int:
    print(f"rex: error: {' '.join(message.split())}", file=sys.stderr)  # always one line
    return status


if __name__ == "__main__":
    sys.exit(main())
