"""llama.cpp as an LLM engine: a GGUF file run through llama.cpp's C API (llama-cpp-python).

The one invariant: a generation owns the context's KV cache from position 0. `prefill` clears
the cache and decodes the whole prompt in one `llama_decode` call (llama.cpp splits it into
micro-batches of `ubatch` tokens itself) asking logits of the last position only; each
`decode_one_token` then feeds the token just chosen at the next position. Which positions
return logits is a flag per token of a batch, so `logprobs` asks them for every position of its
one batch on the same context while generation pays for one row a step; the output buffer
grows once to the longest sequence judged.

Tokens are chosen in numpy by `generation.choose` from the logits llama.cpp hands back (its own
samplers are not used): greedy is the argmax, sampling the same seeded top-p as every engine.
llama.cpp computes in the weights' GGUF type (f32, Q8_0, Q4_K_M, ...) with an f16 KV cache.

Threads: llama.cpp runs a graph on `threads` OpenMP threads (`GGML_OPENMP`, on in the build
this installs). Its barriers between operations wait in OpenMP's own way: spinning while
another process holds a core stalls every step, so on a shared machine fewer threads than cores
can be faster, or waiting threads must sleep (`OMP_WAIT_POLICY=PASSIVE`). torch loads the same
libgomp first and it reads the policy once, so only the process's environment sets it: this
module reads it for `describe` and sets nothing (README, "Decoder LLMs", has the measurement).

llama.cpp logs through a callback that llama-cpp-python prints to `sys.stderr`; loading and
quantizing capture it (`captured_logs`) and an error's last line goes into the exception, so
users see one line. A runtime knows nothing of passes, search or serving.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import os
import weakref
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

from mahir.errors import BadInput, RuntimeFailure, Unsupported
from mahir.generation import Sampling, check_request, choose, decode_loop
from mahir.hardware import physical_cores
from mahir.runtimes.llamacpp_batching import LlamaCppBatch
from mahir.types import CPU, Artifact, Device

FILE_TYPES = {
    getattr(llama_cpp, name): name.removeprefix("LLAMA_FTYPE_")
    .removeprefix("MOSTLY_")
    .removeprefix("ALL_")
    for name in dir(llama_cpp)
    if name.startswith("LLAMA_FTYPE_") and name != "LLAMA_FTYPE_GUESSED"
}
"""llama.cpp's file types by number: 0 "F32", 7 "Q8_0", 15 "Q4_K_M", ..."""
FLASH_ATTENTION = {
    None: (llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO, "llama.cpp's choice"),
    True: (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED, "on"),
    False: (llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED, "off"),
}
"""`LlamaCppOptions.flash_attention` as llama.cpp's context setting, and as reports name it."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LlamaCppOptions:
    """How llama.cpp runs a GGUF."""

    threads: int | None = None
    """Threads of prefill and decode alike; default: the machine's physical cores."""
    context: int = 2048
    """Tokens the KV cache holds (prompt plus new, at most; the model's own context caps it)."""
    ubatch: int = 512
    """Tokens a prefill computes at once (llama.cpp's n_ubatch)."""
    slots: int = 1
    """Sequences decoded together (continuous batching, `llamacpp_batching.py`), each with a
    KV cache of `context` positions; 1: one generation at a time."""
    step_tokens: int = 256
    """With slots: the tokens one batched step feeds at most, decode tokens and prompt chunks
    together (at least `slots`)."""
    flash_attention: bool | None = None
    """Attention as one fused kernel; None: llama.cpp's choice (on wherever the backend has
    it). On CPUs its fused kernel slows as the context grows: SmolLM2-135M Q4_1 on a 2-core
    Xeon decoded at 10.9 / 20.2 / 26.7 ms a token with 32 / 512 / 1,024 tokens before it, and
    at 11.9 / 14.0 / 15.9 as separate matmuls and softmax (off)."""
    device: Device = CPU

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.context < 2:
            raise ValueError(f"context must be >= 2 tokens, got {self.context}")
        if self.ubatch < 1:
            raise ValueError(f"ubatch must be >= 1, got {self.ubatch}")
        if self.slots < 1 or self.step_tokens < self.slots:
            raise ValueError(
                f"slots must be >= 1 and step_tokens >= slots, got {self.slots}, {self.step_tokens}"
            )


class LlamaCppGenerator:
    """`Generator` over a llama.cpp model and context (`generation.Generator`)."""

    token_logprobs = True
    """Its streams yield `Token`s with their log-probabilities where `Sampling.logprobs` asks."""
    constrained = True
    """Its tokens are chosen by `generation.choose`, which follows `Sampling.constraint`."""

    max_concurrency: int
    """`slots`: one generation at a time on one context whose KV cache each generation clears,
    or that many decoded together in a context of that many sequences."""

    def __init__(self, path: Path, options: LlamaCppOptions, *, engine: str) -> None:
        self.engine = engine
        self.device = options.device
        self.max_concurrency = options.slots
        self._step_tokens = options.step_tokens
        self._path = path
        self._threads = options.threads or physical_cores()
        self._flash_attention = options.flash_attention
        self._native = _Native(_load(path))
        self._free = weakref.finalize(self, self._native.release)
        try:
            self._open(options)
        except BaseException:
            self._free()
            raise

    def _open(self, options: LlamaCppOptions) -> None:
        native, model = self._native, self._native.model
        self._vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
        self.context_length = min(options.context, llama_cpp.llama_model_n_ctx_train(model))
        size = self.context_length
        native.context = self._new_context(size, size, min(options.ubatch, size))
        native.batch = self._batch = llama_cpp.llama_batch_init(size, 0, 1)
        self._context = native.context
        self._tokens = np.ctypeslib.as_array(self._batch.token, shape=(size,))
        self._positions = np.ctypeslib.as_array(self._batch.pos, shape=(size,))
        self._wants = np.ctypeslib.as_array(self._batch.logits, shape=(size,))
        np.ctypeslib.as_array(self._batch.n_seq_id, shape=(size,))[:] = 1
        for i in range(size):  # every token belongs to sequence 0
            self._batch.seq_id[i][0] = 0
        self.batch: LlamaCppBatch | None = None
        """The continuous batch that runs every `stream` when `slots` > 1 (`_context` then
        serves `logprobs` only)."""
        if options.slots > 1:
            step = options.step_tokens
            context = self._new_context(size * options.slots, step, step, options.slots)
            native.batched_context = context
            native.batched_batch = llama_cpp.llama_batch_init(step, 0, 1)
            self.batch = native.batched = LlamaCppBatch(
                context,
                native.batched_batch,
                slots=options.slots,
                step_tokens=step,
                vocab=self._vocab,
            )

    def _new_context(self, positions: int, batch: int, ubatch: int, sequences: int = 1) -> Any:
        """A context of `positions` KV cells in all (split evenly among `sequences`, each
        attending to its own cells), decoding up to `batch` tokens per call."""
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = positions, batch, ubatch
        params.n_seq_max, params.kv_unified = sequences, False
        params.n_threads = params.n_threads_batch = self._threads
        params.flash_attn_type = FLASH_ATTENTION[self._flash_attention][0]
        params.no_perf = True
        with captured_logs() as logs:
            context = llama_cpp.llama_init_from_model(self._native.model, params)
        if not context:
            why = last_error(logs)
            raise RuntimeFailure(f"llama.cpp cannot make a context for {self._path.name}: {why}")
        return context

    def stream(self, prompt: Sequence[int], sampling: Sampling) -> Iterator[int]:
        self._check(prompt, sampling.max_new_tokens)  # at the call, not at the first token
        if self.batch is not None:
            return self.batch.stream(prompt, sampling)
        return decode_loop(prompt, sampling, self._prefill, self._decode_one_token, choose)

    def logprobs(self, tokens: Sequence[int]) -> np.ndarray:
        self._check(tokens, 0)
        self._clear()
        self._decode(tokens, 0, every=True)
        pointer = llama_cpp.llama_get_logits(self._context)
        logits = np.ctypeslib.as_array(pointer, shape=(len(tokens), self._vocab))
        shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
        log_norm = np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
        logprobs: np.ndarray = (shifted - log_norm).astype(np.float32)
        return logprobs

    def describe(self) -> dict[str, Any]:
        file_type = llama_cpp.llama_model_ftype(self._native.model)
        return {
            "engine": self.engine,
            "gguf_type": FILE_TYPES.get(file_type, str(file_type)),
            "tensor_types": tensor_types(self._path),
            "kv_cache": "f16",
            "flash_attention": FLASH_ATTENTION[self._flash_attention][1],
            "context": self.context_length,
            "slots": self.max_concurrency,
            "step_tokens": self._step_tokens,
            "weights_mb": llama_cpp.llama_model_size(self._native.model) / 2**20,
            "parameters": llama_cpp.llama_model_n_params(self._native.model),
            "threads": llama_cpp.llama_n_threads(self._context),
            "openmp": _built_with("OPENMP"),
            "repacked_weights": not _built_with("AMX_INT8"),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
            "device": str(self.device),
            "llama_cpp_python": llama_cpp.__version__,
            "file": self._path.name,
        }

    def close(self) -> None:
        """Free the model, its context and batch now rather than when collected."""
        self._free()

    def _prefill(self, prompt: Sequence[int]) -> np.ndarray:
        self._clear()
        return self._decode(prompt, 0)

    def _decode_one_token(self, token: int, position: int) -> np.ndarray:
        return self._decode((token,), position)

    def _decode(self, tokens: Sequence[int], start: int, *, every: bool = False) -> np.ndarray:
        """Run `tokens` at positions from `start`; the logits of the last one (a view that the
        next call overwrites)."""
        count = len(tokens)
        self._tokens[:count] = tokens
        self._positions[:count] = np.arange(start, start + count)
        self._wants[:count] = every
        self._wants[count - 1] = True
        self._batch.n_tokens = count
        status = llama_cpp.llama_decode(self._context, self._batch)
        if status != 0:
            raise RuntimeFailure(
                f"llama.cpp failed to decode {count} tokens at position {start} (status "
                f"{status}): open the engine again"
            )
        pointer = llama_cpp.llama_get_logits_ith(self._context, -1)
        return np.ctypeslib.as_array(pointer, shape=(self._vocab,))

    def _clear(self) -> None:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._context), True)

    def _check(self, tokens: Sequence[int], new: int) -> None:
        check_request(
            tokens, new, vocab=self._vocab, context=self.context_length, engine=self.engine
        )


def open_generator(
    artifact: Artifact, options: LlamaCppOptions = LlamaCppOptions(), *, engine: str = "llama.cpp"
) -> LlamaCppGenerator:
    """`artifact` (a GGUF file) as a `LlamaCppGenerator` on the CPU."""
    if artifact.format != "gguf" or artifact.path is None:
        raise Unsupported(f"the {engine} engine runs a GGUF file, not a {artifact.format} model")
    if options.device.kind != "cpu":
        raise Unsupported(f"{engine}: this llama.cpp build runs on the CPU only: use --device cpu")
    return LlamaCppGenerator(artifact.path, options, engine=engine)


def tensor_types(path: Path) -> dict[str, int]:
    """How many of a GGUF's tensors each type holds, most first: a file type names a mix, and
    k-quants fall back per tensor where rows are not whole super-blocks."""
    stat = path.stat()
    return dict(_tensor_types(path.resolve(), stat.st_size, stat.st_mtime_ns))


@functools.lru_cache(maxsize=64)
def _tensor_types(path: Path, size: int, mtime_ns: int) -> tuple[tuple[str, int], ...]:
    """`tensor_types` read once per version of a file (its size and time of change): gguf's
    reader parses every metadata array in Python, a tokenizer's ~100k strings in ~2 s on 2
    cores, and each engine opened on the file is described."""
    from gguf import GGUFReader

    counts = Counter(tensor.tensor_type.name for tensor in GGUFReader(path).tensors)
    return tuple(counts.most_common())


@contextlib.contextmanager
def captured_logs() -> Iterator[io.StringIO]:
    """llama.cpp's log lines during the block, kept instead of printed: llama-cpp-python's
    callback writes them to `sys.stderr`, which the block redirects (Python's object only; what
    C code writes to file descriptor 2 itself still shows)."""
    with contextlib.redirect_stderr(io.StringIO()) as logs:
        yield logs


def last_error(logs: io.StringIO) -> str:
    """The last line llama.cpp logged, for an exception's message."""
    lines = [line.strip() for line in logs.getvalue().splitlines() if line.strip()]
    return lines[-1] if lines else "no reason logged"


@functools.cache
def _load_backends() -> None:
    """Register llama.cpp's compute backends once per process. A build that links them in has
    its CPU backend already; one that builds them as plugins (`GGML_BACKEND_DL`, as some cached
    or prebuilt wheels are) has none until they are loaded from the package's library folder."""
    libraries = Path(llama_cpp.__file__).parent / "lib"
    # The name libllama links (libggml.so.0, the shortest versioned one): opening the file by
    # another name (libggml.so) maps a second copy, whose registry libllama never sees.
    linked = min(libraries.glob("libggml.so.*"), key=lambda name: len(name.name), default=None)
    ggml = ctypes.CDLL(str(linked or libraries / "libggml.so"))
    ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
    if ggml.ggml_backend_dev_count() == 0:
        ggml.ggml_backend_load_all_from_path(str(libraries).encode())
    if ggml.ggml_backend_dev_count() == 0:
        raise RuntimeFailure(
            "llama.cpp found no compute backend in its build: reinstall llama-cpp-python from "
            "source (make install)"
        )


@functools.cache
def _built_with(feature: str) -> bool:
    """Whether this llama.cpp build has `feature` ("OPENMP", "AMX_INT8", ...): its system info
    line reads "FEATURE = 1"."""
    return f"{feature} = 1".encode() in llama_cpp.llama_print_system_info()


def _load(path: Path) -> Any:
    if not path.is_file():
        raise BadInput(f"{path} does not exist: give a .gguf file")
    _load_backends()
    params = llama_cpp.llama_model_default_params()
    # A build with AMX kernels (-march=native on a CPU with AMX) crashed in their buffer type, one
    # of the "extra" ones weights are repacked into, at the first decode on a Xeon with AMX
    # (`ggml_backend_amx_mul_mat`; llama-cpp-python 0.3.36, upstream llama.cpp issue 20824):
    # there weights load without extra buffer types, the plain CPU kernels, which also leaves
    # out the AVX-512 repacking of Q4_0 and IQ4_NL.
    params.use_extra_bufts = not _built_with("AMX_INT8")
    with captured_logs() as logs:
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise BadInput(
            f"{path} is not a GGUF file llama.cpp can load ({last_error(logs)}): download it "
            "again, or give its Hugging Face folder"
        )
    return model


@dataclass
class _Native:
    """What llama.cpp allocated for one generator, freed in reverse order (`release`, once)."""

    model: Any
    context: Any = None
    batch: Any = None
    batched_context: Any = None
    batched_batch: Any = None
    batched: LlamaCppBatch | None = None

    def release(self) -> None:
        with captured_logs():  # freeing a context logs its buffer sizes
            if self.batched is not None:  # its thread out of llama.cpp before its context goes
                self.batched.stop_and_wait()
            for batch in (self.batched_batch, self.batch):
                if batch is not None:
                    llama_cpp.llama_batch_free(batch)
            for context in (self.batched_context, self.context):
                if context:
                    llama_cpp.llama_free(context)
            llama_cpp.llama_model_free(self.model)
