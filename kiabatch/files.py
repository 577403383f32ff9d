"""Files and directories kiabatch creates: private to the user (0700 / 0600), whatever the umask.

Item content passes through these files (task directories, logs), so another local
user must not be able to read them. A directory that cannot be made, or a path that
is not a directory, is one :class:`~kiabatch.errors.UsageError` naming what to fix.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO

from .errors import UsageError

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: Path, what: str, *, tighten: bool = False) -> Path:
    """Create ``path`` (and missing parents) as a 0700 directory; ``what`` names it in errors.

    Parents are created with the usual permissions; only ``path`` itself is made
    private. ``tighten``: an existing directory owned by us that is open to others
    is made 0700 too (for kiabatch's own directories, never for one a user named).
    """
    try:
        path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        info = path.lstat()
    except FileExistsError:
        raise UsageError(f"{what} {path} exists but is not a directory") from None
    except OSError as exc:
        raise UsageError(f"cannot create {what} {path}: {exc.strerror}") from None
    if not path.is_dir():
        raise UsageError(f"{what} {path} is not a directory")
    if tighten and info.st_uid == os.getuid() and info.st_mode & 0o077:
        try:
            path.chmod(DIR_MODE)
        except OSError as exc:
            raise UsageError(f"cannot make {what} {path} private: {exc.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {path} is not writable")
    return path


def write_private(path: Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` (created 0600, truncated if it exists)."""
    raw = data.encode() if isinstance(data, str) else data
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
    with os.fdopen(fd, "wb") as handle:
        handle.write(raw)


def open_private(path: Path, mode: str = "ab") -> IO[bytes]:
    """Open ``path`` for appending or updating, creating it 0600 (``mode``: "ab" or "a+")."""
    flags = os.O_CREAT | os.O_CLOEXEC | (os.O_RDWR if "+" in mode else os.O_WRONLY) | os.O_APPEND
    return os.fdopen(os.open(path, flags, FILE_MODE), mode)
