"""A transformers causal LM as the PyTorch LLM engine calls it: one forward with a KV cache, and a
prefill that keeps only the last position's logits.

Shared by the one-stream generator (`torch_generator.py`) and the continuous batch
(`torch_batching.py`), so that a sequence prefilled by either runs the very same forward. It
holds no generator state (no cache, no thread): the batch's engine thread keeps one without
keeping the generator alive. Imports torch only.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mahir.errors import RuntimeFailure, Unsupported, first_line


@dataclass(frozen=True, slots=True)
class CausalLM:
    """A causal LM module on its device, run with the engine's thread count."""

    module: Any
    where: torch.device
    threads: int
    cache_arg: str
    """The forward's name for the KV cache (transformers renamed `past_key_values` to `cache`)."""
    keep_last: bool
    """Whether the forward takes `logits_to_keep` (a prefill then projects one position)."""

    @classmethod
    def of(cls, module: Any, where: torch.device, threads: int) -> CausalLM:
        cache_arg = "cache" if _takes(module, "cache") else "past_key_values"
        return cls(module, where, threads, cache_arg, _takes(module, "logits_to_keep"))

    def forward(self, ids: torch.Tensor, cache: Any, **extra: Any) -> torch.Tensor:
        """(batch, len(ids), vocab) logits; `cache` takes the new keys and values."""
        out = self.module(input_ids=ids, use_cache=True, **{self.cache_arg: cache}, **extra)
        logits: torch.Tensor = out.logits
        return logits

    def prefill(self, prompt: Sequence[int], cache: Any, **extra: Any) -> torch.Tensor:
        """The logits after `prompt`'s last token (vocab,), `cache` filled with the prompt. Sets
        torch's process-wide thread count: a generation starts here."""
        torch.set_num_threads(self.threads)
        ids = torch.tensor([list(prompt)], device=self.where)
        if self.keep_last:
            extra["logits_to_keep"] = 1
        with torch.inference_mode():
            return self.forward(ids, cache, **extra)[0, -1]


WINDOWED = (
    "this model has sliding-window or linear attention layers, which the compiled static cache "
    "does not run: use the eager torch engine or llama.cpp"
)
"""Why a compiled engine refuses a model `full_attention` finds None for: said where it opens
and, before any work, where the bench and the search choose engines."""


def full_attention(config: Any) -> int | None:
    """The model's layer count where every layer attends to all positions; None where some
    have sliding windows or linear attention, whose caches a preallocated, position-indexed
    cache (the compiled step's, the continuous batch's) does not hold."""
    from transformers import DynamicCache, DynamicLayer

    layers = DynamicCache(config=config).layers
    full = [isinstance(layer, DynamicLayer) and not layer.is_sliding for layer in layers]
    return len(layers) if full and all(full) else None


Step = Callable[..., torch.Tensor]


def compile_step(step: Step, where: torch.device) -> Step:
    """`step` (a decode step: one shape per batch size) compiled for `where`.

    On a GPU a small model's step is hundreds of short kernels, bound by launches and by the
    skinny matmuls of a few rows: the weights are frozen into the compiled code (inductor's
    freezing: the projections that share an input, q/k/v and gate/up, become one matmul each)
    and the step replays as a CUDA graph captured here (`CapturedStep`). torch.compile's own
    graphs ("reduce-overhead") are not used: with frozen weights, torch 2.11 counts the step's
    writes to the static KV cache as mutated inputs and skips the graph (9.1 ms a token for
    SmolLM2-135M's shape on an H200, against 1.1).

    Matmuls are autotuned for one row only, as measured on H100s against transformers'
    compiled `generate` (`benchmarks/gpu_llm.py`, per-token ratios at one row, tokens/s at 32):
    at one row max-autotune's Triton kernels, the norms fused into them, beat cuBLAS
    (SmolLM2-135M's shape 2.50x against 1.73x, TinyLlama-1.1B's 2.20x against 1.64x); at 32 rows
    cuBLAS's do as well or better, and the step compiles in a fifth of the time (TinyLlama-1.1B's
    shape 2.52x against 1.71x, SmolLM2-135M's 2.48x against 2.57x). Each batch size compiles,
    and freezes its merged weights, once."""
    if where.type != "cuda":
        return torch.compile(step, fullgraph=True, dynamic=False)
    Options = dict[str, str | int | bool | Callable[..., Any]]
    frozen: Options = {"freezing": True}
    autotuned: Options = {**frozen, "max_autotune": True, "coordinate_descent_tuning": True}
    one_row = torch.compile(step, fullgraph=True, dynamic=False, options=autotuned)
    rows = torch.compile(step, fullgraph=True, dynamic=False, options=frozen)

    def by_rows(ids: torch.Tensor, *rest: Any) -> torch.Tensor:
        return (one_row if ids.shape[0] == 1 else rows)(ids, *rest)

    return CapturedStep(by_rows)


def static_cache(module: Any, batch: int, length: int, where: torch.device) -> Any:
    """transformers' static cache for `batch` sequences of `length` tokens, its tensors made
    now (not by the first forward that writes it, which may be a compiled prefill's)."""
    from transformers import StaticCache

    config = module.config
    cache = StaticCache(config=config, max_cache_len=length)
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    width = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dtype = next(module.parameters()).dtype
    with torch.inference_mode():
        cache.early_initialization(batch, heads, width, dtype, where)
    return cache


def compile_prefill(module: Any, where: torch.device) -> Any:
    """`module` as a compiled engine's prefills run it on `where`. On a GPU an eager forward is
    bound by its launches, not its arithmetic (SmolLM2-135M's shape on an H200: 40 ms for one
    128-token prompt, 61 ms for 32 of them), so it is compiled, with dynamic shapes (prompts
    differ in length) and without CUDA graphs (each length would capture its own). On a CPU
    the arithmetic bounds it: compiled, a 128-token prefill of that shape took 64 ms against
    79 eager on 2 cores, after compiling for 55-78 s per length class, so it stays eager."""
    if where.type != "cuda":
        return module
    return torch.compile(module, dynamic=True)


@dataclass(frozen=True, slots=True)
class _Replay:
    graph: torch.cuda.CUDAGraph
    arguments: tuple[Any, ...]
    """The graph's static inputs; the other arguments (the cache) held so they stay alive."""
    logits: torch.Tensor


class CapturedStep:
    """A CUDA decode step replayed as one CUDA graph per argument shapes: each call copies its
    tensor arguments into the graph's and replays it. The logits returned are the graph's own,
    valid until the next call (a step's logits are read before the next step is taken). Other
    arguments (the KV cache) are the graph's by identity: they must be the same objects each
    time, their tensors written in place.

    Every call takes exactly one step, never a rehearsal: transformers' static cache writes at
    its own counter, which each step advances (it ignores the step's `cache_position`), so a
    step run twice would write one position ahead. A shape's first call runs the step as it is
    (compiling it, autotuning its kernels); its second captures the graph, which runs nothing,
    then replays it once."""

    def __init__(self, step: Step) -> None:
        self._step = step
        self._ran: set[tuple[Any, ...]] = set()
        self._replays: dict[tuple[Any, ...], _Replay] = {}

    def __call__(self, *arguments: Any) -> torch.Tensor:
        key = tuple((a.shape, a.dtype) if isinstance(a, torch.Tensor) else id(a) for a in arguments)
        replay = self._replays.get(key)
        if replay is None:
            if key not in self._ran:
                self._ran.add(key)
                return self._step(*arguments)
            replay = self._replays[key] = self._capture(arguments)
        for static, argument in zip(replay.arguments, arguments, strict=True):
            if isinstance(argument, torch.Tensor):
                static.copy_(argument)
        replay.graph.replay()
        return replay.logits

    def _capture(self, arguments: tuple[Any, ...]) -> _Replay:
        static = tuple(_like(a) if isinstance(a, torch.Tensor) else a for a in arguments)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                logits = self._step(*static)
        except RuntimeError as err:  # a host synchronisation inside the model, most often
            raise RuntimeFailure(
                f"cannot capture this model's decode step as a CUDA graph: {first_line(err)}; "
                "use the eager torch engine"
            ) from err
        return _Replay(graph, static, logits)


def _like(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of `tensor` that torch.compile's guards take for it: made in inference mode only
    where `tensor` was (a mask made outside it and its copy made inside would compile the step
    again, inside the capture, where compiling cannot run)."""
    with torch.inference_mode(tensor.is_inference()):
        return tensor.clone()


def _takes(module: Any, name: str) -> bool:
    """Whether the model's forward takes keyword `name`: transformers renames arguments between
    releases (`past_key_values` became `cache`), and the old name warns."""
    return name in inspect.signature(module.forward).parameters


def context_of(config: Any) -> int:
    """The model's context length from its config."""
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise Unsupported("the model's config gives no context length (max_position_embeddings)")
