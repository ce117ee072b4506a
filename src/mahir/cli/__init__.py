"""The `mahir` command: parses, calls the API, prints. Nothing else lives here.

Each command is a plain function in the room of its kind (`build.py`: bench, apply, optimize;
`serving.py`: serve; `loadtesting.py`: loadtest; `profiling.py`: profile), listed once below.
Errors mahir raises on purpose become one line on stderr and an exit code (`errors.EXIT_CODES`);
`--debug` shows the traceback instead.
"""

from __future__ import annotations

from typing import Annotated

import typer

from mahir.cli import build, export, loadtesting, profiling, serving

app = typer.Typer(
    help="mahir: make a trained model run faster and cheaper without changing its answers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
for command in (
    build.bench,
    build.apply,
    build.optimize,
    profiling.profile,
    serving.serve,
    loadtesting.loadtest,
    export.export,
):
    # the list in `mahir --help` keeps a docstring's line breaks: its first paragraph, unwrapped
    summary = " ".join((command.__doc__ or "").split("\n\n")[0].split())
    app.command(short_help=summary)(command)


@app.callback()
def _options(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
) -> None:
    ctx.obj = {"debug": debug}


def main() -> None:
    app(prog_name="mahir")
