"""Actions as rex executes them: a Command, an input tree of Directories, and limits.

These are rex's own schemas (JSON through :mod:`rexcore.serialization.codec`), shaped like
the REAPI messages so the ``reapi`` protocol converts both ways. Actions, Commands and
Directories are stored in the CAS as canonical JSON (sorted keys, no whitespace), so their
digests are stable; :func:`canonical_digest` computes them.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable

import attrs
import orjson

from rexcore.artifacts.digest import Digest, DigestFunction, digest_of
from rexcore.serialization.codec import unstructure

__all__ = [
    "Action",
    "Command",
    "Directory",
    "DirectoryNode",
    "FileNode",
    "InvalidActionError",
    "SymlinkNode",
    "Tree",
    "canonical_bytes",
    "canonical_digest",
    "check_relative_path",
]


class InvalidActionError(ValueError):
    """An action, command or directory breaks the rules (paths, ordering, names)."""


def check_relative_path(path: str, what: str) -> str:
    """``path`` if it is relative, normalized and stays inside its root; else an error."""
    if not path or path.startswith("/") or "\\" in path or "\0" in path:
        raise InvalidActionError(f"{what} {path!r} must be a relative POSIX path")
    if posixpath.normpath(path) != path or path.split("/")[0] == "..":
        raise InvalidActionError(
            f"{what} {path!r} must be normalized and stay inside the exec root (no '..', "
            "'.', '//' or trailing '/')"
        )
    return path


def _check_name(name: str, where: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise InvalidActionError(f"{where}: {name!r} is not a valid file name")


@attrs.frozen
class FileNode:
    name: str
    digest: Digest
    is_executable: bool = False


@attrs.frozen
class DirectoryNode:
    name: str
    digest: Digest


@attrs.frozen
class SymlinkNode:
    name: str
    target: str


@attrs.frozen
class Directory:
    """One directory of an input or output tree; entries sorted by name, names unique."""

    files: tuple[FileNode, ...] = ()
    directories: tuple[DirectoryNode, ...] = ()
    symlinks: tuple[SymlinkNode, ...] = ()

    def validate(self, where: str = "directory") -> None:
        names: list[str] = []
        for group in (self.files, self.directories, self.symlinks):
            group_names = [node.name for node in group]
            for name in group_names:
                _check_name(name, where)
            if group_names != sorted(group_names):
                raise InvalidActionError(f"{where}: entries are not sorted by name")
            names.extend(group_names)
        if len(set(names)) != len(names):
            raise InvalidActionError(f"{where}: an entry name appears twice")


@attrs.frozen
class Tree:
    """A whole directory tree in one blob (an output directory): root plus every child."""

    root: Directory
    children: tuple[Directory, ...] = ()


@attrs.frozen
class Command:
    """What to run: argv, the exact environment, where, and which outputs to collect."""

    arguments: tuple[str, ...]
    environment: tuple[tuple[str, str], ...] = ()
    output_paths: tuple[str, ...] = ()
    working_directory: str = ""

    def validate(self) -> None:
        if not self.arguments:
            raise InvalidActionError("command has no arguments")
        names = [name for name, _ in self.environment]
        if names != sorted(names) or len(set(names)) != len(names):
            raise InvalidActionError("command environment must be sorted by name, no repeats")
        for path in self.output_paths:
            check_relative_path(path, "output path")
        if self.working_directory:
            check_relative_path(self.working_directory, "working directory")


@attrs.frozen
class Action:
    """A command plus its inputs and how to run it; its digest keys the action cache."""

    command_digest: Digest
    input_root_digest: Digest
    timeout_s: float | None = None
    do_not_cache: bool = False
    platform: tuple[tuple[str, str], ...] = ()
    #: Puts the action in a cache namespace of its own (REAPI ``Action.salt``, as hex):
    #: changing it disowns every result cached under the old one.
    salt: str = ""


def canonical_bytes(obj: object) -> bytes:
    """The stable encoding of a schema object: JSON, sorted keys, no whitespace."""
    return orjson.dumps(unstructure(obj), option=orjson.OPT_SORT_KEYS)


def canonical_digest(obj: object, function: DigestFunction = DigestFunction.BLAKE3) -> Digest:
    return digest_of(canonical_bytes(obj), function)


def sorted_pairs(pairs: Iterable[tuple[str, str]] | dict[str, str]) -> tuple[tuple[str, str], ...]:
    items = pairs.items() if isinstance(pairs, dict) else pairs
    return tuple(sorted((str(k), str(v)) for k, v in items))
