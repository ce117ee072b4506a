"""int8 weights and int8 activations (W8A8) for vLLM: a decoder's linear layers as a
compressed-tensors checkpoint that vLLM runs with its int8 matmul kernels (oneDNN on CPUs).

Each linear layer of the decoder blocks keeps its weight as int8, symmetric, one scale per
output channel (round to nearest: the scale is the row's largest magnitude over 127), and
declares its inputs int8 too, quantized per token as they arrive (dynamic, symmetric), so a
matmul is int8 by int8 with int32 sums: on a CPU with VNNI, twice the multiply-adds a cycle of
bf16. The embedding stays as it is, in the engine's dtype; so does the output layer (often one
matrix tied to the embedding) unless `W8A8.head` asks for it too: then the folder unties them,
the output layer int8 like the others and the embedding as it was. A small model's output layer
is a large share of its weights (SmolLM2-135M: 28M of 135M parameters) and of a decode step's
time, and also the layer int8 hurts most: SmolLM2's loses 6% of its top-1 agreement by itself,
smoothed or not. This is the scheme llm-compressor calls W8A8 with dynamic per-token
activations, written here without it: the format is a folder of safetensors whose quantized
layers carry `weight` (int8) and `weight_scale`, and a `quantization_config` in config.json
that names the scheme (compressed-tensors' "int-quantized" format).

Activations are what int8 hurts: a few input channels carry values far above the rest, and one
scale per token spends the int8 range on them. SmoothQuant first moves that range into the
weights, exactly: an input channel j divided by s_j and the weight's column j multiplied by it
leave the product unchanged, with s_j = max|x_j|^alpha / max|w_j|^(1 - alpha) from the
reference's own activations on mahir's prompt text (never the held-out text). The division
folds into what feeds the layer: the RMSNorm's weight before the attention's q, k, v and the
MLP's gate and up projections, the up projection's rows before the down projection (its input
is silu(gate) * up, linear in up). Llama-shaped blocks (Llama, Mistral, Qwen2, SmolLM) are
smoothed; others are quantized as they are.

Cached by the source's content, the scheme's version and transformers' (which writes the rest
of the folder), written whole or not at all. A pass: it makes an artifact and knows nothing of
search or serving.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from mahir.export.hf_folder import save_hf_folder
from mahir.families.decoder import DECODER_SPEC, LanguageModel
from mahir.families.prompts import PROMPT_TEXT
from mahir.files import cache_dir, content_hash, slug, staged
from mahir.types import Artifact

WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True, slots=True)
class W8A8:
    """int8 weights per output channel and int8 activations per token, for vLLM."""

    smoothing: float = 0.65
    """SmoothQuant's alpha: how much of an input channel's range moves into the weights (0:
    none, the plain round-to-nearest scheme)."""
    keep: tuple[str, ...] = ()
    """Linear layers left in the engine's dtype, by the last part of their name ("down_proj":
    the MLP's output projection, whose input carries the largest outliers)."""
    head: bool = False
    """The output layer (`lm_head`) int8 too, untied from the embedding if they were one."""
    version: ClassVar[int] = 1

    def __post_init__(self) -> None:
        if not 0 <= self.smoothing < 1:
            raise ValueError(f"smoothing must be in [0, 1), got {self.smoothing}")

    def tag(self) -> str:
        """Short name for folders and reports: w8a8-sq0.65, w8a8-sq0.65-keep-down_proj-head."""
        kept = [f"keep-{k}" for k in self.keep]
        return "-".join(["w8a8", f"sq{self.smoothing:g}", *kept, *(["head"] if self.head else [])])


def w8a8_folder(
    llm: LanguageModel, config: W8A8 = W8A8(), *, cache: Path | None = None
) -> Artifact:
    """`llm` as a W8A8 compressed-tensors folder (see the module's note), made once per source."""
    import transformers

    described = f"{config.tag()}\0{config.version}\0{transformers.__version__}"
    parts = f"{content_hash(Path(llm.source))}\0{described}"
    key = hashlib.sha256(parts.encode()).hexdigest()[:16]
    folder = (cache or cache_dir() / "w8a8") / f"{slug(llm.name)}-{config.tag()}-{key}"
    if not folder.is_dir():
        with staged(folder, folder=True) as draft:
            _write(llm, config, draft)
    meta = {"precision": config.tag(), "parameters": llm.parameters, "source": llm.source}
    return Artifact("hf", DECODER_SPEC, path=folder, meta=meta)


def quantized_linears(
    module: torch.nn.Module, keep: tuple[str, ...] = (), *, head: bool = False
) -> dict[str, torch.Tensor]:
    """The module's weights with every linear layer but those named in `keep` and, unless
    `head`, the output one as int8 `weight` and float32 `weight_scale` (one per output
    channel); the other tensors as they are, an unquantized tied output layer once (as its
    embedding)."""
    linears = {
        name
        for name, child in module.named_modules()
        if isinstance(child, torch.nn.Linear)
        and (head or name != "lm_head")
        and name.rsplit(".", 1)[-1] not in keep
    }
    state: dict[str, torch.Tensor] = {}
    for key, tensor in module.state_dict().items():
        owner = key.rsplit(".", 1)[0]
        if owner in linears and key.endswith(".weight"):
            weight = tensor.detach().float()
            scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
            state[key] = torch.round(weight / scale).clamp(-127, 127).to(torch.int8)
            state[f"{owner}.weight_scale"] = scale
        else:
            state[key] = tensor.detach().contiguous()
    if getattr(module.config, "tie_word_embeddings", False) and not head:
        state.pop("lm_head.weight", None)
    return state


def quantization_config(keep: tuple[str, ...] = (), *, head: bool = False) -> dict[str, Any]:
    """config.json's declaration of the scheme, as vLLM's compressed-tensors loader reads it
    (its "Linear" target does not reach the output layer: that one is named)."""
    int8 = {"num_bits": 8, "type": "int", "symmetric": True}
    return {
        "quant_method": "compressed-tensors",
        "format": "int-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear", *(["lm_head"] if head else [])],
                "weights": {**int8, "strategy": "channel", "dynamic": False},
                "input_activations": {**int8, "strategy": "token", "dynamic": True},
            }
        },
        "ignore": [*([] if head else ["lm_head"]), *(f"re:.*\\.{name}$" for name in keep)],
    }


def smoothed(llm: LanguageModel, alpha: float) -> torch.nn.Module:
    """A copy of the reference with SmoothQuant's scales folded in (the module's note): the same
    function, its linear layers' inputs narrower."""
    module: torch.nn.Module = copy.deepcopy(llm.module)
    blocks: list[Any] = [
        b for b in module.modules() if all(hasattr(b, n) for n in ("self_attn", "mlp"))
    ]
    llama_shaped = [b for b in blocks if _llama_shaped(b)]
    ranges = _input_ranges(module, llm, [linear for b in llama_shaped for linear in _fed(b)])
    with torch.no_grad():
        for block in llama_shaped:
            attention, mlp = block.self_attn, block.mlp
            qkv = (attention.q_proj, attention.k_proj, attention.v_proj)
            _smooth(ranges[attention.q_proj], qkv, block.input_layernorm.weight, alpha)
            up = (mlp.gate_proj, mlp.up_proj)
            _smooth(ranges[mlp.gate_proj], up, block.post_attention_layernorm.weight, alpha)
            _smooth(ranges[mlp.down_proj], (mlp.down_proj,), mlp.up_proj.weight, alpha)
    return module


def _llama_shaped(block: Any) -> bool:
    attention, mlp = block.self_attn, block.mlp
    return (
        all(hasattr(attention, n) for n in ("q_proj", "k_proj", "v_proj"))
        and all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj"))
        and all(hasattr(block, n) for n in ("input_layernorm", "post_attention_layernorm"))
    )


def _fed(block: Any) -> tuple[torch.nn.Linear, ...]:
    """The linear layers whose inputs the smoothing reads: one per shared input."""
    return (block.self_attn.q_proj, block.mlp.gate_proj, block.mlp.down_proj)


def _input_ranges(
    module: torch.nn.Module, llm: LanguageModel, linears: list[torch.nn.Linear]
) -> dict[torch.nn.Linear, torch.Tensor]:
    """Each linear layer's largest input magnitude per channel over mahir's prompt text."""
    ranges: dict[torch.nn.Linear, torch.Tensor] = {}

    def record(linear: Any, inputs: tuple[torch.Tensor, ...]) -> None:
        seen = inputs[0].detach().abs().reshape(-1, inputs[0].shape[-1]).amax(dim=0).float()
        ranges[linear] = torch.maximum(ranges[linear], seen) if linear in ranges else seen

    hooks = [linear.register_forward_pre_hook(record) for linear in linears]
    try:
        with torch.no_grad():
            for ids in _calibration(llm):
                module(input_ids=torch.tensor([ids]))
    finally:
        for hook in hooks:
            hook.remove()
    return ranges


def _calibration(llm: LanguageModel, passages: int = 16, tokens: int = 256) -> list[list[int]]:
    """Passages of mahir's prompt text (never the held-out text fidelity is judged on)."""
    text = [p.strip() for p in PROMPT_TEXT.read_text().split("\n\n") if p.strip()]
    return [llm.family.encode(p)[:tokens] for p in text[:passages]]


def _smooth(
    seen: torch.Tensor, linears: tuple[torch.nn.Linear, ...], feeding: torch.Tensor, alpha: float
) -> None:
    """Divide the input channels by s (in `feeding`: a norm's weight, or the rows of the
    layer that writes them) and multiply the linear layers' columns by it."""
    weights = torch.cat([linear.weight.abs() for linear in linears]).amax(dim=0).float()
    scale = (seen.clamp(min=1e-5) ** alpha / weights.clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)
    if feeding.dim() == 1:
        feeding.div_(scale.to(feeding.dtype))
    else:
        feeding.div_(scale.to(feeding.dtype)[:, None])
    for linear in linears:
        linear.weight.mul_(scale.to(linear.weight.dtype))


def _write(llm: LanguageModel, config: W8A8, folder: Path) -> None:
    """The reference's folder (config, tokenizer, generation config) with its weights replaced."""
    from safetensors.torch import save_file

    save_hf_folder(llm, folder)
    for written in [*folder.glob("*.safetensors"), *folder.glob("*.safetensors.index.json")]:
        written.unlink()
    module = smoothed(llm, config.smoothing) if config.smoothing else llm.module
    state = quantized_linears(module, config.keep, head=config.head)
    save_file(state, str(folder / WEIGHTS_FILE), {"format": "pt"})
    config_file = folder / "config.json"
    described = json.loads(config_file.read_text())
    described["quantization_config"] = quantization_config(config.keep, head=config.head)
    if config.head:
        described["tie_word_embeddings"] = False
    config_file.write_text(json.dumps(described, indent=2))
