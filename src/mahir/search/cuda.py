"""The candidates for a CUDA GPU: the one place that knows what is worth trying there.

On a GPU the question is not int8 instructions but how busy the device is kept. Small batches
are bound by kernel launches (eager BERT-base takes ~4-5 ms at batch 1 on an H200 whatever the
precision), so CUDA graphs (`torch-compile` on a GPU: one captured graph per shape bucket)
are proposed beside eager; big batches are bound by the matmuls, so fp16 and bf16 (tensor
cores) are proposed beside fp32, and by what crosses to the host, so a sentence encoder pools
inside the model (its token vectors are 128x the embedding at 128 tokens). bf16 needs compute
capability 8.0 (Ampere) or later. The baseline is the original, eager and fp32, on the same
GPU: the honest denominator for a GPU's speedup (the reference answers stay the CPU's fp32).

Sits beside `candidates.py`, which calls it for a CUDA device.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from mahir.errors import BadInput
from mahir.hardware import Machine
from mahir.model import Model
from mahir.passes.float8 import FP8_COMPUTE_CAPABILITY, TorchaoFloat8
from mahir.passes.fuse_qkv import FuseQKV
from mahir.passes.packing import PackSequences
from mahir.passes.pooling import PoolInModel
from mahir.passes.precision import Float16, TorchLowPrecision
from mahir.passes.torchao import INSTALL
from mahir.recipe import Recipe
from mahir.runtimes import get_runtime
from mahir.types import Device, RuntimeOptions

Entry = tuple[str, str, Recipe, str | None]
"""id, label, recipe, and why it is left out (None: proposed)."""


def cuda_baseline(model: Model, device: Device) -> tuple[str, str, Recipe]:
    """PyTorch eager fp32 on `device`; an ONNX source gets one line saying what to give."""
    if model.module is None:
        raise BadInput(
            f"{model.name} is an ONNX file, and on a GPU mahir runs PyTorch modules: give the "
            "Hugging Face folder or the module factory, or use --device cpu"
        )
    return "torch", f"PyTorch eager fp32 on {device}", Recipe((), "torch", _on(device))


def cuda_entries(model: Model, machine: Machine, device: Device) -> list[Entry]:
    """The GPU candidates, most promising first. A sentence encoder's pool inside the model,
    so that only the embedding leaves the GPU, and may run packed (no padding computed)."""
    on = _on(device)
    no_bf16 = _needs(machine, device, (8, 0), "bf16 tensor cores")
    no_fp8 = _needs(machine, device, FP8_COMPUTE_CAPABILITY, "fp8 tensor cores") or _no_torchao()
    pooled: tuple[Any, ...] = (PoolInModel(),) if model.family.pools else ()
    no_packing = None if pooled else "packing is for sentence encoders (it pools inside)"
    suffix = ", pooled on the GPU" if pooled else ""
    bf16, fp16 = TorchLowPrecision("bfloat16"), TorchLowPrecision("float16")
    fused = _fused_qkv(model)
    fp8 = (*fused, TorchaoFloat8())
    fp8_static = (*fused, TorchaoFloat8(scaling="static"))
    packed = PackSequences()
    graphs = "torch.compile + CUDA graphs over shape buckets"
    compiled, eager = "torch-compile", "torch"
    return [
        (
            "packed-bf16",
            f"{graphs}, bf16, packed sequences (no padding)",
            Recipe((bf16, packed), compiled, on),
            no_bf16 or no_packing,
        ),
        (
            "packed-fp16",
            f"{graphs}, fp16, packed sequences (no padding)",
            Recipe((fp16, packed), compiled, on),
            no_packing,
        ),
        (
            "packed-fp8-static",
            f"{graphs}, fp8 matmuls with calibrated scales (torchao), packed sequences",
            Recipe((bf16, *fp8_static, packed), compiled, on),
            no_fp8 or no_packing,
        ),
        (
            "packed-fp8",
            f"{graphs}, fp8 matmuls (torchao), packed sequences (no padding)",
            Recipe((bf16, *fp8, packed), compiled, on),
            no_fp8 or no_packing,
        ),
        (
            "cuda-graphs-fp8-static",
            f"{graphs}, fp8 matmuls with calibrated scales (torchao){suffix}",
            Recipe((bf16, *fp8_static, *pooled), compiled, on),
            no_fp8,
        ),
        (
            "cuda-graphs-fp8",
            f"{graphs}, fp8 matmuls (torchao){suffix}",
            Recipe((bf16, *fp8, *pooled), compiled, on),
            no_fp8,
        ),
        (
            "cuda-graphs-bf16",
            f"{graphs}, bf16{suffix}",
            Recipe((bf16, *pooled), compiled, on),
            no_bf16,
        ),
        (
            "cuda-graphs-fp16",
            f"{graphs}, fp16{suffix}",
            Recipe((fp16, *pooled), compiled, on),
            None,
        ),
        ("torch-bf16", f"PyTorch eager bf16{suffix}", Recipe((bf16, *pooled), eager, on), no_bf16),
        ("torch-fp16", f"PyTorch eager fp16{suffix}", Recipe((fp16, *pooled), eager, on), None),
        ("cuda-graphs", f"{graphs}, fp32{suffix}", Recipe(pooled, compiled, on), None),
    ]


def _fused_qkv(model: Model) -> tuple[FuseQKV, ...]:
    """`FuseQKV` before fp8 where the model has attention it fuses: fp8 casts each matmul's
    input, and q, k and v read one input (BERT-base 256x128 on an H100, static fp8: 1.35x eager
    bf16 fused against 1.27x not, GPU time; bf16 alone gains nothing from it)."""
    from mahir.fused_qkv import fusable

    module = model.module
    layers = module.modules() if module is not None else ()
    return (FuseQKV(),) if any(fusable(layer) for layer in layers) else ()


def _on(device: Device) -> RuntimeOptions:
    return RuntimeOptions(device=device)


def _needs(machine: Machine, device: Device, capability: tuple[int, int], what: str) -> str | None:
    gpus = machine.gpus
    if device.index < len(gpus) and gpus[device.index].compute_capability < capability:
        name, (major, minor) = gpus[device.index].name, capability
        return f"{name} has no {what} (compute capability {major}.{minor} or later)"
    return None


def _no_torchao() -> str | None:
    if importlib.util.find_spec("torchao") is None:
        return f"fp8 needs torchao: {INSTALL}"
    return None


def onnxruntime_entries(model: Model, device: Device) -> list[Entry]:
    """ONNX Runtime's GPU providers, after PyTorch's candidates: CUDA on an fp16 graph, and
    TensorRT (fp16 kernels allowed) on the fp32 one, pooled inside like the rest. Each is left
    out, with the reason, where this machine's onnxruntime lacks the provider (the CPU wheel).
    torch-tensorrt is not here: mahir has no runtime for it yet."""
    on = _on(device)
    pooled: tuple[Any, ...] = (PoolInModel(),) if model.family.pools else ()
    suffix = ", pooled on the GPU" if pooled else ""
    cuda, tensorrt = "onnxruntime", "onnxruntime-tensorrt"
    return [
        (
            "ort-cuda-fp16",
            f"ONNX Runtime, CUDA provider, fp16 graph{suffix}",
            Recipe((*pooled, Float16()), cuda, on),
            _lacks(cuda, device),
        ),
        (
            "ort-tensorrt-fp16",
            f"ONNX Runtime, TensorRT provider, fp16 kernels allowed{suffix}",
            Recipe(pooled, tensorrt, on),
            _lacks(tensorrt, device),
        ),
    ]


def _lacks(runtime: str, device: Device) -> str | None:
    chosen = get_runtime(runtime)
    missing = chosen.missing()
    return f"needs {missing}: pip install {missing}" if missing else chosen.unavailable(device)
