"""Files written whole or not at all: a reader (or a crash) sees the old file or the new one,
never half of one. Output directories, which are folders, are swapped in by `outdir.py`.

Bottom layer: imports nothing of mahir.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A hidden sibling of `path` to write into; it replaces `path` when the block ends without
    an error and is removed when it raises."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # two writers never share one
    try:
        yield staged
        staged.replace(path)
    finally:
        staged.unlink(missing_ok=True)


def write_text_atomically(path: Path, text: str) -> None:
    with atomic_path(path) as staged:
        staged.write_text(text, encoding="utf-8")
