"""PyTorch as an LLM engine: a transformers causal LM driven token by token with its KV cache.

The one invariant: `prefill` runs the whole prompt in one forward, which fills the cache and keeps
only the last position's logits; then each `decode_one_token` feeds the token just chosen at the
next position and reads everything the cache holds. So time to first token grows with the
prompt, and time per token with the weights read once per step (plus the cache). Two caches:
- dynamic (`DynamicCache`): grows by concatenation, any length; shapes change every step, so
  the step runs eager;
- static (`StaticCache`): preallocated to `max_cache_len` tokens and written in place, so the
  decode step has one shape and `torch.compile` (inductor) compiles it once, when the generator
  opens (minutes on 2 cores). Attention then reads all `max_cache_len` rows every step, the
  empty ones masked: size it to the work, not to the model's context.
bf16 halves the bytes read per token, and only pays on CPUs that compute in it (avx512_bf16 or
AMX); elsewhere it is emulated and slower than fp32, so it is refused there with the reason.
`logprobs` is one eager forward over the whole sequence with the engine's weights and precision;
the compiled decode step is checked by greedy continuations (`mahir.generation_quality`).

Tokens are chosen by `generation.choose` (greedy in torch, without copying the logits out).
Torch's thread count is process-wide: each generation and each `logprobs` sets the generator's
own, so generators with different thread counts can take turns in one process (as a search
timing them interleaved does). A runtime knows nothing of passes, search or serving.
"""

from __future__ import annotations

import copy
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import torch

from mahir.errors import Unsupported
from mahir.generation import Sampling, check_request, check_shared, choose, decode_loop
from mahir.hardware import Machine, detect, physical_cores
from mahir.runtimes import torch_attention
from mahir.runtimes.torch_batching import ContinuousBatch
from mahir.runtimes.torch_lm import (
    WINDOWED,
    CausalLM,
    compile_prefill,
    compile_step,
    context_of,
    full_attention,
    static_cache,
)
from mahir.types import CPU, Artifact, Device, module_mb

BF16_ISA = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True, slots=True, kw_only=True)
class TorchEngineOptions:
    """How the PyTorch engine runs a causal LM."""

    precision: Literal["fp32", "bf16"] = "fp32"
    """Weights, activations and KV cache in this dtype (logits are read in fp32)."""
    compile: bool = False
    """Static KV cache and a decode step compiled by torch.compile when the generator opens."""
    max_cache_len: int = 2048
    """Tokens the static cache holds (prompt plus new, at most); the dynamic cache ignores it."""
    threads: int | None = None
    """Torch's intra-op threads; default: the machine's physical cores."""
    slots: int = 1
    """Sequences decoded together: above 1, concurrent `stream` calls join one batch between
    decode steps (`torch_batching.py`), over a KV cache preallocated for `slots` sequences of
    `max_cache_len` tokens, eager or compiled."""
    step_tokens: int = 256
    """With slots: prompt tokens prefilled per step at most (a long prompt goes in chunks)."""
    device: Device = CPU

    def __post_init__(self) -> None:
        if self.slots < 1 or self.step_tokens < 1:
            raise ValueError(
                f"slots and step_tokens must be >= 1, got {self.slots} and {self.step_tokens}"
            )
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision is fp32 or bf16, got {self.precision!r}")
        if self.max_cache_len < 2:
            raise ValueError(f"max_cache_len must be >= 2, got {self.max_cache_len}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")


class TorchGenerator:
    """`Generator` over a transformers causal LM (`generation.Generator`)."""

    token_logprobs = True
    """Its streams yield `Token`s with their log-probabilities where `Sampling.logprobs` asks."""
    constrained = True
    """Its tokens are chosen by `generation.choose`, which follows `Sampling.constraint`."""

    max_concurrency: int
    """`slots`: one generation at a time on its own cache (torch's thread count is
    process-wide), or that many decoded together as one batch."""

    def __init__(self, module: Any, options: TorchEngineOptions, *, engine: str) -> None:
        self.engine = engine
        self.device = options.device
        self.max_concurrency = options.slots
        self._options = options
        self._threads = options.threads or physical_cores()
        self._module = module
        self._where = torch.device("cpu" if options.device.kind == "cpu" else str(options.device))
        self._lm = CausalLM.of(module, self._where, self._threads)
        positions = context_of(module.config)
        preallocated = options.compile or options.slots > 1
        self.context_length = min(positions, options.max_cache_len) if preallocated else positions
        self._vocab = int(module.config.vocab_size)
        self._pinned: torch.Tensor | None = None
        """Host memory greedy tokens are copied into, asynchronously (`_to_host`)."""
        self._statics: dict[int, Any] = {}
        """Static caches by batch size (a cache's tensors take the batch of its first use)."""
        self._step = self._eager_step
        self._prefills = self._lm
        """What prefills run: the module itself, or compiled for them (`compile_prefill`)."""
        self.compile_s: float | None = None
        self.batch: ContinuousBatch | None = None
        """The continuous batch that runs every `stream` when `slots` > 1."""
        if options.slots > 1:
            self.batch = ContinuousBatch(
                self._lm,
                slots=options.slots,
                length=self.context_length,
                compiled=options.compile,
                step_tokens=options.step_tokens,
            )
            weakref.finalize(self, self.batch.stop)  # its thread ends with the generator
        elif options.compile:
            self._step = compile_step(self._eager_step, self._where)
            self._prefills = replace(self._lm, module=compile_prefill(module, self._where))
        if options.compile:
            started = time.perf_counter()
            list(self.stream([0], Sampling(max_new_tokens=3)))  # compiles here, not when timed
            self.compile_s = time.perf_counter() - started

    def stream(self, prompt: Sequence[int], sampling: Sampling) -> Iterator[int]:
        self._check(prompt, sampling.max_new_tokens)  # at the call, not at the first token
        if self.batch is not None:
            return self._joined(self.batch, prompt, sampling)
        cache = self._new_cache(1)
        if self._compiled and sampling.argmax_only:
            return self._stream_on_device(prompt, sampling, cache)
        return decode_loop(
            prompt,
            sampling,
            lambda ids: self._prefill(ids, cache),
            lambda token, position: self._decode_one_token(token, position, cache),
            self._choose,
        )

    def _joined(
        self, batch: ContinuousBatch, prompt: Sequence[int], sampling: Sampling
    ) -> Iterator[int]:
        """The batch's stream, holding this generator: the batch's thread ends with it."""
        yield from batch.stream(prompt, sampling)

    def _stream_on_device(
        self, prompt: Sequence[int], sampling: Sampling, cache: Any
    ) -> Iterator[int]:
        stops = frozenset(sampling.stop_token_ids)
        logits = self._prefill(prompt, cache)[None]
        with torch.inference_mode():
            for (token,) in self._steps(logits, cache, len(prompt), sampling, []):
                yield token
                if token in stops:
                    return

    def generate_batch(
        self, prompts: Sequence[Sequence[int]], sampling: Sampling
    ) -> list[list[int]]:
        """Several prompts at once, left-padded into one cache (the padding masked), so each
        weight read serves every sequence: each one's new tokens, up to and including its stop
        token, as `stream` gives them for that prompt alone (greedily: up to the rounding a
        batched matmul may change). Sampled rows draw from generators spawned from `seed`.
        With slots, the prompts join the continuous batch instead, `slots` at a time."""
        check_shared(sampling)
        for prompt in prompts:
            self._check(prompt, sampling.max_new_tokens)
        if self.batch is not None:
            return self.batch.generate(prompts, sampling)
        batch, longest = len(prompts), max(len(p) for p in prompts)
        self._check([0] * longest, sampling.max_new_tokens)  # the padded prompt must fit too
        torch.set_num_threads(self._threads)
        width = self.context_length if self._compiled else longest + sampling.max_new_tokens
        ids = torch.zeros((batch, longest), dtype=torch.long)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, longest - len(prompt) :] = torch.tensor(list(prompt))
            mask[row, longest - len(prompt) : longest] = 1
        ids, mask = ids.to(self._where), mask.to(self._where)
        positions = (mask[:, :longest].cumsum(-1) - 1).clamp(min=0)
        cache = self._new_cache(batch)
        extra: dict[str, Any] = {"logits_to_keep": 1} if self._lm.keep_last else {}
        with torch.inference_mode():
            logits = self._prefills.forward(
                ids,
                cache,
                attention_mask=mask if self._compiled else mask[:, :longest],
                position_ids=positions,
                cache_position=torch.arange(longest, device=self._where),
                **extra,
            )[:, -1]
            seeds = np.random.SeedSequence(sampling.seed).spawn(batch)
            rngs = [np.random.default_rng(seed) for seed in seeds]
            return self._batched_decode(
                logits, mask, positions[:, -1:] + 1, longest, cache, sampling, rngs
            )

    def _batched_decode(
        self,
        logits: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        slot: int,
        cache: Any,
        sampling: Sampling,
        rngs: list[np.random.Generator],
    ) -> list[list[int]]:
        """Each row's tokens up to its stop token or `max_new_tokens`."""
        stops = frozenset(sampling.stop_token_ids)
        out: list[list[int]] = [[] for _ in rngs]
        running = set(range(len(rngs)))
        for chosen in self._steps(logits, cache, slot, sampling, rngs, mask, positions):
            for row in list(running):
                out[row].append(chosen[row])
                if chosen[row] in stops:
                    running.discard(row)
            if not running:
                break
        return out

    def _steps(
        self,
        logits: torch.Tensor,
        cache: Any,
        slot: int,
        sampling: Sampling,
        rngs: list[np.random.Generator],
        mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> Iterator[list[int]]:
        """Every row's token at each step, `max_new_tokens` steps at most (the caller stops
        earlier by closing it). Each step feeds the tokens just chosen at the next slot of the
        cache (every row writes the same slot: a batch's padding keeps them aligned). Greedy
        tokens never leave the device between steps: the next step is queued before the host
        reads this one's tokens, so on a GPU the host's work hides behind the step's."""
        slots = torch.tensor([slot], device=self._where)
        for count in range(1, sampling.max_new_tokens + 1):
            if sampling.greedy:
                tokens = torch.argmax(logits, dim=-1)
                read = self._to_host(tokens)
            else:
                rows = logits.float().cpu().numpy()
                chosen = [choose(rows[i], sampling, rng) for i, rng in enumerate(rngs)]
                tokens = torch.tensor(chosen, device=self._where)
            if count < sampling.max_new_tokens:
                seen = None
                if mask is not None:
                    mask[:, slot + count - 1] = 1
                    # the dynamic cache is as long as what it has seen
                    seen = mask if self._compiled else mask[:, : slot + count]
                logits = self._step(tokens[:, None], slots, cache, seen, positions)
                slots += 1
                if positions is not None:
                    positions = positions + 1
            yield read() if sampling.greedy else chosen

    def _to_host(self, tokens: torch.Tensor) -> Callable[[], list[int]]:
        """Start copying `tokens` to the host; the returned call waits for the copy alone."""
        if self._where.type != "cuda":
            return tokens.tolist
        if self._pinned is None or self._pinned.numel() != tokens.numel():
            self._pinned = torch.empty(tokens.numel(), dtype=tokens.dtype, pin_memory=True)
        pinned = self._pinned
        pinned.copy_(tokens, non_blocking=True)
        copied = torch.cuda.Event()  # type: ignore[no-untyped-call]
        copied.record()

        def read() -> list[int]:
            copied.synchronize()
            values: list[int] = pinned.tolist()
            return values

        return read

    def logprobs(self, tokens: Sequence[int]) -> np.ndarray:
        self._check(tokens, 0)
        torch.set_num_threads(self._threads)
        with torch.inference_mode():
            ids = torch.tensor([list(tokens)], device=self._where)
            logits = self._module(input_ids=ids, use_cache=False).logits[0]
            return torch.log_softmax(logits.float(), dim=-1).cpu().numpy()

    def describe(self) -> dict[str, Any]:
        return {
            "engine": self.engine,
            "precision": self._options.precision,
            "kv_cache": self._kv_cache,
            "max_cache_len": None if self._kv_cache == "dynamic" else self.context_length,
            "compiled": self._options.compile,
            "compiled_prefill": self._prefills.module is not self._lm.module,
            "attention": self._module.config._attn_implementation,
            "slots": self._options.slots,
            "step_tokens": self._options.step_tokens,
            "compile_s": self.compile_s,
            "weights_mb": module_mb(self._module),
            "threads": self._threads,
            "device": str(self.device),
            "torch": torch.__version__,
        }

    def close(self) -> None:
        """Stop the continuous batch's engine thread (its KV cache goes with it); the module
        belongs to the caller."""
        if self.batch is not None:
            self.batch.stop()

    @property
    def _kv_cache(self) -> str:
        if self.batch is not None:
            return "slots"  # a row per sequence, preallocated
        return "static" if self._options.compile else "dynamic"

    @property
    def _compiled(self) -> bool:
        return self._options.compile

    def _new_cache(self, batch: int) -> Any:
        """A fresh dynamic cache, or the static cache of this batch size, reset."""
        if not self._compiled:
            from transformers import DynamicCache

            return DynamicCache(config=self._module.config)
        if batch not in self._statics:
            self._statics[batch] = static_cache(
                self._module, batch, self.context_length, self._where
            )
        with torch.inference_mode():  # its tensors were made in inference mode
            self._statics[batch].reset()
        return self._statics[batch]

    def _prefill(self, prompt: Sequence[int], cache: Any) -> torch.Tensor:
        if not self._compiled:
            return self._lm.prefill(prompt, cache)
        return self._prefills.prefill(
            prompt, cache, cache_position=torch.arange(len(prompt), device=self._where)
        )

    def _decode_one_token(self, token: int, position: int, cache: Any) -> torch.Tensor:
        ids = torch.tensor([[token]], device=self._where)
        with torch.inference_mode():
            if not self._compiled:  # the dynamic cache knows its own length
                return self._lm.forward(ids, cache)[0, -1]
            return self._step(ids, torch.tensor([position], device=self._where), cache)[0]

    def _eager_step(
        self,
        ids: torch.Tensor,
        slot: torch.Tensor,
        cache: Any,
        mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One decode step (what torch.compile compiles on the static cache): `ids` at cache
        `slot`; a batch's padding `mask` and each row's `positions` where rows differ.
        transformers' static cache writes at a counter of its own, which each forward advances
        (it ignores `slot`): the two agree because every step runs exactly once after the
        prefill of a reset cache, so a step must never be run twice, not even to warm up.
        Positions always go in as a tensor: a model that would count them from the cache
        (Mistral) reads a Python int there, and the compiled step would be compiled again for
        every position until torch.compile gives up."""
        extra: dict[str, Any] = {"position_ids": slot[None] if positions is None else positions}
        if mask is not None:
            extra["attention_mask"] = mask
        return self._lm.forward(ids, cache, cache_position=slot, **extra)[:, -1]

    def _choose(self, logits: torch.Tensor, sampling: Sampling, rng: np.random.Generator) -> int:
        if sampling.argmax_only:
            return int(torch.argmax(logits))
        return choose(logits.float().cpu().numpy(), sampling, rng)

    def _check(self, tokens: Sequence[int], new: int) -> None:
        check_request(
            tokens, new, vocab=self._vocab, context=self.context_length, engine=self.engine
        )


def open_generator(
    artifact: Artifact,
    options: TorchEngineOptions = TorchEngineOptions(),
    *,
    engine: str = "torch",
    machine: Machine | None = None,
) -> TorchGenerator:
    """`artifact` (a live transformers causal LM) as a `TorchGenerator`: converted to bf16,
    moved to a GPU or compiled on a copy (the artifact's module stays the fp32 CPU reference);
    compiled, with grouped attention for its decode steps (`torch_attention`)."""
    module = artifact.module
    if artifact.format != "torch" or module is None or not hasattr(module, "config"):
        raise Unsupported(f"the {engine} engine runs a live transformers causal LM")
    if options.precision == "bf16" and options.device.kind == "cpu":
        machine = machine or detect(gpus=False)
        if not any(machine.has(flag) for flag in BF16_ISA):
            raise Unsupported(
                f"{engine}: bf16 on this CPU ({machine.cpu}: no avx512_bf16 or AMX) is emulated "
                "and slower than fp32: use fp32 or int8 weights"
            )
    if options.device.kind == "cuda" and not torch.cuda.is_available():
        raise Unsupported(f"{engine}: torch sees no CUDA GPU here: use --device cpu")
    if options.compile and full_attention(module.config) is None:
        raise Unsupported(f"{engine}: {WINDOWED}")
    dtype = torch.bfloat16 if options.precision == "bf16" else torch.float32
    if options.compile or dtype != torch.float32 or options.device.kind != "cpu":
        module = copy.deepcopy(module).to(device=str(options.device), dtype=dtype)
    if options.compile:  # its own copy: the artifact's module keeps transformers' attention
        torch_attention.use(module)
    return TorchGenerator(module.eval(), options, engine=engine)
