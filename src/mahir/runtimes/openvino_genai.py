"""OpenVINO GenAI as an LLM engine: a stateful OpenVINO IR (the KV cache lives inside the model
as its state) run by `openvino_genai.LLMPipeline`, on token ids.

The IR comes from `export/openvino_llm.py` (optimum-intel, with NNCF weight compression). The
pipeline owns prefill, decode and sampling in C++; `stream` runs its `generate` on a thread and
yields each token id its streamer receives, as it arrives (closing the stream early cancels the
generation). mahir's family owns the tokenizer, so the pipeline is fed ids (`ov.Tensor`); the
tokenizer IRs beside the model (the export writes them) give GenAI the vocabulary its structured
outputs need: a constrained `Sampling` becomes GenAI's `StructuredOutputConfig` (xgrammar) from
the constraint's `Structure`, the JSON schema and the tool-call tags. xgrammar leaves JSON's
whitespace free, where mahir's own grammars write JSON compactly.

What decides fidelity is the runtime, not only the weights: left to itself the CPU plugin runs
in bf16 on CPUs with bf16 instructions, keeps the KV cache in u8 and quantizes activations on
the fly in groups of 32 (`DYNAMIC_QUANTIZATION_GROUP_SIZE`) before int8/int4 matmuls. Each is an
option here (`OpenVinoLlmOptions`), None meaning OpenVINO's own choice; the defaults pin all
three to f32 / off, so only the weights differ from the reference. `logprobs` cannot come from
the pipeline (it keeps only the last position's logits), so the same IR is also compiled with
`openvino.Core` with the same settings, on first use, and run once over the whole sequence from
an empty state: the distribution judged is the one the timed engine computes.

A runtime knows nothing of passes, search or serving.
"""

from __future__ import annotations

import json
import queue
import threading
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import openvino as ov
import openvino_genai as ov_genai

from mahir.errors import BadInput, RuntimeFailure, Unsupported, first_line
from mahir.generation import Sampling, Structure, check_request, check_shared
from mahir.hardware import physical_cores
from mahir.runtimes.openvino_batching import OpenVinoBatch
from mahir.types import CPU, Artifact

IR_FILE = "openvino_model.xml"
TOKENIZER_FILES = ("openvino_tokenizer.xml", "openvino_detokenizer.xml")
Float = Literal["f32", "bf16", "f16"]


@dataclass(frozen=True, slots=True, kw_only=True)
class OpenVinoLlmOptions:
    """How the CPU plugin runs the IR. None: OpenVINO's own choice on this CPU."""

    precision: Float | None = "f32"
    """INFERENCE_PRECISION_HINT: activations and matmuls (OpenVINO picks bf16 where the CPU
    has bf16 instructions)."""
    kv_cache_precision: Literal["f32", "bf16", "f16", "u8"] | None = "f32"
    """KV_CACHE_PRECISION (OpenVINO's choice on a CPU: u8)."""
    dynamic_quantization: int | None = 0
    """DYNAMIC_QUANTIZATION_GROUP_SIZE: activations quantized to int8 in groups of this many
    before compressed-weight matmuls; 0 off (OpenVINO's choice on a CPU: 32)."""
    paged: bool = False
    """Paged attention under GenAI's scheduler (`SchedulerConfig`), as continuous batching runs,
    instead of the stateful IR's own cache."""
    cache_gb: int = 1
    """KV cache the paged scheduler allocates."""
    slots: int = 1
    """Paged only: requests run together, as a continuous batch of GenAI's
    `ContinuousBatchingPipeline` driven step by step (`openvino_batching.py`); 1: one `generate`
    at a time."""
    step_tokens: int | None = None
    """Paged only: the most tokens one scheduler step batches, decode tokens and prompt chunks
    together (GenAI's `max_num_batched_tokens`, prompts split to fit); None: GenAI's (256)."""
    threads: int | None = None
    """INFERENCE_NUM_THREADS; default: the machine's physical cores."""
    lookup: int = 0
    """Prompt lookup decoding (GenAI's `prompt_lookup`): at each step, draft this many tokens
    that followed the latest n-gram's earlier occurrence in the prompt or the answer, and verify
    them in one pass; greedy answers stay the plain pipeline's. 0: off. The stateful pipeline
    only."""

    def __post_init__(self) -> None:
        if self.precision not in ("f32", "bf16", "f16", None):
            raise ValueError(f"precision is f32, bf16, f16 or None, got {self.precision!r}")
        if self.kv_cache_precision not in ("f32", "bf16", "f16", "u8", None):
            raise ValueError(
                f"kv_cache_precision is f32, bf16, f16, u8 or None, got {self.kv_cache_precision!r}"
            )
        if self.dynamic_quantization is not None and self.dynamic_quantization < 0:
            raise ValueError(f"dynamic_quantization must be >= 0, got {self.dynamic_quantization}")
        if self.cache_gb < 1:
            raise ValueError(f"cache_gb must be >= 1, got {self.cache_gb}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.slots < 1 or (self.slots > 1 and not self.paged):
            raise ValueError(f"slots must be >= 1, and above 1 only paged, got {self.slots}")
        if self.lookup < 0 or (self.lookup and self.paged):
            raise ValueError(f"lookup must be >= 0, and above 0 only unpaged, got {self.lookup}")

    @classmethod
    def openvino_defaults(cls, **changes: Any) -> OpenVinoLlmOptions:
        """Whatever the CPU plugin picks for this CPU: fastest, least faithful."""
        return cls(precision=None, kv_cache_precision=None, dynamic_quantization=None, **changes)

    def plugin_config(self) -> dict[str, Any]:
        """The CPU plugin's properties these options set."""
        config: dict[str, Any] = {"INFERENCE_NUM_THREADS": self.threads or physical_cores()}
        settings = {
            "INFERENCE_PRECISION_HINT": self.precision,
            "KV_CACHE_PRECISION": self.kv_cache_precision,
            "DYNAMIC_QUANTIZATION_GROUP_SIZE": self.dynamic_quantization,
        }
        return config | {key: value for key, value in settings.items() if value is not None}


class OpenVinoGenerator:
    """`Generator` over a stateful OpenVINO IR folder (`generation.Generator`)."""

    device = CPU
    max_concurrency: int
    """`slots`: GenAI's pipelines do not promise that `generate` may be called from several
    threads at once (the paged one batches only requests its own `generate` was given), so one
    at a time; or, paged with slots, that many requests of one `ContinuousBatchingPipeline`."""

    top_logprobs = 0
    """GenAI's sampler scores each chosen token (before temperature and top-p), no alternatives
    (`GenerationConfig.logprobs` above 1 counts as 1)."""

    def __init__(self, folder: Path, options: OpenVinoLlmOptions, *, engine: str) -> None:
        self.engine = engine
        self.max_concurrency = options.slots
        self.token_logprobs = options.slots > 1
        """Streams yield `Token`s where `Sampling.logprobs` asks: in the continuous batch, whose
        pipeline hands out each token's log-probability (the stateful and the single paged
        pipeline stream ids only)."""
        self.constrained = all((folder / name).is_file() for name in TOKENIZER_FILES)
        """Holds streams to `Sampling.constraint`'s structure: where the tokenizer IRs are
        beside the model (exports before they were written lack them)."""
        self._folder = folder
        self._options = options
        self._config = options.plugin_config()
        described = _config_json(folder)
        self.context_length = _positions(described, folder)
        self._vocab = _vocab(described, folder)
        self.batch: OpenVinoBatch | None = None
        """The continuous batch that runs every `stream` when `slots` > 1."""
        try:
            if options.slots > 1:
                scheduler = _scheduler(options)
                pipeline = ov_genai.ContinuousBatchingPipeline(
                    str(folder), scheduler, "CPU", self._config
                )
                self.batch = OpenVinoBatch(pipeline, generation_config, slots=options.slots)
                weakref.finalize(self, self.batch.stop)  # its thread ends with the generator
            else:
                extra: dict[str, Any] = {"prompt_lookup": True} if options.lookup else {}
                if options.paged:
                    extra["scheduler_config"] = _scheduler(options)
                self._pipe = ov_genai.LLMPipeline(str(folder), "CPU", **self._config, **extra)
        except RuntimeError as err:
            raise BadInput(f"{folder}: OpenVINO GenAI cannot open it ({first_line(err)})") from err
        self._forward: ov.CompiledModel | None = None

    def stream(self, prompt: Sequence[int], sampling: Sampling) -> Iterator[int]:
        new = sampling.max_new_tokens
        check_request(
            prompt, new, vocab=self._vocab, context=self.context_length, engine=self.engine
        )
        if sampling.logprobs is not None and not self.token_logprobs:
            raise Unsupported(
                f"{self.engine} generates inside a pipeline that reports no log-probabilities: "
                "serve a paged OpenVINO GenAI engine with --slots 2 or more, or use the "
                "PyTorch, llama.cpp or vLLM engine"
            )
        if sampling.logprobs is not None and sampling.logprobs > self.top_logprobs:
            raise Unsupported(
                f"{self.engine} reports each token's own log-probability, not the most likely "
                "alternatives beside it: ask for 0 of them"
            )
        if sampling.constraint is not None and not self.constrained:
            raise Unsupported(
                f"{self.engine}: {self._folder} has no tokenizer IR, which GenAI's structured "
                "outputs need: export the model again"
            )
        if self.batch is not None:
            return self.batch.stream(prompt, sampling)
        return self._generate(list(prompt), sampling)

    def _generate(self, prompt: list[int], sampling: Sampling) -> Iterator[int]:
        tokens: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        cancel = threading.Event()
        failed: list[Exception] = []

        def run() -> None:
            try:
                ids = ov.Tensor(np.array([prompt], dtype=np.int64))
                config = generation_config(sampling, self._options.lookup)
                self._pipe.generate(ids, config, _Streamer(tokens, cancel))
            except Exception as err:  # raised again on the caller's thread, translated
                failed.append(err)
            finally:
                tokens.put(None)

        thread = threading.Thread(target=run, name=f"{self.engine}-generate", daemon=True)
        thread.start()
        try:
            while (token := tokens.get()) is not None:
                yield token
        finally:
            cancel.set()  # the consumer stopped early: the next token ends the generation
            thread.join()
        if failed:
            raise RuntimeFailure(f"{self.engine}: generation failed: {first_line(failed[0])}")

    def generate_batch(
        self, prompts: Sequence[Sequence[int]], sampling: Sampling
    ) -> list[list[int]]:
        """Several prompts in one `generate` call, left-padded with an attention mask: the
        stateful pipeline runs them as one static batch, the paged one as requests its
        scheduler batches step by step. Each row's tokens equal what it gets alone (checked
        greedily on SmolLM2-135M's int8 IR for both)."""
        check_shared(sampling)
        new = sampling.max_new_tokens
        for prompt in prompts:
            check_request(
                prompt, new, vocab=self._vocab, context=self.context_length, engine=self.engine
            )
        if self.batch is not None:
            return self.batch.generate(prompts, sampling)
        longest = max(len(p) for p in prompts)
        ids = np.zeros((len(prompts), longest), dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            ids[row, longest - len(prompt) :] = prompt
            mask[row, longest - len(prompt) :] = 1
        inputs = ov_genai.TokenizedInputs(ov.Tensor(ids), ov.Tensor(mask))
        try:
            results = self._pipe.generate(inputs, generation_config(sampling, self._options.lookup))
        except RuntimeError as err:
            raise RuntimeFailure(f"{self.engine}: generation failed: {first_line(err)}") from err
        return [[int(t) for t in row] for row in results.tokens]

    def logprobs(self, tokens: Sequence[int]) -> np.ndarray:
        check_request(tokens, 0, vocab=self._vocab, context=self.context_length, engine=self.engine)
        request = self._forward_model().create_infer_request()
        n = len(tokens)
        request.reset_state()
        outputs = request.infer(
            {
                "input_ids": np.array([tokens], dtype=np.int64),
                "attention_mask": np.ones((1, n), dtype=np.int64),
                "position_ids": np.arange(n, dtype=np.int64)[None],
                "beam_idx": np.zeros(1, dtype=np.int32),
            }
        )
        logits = np.asarray(outputs["logits"][0], dtype=np.float64)
        shifted = logits - logits.max(axis=-1, keepdims=True)
        logprobs: np.ndarray = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
        return logprobs.astype(np.float32)

    def describe(self) -> dict[str, Any]:
        default = ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").to_string()
        options = self._options
        return {
            "engine": self.engine,
            "precision": options.precision or f"{default} (OpenVINO's choice)",
            "kv_cache_precision": options.kv_cache_precision or "OpenVINO's choice",
            "dynamic_quantization": options.dynamic_quantization,
            "kv_cache": "paged" if options.paged else "stateful",
            "prompt_lookup": options.lookup,
            "slots": options.slots,
            "step_tokens": options.step_tokens or "GenAI's (256)",
            "weight_format": _weight_format(self._folder),
            "weights_mb": (self._folder / IR_FILE).with_suffix(".bin").stat().st_size / 2**20,
            "threads": self._config["INFERENCE_NUM_THREADS"],
            "device": str(self.device),
            "openvino": ov.get_version(),
            "openvino_genai": ov_genai.__version__,
        }

    def close(self) -> None:
        """Stop the continuous batch's thread, if any; the pipelines free with this generator."""
        if self.batch is not None:
            self.batch.stop()

    def _forward_model(self) -> ov.CompiledModel:
        """The IR compiled for whole-sequence forwards, on first use (it holds a second copy of
        the weights, so only engines that are judged pay for it)."""
        if self._forward is None:
            ir = str(self._folder / IR_FILE)
            self._forward = ov.Core().compile_model(ir, "CPU", self._config)
        return self._forward


class _Streamer(ov_genai.StreamerBase):  # type: ignore[misc]
    """Hands each token id the pipeline makes to the consumer's queue; cancels when asked."""

    def __init__(self, tokens: queue.SimpleQueue[int | None], cancel: threading.Event) -> None:
        super().__init__()
        self._tokens, self._cancel = tokens, cancel

    def write(self, token: int | list[int]) -> ov_genai.StreamingStatus:
        for t in token if isinstance(token, list) else [token]:
            self._tokens.put(int(t))
        if self._cancel.is_set():
            return ov_genai.StreamingStatus.CANCEL
        return ov_genai.StreamingStatus.RUNNING

    def end(self) -> None:
        """Nothing to flush: the generating thread marks the end itself."""


def generation_config(sampling: Sampling, lookup: int = 0) -> ov_genai.GenerationConfig:
    """`sampling` as GenAI's config: only its stop tokens stop (the model's own eos does not,
    as in every mahir engine); an unseeded sample draws a fresh seed; `lookup` draft tokens a
    step from n-grams of up to 3 tokens."""
    config = ov_genai.GenerationConfig()
    if lookup:
        config.num_assistant_tokens, config.max_ngram_size = lookup, 3
    config.max_new_tokens = sampling.max_new_tokens
    config.logprobs = 0 if sampling.logprobs is None else 1  # the chosen token's own
    config.stop_token_ids = set(sampling.stop_token_ids)
    config.ignore_eos = not sampling.stop_token_ids  # it ignores stop_token_ids too
    if not sampling.greedy:
        config.do_sample = True
        config.temperature = sampling.temperature
        config.top_p = sampling.top_p
        seed = sampling.seed
        config.rng_seed = int(np.random.default_rng().integers(2**32)) if seed is None else seed
    if sampling.constraint is not None:
        config.structured_output_config = structured_output(sampling.constraint.structure)
    return config


def structured_output(structure: Structure) -> ov_genai.StructuredOutputConfig:
    """`structure` as GenAI's structured output: a JSON schema, or tagged blocks of one (one,
    or several a line apart), or else a JSON value of the alternative. GenAI's grammars take no
    choice between blocks that may repeat and a JSON value, so beside an alternative the answer
    is one block at most."""
    shapes = ov_genai.StructuredOutputConfig
    if structure.tags is None:
        return shapes(json_schema=json.dumps(structure.schema))
    opening, closing = structure.tags
    schema = shapes.JSONSchema(json.dumps(structure.schema))
    block = shapes.Tag(f"{opening}\n", schema, f"\n{closing}")
    if structure.alternative is not None:
        answer = shapes.JSONSchema(json.dumps(structure.alternative))
        return shapes(compound_grammar=shapes.Union(block, answer))
    if structure.repeat:
        return shapes(compound_grammar=shapes.TagsWithSeparator([block], "\n", at_least_one=True))
    return shapes(compound_grammar=block)


def open_generator(
    artifact: Artifact, options: OpenVinoLlmOptions, *, engine: str = "openvino"
) -> OpenVinoGenerator:
    """`artifact` (a stateful IR from `export/openvino_llm.py`) as an `OpenVinoGenerator`."""
    path = artifact.path
    if artifact.format != "openvino" or path is None or path.name != IR_FILE:
        raise Unsupported(
            f"the {engine} engine runs a stateful OpenVINO IR of an LLM "
            "(mahir.export.openvino_llm.export_llm makes one)"
        )
    if not path.is_file():
        raise BadInput(f"{path} does not exist: export the LLM again")
    return OpenVinoGenerator(path.parent, options, engine=engine)


def _scheduler(options: OpenVinoLlmOptions) -> ov_genai.SchedulerConfig:
    config = ov_genai.SchedulerConfig()
    config.cache_size = options.cache_gb
    if options.step_tokens is not None:
        config.max_num_batched_tokens = options.step_tokens
    return config


def _config_json(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise BadInput(f"{folder} has no readable config.json: export the LLM again") from err
    return config if isinstance(config, dict) else {}


def _positions(config: dict[str, Any], folder: Path) -> int:
    for key in ("max_position_embeddings", "n_positions"):
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    raise Unsupported(f"{folder}/config.json gives no context length (max_position_embeddings)")


def _vocab(config: dict[str, Any], folder: Path) -> int:
    vocab = config.get("vocab_size")
    if not isinstance(vocab, int) or vocab < 1:
        raise Unsupported(f"{folder}/config.json gives no vocab_size")
    return vocab


def _weight_format(folder: Path) -> str:
    """What the export recorded (`export/openvino_llm.py` writes mahir-export.json)."""
    try:
        return str(json.loads((folder / "mahir-export.json").read_text())["weights"]["format"])
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown"
