"""The W8A8 pass on the tiny Llama: int8 weights that dequantize to the originals within half a
step, SmoothQuant's folding that leaves the function unchanged and narrows the inputs, layers
kept in float where asked, and a compressed-tensors folder made once. vLLM running the folder
is tested beside the vLLM engine (`tests/runtimes/test_vllm.py`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mahir.families.decoder import LanguageModel
from mahir.passes.w8a8 import W8A8, quantized_linears, smoothed, w8a8_folder


def test_weights_are_int8_per_output_channel_within_half_a_step(tiny_llm: LanguageModel) -> None:
    original = tiny_llm.module.state_dict()
    state = quantized_linears(tiny_llm.module, keep=("down_proj",))
    q = "model.layers.0.self_attn.q_proj"
    assert state[f"{q}.weight"].dtype == torch.int8
    scale = state[f"{q}.weight_scale"]
    assert scale.shape == (original[f"{q}.weight"].shape[0], 1)
    restored = state[f"{q}.weight"].float() * scale
    assert (restored - original[f"{q}.weight"]).abs().le(scale / 2 + 1e-7).all()
    assert state["model.layers.0.mlp.down_proj.weight"].dtype == torch.float32  # kept
    assert "model.layers.0.mlp.down_proj.weight_scale" not in state
    assert torch.equal(state["model.norm.weight"], original["model.norm.weight"])
    assert "lm_head.weight" not in state  # tied: written once, as the embedding


def test_the_output_layer_is_untied_and_int8_only_when_asked(
    tiny_llm: LanguageModel, tmp_path: Path
) -> None:
    original = tiny_llm.module.state_dict()
    state = quantized_linears(tiny_llm.module, head=True)
    assert state["lm_head.weight"].dtype == torch.int8
    assert state["lm_head.weight_scale"].shape == (original["lm_head.weight"].shape[0], 1)
    embedding = "model.embed_tokens.weight"
    assert torch.equal(state[embedding], original[embedding])  # the embedding keeps its values
    made = w8a8_folder(tiny_llm, W8A8(head=True), cache=tmp_path)
    assert made.path is not None
    assert made.path.name.split("-")[-2] == "head"
    described = json.loads((made.path / "config.json").read_text())
    assert described["tie_word_embeddings"] is False
    declared = described["quantization_config"]
    assert declared["config_groups"]["group_0"]["targets"] == ["Linear", "lm_head"]
    assert declared["ignore"] == []


def test_smoothing_keeps_the_function_and_narrows_the_inputs(tiny_llm: LanguageModel) -> None:
    ids = torch.tensor([tiny_llm.family.held_out(1, 32)[0]])
    norm = tiny_llm.module.model.layers[0].input_layernorm.weight
    untouched = norm.detach().clone()
    folded = smoothed(tiny_llm, 0.65)
    with torch.no_grad():
        before = tiny_llm.module(input_ids=ids).logits
        after = folded(input_ids=ids).logits
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-4)

    def spread(module: torch.nn.Module) -> float:
        """The largest input channel's range over the median one, at layer 0's down_proj."""
        seen: list[torch.Tensor] = []
        layer = module.model.layers[0].mlp.down_proj
        hook = layer.register_forward_pre_hook(lambda _m, x: seen.append(x[0].abs().amax(1)[0]))
        with torch.no_grad():
            module(input_ids=ids)
        hook.remove()
        return float(seen[0].max() / seen[0].median())

    assert spread(folded) < spread(tiny_llm.module)
    assert torch.equal(norm, untouched)  # the copy was smoothed, not the reference


def test_the_folder_declares_the_scheme_and_is_made_once(
    tiny_llm: LanguageModel, tmp_path: Path
) -> None:
    made = w8a8_folder(tiny_llm, W8A8(keep=("down_proj",)), cache=tmp_path)
    assert made.format == "hf"
    assert made.path is not None
    declared = json.loads((made.path / "config.json").read_text())["quantization_config"]
    assert declared["quant_method"] == "compressed-tensors"
    group = declared["config_groups"]["group_0"]
    assert (group["weights"]["strategy"], group["input_activations"]["strategy"]) == (
        "channel",
        "token",
    )
    assert declared["ignore"] == ["lm_head", r"re:.*\.down_proj$"]
    assert (made.path / "tokenizer_config.json").is_file()
    written = (made.path / "model.safetensors").stat().st_mtime_ns
    again = w8a8_folder(tiny_llm, W8A8(keep=("down_proj",)), cache=tmp_path)
    assert again.path == made.path
    assert (made.path / "model.safetensors").stat().st_mtime_ns == written
    assert w8a8_folder(tiny_llm, W8A8(), cache=tmp_path).path != made.path


def test_an_alpha_outside_its_range_is_refused() -> None:
    with pytest.raises(ValueError, match="smoothing must be in"):
        W8A8(smoothing=1.0)
