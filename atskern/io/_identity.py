"""What tells a slide file from a replacement written under its name, for backends that reopen files by path."""

from __future__ import annotations

import os


def file_identity(stat: os.stat_result) -> tuple[int, int]:
    """A file's size and modification time (not its inode, which a network file system need not keep across the
    machines that pickled slides go to)."""
    return stat.st_size, stat.st_mtime_ns


def changed_error(path: str) -> OSError:
    """The error of a read that found ``path`` replaced or rewritten since its slide was opened."""
    return OSError(f"{path}: the file changed since the slide was opened (its size or modification time); open the "
                   "slide again")
