"""The LLM profile on the tiny Llama: a decode step's matmuls are costed at 2 FLOPs per weight
(one token: every Linear read once), the prefill's at that times the prompt's tokens, and each
phase's profiled ops cover its calls."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from mahir.families.decoder import LanguageModel
from mahir.profile.breakdown import OpTime
from mahir.profile.llm import LlmProfile, profile_llm
from mahir.profile.run import ProfileConfig

TOKENS = 24


@pytest.fixture(scope="module")
def profiled(tiny_llm: LanguageModel) -> LlmProfile:
    config = ProfileConfig(sequence_length=TOKENS, runs=5, seconds=0.2, threads=1)
    return profile_llm(tiny_llm, config)


def _linear_weights(llm: LanguageModel) -> int:
    return sum(m.weight.numel() for m in llm.module.modules() if isinstance(m, torch.nn.Linear))


def _linear_flops(ops: Sequence[OpTime]) -> float:
    return sum(op.cost.flops for op in ops if op.op_type == "aten::linear" and op.cost)


def test_decode_reads_every_weight_once_for_one_token(
    profiled: LlmProfile, tiny_llm: LanguageModel
) -> None:
    assert _linear_flops(profiled.decode.breakdown.ops) == 2 * _linear_weights(tiny_llm)


def test_prefill_multiplies_by_the_prompt_but_projects_one_position(
    profiled: LlmProfile, tiny_llm: LanguageModel
) -> None:
    head = tiny_llm.module.get_output_embeddings().weight.numel()
    body = _linear_weights(tiny_llm) - head
    assert _linear_flops(profiled.prefill.breakdown.ops) == 2 * (body * TOKENS + head)


def test_both_phases_time_their_ops_and_place_them_on_the_roofline(profiled: LlmProfile) -> None:
    for phase in (profiled.prefill, profiled.decode):
        assert phase.breakdown.ops
        assert phase.breakdown.latency.p50_ms > 0
        assert phase.whole.flops > 0
        assert phase.whole.bytes > 0
    # the tiny model's weights are mostly its vocabulary projection, which a prefill runs for
    # the last position only: more work than a step, far from TOKENS times as much
    assert profiled.prefill.whole.flops > profiled.decode.whole.flops
