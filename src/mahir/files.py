"""Files and folders written whole or not at all: a reader (or a crash) sees the old one or the
new one, never half of one.

One mechanism for all of them (`staged`): the block writes into a fresh hidden folder beside the
target, and only when it ends without an error does what it wrote move into place, by rename
(same folder, same file system); when it raises, the hidden folder goes and the old target
stays as it was. A folder that already exists cannot be renamed over, so it is moved aside
into the hidden folder first and removed with it.

Also where mahir keeps what it builds once per machine (`cache_dir`: measured peaks, its own
Python environments, exported LLMs), and the content hash those are keyed by (`content_hash`).

Bottom layer: imports nothing of mahir.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CACHE_ENV = "MAHIR_CACHE_DIR"


@contextmanager
def staged(target: Path, *, folder: bool = False) -> Iterator[Path]:
    """Where to write `target`, inside a fresh hidden folder beside it: a path to create a file
    at, or with `folder` an empty folder to fill. On success `target` is replaced in one rename,
    then files written beside the yielded path (an ONNX file's external data) move next to it,
    before it; on an error nothing of the block's writing remains and `target` is untouched."""
    target.parent.mkdir(parents=True, exist_ok=True)
    hidden = Path(tempfile.mkdtemp(prefix=".mahir-staging-", dir=target.parent))
    draft = hidden / target.name
    try:
        if folder:
            draft.mkdir()
        yield draft
        for produced in sorted(hidden.iterdir(), key=lambda p: p == draft):  # target last
            _put(produced, target.parent / produced.name, aside=hidden / f".old-{produced.name}")
    finally:
        shutil.rmtree(hidden, ignore_errors=True)


def _put(produced: Path, final: Path, *, aside: Path) -> None:
    if produced.is_dir() and final.is_dir():
        final.replace(aside)  # removed with the hidden folder, after the swap
    produced.replace(final)


def write_text_atomically(path: Path, text: str) -> None:
    with staged(path) as draft:
        draft.write_text(text, encoding="utf-8")


def unwritable(path: Path) -> str | None:
    """Why `path`, a file or folder still to be written, could not be created, or None: the
    nearest folder above it that exists is a file, or no file can be created in it. Write
    permission bits do not tell: root ignores them, read-only mounts add to them."""
    parent = path.parent
    while not parent.exists():  # the folders writing it would create
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is a file, so {path} cannot be created"
    try:
        handle, probe = tempfile.mkstemp(prefix=".mahir-probe-", dir=parent)
        os.close(handle)
        os.unlink(probe)
    except OSError as err:
        return f"cannot create files in {parent} ({err.strerror})"
    return None


def slug(name: str) -> str:
    """`name` as a short file-name part: characters other than letters, digits, - _ . become -."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)[:48]


def cache_dir() -> Path:
    """mahir's folder in the user's cache: `$MAHIR_CACHE_DIR`, else `$XDG_CACHE_HOME/mahir`,
    else `~/.cache/mahir`."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mahir"


def content_hash(path: Path) -> str:
    """sha256 of a file's bytes, or of a folder's files (hidden ones skipped) in sorted
    relative-path order, each with its name and size, so a renamed file changes it too."""
    digest = hashlib.sha256()
    if path.is_file():
        files = [("", path)]
    else:
        files = sorted(
            (p.relative_to(path).as_posix(), p)
            for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
    for name, file in files:
        if name:
            digest.update(f"{name}\0{file.stat().st_size}\0".encode())
        with file.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()
