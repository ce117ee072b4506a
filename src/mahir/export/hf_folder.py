"""A decoder's fp32 reference as a Hugging Face folder: what engines and exporters that load a
model by themselves read (vLLM, `runtimes/vllm.py`; optimum-intel, `export/openvino_llm.py`).

A folder source is that folder. A .gguf source's reference is the folder `load_decoder` saved it
to when it first read the file (`families.decoder.gguf_reference_folder`), written again here
if it has gone since (`keep_reference`: whole or not at all).

Imports families.
"""

from __future__ import annotations

from pathlib import Path

from mahir.families.decoder import (
    DECODER_SPEC,
    LanguageModel,
    gguf_reference_folder,
    keep_reference,
    save_reference,
)
from mahir.types import Artifact


def reference_folder(llm: LanguageModel) -> Artifact:
    """The fp32 reference as a folder artifact: the source folder itself, or for a .gguf
    source the folder its fp32 reference is kept in."""
    folder = Path(llm.source)
    if llm.gguf:
        folder = gguf_reference_folder(folder)
        if not folder.is_dir():
            keep_reference(llm.module, llm.family.tokenizer, folder)
    meta = {"precision": "fp32", "parameters": llm.parameters, "source": llm.source}
    return Artifact("hf", DECODER_SPEC, path=folder, meta=meta)


def save_hf_folder(llm: LanguageModel, folder: Path) -> Path:
    """The fp32 reference and its tokenizer written as a Hugging Face folder."""
    save_reference(llm.module, llm.family.tokenizer, folder)
    return folder
