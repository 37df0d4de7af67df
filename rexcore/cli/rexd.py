"""``rexd``: the daemon. ``serve`` runs it; ``plugins list`` and ``config show`` inspect it.

``rexd serve`` parses its command line twice: first to find ``--config`` (which says what
plugins to load), then, with the loaded protocols' flags added (``--listen`` from
rex-reapi, say), for real.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rexcore import __version__
from rexcore.config.converter import ConfigError, structure_config
from rexcore.config.loader import (
    ResolvedConfig,
    effective_config,
    read_config_file,
    resolve_config,
    set_option,
)
from rexcore.config.model import PluginsConfig, RexConfig
from rexcore.plugins.manager import PluginError, PluginManager, build_plugin_manager

__all__ = ["main"]


class _Fail(Exception):
    """Exit with a message (already phrased for the user) and a status."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def _base_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, metavar="FILE",
                        help="rexd.toml to read (default: none; every option has a default)")
    parser.add_argument("--data-dir", metavar="DIR",
                        help="blobs, action cache and state (default: $REX_DATA_DIR, "
                             "else /var/lib/rex as root, ~/.local/share/rex otherwise)")


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rexd", description="rex remote execution daemon")
    parser.add_argument("--version", action="version", version=f"rexd {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = commands.add_parser("serve", help="run the service until SIGINT/SIGTERM",
                                add_help=False)
    _base_options(serve)

    plugins = commands.add_parser("plugins", help="inspect installed plugins")
    plugin_commands = plugins.add_subparsers(dest="plugins_command", metavar="COMMAND",
                                             required=True)
    listing = plugin_commands.add_parser("list", help="list plugins, their components and status")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    _base_options(listing)

    worker = commands.add_parser(
        "worker", help="run a worker that executes actions for a coordinator",
        description="Join a coordinator and run the actions it assigns until SIGTERM "
                    "(which drains: running actions finish and are reported first).")
    worker.add_argument("--coordinator", metavar="URL",
                        help="the coordinator's native HTTP API, or srv:NAME for a DNS SRV "
                             "record (default: $REX_COORDINATOR, else the _rex._tcp SRV "
                             "record of the search domains)")
    worker.add_argument("--dns-server", metavar="HOST[:PORT]",
                        help="resolver for SRV lookups (default: the system's)")
    worker.add_argument("--token", help="the coordinator's join token (default: "
                                        "$REX_JOIN_TOKEN; none needed on the same host)")
    worker.add_argument("--ca-file", metavar="PEM",
                        help="CA certificates to trust for an https:// coordinator (default: "
                             "$REX_CA_FILE, else the system's)")
    worker.add_argument("--slots", type=int, default=1, metavar="N",
                        help="actions run at once (default: 1)")
    worker.add_argument("--property", action="append", default=[], metavar="KEY=VALUE",
                        dest="properties",
                        help="a platform property actions may ask for (repeatable)")
    worker.add_argument("--sandbox", default="auto", metavar="NAME",
                        help="sandbox to run actions in; auto picks the best available "
                             "(default: auto)")
    worker.add_argument("--data-dir", metavar="DIR",
                        help="exec roots and the worker's caches (default: "
                             "$REX_DATA_DIR/worker, else /var/lib/rex/worker as root, "
                             "~/.local/share/rex/worker otherwise); one "
                             "per worker")
    worker.add_argument("--shared-store", metavar="DIR", type=Path,
                        help="the coordinator's blob store directory (<its data dir>/cas) "
                             "when on the same host: stage from it and publish into it")
    worker.add_argument("--worker-id", metavar="ID",
                        help="the name the coordinator knows this worker by (default: "
                             "<host>-<pid>-<random>)")
    worker.add_argument("--parent-pid", type=int, metavar="PID",
                        help="drain once this process is gone (set by the local provider, so "
                             "a killed rexd leaves no workers behind)")
    worker.add_argument("--orphan-grace", type=float, default=60.0, metavar="S",
                        help="with --parent-pid: seconds an orphaned worker keeps trying to "
                             "finish and report its running actions (default: 60)")
    worker.add_argument("--config", type=Path, metavar="FILE",
                        help="rexd.toml whose [plugins] say which plugins to load, whose "
                             "[sandboxes.NAME] tables give sandbox options and whose "
                             "event_loop picks the event loop")
    worker.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                        default="info", help="logging level (default: info)")

    config = commands.add_parser("config", help="inspect configuration")
    config_commands = config.add_subparsers(dest="config_command", metavar="COMMAND",
                                            required=True)
    show = config_commands.add_parser("show", help="print the effective config (TOML)")
    show.add_argument("--json", action="store_true", help="print JSON instead of TOML")
    _base_options(show)
    return parser


def _raw_config(args: argparse.Namespace) -> dict[str, Any]:
    raw = read_config_file(args.config)
    if args.data_dir:
        raw["data_dir"] = args.data_dir
    return raw


def _plugins_config(raw: dict[str, Any], source: str) -> PluginsConfig:
    return structure_config(raw.get("plugins", {}), PluginsConfig, path="$.plugins",
                            source=source)


def _resolve(raw: dict[str, Any], plugins: PluginManager, source: str) -> ResolvedConfig:
    config = structure_config(raw, RexConfig, source=source)
    return resolve_config(config, plugins, source)


_SERVE_POOL_FLAGS = {
    "workers": "pool.target_workers",
    "worker_slots": "pool.slots_per_worker",
    "sandbox": "pool.sandbox",
}


def _serve(argv: Sequence[str], args: argparse.Namespace) -> int:
    source = str(args.config) if args.config else "config"
    raw = _raw_config(args)
    plugins = build_plugin_manager(_plugins_config(raw, source), strict=True)

    parser = argparse.ArgumentParser(prog="rexd serve", description="run the rex service")
    _base_options(parser)
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                        help="logging level (default: logging.level in config, else info)")
    parser.add_argument("--workers", type=int, metavar="N",
                        help="local worker processes to run (default: CPU count; 0: none, "
                             "remote workers join with `rexd worker`) [pool.target_workers]")
    parser.add_argument("--worker-slots", type=int, metavar="N",
                        help="actions each worker runs at once (default 1) "
                             "[pool.slots_per_worker]")
    parser.add_argument("--sandbox", metavar="NAME",
                        help="sandbox the workers use (default auto: the best available) "
                             "[pool.sandbox]")
    flags: dict[str, str] = {}
    for name, registered in sorted(plugins.components("protocol").items()):
        for option in registered.descriptor.cli_options:
            dest = f"protocol_{name}_{option.option}"
            parser.add_argument(option.flag, dest=dest, metavar=option.metavar,
                                help=f"{option.help} [protocols.{name}.{option.option}]")
            flags[dest] = f"protocols.{name}.{option.option}"
    full = parser.parse_args(argv)
    for dest, dotted in flags.items():
        value = getattr(full, dest)
        if value is not None:
            set_option(raw, dotted, value)
    if full.log_level:
        set_option(raw, "logging.level", full.log_level)
    for dest, dotted in _SERVE_POOL_FLAGS.items():
        value = getattr(full, dest)
        if value is not None:
            set_option(raw, dotted, value)
    resolved = _resolve(raw, plugins, source)
    logging.basicConfig(
        level=resolved.config.logging.level.upper(), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from rexcore.core import loop
    from rexcore.core.daemon import Daemon, DaemonError

    setting = resolved.config.event_loop
    try:
        logging.getLogger("rexd").info("event loop: %s", loop.chosen_event_loop(setting))
        loop.run(Daemon(resolved, plugins).serve_forever(), setting)
    except (DaemonError, loop.EventLoopError) as exc:
        raise _Fail(str(exc)) from exc
    return 0


def _plugins_list(args: argparse.Namespace) -> int:
    source = str(args.config) if args.config else "config"
    raw = _raw_config(args)
    plugins = build_plugin_manager(_plugins_config(raw, source), strict=False)
    infos = plugins.plugin_infos()
    if args.json:
        rows = [
            {"name": i.name, "distribution": i.distribution, "version": i.version,
             "status": i.status, "reason": i.reason, "components": list(i.components)}
            for i in infos
        ]
        print(json.dumps(rows, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="rex plugins")
    for column in ("plugin", "distribution", "version", "status", "components"):
        table.add_column(column)
    for info in infos:
        components = "\n".join(
            f"{c['kind']}: {c['name']}" + ("" if c["available"] else f" (unavailable: {c['reason']})")
            for c in info.components
        ) or "-"
        status = info.status + (f": {info.reason}" if info.reason else "")
        table.add_row(info.name, info.distribution, info.version, status, components)
    Console().print(table)
    failed = [i for i in infos if i.status == "failed"]
    for info in failed:
        print(f"rexd: warning: plugin {info.name} ({info.distribution} {info.version}) "
              f"failed to load: {info.reason}", file=sys.stderr)
    return 0


def _parse_properties(values: Sequence[str]) -> list[tuple[str, str]]:
    properties = []
    for value in values:
        key, sep, setting = value.partition("=")
        if not sep or not key:
            raise _Fail(f"--property {value!r} is not KEY=VALUE", status=2)
        properties.append((key, setting))
    return properties


def _worker(args: argparse.Namespace) -> int:
    import os

    from rexcore.config.model import default_data_dir
    from rexcore.core import loop
    from rexcore.plugins.descriptors import ComponentContext
    from rexcore.protocol.client import RexClientError, resolve_server, tune_malloc_for_streaming
    from rexcore.protocol.discovery import CoordinatorNotFoundError, discover_coordinator
    from rexcore.sandbox.interface import SandboxError
    from rexcore.sandbox.select import create_sandbox, select_sandbox
    from rexcore.worker.agent import WorkerAgent
    from rexcore.worker.errors import WorkerError

    try:
        coordinator = discover_coordinator(args.coordinator, dns_server=args.dns_server)
    except CoordinatorNotFoundError as exc:
        raise _Fail(str(exc), status=2) from None
    try:
        url = resolve_server(coordinator)
    except RexClientError as exc:
        raise _Fail(str(exc).replace("--server or REX_SERVER", "--coordinator"), 2) from exc
    if args.slots < 1:
        raise _Fail(f"--slots must be at least 1, got {args.slots}", status=2)
    properties = _parse_properties(args.properties)
    token = args.token if args.token is not None else os.environ.get("REX_JOIN_TOKEN", "")
    data_dir = Path(args.data_dir).expanduser() if args.data_dir else default_data_dir() / "worker"
    source = str(args.config) if args.config else "config"
    raw = read_config_file(args.config)
    plugins = build_plugin_manager(_plugins_config(raw, source), strict=True)
    event_loop = raw.get("event_loop", "auto")
    try:
        chosen_loop = loop.chosen_event_loop(event_loop)
    except loop.EventLoopError as exc:
        raise _Fail(f"{source}: {exc}", status=2) from None
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("rexd").info("event loop: %s", chosen_loop)
    tune_malloc_for_streaming()

    async def serve() -> None:
        chosen = select_sandbox(plugins, args.sandbox,
                                raw.get("sandboxes", {}).get(args.sandbox)).descriptor.name
        sandbox = create_sandbox(plugins, chosen, ComponentContext(data_dir=data_dir),
                                 raw.get("sandboxes", {}).get(chosen))
        ca_file = args.ca_file if args.ca_file is not None else os.environ.get("REX_CA_FILE", "")
        agent = WorkerAgent(url, token=token, ca_file=ca_file, slots=args.slots,
                            properties=properties,
                            sandbox=sandbox, data_dir=data_dir,
                            shared_store_root=args.shared_store, worker_id=args.worker_id)
        watch = None
        if args.parent_pid is not None:
            watch = asyncio.create_task(_drain_when_orphaned(agent, args.parent_pid,
                                                             args.orphan_grace))
        try:
            await agent.run()
        finally:
            if watch is not None:
                watch.cancel()

    try:
        loop.run(serve(), event_loop)
    except (WorkerError, SandboxError, RexClientError, loop.EventLoopError) as exc:
        raise _Fail(str(exc)) from exc
    return 0


async def _drain_when_orphaned(agent: Any, parent_pid: int, grace_s: float) -> None:
    """Drain once ``parent_pid`` is gone; stop outright ``grace_s`` later.

    A local worker outlives a killed rexd (it runs in its own session); it finishes and
    reports what it is running (a restarted rexd on the same address takes the results),
    but takes no new work, so nothing is left behind.
    """
    import os

    while os.getppid() == parent_pid:
        await asyncio.sleep(1.0)
    logging.getLogger(__name__).warning(
        "worker %s: its rexd (pid %d) is gone; draining", agent.worker_id, parent_pid)
    agent.drain()
    await asyncio.sleep(grace_s)
    agent.drain()  # the second call stops at once


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def _config_show(args: argparse.Namespace) -> int:
    source = str(args.config) if args.config else "config"
    raw = _raw_config(args)
    plugins = build_plugin_manager(_plugins_config(raw, source), strict=True)
    data = _drop_none(effective_config(_resolve(raw, plugins, source)))
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        import tomli_w

        sys.stdout.write(tomli_w.dumps(data))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _top_parser()
    args, rest = parser.parse_known_args(argv)
    try:
        if args.command == "serve":
            serve_at = argv.index("serve")
            return _serve(argv[serve_at + 1:], args)
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        if args.command == "worker":
            return _worker(args)
        if args.command == "plugins":
            return _plugins_list(args)
        return _config_show(args)
    except ConfigError as exc:
        print(f"rexd: error: {exc}", file=sys.stderr)
        return 2
    except PluginError as exc:
        print(f"rexd: error: {exc}", file=sys.stderr)
        return 1
    except _Fail as exc:
        print(f"rexd: error: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
