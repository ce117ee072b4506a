"""The PyTorch LLM engine: greedy generation equals transformers' own `generate`, token for token,
on several architectures; stop tokens stop; a seed repeats a sample; logprobs are one forward's;
bf16 is refused where the CPU would emulate it; the compiled static-cache variant decodes as eager
does; a left-padded batch gives each row what it gives alone; torchao int8 weight-only runs on the
engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mahir.errors import BadInput, Unsupported
from mahir.families.decoder import LanguageModel
from mahir.generation import Sampling
from mahir.hardware import Machine, detect
from mahir.model import load_model
from mahir.runtimes import torch_attention
from mahir.runtimes.engines import open_engine
from mahir.runtimes.torch_generator import TorchEngineOptions, TorchGenerator, open_generator
from mahir.runtimes.torch_lm import CapturedStep
from mahir.types import Device, RuntimeOptions
from tests.helpers import question_ids
from tests.models import DECODERS

ONE_THREAD = RuntimeOptions(threads=1)


def _hf_greedy(llm: LanguageModel, prompt: list[int], new: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = llm.module.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new,
        do_sample=False,
        eos_token_id=None,  # as many tokens as asked, like the stream below
        pad_token_id=2,
    )
    return [int(t) for t in out[0, len(prompt) :]]


@pytest.mark.parametrize("arch", DECODERS)
def test_greedy_equals_transformers_generate(decoder_folders: dict[str, Path], arch: str) -> None:
    llm = load_model(decoder_folders[arch], llm=True)
    generator = open_engine("torch", llm.original(), ONE_THREAD)
    prompt = question_ids(llm)
    tokens = list(generator.stream(prompt, Sampling(max_new_tokens=16)))
    assert tokens == _hf_greedy(llm, prompt, 16)
    assert len(set(tokens)) > 4  # a real sequence, not one token repeated


def test_stop_tokens_stop(tiny_llm: LanguageModel) -> None:
    generator = open_engine("torch", tiny_llm.original(), ONE_THREAD)
    prompt = question_ids(tiny_llm)
    free = list(generator.stream(prompt, Sampling(max_new_tokens=12)))
    stop = free[4]
    stopped = list(generator.stream(prompt, Sampling(12, stop_token_ids=(stop,))))
    assert stopped == free[: free.index(stop) + 1]


def test_a_seed_repeats_a_sample(tiny_llm: LanguageModel) -> None:
    generator = open_engine("torch", tiny_llm.original(), ONE_THREAD)
    prompt = question_ids(tiny_llm)

    def sample(seed: int) -> list[int]:
        return list(generator.stream(prompt, Sampling(24, temperature=1.0, seed=seed)))

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)
    assert sample(7) != list(generator.stream(prompt, Sampling(24)))


def test_each_generation_runs_on_its_own_threads(tiny_llm: LanguageModel) -> None:
    """Torch's thread count is process-wide: generators opened with different counts take
    turns (as the LLM search times them) and each runs on its own."""
    one = open_engine("torch", tiny_llm.original(), ONE_THREAD)
    two = open_engine("torch", tiny_llm.original(), RuntimeOptions(threads=2))
    prompt = question_ids(tiny_llm)
    for generator, threads in ((one, 1), (two, 2), (one, 1)):
        stream = generator.stream(prompt, Sampling(max_new_tokens=2))
        next(stream)
        assert torch.get_num_threads() == threads
        assert generator.describe()["threads"] == threads


def test_logprobs_are_one_forward(tiny_llm: LanguageModel) -> None:
    generator = open_engine("torch", tiny_llm.original(), ONE_THREAD)
    tokens = question_ids(tiny_llm)
    logprobs = generator.logprobs(tokens)
    with torch.inference_mode():
        logits = tiny_llm.module(input_ids=torch.tensor([tokens])).logits[0]
    expected = torch.log_softmax(logits, dim=-1).numpy()
    assert logprobs.shape == (len(tokens), tiny_llm.family.vocab_size)
    assert logprobs.dtype == np.float32
    np.testing.assert_allclose(logprobs, expected, atol=1e-5)
    # The greedy stream's first token is the argmax after the prompt.
    first = next(iter(generator.stream(tokens, Sampling(1))))
    assert first == int(logprobs[-1].argmax())


@pytest.mark.parametrize(
    ("prompt", "new", "message"),
    [
        ([], 4, "the prompt is empty"),
        ([10**6], 4, "token ids must be in"),
        ([5] * 250, 8, "exceed the torch engine's context of 256 tokens"),
    ],
)
def test_bad_requests_are_refused_at_the_call(
    tiny_llm: LanguageModel, prompt: list[int], new: int, message: str
) -> None:
    generator = open_engine("torch", tiny_llm.original(), ONE_THREAD)
    with pytest.raises(BadInput, match=message):
        generator.stream(prompt, Sampling(new))


def test_bf16_is_refused_where_the_cpu_would_emulate_it(tiny_llm: LanguageModel) -> None:
    plain = Machine("AVX2-only CPU", 2, 2, ("avx2",), 8.0)
    with pytest.raises(Unsupported, match="no avx512_bf16 or AMX"):
        open_generator(tiny_llm.original(), TorchEngineOptions(precision="bf16"), machine=plain)


@pytest.mark.skipif(
    not any(detect(gpus=False).has(f) for f in ("avx512_bf16", "amx_bf16")),
    reason="bf16 is emulated on this CPU",
)
def test_bf16_runs_on_a_copy_and_stays_close(tiny_llm: LanguageModel) -> None:
    generator = open_engine("torch-bf16", tiny_llm.original(), ONE_THREAD)
    assert next(tiny_llm.module.parameters()).dtype == torch.float32  # the reference untouched
    tokens = question_ids(tiny_llm)
    reference = open_engine("torch", tiny_llm.original(), ONE_THREAD).logprobs(tokens)
    probs = np.exp(generator.logprobs(tokens))
    assert np.abs(probs - np.exp(reference)).max() < 0.05
    assert generator.describe()["precision"] == "bf16"


@pytest.mark.slow
def test_the_compiled_static_cache_decodes_as_eager_does(tiny_llm: LanguageModel) -> None:
    """torch.compile of the decode step takes 10-40 s on 2 cores, when the generator opens."""
    compiled = open_engine("torch-compile", tiny_llm.original(), ONE_THREAD)
    assert isinstance(compiled, TorchGenerator)
    settings = compiled.describe()
    assert settings["kv_cache"] == "static"
    assert settings["compile_s"] > 0
    assert not settings["compiled_prefill"]  # on a CPU its arithmetic bounds it: eager
    assert settings["attention"] == torch_attention.NAME  # on its own copy of the model
    assert tiny_llm.original().module.config._attn_implementation == "sdpa"
    eager = open_engine("torch", tiny_llm.original(), ONE_THREAD)
    assert eager.describe()["attention"] == "sdpa"
    prompt = question_ids(tiny_llm)
    for new in (16, 40):  # a second, longer request reuses the cache from position 0
        expected = list(eager.stream(prompt, Sampling(new)))
        assert list(compiled.stream(prompt, Sampling(new))) == expected
    prompts = _prompts_of_three_lengths(tiny_llm)
    alone = [list(eager.stream(p, Sampling(12))) for p in prompts]
    assert compiled.generate_batch(prompts, Sampling(12)) == alone  # its own static cache


def _prompts_of_three_lengths(llm: LanguageModel) -> list[list[int]]:
    return [question_ids(llm), question_ids(llm)[:3], llm.family.held_out(1, 24)[0]]


def test_sliding_window_layers_are_refused_by_the_compiled_engine_alone(
    tmp_path: Path, llm_tokenizer: Any
) -> None:
    """Mistral's window reads the cache's position as a Python int, so a compiled step would be
    compiled again at every token until torch.compile fails: refused before any work by the
    bench and the search, and by the engine when it opens; the eager engine runs it."""
    from mahir.search.llm_variants import cannot_run
    from tests.models import decoder_folder

    mistral = load_model(decoder_folder(tmp_path, "mistral", llm_tokenizer), llm=True)
    assert isinstance(mistral, LanguageModel)
    why = cannot_run("torch-compile", Device.parse("cpu"), detect(gpus=False), mistral)
    assert why is not None
    assert "sliding-window or linear attention" in why
    assert cannot_run("torch", Device.parse("cpu"), detect(gpus=False), mistral) is None
    with pytest.raises(Unsupported, match="sliding-window or linear attention"):
        open_generator(mistral.original(), TorchEngineOptions(compile=True, threads=1))
    eager = open_generator(mistral.original(), TorchEngineOptions(threads=1))
    assert len(list(eager.stream(question_ids(mistral), Sampling(4)))) == 4


@pytest.mark.gpu
def test_on_a_gpu_the_compiled_step_decodes_as_the_cpu_engine_does(
    tiny_llm: LanguageModel,
) -> None:
    """fp32 on a GPU, the step compiled there (grouped attention, frozen weights, autotuned for
    one row and not for three, captured as CUDA graphs) and the prefills compiled with dynamic
    shapes: one stream and a padded batch get the CPU engine's greedy tokens."""
    cpu = open_engine("torch", tiny_llm.original(), ONE_THREAD)
    prompts = _prompts_of_three_lengths(tiny_llm)
    alone = [list(cpu.stream(p, Sampling(16))) for p in prompts]
    gpu = RuntimeOptions(threads=1, device=Device.parse("cuda"))
    compiled = open_engine("torch-compile", tiny_llm.original(), gpu)
    assert isinstance(compiled, TorchGenerator)
    assert compiled.describe()["attention"] == torch_attention.NAME
    assert compiled.describe()["compiled_prefill"]
    assert [list(compiled.stream(p, Sampling(16))) for p in prompts] == alone
    assert compiled.generate_batch(prompts, Sampling(16)) == alone


@pytest.mark.gpu
def test_a_captured_step_takes_exactly_one_step_a_call() -> None:
    """A shape's first call runs the step, its second captures and replays it, the next ones
    replay: each call's tensors go into the graph's, and the cache, the graph's by identity,
    is written once a call (as transformers' static cache advances its counter); a new shape
    starts over."""

    class Cache:
        def __init__(self) -> None:
            self.seen = torch.zeros(4, device="cuda")

    def step(ids: torch.Tensor, cache: Cache) -> torch.Tensor:
        cache.seen.add_(ids.sum())
        return ids * 2.0 + cache.seen.sum()

    captured = CapturedStep(step)
    cache = Cache()
    expected_seen = 0.0
    for value in (1.0, 3.0, 5.0, 7.0):  # run, capture + replay, replay, replay
        ids = torch.full((2, 1), value, device="cuda")
        expected_seen += 2 * value
        assert captured(ids, cache).tolist() == [[2 * value + 4 * expected_seen]] * 2
        assert cache.seen.tolist() == [expected_seen] * 4
    wider = captured(torch.ones(3, 1, device="cuda"), cache)
    assert wider.tolist() == [[2.0 + 4 * (expected_seen + 3)]] * 3


def test_a_padded_batch_gives_each_row_what_it_gives_alone(tiny_llm: LanguageModel) -> None:
    generator = open_engine("torch", tiny_llm.original(), ONE_THREAD)
    assert isinstance(generator, TorchGenerator)
    prompts = _prompts_of_three_lengths(tiny_llm)
    alone = [list(generator.stream(p, Sampling(12))) for p in prompts]
    assert len({len(p) for p in prompts}) == 3
    assert generator.generate_batch(prompts, Sampling(12)) == alone
    stop = alone[1][3]  # one row stops early; the others run on to their own stop or the end
    stopping = Sampling(12, stop_token_ids=(stop,))
    expected = [row[: row.index(stop) + 1] if stop in row else row for row in alone]
    assert generator.generate_batch(prompts, stopping) == expected
    with pytest.raises(BadInput, match="exceed"):
        generator.generate_batch([[1] * 10, [1] * (generator.context_length - 4)], Sampling(8))


def test_int8_weight_only_runs_smaller_and_close(tiny_llm: LanguageModel) -> None:
    from mahir.passes.torchao import TorchaoInt8, quantize_linears

    original = tiny_llm.original()
    int8 = quantize_linears(original, TorchaoInt8(weight_only=True), name=tiny_llm.name)
    # The tied embedding stays fp32 beside an int8 copy of the output layer, so the tiny model,
    # all embedding, grows; the linear layers (the output layer among them) shrink about 4x.
    embedding = tiny_llm.module.model.embed_tokens.weight.numel() * 4 / 2**20
    assert int8.size_mb() - embedding < original.size_mb() / 3
    generator = open_engine("torch", int8, ONE_THREAD)
    tokens = question_ids(tiny_llm)
    reference = open_engine("torch", original, ONE_THREAD).logprobs(tokens)
    got = generator.logprobs(tokens)
    agreement = (got.argmax(axis=1) == reference.argmax(axis=1)).mean()
    assert agreement > 0.9
    assert len(list(generator.stream(tokens, Sampling(8)))) == 8
