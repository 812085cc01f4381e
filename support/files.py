"""Plumbing: files replaced whole or not at all, and derived files cached by their inputs.

Guarantee: a reader of a file written here, or a process killed while writing it, sees either
the old file or the new one, never a mix or a stub. The new contents go to a temporary file in
the same directory, which then replaces the old one in one `os.replace` (atomic on POSIX).
A cached file is derived data: one that no longer loads is built again and replaced, with a
warning, and a build that fails writes nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import IO, TypeVar

T = TypeVar("T")


@contextlib.contextmanager
def replacing(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """A file handle whose contents replace `path` atomically when the block ends without an
    error; if it raises, `path` is left as it was and the partial file removed."""
    path = pathlib.Path(path)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:
        with open(partial, mode) as file:
            yield file
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def replace_file(path: str | os.PathLike, data: str | bytes) -> None:
    """Write `data` (text or bytes) to `path` atomically."""
    with replacing(path, "wb" if isinstance(data, bytes) else "w") as file:
        file.write(data)


def content_key(header: str, items: Iterable[str]) -> str:
    """16 hex digits of the SHA-256 of `header` followed by each item's own SHA-256 digest
    (hashing each item first keeps ["ab", "c"] and ["a", "bc"] apart)."""
    key = hashlib.sha256(header.encode())
    for item in items:
        key.update(hashlib.sha256(item.encode()).digest())
    return key.hexdigest()[:16]


def load_or_build(path: str | os.PathLike, load: Callable[[pathlib.Path], T],
                  build: Callable[[], bytes], *, notes: Mapping[str, str] | None = None,
                  redo: str = "building it again") -> T:
    """`load(path)` of a cached file, after building it with `build()` if it is missing.

    A file on which `load` raises ValueError (cut short by a full disk or a copy, say) is built
    again, after a warning that names the error and `redo`. The new bytes replace the file
    atomically, after the `notes` (name -> text, e.g. how it was made) are written beside it;
    if `build` raises, nothing is written.
    """
    path = pathlib.Path(path)
    if path.is_file():
        try:
            return load(path)
        except ValueError as error:
            print(f"warning: {error}; {redo}", file=sys.stderr)
    data = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    for name, text in (notes or {}).items():
        replace_file(path.parent / name, text)
    replace_file(path, data)
    return load(path)
