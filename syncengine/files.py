"""Files for the shells: fsync of a path, a secret key file written once, a lock file.

Used by the sync server (its signing key, its single-process SQLite store, backups), the
sandbox processor (its key) and the terminal SDK (one open ``Terminal`` per database).
Nothing here is part of the sans-I/O core.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO

from syncengine.core.errors import StorageError

KEY_FILE_MODE = 0o600


def fsync_path(path: Path) -> None:
    """fsync a file, or a directory (so that a file created or renamed in it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_private_file(path: Path, data: bytes, *, replace: bool) -> None:
    """Put ``data`` at ``path`` (mode 0600) durably: written to a private temporary file
    beside it and fsynced, then moved into place and the directory fsynced, so the file is
    either whole or absent after a crash or a power cut.

    ``replace=False`` *links* it into place, which fails quietly if ``path`` exists (of
    processes writing at once, the first one wins); ``replace=True`` overwrites.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, KEY_FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)  # atomic; the first process's file wins
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(path.parent)


def load_or_create_key_file(path: Path, size: int, make_key: Callable[[], bytes]) -> bytes:
    """Read the ``size``-byte key at ``path``, creating it (mode 0600) if there is none.

    Several processes may start at once on one directory: each writes its new key to a
    private temporary file, fsyncs it and *links* it into place, which fails if another
    process got there first; then everyone reads the one key that won. The directory is
    fsynced after the link, so a power cut right after the first start cannot take the key
    back (a new key would make everything enrolled with the old one refuse this one). A
    file of another size raises :class:`StorageError` naming the file.
    """
    if not path.exists():
        key = make_key()
        if len(key) != size:
            raise ValueError(f"a new key must be {size} bytes, got {len(key)}")
        path.parent.mkdir(parents=True, exist_ok=True)
        write_private_file(path, key, replace=False)
    try:
        key = path.read_bytes()
    except OSError as exc:
        raise StorageError(f"cannot read the key file {path}: {exc}") from exc
    if len(key) != size:
        raise StorageError(
            f"{path} is {len(key)} bytes, not a {size}-byte key; restore it from a backup "
            "(a new key would not match what was made with the old one)"
        )
    return key


def lock_exclusive(path: Path) -> IO[str] | None:
    """Take an exclusive ``flock`` on ``path`` (created if missing), without waiting.

    Returns the open file: the lock is held while it stays open, and released when it is
    closed or the process ends (a killed process leaves no stale lock). Returns None if
    another open file -- of this process or another -- holds the lock. The file is never
    deleted: a lock on a file unlinked and created again would not exclude anyone.
    """
    handle = open(path, "a+")  # noqa: SIM115 - held open for the lock's lifetime
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
    return handle
