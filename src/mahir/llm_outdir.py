"""An LLM output directory (written by `mahir optimize --llm`): its model files, and opening it.

`model/` holds what the winning engine opens. For the PyTorch engines that is the causal LM's
config, generation config and tokenizer (chat template included) as `save_pretrained` writes
them, and its weights as a torch state dict (`weights.pt`): `save_pretrained` refuses torchao's
int8 weight tensors, while `torch.save` keeps them bit for bit and `torch.load` reads them back
with `weights_only` (torchao registers its tensor types as safe to load). `mahir.json` names the
engine, its threads and the family's stop tokens; `open_llm_output` opens all of it as the
`Generator` the search timed, for a server to stream from.

Imports runtimes, families and the low rooms; never passes or search, so serving stays free of
the optimizer (the int8 weights are read as saved, not quantized again).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

from mahir.errors import BadInput, Unsupported, first_line
from mahir.families.decoder import DECODER_SPEC, Decoder, decoder_family
from mahir.generation import Generator
from mahir.outdir import MANIFEST, read_manifest
from mahir.runtimes.engines import open_engine
from mahir.silence import quiet_transformers
from mahir.types import Artifact, RuntimeOptions

MODEL_FOLDER = "model"
WEIGHTS = "weights.pt"
FORMAT = "torch-state-dict"
"""`mahir.json`'s `format` for model/ as `save_llm_model` writes it."""


def save_llm_model(module: Any, tokenizer: Any, folder: Path) -> list[str]:
    """Write `module` (a transformers causal LM, fp32 or with torchao int8 weights) and its
    tokenizer into the new folder `folder`; the names of the files written."""
    import torch

    folder.mkdir()
    module.config.save_pretrained(folder)
    if getattr(module, "generation_config", None) is not None:
        module.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    torch.save(module.state_dict(), folder / WEIGHTS)
    return sorted(p.name for p in folder.iterdir())


def open_llm_output(out: str | os.PathLike[str]) -> tuple[Generator, Decoder]:
    """The winner of `mahir optimize --llm` in `out`, on the engine and threads it won with,
    and its family (tokenizer, chat template, stop tokens)."""
    out = Path(out)
    manifest = read_manifest(out)
    try:
        if manifest["family"] != Decoder.kind or manifest["format"] != FORMAT:
            raise ValueError(f"format {manifest['format']!r} of family {manifest['family']!r}")
        engine = str(manifest["engine"])
        options = RuntimeOptions.from_dict(manifest["options"])
        int8 = bool(manifest["int8_weights"])
    except (KeyError, TypeError, ValueError) as err:
        raise BadInput(
            f"{out / MANIFEST} is not an LLM output directory mahir can open ({err}): write it "
            "again with mahir optimize --llm"
        ) from err
    module, tokenizer = _read_model(out / MODEL_FOLDER, int8)
    family = decoder_family(module, tokenizer, out)
    artifact = Artifact("torch", DECODER_SPEC, module=module, meta={"int8_weights": int8})
    return open_engine(engine, artifact, options), family


def _read_model(folder: Path, int8: bool) -> tuple[Any, Any]:
    """The causal LM built from its config, with the saved weights put in place of the random
    ones (assigned, so int8 tensors stay int8), and its tokenizer."""
    import torch
    import transformers

    if int8:  # registers its tensor types with torch.load's weights_only allow-list
        try:
            importlib.import_module("torchao")
        except ImportError as err:
            raise Unsupported("the int8 weights need torchao: pip install torchao==0.18.0") from err
    try:
        with quiet_transformers():
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
            config = transformers.AutoConfig.from_pretrained(folder)
            auto: Any = transformers.AutoModelForCausalLM
            module = auto.from_config(config, dtype=torch.float32)
        module.load_state_dict(torch.load(folder / WEIGHTS, weights_only=True), assign=True)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise BadInput(
            f"cannot read the model in {folder} ({first_line(err)}): write the "
            "directory again with mahir optimize --llm"
        ) from err
    return module.eval(), tokenizer
