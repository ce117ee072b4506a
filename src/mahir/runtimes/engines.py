"""The LLM engines mahir can run a decoder on, each behind the one `Generator` interface.

`ENGINES` is written out by hand, as `RUNTIMES` is for one-forward sessions: to add an engine,
add a module with a function that opens an artifact as a `Generator` and one entry here. An
engine is opened with the `RuntimeOptions` every runtime takes (threads, device). Engine modules
import their framework at the top, so they are imported only when a generator opens.

Now: PyTorch, eager or with a static KV cache and a compiled decode step, in fp32 or bf16
(`runtimes/torch_generator.py`), on a live transformers model, one generation at a time or, with
`RuntimeOptions.slots`, that many decoded together (continuous batching,
`runtimes/torch_batching.py`); llama.cpp on a GGUF file (`runtimes/llamacpp.py`), likewise one at a
time or `slots` together (`runtimes/llamacpp_batching.py`); OpenVINO GenAI
on a stateful IR (`runtimes/openvino_genai.py`; the IR and its weight format come from
`export/openvino_llm.py`), with f32 compute and KV cache or with the CPU plugin's own choices;
vLLM's CPU build on a Hugging Face folder (`runtimes/vllm_cpu.py`), in bf16 or fp32, in an
environment of mahir's own.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from mahir.errors import BadInput, Unsupported
from mahir.generation import Generator
from mahir.types import Artifact, ArtifactFormat, RuntimeOptions

REFERENCE_ENGINE = "torch"
"""The engine whose answers on the fp32 original are the reference: PyTorch eager, fp32."""


@dataclass(frozen=True, slots=True)
class Engine:
    """An engine's name, how to open an artifact on it, and where it runs."""

    name: str
    open: Callable[[Artifact, RuntimeOptions], Generator]
    summary: str
    """One line for `--help` and reports."""
    devices: tuple[str, ...] = ("cpu", "cuda")
    format: ArtifactFormat = "torch"
    """The artifact it opens: a live torch module, a GGUF file, an OpenVINO IR folder, or a
    Hugging Face folder."""
    bf16: bool = False
    """Computes in bf16: emulated, slower than fp32, on CPUs without bf16 instructions."""
    package: str | None = "torch"
    """The module it imports; None: it runs in an environment of mahir's own, created when it
    first opens (`mahir.venvs`)."""
    install: str = ""
    """What to pip install for it, when that is not the module's name."""
    full_attention: bool = False
    """Runs only models whose every layer attends to all positions (`torch_lm.full_attention`):
    its preallocated, position-indexed cache holds no sliding window or linear attention."""
    slotted: bool = False
    """Runs requests at once as a continuous batch of `RuntimeOptions.slots` rows: mahir's own
    loop over the engine's steps (`runtimes/continuous.py`: PyTorch eager, llama.cpp, OpenVINO
    GenAI paged). vLLM schedules concurrent streams itself and takes no slots. Compiled PyTorch
    runs its batched step over every row and the whole cache, which a CPU does not repay
    (measured 13 tokens/s at 16 slots against 149 eager, SmolLM2-135M bf16), so it takes none."""

    def options_for(self, options: RuntimeOptions, requests: int) -> RuntimeOptions:
        """`options` for serving `requests` at once: that many slots where the engine batches by
        slots."""
        return dataclasses.replace(options, slots=requests) if self.slotted else options

    def missing(self) -> str | None:
        """What to pip install before this engine can run here, or None."""
        if self.package is None or importlib.util.find_spec(self.package):
            return None
        return self.install or self.package


def _torch(
    name: str, precision: Literal["fp32", "bf16"], compile: bool
) -> Callable[[Artifact, RuntimeOptions], Generator]:
    def open_torch(artifact: Artifact, options: RuntimeOptions) -> Generator:
        from mahir.runtimes.torch_generator import TorchEngineOptions, open_generator

        settings = TorchEngineOptions(
            precision=precision,
            compile=compile,
            threads=options.threads,
            slots=options.slots,
            device=options.device,
            **_step(options),
        )
        return open_generator(artifact, settings, engine=name)

    return open_torch


def _llamacpp(name: str, summary: str, *, flash_attention: bool | None = None) -> Engine:
    """A llama.cpp engine: attention as llama.cpp chooses, or with its fused kernel off."""

    def open_llamacpp(artifact: Artifact, options: RuntimeOptions) -> Generator:
        from mahir.runtimes.llamacpp import LlamaCppOptions, open_generator

        settings = LlamaCppOptions(
            threads=options.threads,
            slots=options.slots,
            flash_attention=flash_attention,
            device=options.device,
            **_step(options),
        )
        return open_generator(artifact, settings, engine=name)

    return Engine(
        name,
        open_llamacpp,
        summary,
        devices=("cpu",),
        format="gguf",
        package="llama_cpp",
        install="llama-cpp-python==0.3.36",
        slotted=True,
    )


def _step(options: RuntimeOptions) -> dict[str, int]:
    """`step_tokens` where the options set it; else the engine's own default stands."""
    return {} if options.step_tokens is None else {"step_tokens": options.step_tokens}


def _vllm(dtype: Literal["bf16", "fp32"]) -> Callable[[Artifact, RuntimeOptions], Generator]:
    def open_vllm(artifact: Artifact, options: RuntimeOptions) -> Generator:
        from mahir.runtimes.vllm_cpu import VllmOptions, open_generator

        settings = VllmOptions(
            dtype=dtype,
            threads=options.threads,
            device=options.device,
            prefix_caching=options.prefix_cache,
        )
        return open_generator(artifact, settings, engine="vllm" if dtype == "bf16" else "vllm-fp32")

    return open_vllm


def _openvino(
    name: str, summary: str, *, own_choices: bool = False, paged: bool = False, lookup: int = 0
) -> Engine:
    """An OpenVINO GenAI engine: f32 compute and KV cache unless `own_choices`; `lookup` draft
    tokens a step by prompt lookup."""

    def open_openvino(artifact: Artifact, options: RuntimeOptions) -> Generator:
        from mahir.runtimes.openvino_genai import OpenVinoLlmOptions, open_generator

        shared: dict[str, Any] = {"threads": options.threads, "paged": paged, "lookup": lookup}
        if paged:
            shared |= {"slots": options.slots, **_step(options)}
        make = OpenVinoLlmOptions.openvino_defaults if own_choices else OpenVinoLlmOptions
        settings = make(**shared)
        return open_generator(artifact, settings, engine=name)

    return Engine(
        name,
        open_openvino,
        summary,
        devices=("cpu",),
        format="openvino",
        package="openvino_genai",
        install="openvino-genai",
        slotted=paged,
    )


ENGINES: dict[str, Engine] = {
    "torch": Engine(
        "torch",
        _torch("torch", "fp32", False),
        "PyTorch eager, fp32, dynamic KV cache (the reference)",
        slotted=True,
    ),
    "torch-bf16": Engine(
        "torch-bf16",
        _torch("torch-bf16", "bf16", False),
        "PyTorch eager, bf16 (CPUs with avx512_bf16 or AMX)",
        bf16=True,
        slotted=True,
    ),
    "torch-compile": Engine(
        "torch-compile",
        _torch("torch-compile", "fp32", True),
        "PyTorch, static KV cache, decode step compiled by torch.compile, fp32",
        full_attention=True,
    ),
    "torch-compile-bf16": Engine(
        "torch-compile-bf16",
        _torch("torch-compile-bf16", "bf16", True),
        "PyTorch, static KV cache, decode step compiled by torch.compile, bf16",
        bf16=True,
        full_attention=True,
    ),
    "llama.cpp": _llamacpp(
        "llama.cpp",
        "llama.cpp on a GGUF file (its weights' type: f32, Q8_0, Q4_K_M, ...), f16 KV cache",
    ),
    "llama.cpp-fa-off": _llamacpp(
        "llama.cpp-fa-off",
        "llama.cpp with its fused (flash) attention kernel off: matmuls and softmax, which "
        "slow less than it as the context grows on CPUs",
        flash_attention=False,
    ),
    "openvino": _openvino(
        "openvino",
        "OpenVINO GenAI on a stateful IR, f32 compute and KV cache, no activation quantization",
    ),
    "openvino-lookup": _openvino(
        "openvino-lookup",
        "OpenVINO GenAI, f32, prompt lookup decoding: 4 tokens drafted a step from earlier text",
        lookup=4,
    ),
    "openvino-paged": _openvino(
        "openvino-paged",
        "OpenVINO GenAI, paged attention under its continuous-batching scheduler, f32",
        paged=True,
    ),
    "openvino-auto": _openvino(
        "openvino-auto",
        "OpenVINO GenAI, the CPU plugin's own precision, KV cache and activation quantization "
        "(bf16 / u8 / groups of 32 on CPUs with bf16)",
        own_choices=True,
    ),
    "openvino-auto-paged": _openvino(
        "openvino-auto-paged",
        "OpenVINO GenAI, the CPU plugin's own choices, paged attention under its "
        "continuous-batching scheduler",
        own_choices=True,
        paged=True,
    ),
    "vllm": Engine(
        "vllm",
        _vllm("bf16"),
        "vLLM's CPU build, bf16 (its default), paged KV cache, continuous batching, in its own "
        "environment",
        devices=("cpu",),
        format="hf",
        package=None,
        bf16=True,
    ),
    "vllm-fp32": Engine(
        "vllm-fp32",
        _vllm("fp32"),
        "vLLM's CPU build in fp32, in its own environment",
        devices=("cpu",),
        format="hf",
        package=None,
    ),
}


def get_engine(name: str) -> Engine:
    """The engine called `name`; an unknown name gets one line listing the known ones."""
    try:
        return ENGINES[name]
    except KeyError:
        raise BadInput(f"unknown LLM engine {name!r}: choose from {', '.join(ENGINES)}") from None


def open_engine(name: str, artifact: Artifact, options: RuntimeOptions) -> Generator:
    """Open `artifact` on the named engine, refusing a device or package it lacks."""
    engine = get_engine(name)
    if options.device.kind not in engine.devices:
        raise Unsupported(f"{name} runs on {' or '.join(engine.devices)} only")
    missing = engine.missing()
    if missing:
        raise Unsupported(f"{name} needs {missing}, which is not installed: pip install {missing}")
    return engine.open(artifact, options)
