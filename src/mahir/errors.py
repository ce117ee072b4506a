"""One exception tree for mahir. Third-party errors are translated into it at the boundary
(`raise ... from err`), so callers catch these and nothing else.

    MahirError                 base; the message is one line that says what is wrong and what to do
    ├── BadInput               the user gave something unusable: a missing path, a corrupt file,
    │   │                      a factory that returns the wrong thing
    │   └── RequestError       a request the server will not run (`param`, `code`: OpenAI's fields)
    │       ├── Malformed      not a valid request at all
    │       ├── Mismatch       valid, but does not fit the model: names, shapes, datatypes, values
    │       ├── TooLarge       can never be admitted, however long the client waits
    │       ├── Unauthorized   a missing or wrong API key
    │       └── NotFound       no such model, or not an endpoint this model serves
    ├── Unsupported            a technique or runtime does not apply here; the message is the reason
    ├── ExportMismatch         an export or conversion disagrees with the reference model
    ├── RuntimeFailure         a runtime failed while running a model it had accepted
    ├── Overloaded             the server's queue is full: retry later
    ├── Unavailable            the served model fails its health probe after an error: retry shortly
    ├── DeadlineExceeded       a request waited past its timeout before its batch started
    └── ClientClosed           the client went away before its answer

The CLI maps these to exit codes (`EXIT_CODES`), the server to HTTP statuses (`HTTP_STATUS`),
each by the error's nearest class in its table (`nearest`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

T = TypeVar("T")


class MahirError(Exception):
    """Base of every error mahir raises on purpose."""


class BadInput(MahirError):
    """The user gave something mahir cannot use; the message says what to give instead."""


class RequestError(BadInput):
    """A request the server will not run. `param` names the field at fault where one is, `code`
    is a machine-readable reason; both reach clients in OpenAI's error shape."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


class Malformed(RequestError):
    """The body is not a valid request at all."""


class Mismatch(RequestError):
    """A valid request that does not fit the model: names, shapes, datatypes, values."""


class TooLarge(RequestError):
    """The request can never be admitted: more items than a batch or the queue holds, or a
    body past the server's limit."""


class Unauthorized(RequestError):
    """The request lacks the server's API key, or sends a wrong one."""


class NotFound(RequestError):
    """The request names a model this server does not serve, or asks an endpoint of a model
    that does not offer it."""


class Unsupported(MahirError):
    """A technique, runtime or model feature does not apply here; the message is the reason."""


class ExportMismatch(MahirError):
    """An exported or converted model gives different answers from the model it came from."""


class RuntimeFailure(MahirError):
    """A runtime raised while opening or running a model it had accepted."""


class Overloaded(MahirError):
    """The queue is full, or the server is shutting down: the client should retry later."""


class Unavailable(MahirError):
    """The session failed its health probe after an inference error: retry shortly."""


class DeadlineExceeded(MahirError):
    """The request waited longer than its timeout before its batch started."""


class ClientClosed(MahirError):
    """The client closed the connection before its answer; its work was dropped unrun."""


EXIT_CODES: dict[type[MahirError], int] = {
    BadInput: 2,
    Unsupported: 2,
    ExportMismatch: 3,
    RuntimeFailure: 4,
}

HTTP_STATUS: dict[type[MahirError], int] = {
    Malformed: 400,
    Unauthorized: 401,
    NotFound: 404,
    TooLarge: 413,
    Mismatch: 422,
    BadInput: 422,
    ClientClosed: 499,  # nginx's code: nobody reads it but the logs and the metrics
    MahirError: 500,
    Overloaded: 503,
    Unavailable: 503,
    DeadlineExceeded: 504,
}


def refuse_below(floor: float, flags: Mapping[str, float | None], *, above: bool = False) -> None:
    """Refuse, in one line that names the flag as typed, the first number in `flags` under
    `floor`, or at it where it must be `above`; a flag left out (None) passes. Commands and the
    configs behind them check their numbers with it, so every such refusal reads alike."""
    for flag, value in flags.items():
        if value is not None and (value < floor or (above and value == floor)):
            bound = f"> {floor:g}" if above else f">= {floor:g}"
            given = f"{value:g}" if isinstance(value, float) else value
            raise BadInput(f"{flag} must be {bound}, got {given}")


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
