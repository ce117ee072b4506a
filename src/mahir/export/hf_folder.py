"""A decoder's fp32 reference as a Hugging Face folder: what engines and exporters that load a
model by themselves read (vLLM, `runtimes/vllm.py`; optimum-intel, `export/openvino_llm.py`).

A folder source is that folder. A .gguf source's reference (transformers dequantized it to fp32
when loading; `load_decoder` dropped the GGUF mark that `save_pretrained` refuses) is saved with
its tokenizer (`save_hf_folder`); for engines that read it at every open it is cached by the
source's content (`reference_folder`), written whole or not at all (`files.staged`).

Imports families, recipe (content hashes) and files.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from mahir.families.decoder import DECODER_SPEC, LanguageModel
from mahir.files import cache_dir, slug, staged
from mahir.recipe import content_hash
from mahir.types import Artifact

FORMAT_VERSION = 1
"""Part of a cached folder's key: bump it when what `save_hf_folder` writes changes."""


def reference_folder(llm: LanguageModel, *, cache: Path | None = None) -> Artifact:
    """The fp32 reference as a folder artifact: the source folder itself, or for a .gguf
    source the reference saved once per source content in `cache`."""
    folder = Path(llm.source)
    if llm.gguf:
        import transformers

        parts = f"{content_hash(folder)}\0{FORMAT_VERSION}\0{transformers.__version__}"
        key = hashlib.sha256(parts.encode()).hexdigest()[:16]
        folder = (cache or cache_dir() / "hf-llm") / f"{slug(llm.name)}-{key}"
        if not folder.is_dir():
            with staged(folder, folder=True) as draft:
                save_hf_folder(llm, draft)
    meta = {"precision": "fp32", "parameters": llm.parameters, "source": llm.source}
    return Artifact("hf", DECODER_SPEC, path=folder, meta=meta)


def save_hf_folder(llm: LanguageModel, folder: Path) -> Path:
    """The fp32 reference and its tokenizer written as a Hugging Face folder."""
    from mahir.silence import quiet_transformers

    with quiet_transformers():
        llm.module.save_pretrained(folder)
        llm.family.tokenizer.save_pretrained(folder)
    return folder
