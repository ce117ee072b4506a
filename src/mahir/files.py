"""Files written whole or not at all: a reader (or a crash) sees the old file or the new one,
never half of one. Output directories, which are folders, are swapped in by `outdir.py`.

Bottom layer: imports nothing of mahir.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
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


@contextlib.contextmanager
def staging(final: Path) -> Iterator[Path]:
    """A path in a fresh folder beside `final`; on success its files move next to `final`
    (external-data files keep their names, so references stay valid), else all is removed."""
    final.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=".mahir-staging-", dir=final.parent))
    try:
        yield folder / final.name
        for produced in sorted(folder.iterdir(), key=lambda p: p == folder / final.name):
            produced.replace(final.parent / produced.name)  # the main file last
    finally:
        shutil.rmtree(folder, ignore_errors=True)
