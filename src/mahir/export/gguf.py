"""A decoder's fp32 reference as an f32 GGUF file, the format llama.cpp runs and quantizes.

llama.cpp reads GGUF only. A `.gguf` source is run as it is (`source_gguf`); a Hugging Face
folder, and any source that llama.cpp's quantizer must start from full precision (the default
LLM ships in Q4_1), is written out from the fp32 reference's tensors with the `gguf` package
(`f32_gguf`): the same tensors every engine is judged against, so the f32 file reproduces the
reference and the quantized files made from it show llama.cpp's own quantization error only.

The writer covers the Llama architecture (SmolLM2, Llama 2/3 without rope scaling, TinyLlama),
as llama.cpp's `convert_hf_to_gguf.py` writes it: tensor names from gguf's own table, the
query and key rows permuted from Hugging Face's rotate-half layout to llama.cpp's interleaved
pairs, the byte-level BPE tokenizer with its merges, special ids and chat template. Other
architectures are refused in one line (that converter ships with llama.cpp's sources, not in
any installed package). Each file is checked in llama.cpp against the reference before it is
kept, and cached by the source's content hash in the user's cache folder (`files.cache_dir`).

Sits in export/, above runtimes (it runs what it wrote); knows nothing of passes or search.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from mahir.errors import ExportMismatch, Unsupported
from mahir.families.decoder import DECODER_SPEC, LanguageModel
from mahir.files import cache_dir, content_hash, slug, staged
from mahir.generation_quality import teacher_forced
from mahir.types import Artifact, RuntimeOptions

WRITER_VERSION = 1
"""Part of every cached file's key: bump it when what the writer puts in a file changes."""
WRITABLE = ("LlamaForCausalLM",)
MAX_KL = 1e-3
"""Mean KL(reference || llama.cpp) an f32 file may show on the check: llama.cpp's f16 KV cache
costs ~1e-5; a wrong permutation or name costs nats. Top-1 is not checked: near-ties flip."""


def source_gguf(llm: LanguageModel) -> Artifact:
    """What llama.cpp runs as the original: the source .gguf itself, else the f32 GGUF written
    from the reference."""
    if llm.gguf:
        path = Path(llm.source)
        return Artifact("gguf", DECODER_SPEC, path=path, meta={"sha256": content_hash(path)})
    return f32_gguf(llm)


def f32_gguf(llm: LanguageModel, *, folder: Path | None = None) -> Artifact:
    """The reference's tensors as an f32 GGUF in `folder` (default: the cache), written and
    checked in llama.cpp once per source content."""
    why = unwritable(llm)
    if why:
        raise Unsupported(why)
    key = _key(Path(llm.source))
    path = (folder or cache_dir() / "gguf") / f"{slug(llm.name)}-{key[:16]}-f32.gguf"
    if not path.is_file():
        with staged(path) as draft:
            write_llama_gguf(llm, draft)
            _verify(llm, draft)
    return Artifact("gguf", DECODER_SPEC, path=path, meta={"sha256": key, "gguf_type": "F32"})


def write_llama_gguf(llm: LanguageModel, path: Path) -> None:
    """The reference (a Llama causal LM) and its tokenizer as an f32 GGUF at `path`."""
    import gguf

    config = llm.module.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name(llm.name)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(_rope(config)["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    _add_tokenizer(writer, llm)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for name, tensor in llm.module.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reads the output layer from token_embd when output is absent
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise Unsupported(f"{llm.name}: no GGUF name for tensor {name}: not a plain Llama")
        array = tensor.detach().float().numpy()
        if target.startswith("blk.") and ".attn_q." in target:
            array = _interleave(array, heads)
        elif target.startswith("blk.") and ".attn_k." in target:
            array = _interleave(array, kv_heads)
        writer.add_tensor(target, np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _interleave(weights: np.ndarray, heads: int) -> np.ndarray:
    """Query/key rows from Hugging Face's rotate-half order (first half of each head's dims,
    then the second) to llama.cpp's rope on adjacent pairs: convert_hf_to_gguf's `permute`."""
    shape = weights.shape
    per_head = weights.reshape(heads, 2, shape[0] // heads // 2, *shape[1:])
    return per_head.swapaxes(1, 2).reshape(shape)


def _add_tokenizer(writer: Any, llm: LanguageModel) -> None:
    """A byte-level BPE tokenizer as llama.cpp's "gpt2" vocabulary: every id up to the model's
    vocabulary (ids the tokenizer lacks as unused pads), its merges and special tokens."""
    import gguf

    tokenizer = llm.family.tokenizer
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    if state["model"]["type"] != "BPE" or "ByteLevel" not in json.dumps(state["pre_tokenizer"]):
        raise Unsupported(
            f"{llm.name}: writing a GGUF covers byte-level BPE tokenizers (GPT-2, Llama 3, "
            "SmolLM), not this one: give a .gguf file made by llama.cpp's converter"
        )
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens = [by_id.get(index, f"[PAD{index}]") for index in range(llm.family.vocab_size)]
    types = [
        gguf.TokenType.UNUSED
        if index not in by_id
        else gguf.TokenType.NORMAL
        if index not in added
        else gguf.TokenType.CONTROL
        if added[index].special
        else gguf.TokenType.USER_DEFINED
        for index in range(llm.family.vocab_size)
    ]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(llm))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    merges = state["model"]["merges"]
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    for kind in ("bos", "eos", "unk", "pad"):
        special = getattr(tokenizer, f"{kind}_token_id", None)
        if special is not None:
            getattr(writer, f"add_{kind}_token_id")(special)
    writer.add_add_bos_token(_adds_bos(tokenizer))
    if isinstance(tokenizer.chat_template, str):
        writer.add_chat_template(tokenizer.chat_template)


def _pre_tokenizer(llm: LanguageModel) -> str:
    """How llama.cpp splits text before BPE: the source GGUF's choice when there is one (it
    names the model's regex, "smollm", "llama-bpe"), else llama.cpp's default. mahir passes
    token ids, so this matters only to whoever runs the file in llama.cpp's own tools."""
    if not llm.gguf:
        return "default"
    import gguf

    field = gguf.GGUFReader(llm.source).fields.get("tokenizer.ggml.pre")
    return str(field.contents()) if field is not None else "default"


def _adds_bos(tokenizer: Any) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def _rope(config: Any) -> dict[str, Any]:
    """Rope settings: transformers 5's `rope_parameters`, older releases' `rope_theta`."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return rope


def unwritable(llm: LanguageModel) -> str | None:
    """Why this writer cannot write `llm` as a GGUF (one line with the fix), or None."""
    architecture = type(llm.module).__name__
    config = llm.module.config
    fix = "give a .gguf file of it made by llama.cpp's convert_hf_to_gguf.py"
    if architecture not in WRITABLE:
        return f"writing a GGUF covers {', '.join(WRITABLE)}, not {architecture}: {fix}"
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return f"writing a GGUF covers Llama without biases, and {llm.name} has them: {fix}"
    rope = _rope(config).get("rope_type", "default")
    if rope != "default":  # Llama 3.1's and YaRN's need rope tensors the writer does not make
        return f"writing a GGUF covers unscaled rope, and {llm.name} scales it ({rope}): {fix}"
    return None


def _verify(llm: LanguageModel, path: Path) -> None:
    """The written file in llama.cpp against the reference in torch, teacher-forced on held-out
    text: a mean KL under `MAX_KL`. The reference runs on the module as it is, leaving torch's
    process-wide thread count to whoever set it."""
    import torch

    from mahir.runtimes.engines import open_engine

    tokens = llm.family.held_out(passages=1, tokens=64)[0]
    with torch.inference_mode():
        logits = llm.module(input_ids=torch.tensor([tokens])).logits[0]
    reference = torch.log_softmax(logits.float(), dim=-1).numpy()
    written = open_engine("llama.cpp", Artifact("gguf", DECODER_SPEC, path=path), RuntimeOptions())
    forced = teacher_forced([written.logprobs(tokens)], [reference], [tokens])
    if not forced["kl_mean"] <= MAX_KL:
        raise ExportMismatch(
            f"the f32 GGUF written for {llm.name} disagrees with the reference in llama.cpp "
            f"(mean KL {forced['kl_mean']:.2g} > {MAX_KL}): report it with the model's config.json"
        )


def _key(source: Path) -> str:
    """The cached file's name: the source's content, the writer's and the gguf package's
    versions (what the file depends on)."""
    import gguf

    version = getattr(gguf, "__version__", "")
    parts = f"{content_hash(source)}\0{WRITER_VERSION}\0{version}"
    return hashlib.sha256(parts.encode()).hexdigest()
