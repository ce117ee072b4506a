"""What every `mahir` command shares: the consoles, the error guard, progress, small parsers."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from mahir.errors import BadInput, MahirError, exit_code
from mahir.files import write_text_atomically

if TYPE_CHECKING:
    from mahir.types import Device

# Tables are wider than the 80 columns rich assumes when output goes to a file or a pipe.
console = Console(width=None if sys.stdout.isatty() else 120)
errors = Console(stderr=True)
T = TypeVar("T")

ModelArg = Annotated[
    str | None,
    typer.Argument(
        help="A Hugging Face model folder, an .onnx file, a .gguf file (an LLM), or "
        "path/to/file.py:factory (default: the bundled all-MiniLM-L6-v2).",
        show_default=False,
    ),
]
LogitsOption = Annotated[
    list[str] | None,
    typer.Option(
        "--logits",
        help="An output that holds class scores, judged by top-1 agreement; repeat for several "
        "(outputs a transformers head names *logits count already; every other output is "
        "judged by cosine and error).",
        show_default=False,
    ),
]
DeviceOption = Annotated[
    str,
    typer.Option("--device", help="Where the runtimes compute: cpu, cuda (GPU 0) or cuda:N."),
]


def device_here(text: str) -> Device:
    """The device `--device` names, refused in one line where this machine has no such GPU:
    before any model loads, not when the first runtime touches it."""
    from mahir.types import Device

    device = Device.parse(text)
    if device.kind == "cuda":
        from mahir.hardware import detect

        detect().require(device)
    return device


def refuse_unwritable(files: Mapping[str, Path | None]) -> None:
    """Refuse, before any work, a file a command will write at its end (--json, --trace, --out;
    keyed by the flag as typed) that could not be written there: a folder, or a place where no
    file can be created; a flag left out (None) passes. Otherwise the work is done and lost."""
    from mahir.files import unwritable

    for flag, path in files.items():
        if path is None:
            continue
        if path.is_dir():
            raise BadInput(f"{flag} {path} is a folder: give a file to write")
        reason = unwritable(path)
        if reason is not None:
            raise BadInput(f"{flag} {path}: {reason}: give another path")


def load_with_logits(source: str | None, logits: list[str] | None, command: str) -> Any:
    """The model `source` names, with the outputs `--logits` names judged as class scores."""
    from mahir.model import load_model, one_forward, with_logits

    model = one_forward(load_model(source), command)
    return with_logits(model, logits) if logits else model


def progress_bar() -> Progress:
    """A spinner on stderr while it is a terminal; off otherwise, where rich would draw nothing
    but still end with a blank line (before a one-line error, say)."""
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TimeElapsedColumn(),
        console=errors,
        transient=True,
        disable=not errors.is_terminal,
    )


def parse_range(text: str, option: str = "--tokens") -> tuple[int, int]:
    """'64-128' -> (64, 128)."""
    match = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", text)
    if not match:
        raise BadInput(f"{option} takes MIN-MAX such as 64-128, got {text!r}")
    return int(match[1]), int(match[2])


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically: a reader never sees half a file."""
    write_text_atomically(path, json.dumps(data, indent=2, default=str) + "\n")


def guard(ctx: typer.Context, fn: Callable[[], T]) -> T:
    """Run `fn`; a MahirError becomes one line and an exit code, unless --debug asked for the
    traceback."""
    try:
        return fn()
    except MahirError as err:
        if ctx.obj and ctx.obj.get("debug"):
            raise
        errors.print(f"[bold red]error:[/] {err}", markup=True, highlight=False, soft_wrap=True)
        raise typer.Exit(exit_code(err)) from None
