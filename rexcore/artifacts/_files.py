"""File primitives of the on-disk stores (blobs and action cache): temp files that a crash
cannot leave behind for long, and atomic publication. All of it blocks: call it in a thread
(or on an event loop for a file or two of a few KiB, where it costs microseconds).

Each temp file is held under an exclusive ``flock`` by its writer, so cleaning a
directory removes exactly the files whose writer died (the kernel drops the lock with the
process), even while other processes write next to them.

Where the file system can (Linux: tmpfs, ext4, xfs, btrfs), :func:`write_new_file` writes
a small file without any temp name: an unnamed ``O_TMPFILE`` file is filled, then linked
at its name, so a crash leaves nothing behind and there is no name to make, lock or
remove. That takes a third of the time of a named temp file on tmpfs (BENCHMARKS.md).
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
import sys

try:
    import fcntl
except ImportError:  # Windows: an open file cannot be deleted, which protects it instead
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "TEMP_SUFFIX",
    "TempFile",
    "fsync_directory",
    "link_new",
    "publish_temp",
    "remove_file",
    "remove_stale_temps",
    "replace_atomically",
    "write_new_file",
]

TEMP_SUFFIX = ".tmp"
_O_TMPFILE = getattr(os, "O_TMPFILE", 0)
# Directories whose file system refused an unnamed file (or where /proc is missing, so
# one cannot be linked): those take the named temp file.
_NO_TMPFILE: set[str] = set()
_TMPFILE_REFUSED = {errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT}
_root_fd = -1


class TempFile:
    """A uniquely named file in ``directory``, created exclusively and locked."""

    def __init__(self, directory: str, stem: str) -> None:
        while True:
            name = f"{stem}.{os.getpid()}.{secrets.token_hex(6)}{TEMP_SUFFIX}"
            self.path = os.path.join(directory, name)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
            self.fd = os.open(self.path, flags | getattr(os, "O_BINARY", 0), 0o600)
            if fcntl is None:
                return
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            # A cleaner may have locked and removed the file between the open and the
            # lock; then its name is gone and it is of no use.
            if os.fstat(self.fd).st_nlink:
                return
            os.close(self.fd)

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]

    def make_read_only(self) -> None:
        if sys.platform == "win32":
            os.chmod(self.path, stat.S_IREAD)
        else:
            os.fchmod(self.fd, 0o444)

    def set_mtime(self, stamp_ns: int) -> None:
        target = self.fd if os.utime in os.supports_fd else self.path
        os.utime(target, ns=(stamp_ns, stamp_ns))

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def remove(self) -> None:
        """Close and delete (also after a publish, which leaves the name behind)."""
        self.close()
        remove_file(self.path)


def remove_file(path: str) -> None:
    """Delete ``path`` if it exists, read-only or not."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except PermissionError:
        if sys.platform != "win32":
            raise
        os.chmod(path, stat.S_IWRITE)  # Windows will not delete a read-only file
        os.unlink(path)


def remove_stale_temps(directory: str) -> None:
    """Remove the temp files in ``directory`` whose writer is gone."""
    with os.scandir(directory) as entries:
        for entry in entries:
            if not entry.name.endswith(TEMP_SUFFIX):
                continue
            if fcntl is None:
                try:
                    remove_file(entry.path)
                except PermissionError:
                    pass  # open in a live writer
                continue
            try:
                fd = os.open(entry.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                remove_file(entry.path)  # while holding the lock, so no writer uses it
            except BlockingIOError:
                pass  # a live writer holds it
            finally:
                os.close(fd)


def link_new(source: str, target: str) -> bool:
    """Hardlink ``source`` at ``target``, making its directory on demand; False if
    ``target`` exists already (names are content hashes, so it holds the same bytes)."""
    for attempt in range(2):
        try:
            os.link(source, target)
            return True
        except FileExistsError:
            return False
        except FileNotFoundError:
            if attempt:
                raise
            os.makedirs(os.path.dirname(target), exist_ok=True)
    raise AssertionError("unreachable")


def replace_atomically(temp: TempFile, target: str) -> None:
    """Move a written temp file over ``target``, making its directory on demand."""
    if sys.platform == "win32":
        temp.close()  # Windows cannot rename an open file; elsewhere the lock stays on
    try:
        os.replace(temp.path, target)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(temp.path, target)
    temp.close()


def fsync_directory(path: str) -> None:
    """Make a new name in ``path`` durable (a no-op where directories cannot be opened)."""
    if sys.platform == "win32":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _finish(fd: int, mode: int | None, stamp_ns: int | None, fsync: bool) -> None:
    if mode is not None:
        os.fchmod(fd, mode)
    if stamp_ns is not None:
        os.utime(fd, ns=(stamp_ns, stamp_ns))
    if fsync:
        os.fsync(fd)


def _link_unnamed(fd: int, target: str) -> bool | None:
    """Link the unnamed file ``fd`` at ``target``: True, False if ``target`` exists, None
    if unnamed files cannot be linked here."""
    global _root_fd
    if _root_fd < 0:
        _root_fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    # linkat with AT_SYMLINK_FOLLOW on /proc/self/fd/N links the open file itself (Python
    # calls linkat, not link, only when given a directory fd; an absolute path ignores it).
    source = f"/proc/self/fd/{fd}"
    for attempt in range(2):
        try:
            os.link(source, target, src_dir_fd=_root_fd, follow_symlinks=True)
            return True
        except FileExistsError:
            return False
        except FileNotFoundError:
            if not os.path.exists(source):
                return None  # no /proc
            if attempt:
                raise
            os.makedirs(os.path.dirname(target), exist_ok=True)
    raise AssertionError("unreachable")


def write_new_file(
    temp_dir: str,
    target: str,
    data: bytes | memoryview,
    *,
    mode: int | None = None,
    stamp_ns: int | None = None,
    fsync: bool = False,
    replace: bool = False,
) -> bool:
    """Write ``data`` at ``target`` whole or not at all, making its directory on demand:
    whether it was written. If ``target`` exists that is False and nothing is written,
    unless ``replace`` (then it is replaced atomically).

    ``mode`` sets the permissions (else 0600), ``stamp_ns`` the modification time;
    ``fsync`` makes the file and its name durable before this returns.
    """
    if _O_TMPFILE and temp_dir not in _NO_TMPFILE:
        try:
            fd = os.open(temp_dir, _O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            if exc.errno not in _TMPFILE_REFUSED:
                raise
            _NO_TMPFILE.add(temp_dir)
        else:
            try:
                _write_all(fd, data)
                _finish(fd, mode, stamp_ns, fsync)
                added = _link_unnamed(fd, target)
            finally:
                os.close(fd)
            if added is None:
                _NO_TMPFILE.add(temp_dir)
            elif added or not replace:
                if added and fsync:
                    fsync_directory(os.path.dirname(target))
                return added
    temp = TempFile(temp_dir, os.path.basename(target))
    try:
        temp.write(data)
        return publish_temp(temp, target, mode=mode, stamp_ns=stamp_ns, fsync=fsync,
                            replace=replace)
    finally:
        temp.remove()


def publish_temp(
    temp: TempFile,
    target: str,
    *,
    mode: int | None = None,
    stamp_ns: int | None = None,
    fsync: bool = False,
    replace: bool = False,
) -> bool:
    """Give the written ``temp`` its ``mode`` and ``stamp_ns`` (as in
    :func:`write_new_file`) and publish it at ``target``: whether it was (False if
    ``target`` exists, unless ``replace``). The caller still removes ``temp``."""
    if mode is not None:
        if os.name == "posix":
            os.fchmod(temp.fd, mode)
        else:
            temp.make_read_only()  # the one mode Windows knows
    if stamp_ns is not None:
        temp.set_mtime(stamp_ns)
    if fsync:
        os.fsync(temp.fd)
    if replace:
        replace_atomically(temp, target)
        added = True
    else:
        added = link_new(temp.path, target)
    if added and fsync:
        fsync_directory(os.path.dirname(target))
    return added
