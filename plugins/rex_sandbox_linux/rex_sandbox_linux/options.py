"""Options of the ``linux`` sandbox (``[sandboxes.linux]``): plain data, importable on
every OS (the descriptor needs them where the sandbox cannot run)."""

from __future__ import annotations

import attrs

from rexcore.config.types import ByteSize

__all__ = ["ETC_FILES", "SYSTEM_PATHS", "LinuxSandboxOptions"]

SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# What toolchains and resolvers read; copied into the action's /etc (one mount for all).
ETC_FILES = ("ld.so.cache", "alternatives", "localtime", "nsswitch.conf", "hosts",
             "resolv.conf", "ssl")


@attrs.frozen
class LinuxSandboxOptions:
    """Options of the ``linux`` sandbox (``[sandboxes.linux]``)."""

    #: The bubblewrap binary.
    bwrap: str = "/usr/bin/bwrap"
    #: Who actions run as on the host: ``"auto"`` is ``nobody`` when the worker is root,
    #: else the worker's own user; or a user name or uid (needs root).
    user: str = "auto"
    #: Whether an action may have the host's network (platform property ``network=on``);
    #: without it such an action fails with exit code 126 and says why.
    allow_network: bool = False
    #: Limits for an action that names none; ``None``: no limit.
    default_memory: ByteSize | None = None
    default_cpus: float | None = None
    default_pids: int | None = 4096
    #: The most an action may ask for; a bigger request gets the maximum.
    max_memory: ByteSize | None = None
    max_cpus: float | None = None
    max_pids: int | None = 32768
    #: Largest file an action may write (RLIMIT_FSIZE, stdout and stderr included);
    #: ``None``: no limit. The only bound on disk use of the writable exec root.
    max_file_size: ByteSize | None = None
    #: Size of /tmp and of each of the spec's temp dirs (tmpfs; its pages count against
    #: the action's memory limit).
    tmp_size: ByteSize = ByteSize(1 << 30)
    #: Host directories mounted read-only at the same place (a symlink stays a symlink).
    system_paths: tuple[str, ...] = SYSTEM_PATHS
    #: Entries of the host's /etc the action sees (read-only copies, refreshed when the
    #: host's change; what only root may read of them is left out); the rest of /etc is
    #: empty, apart from a passwd and group naming only root, nobody and the action's user.
    etc_files: tuple[str, ...] = ETC_FILES
    #: The host name actions see.
    hostname: str = "rex-sandbox"
    #: Seconds between SIGTERM and SIGKILL when an action is stopped (timeout, cancel).
    kill_grace_s: float = attrs.field(default=2.0, validator=attrs.validators.ge(0))
    #: When this sandbox cannot run on the host (its probe fails), let the worker fall
    #: back to the best available other sandbox (e.g. ``process``, NOT hermetic) instead
    #: of refusing to start.
    allow_fallback: bool = False
