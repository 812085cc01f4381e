"""Plumbing: files replaced whole or not at all.

Guarantee: a reader of a file written here, or a process killed while writing it, sees either
the old file or the new one, never a mix or a stub. The new contents go to a temporary file in
the same directory, which then replaces the old one in one `os.replace` (atomic on POSIX).
"""

from __future__ import annotations

import os
import pathlib


def replace_file(path: str | os.PathLike, data: str | bytes) -> None:
    """Write `data` (text or bytes) to `path` atomically."""
    path = pathlib.Path(path)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:
        if isinstance(data, bytes):
            partial.write_bytes(data)
        else:
            partial.write_text(data)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
