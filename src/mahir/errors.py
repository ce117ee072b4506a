"""One exception tree for mahir. Third-party errors are translated into it at the boundary
(`raise ... from err`), so callers catch these and nothing else.

    MahirError                 base; the message is one line that says what is wrong and what to do
    ├── BadInput               the user gave something unusable: a missing path, a corrupt file,
    │                          a factory that returns the wrong thing, a malformed request
    ├── Unsupported            a technique or runtime does not apply here; the message is the reason
    ├── ExportMismatch         an export or conversion disagrees with the reference model
    └── RuntimeFailure         a runtime failed while running a model it had accepted

The CLI maps these to exit codes (`EXIT_CODES`); the server maps them to HTTP status codes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

T = TypeVar("T")


class MahirError(Exception):
    """Base of every error mahir raises on purpose."""


class BadInput(MahirError):
    """The user gave something mahir cannot use; the message says what to give instead."""


class Unsupported(MahirError):
    """A technique, runtime or model feature does not apply here; the message is the reason."""


class ExportMismatch(MahirError):
    """An exported or converted model gives different answers from the model it came from."""


class RuntimeFailure(MahirError):
    """A runtime raised while opening or running a model it had accepted."""


EXIT_CODES: dict[type[MahirError], int] = {
    BadInput: 2,
    Unsupported: 2,
    ExportMismatch: 3,
    RuntimeFailure: 4,
}


def first_line(err: BaseException) -> str:
    """A third-party error's first line, for a one-line message of our own."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def nearest(err: MahirError, table: Mapping[type[MahirError], T]) -> T | None:
    """The entry of `err`'s nearest class in `table` (its own class first, then its bases), or
    None: how the CLI and the server each map the one tree onto their own codes."""
    for cls in type(err).__mro__:
        if cls in table:
            return table[cls]
    return None


def exit_code(err: MahirError) -> int:
    """The process exit code for `err`: the entry of its nearest class in `EXIT_CODES`."""
    code = nearest(err, EXIT_CODES)
    return 1 if code is None else code
