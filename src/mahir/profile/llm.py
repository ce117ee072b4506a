"""`mahir profile` for a decoder LLM: the prefill and one decode step, each profiled on its own.

A generation is two workloads with different limits. The prefill runs every prompt token through
every matmul at once: about 2 FLOPs per parameter per token, so a long prompt is compute-bound.
A decode step runs one new token per sequence, yet reads every weight and the whole KV cache
for it: at batch 1 it is bound by memory (bytes = weights + cache, FLOPs = 2 per parameter),
and on a GPU often by launches before either. So each phase is a session of its own here:
- prefill: the prompts (held-out text, `sequence_length` tokens each) into a fresh KV cache;
- decode: one token per sequence at position `sequence_length`, over a cache the prompts
  filled, the step's new entry cut off after each call (so every call reads the same cache).
Both run on the PyTorch engine's forward (`runtimes/torch_lm.py`: the fp32 reference on a CPU,
bf16 on a GPU) under torch.profiler (`pytorch.profile_torch`): each op is timed and costed from
its recorded shapes and placed on the roofline like any model's (`result.Profile`).

Sits in profile/: imports families (the decoder), runtimes (the forward) and the profile rooms.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from rich.console import Group
from rich.rule import Rule

from mahir.families.decoder import LanguageModel
from mahir.hardware import detect, physical_cores
from mahir.profile.pytorch import profile_torch
from mahir.profile.result import Profile
from mahir.profile.run import ProfileConfig, roofs
from mahir.runtimes.torch_lm import CausalLM
from mahir.types import Device, Inputs, Outputs

PROMPT_TOKENS = 256
"""Prompt length profiled when none is given: a chat turn with some context."""


@dataclass(frozen=True, slots=True)
class LlmProfile:
    """The prefill's profile and one decode step's, on the same prompts."""

    prefill: Profile
    decode: Profile

    def to_json(self) -> dict[str, Any]:
        return {"kind": "llm", "prefill": self.prefill.to_json(), "decode": self.decode.to_json()}

    def __rich__(self) -> Group:
        rows, tokens = self.prefill.shapes["input_ids"]
        return Group(
            Rule(f"prefill: {rows} x {tokens} prompt tokens into an empty KV cache"),
            self.prefill,
            Rule(f"decode: one token per sequence over {tokens} cached"),
            self.decode,
        )


class _Phase:
    """A `Session` whose call is one phase of generation on the causal LM."""

    runtime = "torch"

    def __init__(self, lm: CausalLM, device: Device, filled: Any | None = None) -> None:
        self.device = device
        self._lm = lm
        self._filled = filled
        """None: each call prefills a fresh dynamic cache (the eager engine's); else the cache
        the prompts filled, which a decode step reads and adds one row to, taken off again
        (`crop(-1)`: a negative count removes that many rows in every transformers 5)."""

    def run(self, inputs: Inputs) -> Outputs:
        from transformers import DynamicCache

        ids = torch.from_numpy(inputs["input_ids"]).to(self._lm.where)
        torch.set_num_threads(self._lm.threads)
        with torch.inference_mode():
            if self._filled is None:
                cache = DynamicCache(config=self._lm.module.config)
                self._lm.forward(ids, cache, **_last_only(self._lm))
            else:
                self._lm.forward(ids, self._filled)
                self._filled.crop(-1)
        return {}

    def describe(self) -> dict[str, Any]:
        phase = "prefill" if self._filled is None else "decode"
        precision = "bf16" if self.device.kind == "cuda" else "fp32"  # as `_causal_lm` makes it
        return {"phase": phase, "threads": self._lm.threads, "precision": precision}


def _last_only(lm: CausalLM) -> dict[str, Any]:
    """The prefill projects only the last position to logits, where the forward allows it."""
    return {"logits_to_keep": 1} if lm.keep_last else {}


def profile_llm(model: LanguageModel, config: ProfileConfig) -> LlmProfile:
    """Profile the prefill of `config.batch_size` prompts of `config.sequence_length` tokens
    (`PROMPT_TOKENS` when None), then one decode step after them."""
    from transformers import DynamicCache

    device, machine = config.device, detect(gpus=config.device.kind == "cuda")
    machine.require(device)
    peaks, paper = roofs(machine, device)  # before the model keeps the device busy
    lm = _causal_lm(model, device, config.threads)
    tokens = min(config.sequence_length or PROMPT_TOKENS, model.family.context_length - 1)
    prompts = _prompts(model, config.batch_size, tokens)
    filled = DynamicCache(config=lm.module.config)
    with torch.inference_mode():
        lm.forward(torch.from_numpy(prompts).to(lm.where), filled, **_last_only(lm))
    step = {"input_ids": prompts[:, -1:].copy()}
    phases = {}
    for name, session, batch in (
        ("prefill", _Phase(lm, device), {"input_ids": prompts}),
        ("decode", _Phase(lm, device, filled), step),
    ):
        breakdown = profile_torch(session, batch, runs=config.runs, seconds=config.seconds)
        shapes = {n: tuple(int(d) for d in a.shape) for n, a in batch.items()}
        if name == "decode":
            shapes["kv_cache_tokens"] = (config.batch_size, tokens)
        phases[name] = Profile(
            f"{model.name} ({name})",
            "torch",
            machine,
            shapes,
            peaks,
            paper,
            breakdown,
            0.0,
            config.top,
        )
    return LlmProfile(phases["prefill"], phases["decode"])


def _causal_lm(model: LanguageModel, device: Device, threads: int | None) -> CausalLM:
    """The reference's forward on `device`: fp32 on a CPU, a bf16 copy on a GPU."""
    module = model.module
    if device.kind == "cuda":
        module = copy.deepcopy(module).to(str(device), dtype=torch.bfloat16)
    where = torch.device("cpu" if device.kind == "cpu" else str(device))
    return CausalLM.of(module, where, threads or physical_cores())


def _prompts(model: LanguageModel, rows: int, tokens: int) -> np.ndarray:
    """`rows` prompts of exactly `tokens` tokens each, as (rows, tokens) ids: the held-out
    passages one after another, cut into rows (and read again from the start if too short)."""
    family = model.family
    passages = family.held_out(passages=None, tokens=family.context_length)
    stream = [token for passage in passages for token in passage]
    repeats = -(-rows * tokens // len(stream))  # ceiling division
    return np.array(stream * repeats, dtype=np.int64)[: rows * tokens].reshape(rows, tokens)
