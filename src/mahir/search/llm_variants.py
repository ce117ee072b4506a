"""The LLM variants mahir can bench, search and replay: an engine (`runtimes/engines.py`) and
how its weights are made, with the reason a machine cannot run one.

PyTorch runs the original weights or torchao's int8 weight-only copy (`passes/torchao.py`);
llama.cpp runs a GGUF: the source file as it is (an f32 one written from the reference for a
folder, `export/gguf.py`), or llama.cpp's own quantizer's Q8_0, Q6_K, Q5_K_M, Q4_K_M, IQ4_NL or
Q4_0 made from the f32 file (`passes/gguf.py`), cached; OpenVINO GenAI runs a stateful IR in a
weight format (`export/openvino_llm.py`: exported once, then cached); vLLM runs the reference as
a Hugging Face folder (the source folder, or a .gguf source's reference saved once,
`export/hf_folder.py`), or its int8 weights-and-activations copy (`passes/w8a8.py`).
A variant's `weights` is also the one step of an LLM recipe (`WEIGHT_STEPS`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mahir.export.gguf import f32_gguf, source_gguf, unwritable
from mahir.export.hf_folder import reference_folder
from mahir.export.openvino_llm import LlmWeights, export_llm
from mahir.families.decoder import LanguageModel
from mahir.hardware import Machine
from mahir.passes.gguf import GgufQuantize, quantize_gguf
from mahir.passes.torchao import TorchaoInt8, quantize_linears
from mahir.passes.w8a8 import W8A8, w8a8_folder
from mahir.runtimes.engines import get_engine
from mahir.runtimes.torch_lm import WINDOWED, full_attention
from mahir.types import Artifact, Device, RuntimeOptions


@dataclass(frozen=True, slots=True)
class Variant:
    """What a row runs: an engine, and the weights it runs in the format the engine opens."""

    engine: str
    weights: TorchaoInt8 | GgufQuantize | LlmWeights | W8A8 | None = None
    """None: the original (for a GGUF engine, the source GGUF, or an f32 one written from the
    reference); `TorchaoInt8`: torchao's int8 weight-only copy; `GgufQuantize`: llama.cpp's
    quantizer over the f32 GGUF; `LlmWeights`: an OpenVINO IR exported with them; `W8A8`: a
    compressed-tensors folder of int8 weights and activations for vLLM."""

    @property
    def weights_label(self) -> str:
        if isinstance(self.weights, GgufQuantize):
            return f"GGUF {self.weights.type}"
        if isinstance(self.weights, LlmWeights):
            return f"OpenVINO IR {self.weights.tag()}"
        if isinstance(self.weights, W8A8):
            return f"int8 weights and activations ({self.weights.tag()})"
        return "int8 weight-only (torchao)" if self.weights else "original"


INT8 = TorchaoInt8(weight_only=True)
VARIANTS: dict[str, Variant] = {
    "torch": Variant("torch"),
    "torch-bf16": Variant("torch-bf16"),
    "torch-int8": Variant("torch", INT8),
    "torch-compile": Variant("torch-compile"),
    "torch-compile-bf16": Variant("torch-compile-bf16"),
    "torch-compile-int8": Variant("torch-compile", INT8),
    "llama.cpp": Variant("llama.cpp"),
    "llama.cpp-q8_0": Variant("llama.cpp", GgufQuantize("Q8_0")),
    "llama.cpp-q6_k": Variant("llama.cpp", GgufQuantize("Q6_K")),
    "llama.cpp-q5_k_m": Variant("llama.cpp", GgufQuantize("Q5_K_M")),
    "llama.cpp-q4_k_m": Variant("llama.cpp", GgufQuantize("Q4_K_M")),
    "llama.cpp-iq4_nl": Variant("llama.cpp", GgufQuantize("IQ4_NL")),
    "llama.cpp-q4_0": Variant("llama.cpp", GgufQuantize("Q4_0")),
    "llama.cpp-fa-off": Variant("llama.cpp-fa-off"),
    "llama.cpp-q8_0-fa-off": Variant("llama.cpp-fa-off", GgufQuantize("Q8_0")),
    "openvino": Variant("openvino", LlmWeights(format="fp32")),
    "openvino-int8": Variant("openvino", LlmWeights(format="int8")),
    "openvino-int8-paged": Variant("openvino-paged", LlmWeights(format="int8")),
    "openvino-int8-lookup": Variant("openvino-lookup", LlmWeights(format="int8")),
    "openvino-int4": Variant("openvino", LlmWeights(format="int4")),
    "openvino-int4-awq": Variant("openvino", LlmWeights(format="int4", data_aware=True)),
    "openvino-auto": Variant("openvino-auto", LlmWeights(format="fp32")),
    "openvino-auto-int8": Variant("openvino-auto", LlmWeights(format="int8")),
    "openvino-auto-int8-paged": Variant("openvino-auto-paged", LlmWeights(format="int8")),
    "vllm": Variant("vllm"),
    "vllm-w8a8": Variant("vllm", W8A8()),
    "vllm-w8a8-keep-down": Variant("vllm", W8A8(keep=("down_proj",))),
    "vllm-w8a8-head": Variant("vllm", W8A8(head=True)),
    "vllm-fp32": Variant("vllm-fp32"),
}
WEIGHT_STEPS: dict[str, type[Any]] = {
    cls.__name__: cls for cls in (TorchaoInt8, GgufQuantize, LlmWeights, W8A8)
}
"""The allow-list an LLM recipe's steps (a variant's `weights`) are read back against."""
DEFAULT_VARIANTS = (
    "torch", "torch-bf16", "torch-int8", "torch-compile", "llama.cpp", "llama.cpp-fa-off",
)  # fmt: skip
"""Measured when none is asked for (those the machine can run): each compiled variant costs
minutes of compiling on 2 cores before it is timed."""


def cannot_run(name: str, device: Device, machine: Machine, model: LanguageModel) -> str | None:
    """Why variant `name` cannot run `model` on `device` of this machine, in one phrase; None if
    it can."""
    variant = VARIANTS[name]
    engine = get_engine(variant.engine)
    if device.kind not in engine.devices:
        return f"{name} runs on {' or '.join(engine.devices)} only"
    if engine.missing():
        return f"{name} needs {engine.missing()} (pip install {engine.missing()})"
    bf16 = any(machine.has(flag) for flag in ("avx512_bf16", "amx_bf16"))
    if engine.bf16 and device.kind == "cpu" and not bf16:
        return f"{name}: bf16 on this CPU (no avx512_bf16 or AMX) is emulated, slower than fp32"
    if engine.full_attention and full_attention(model.module.config) is None:
        return f"{name}: {WINDOWED}"
    if engine.format == "gguf" and (variant.weights or not model.gguf):
        return f"{name}: {why}" if (why := unwritable(model)) else None
    return None


def variant_artifact(
    variant: Variant,
    model: LanguageModel,
    options: RuntimeOptions,
    on_step: Callable[[str], None] = lambda _step: None,
) -> Artifact:
    """The artifact the variant's engine opens, made here (GGUF files and OpenVINO IRs: found in
    the cache when made before)."""
    weights = variant.weights
    if isinstance(weights, GgufQuantize):
        return quantize_gguf(f32_gguf(model), weights)
    if isinstance(weights, LlmWeights):
        return export_llm(model, weights, threads=options.threads, on_step=on_step)
    if isinstance(weights, W8A8):
        return w8a8_folder(model, weights)
    engine = get_engine(variant.engine)
    if engine.format == "gguf":
        return source_gguf(model)
    if engine.format == "hf":
        return reference_folder(model)
    if isinstance(weights, TorchaoInt8):
        return quantize_linears(model.original(), weights, name=model.name)
    return model.original()
