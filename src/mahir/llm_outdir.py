"""An LLM output directory (written by `mahir optimize --llm`): its model files, and opening it.

`model/` holds what the winning engine opens, beside the causal LM's config, generation config
and tokenizer (chat template included) as `save_pretrained` writes them: those give the family
(context length, stop tokens, vocabulary) without loading any weights. What the engine opens
depends on its format (`ENGINE_FILES`):
- PyTorch engines: the weights as a torch state dict (`weights.pt`). `save_pretrained` refuses
  torchao's int8 weight tensors, while `torch.save` keeps them bit for bit and `torch.load`
  reads them back with `weights_only` (torchao registers its tensor types as safe to load).
- llama.cpp: the GGUF file the search ran (`model.gguf`).
- OpenVINO GenAI: the stateful IR's folder as exported and verified (`openvino/`).
- vLLM: the reference as a Hugging Face folder (`hf/`: safetensors weights, config, tokenizer).
`mahir.json` names the format, the engine, its threads and the family's stop tokens;
`open_llm_output` opens all of it as the `Generator` the search timed, for a server to stream
from.

Imports runtimes, families and the low rooms; never passes or search, so serving stays free of
the optimizer (int8 weights are read as saved, not quantized again).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any

from mahir.errors import BadInput, Unsupported, first_line
from mahir.families.decoder import DECODER_SPEC, Decoder, decoder_family
from mahir.generation import Generator
from mahir.outdir import MANIFEST, read_manifest
from mahir.runtimes.engines import get_engine, open_engine
from mahir.silence import quiet_transformers
from mahir.types import Artifact, ArtifactFormat, RuntimeOptions

MODEL_FOLDER = "model"
ENGINE_FILES: dict[ArtifactFormat, str] = {
    "torch": "weights.pt",
    "gguf": "model.gguf",
    "openvino": "openvino/openvino_model.xml",
    "hf": "hf",
}
"""What each format's engine opens, relative to `model/` (`mahir.json`'s `model_file`)."""


def save_llm_model(artifact: Artifact, reference: Any, tokenizer: Any, folder: Path) -> str:
    """Write into the new folder `folder` what `artifact`'s engine opens, beside `reference`'s
    config (the fp32 causal LM the artifact was made from) and `tokenizer`; the path of the
    engine's file, relative to `folder`."""
    name = ENGINE_FILES.get(artifact.format)
    if name is None:
        raise Unsupported(f"an LLM output directory cannot hold a {artifact.format} model")
    folder.mkdir()
    reference.config.save_pretrained(folder)
    if getattr(reference, "generation_config", None) is not None:
        reference.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    target = folder / name
    if artifact.format == "torch":
        import torch

        torch.save(artifact.module.state_dict(), target)
    elif artifact.path is None:
        raise Unsupported(f"the {artifact.format} artifact has no file to save")
    elif artifact.format == "gguf":
        shutil.copyfile(artifact.path, target)
    elif artifact.format == "hf":  # the folder vLLM opens: weights, config and tokenizer
        shutil.copytree(artifact.path, target)
    else:  # the IR's folder: its .xml, .bin and the config its engine reads
        shutil.copytree(artifact.path.parent, target.parent)
    return name


def open_llm_output(
    out: str | os.PathLike[str], *, slots: int | None = None, step_tokens: int | None = None
) -> tuple[Generator, Decoder]:
    """The winner of `mahir optimize --llm` in `out`, on the engine and threads it won with,
    and its family (tokenizer, chat template, stop tokens). `slots`: decode that many requests
    together instead of the number recorded, `step_tokens` feeding that many tokens a step at
    most (an engine mahir batches by slots only)."""
    out = Path(out)
    manifest = read_manifest(out)
    try:
        if manifest["family"] != Decoder.kind or manifest["format"] not in ENGINE_FILES:
            raise ValueError(f"format {manifest['format']!r} of family {manifest['family']!r}")
        fmt: ArtifactFormat = manifest["format"]
        engine = str(manifest["engine"])
        options = RuntimeOptions.from_dict(manifest["options"])
        model_file = out / str(manifest["model_file"])
        torchao = bool(manifest.get("torchao"))
    except (KeyError, TypeError, ValueError) as err:
        raise BadInput(
            f"{out / MANIFEST} is not an LLM output directory mahir can open ({err}): write it "
            "again with mahir optimize --llm"
        ) from err
    options = dataclasses.replace(options, prefix_cache=True)  # a server's prompts repeat
    if slots is not None:
        if not get_engine(engine).slotted:
            raise BadInput(
                f"--slots sizes mahir's own continuous batch; the {engine} engine schedules "
                "requests itself: drop --slots"
            )
        options = dataclasses.replace(options, slots=slots, step_tokens=step_tokens)
    folder = out / MODEL_FOLDER
    config, generation, tokenizer = _read_config(folder)
    family = decoder_family(config, tokenizer, out, generation)
    if not model_file.exists():
        raise BadInput(
            f"{model_file} is missing: write the directory again with mahir optimize --llm"
        )
    if fmt == "torch":
        module = _read_module(model_file, config, torchao)
        artifact = Artifact("torch", DECODER_SPEC, module=module)
    else:
        artifact = Artifact(fmt, DECODER_SPEC, path=model_file)
    return open_engine(engine, artifact, options), family


def _read_config(folder: Path) -> tuple[Any, Any, Any]:
    """The causal LM's config, its generation config (None when not saved) and tokenizer."""
    import transformers

    try:
        with quiet_transformers():
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
            config = transformers.AutoConfig.from_pretrained(folder)
            generation = None
            if (folder / "generation_config.json").is_file():
                generation = transformers.GenerationConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as err:
        raise BadInput(
            f"cannot read the model's config and tokenizer in {folder} ({first_line(err)}): "
            "write the directory again with mahir optimize --llm"
        ) from err
    return config, generation, tokenizer


def _read_module(weights: Path, config: Any, torchao: bool) -> Any:
    """The causal LM built from its config, with the saved weights put in place of the random
    ones (assigned, so int8 tensors stay int8)."""
    import torch
    import transformers

    if torchao:  # registers its tensor types with torch.load's weights_only allow-list
        from mahir.passes.torchao import import_torchao

        import_torchao()
    try:
        with quiet_transformers():
            auto: Any = transformers.AutoModelForCausalLM
            module = auto.from_config(config, dtype=torch.float32)
        module.load_state_dict(torch.load(weights, weights_only=True), assign=True)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise BadInput(
            f"cannot read the weights in {weights} ({first_line(err)}): write the directory "
            "again with mahir optimize --llm"
        ) from err
    return module.eval()
