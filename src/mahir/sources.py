"""What `load_model` takes as a source, known without torch: the command line refuses a source
that is not there before it imports the frameworks (seconds) that loading one needs."""

from __future__ import annotations

import os
import re
from pathlib import Path

from mahir.errors import BadInput

Source = str | os.PathLike[str]
FACTORY_SPEC = re.compile(r"^(?P<target>.+):(?P<fn>[A-Za-z_][A-Za-z0-9_]*)$")
"""`path/to/file.py:fn` or `package.module:fn`: a PyTorch factory (`factory.py`)."""
USAGE = (
    "give a Hugging Face model folder, an .onnx file, a .gguf file (an LLM), or "
    "path/to/file.py:factory"
)


def refuse_missing(source: Source | None, usage: str = USAGE) -> None:
    """The refusal `load_model` gives a path that does not exist, given before any import:
    None (the bundled model), an existing path and a factory spec pass. `usage`: what the
    command takes, where it takes more than a model."""
    if source is None:
        return
    text = os.fspath(source)
    if not Path(text).exists() and not FACTORY_SPEC.match(text):
        raise BadInput(f"{text} does not exist: {usage}")
