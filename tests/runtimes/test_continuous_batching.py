"""Continuous batching in the PyTorch and llama.cpp engines: streams from several threads,
joining while others are mid-generation, each get exactly the tokens the plain engine gives that
prompt alone; a closed stream frees its row; stop tokens and `max_new_tokens` end one row while
others go on; a seeded sample repeats; long prompts are fed in chunks beside the others' decode
tokens, so a long prompt never stalls a decoding row; torch's compiled step decodes as eager
does."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import pytest

from mahir.errors import RuntimeFailure, Unsupported
from mahir.families.decoder import LanguageModel
from mahir.generation import Generator, Sampling
from mahir.model import load_model
from mahir.runtimes.continuous import BatchLoop
from mahir.runtimes.engines import open_engine
from mahir.runtimes.torch_generator import TorchEngineOptions
from mahir.runtimes.torch_generator import open_generator as open_torch
from mahir.types import Artifact, Device, RuntimeOptions
from tests.helpers import check_greedy_scores
from tests.models import DECODERS

ONE_THREAD = RuntimeOptions(threads=1)


class Batched(Protocol):
    """A generator with a continuous batch (torch's or llama.cpp's)."""

    batch: BatchLoop[Any]
    max_concurrency: int

    def stream(self, prompt: Sequence[int], sampling: Sampling) -> Iterator[int]: ...

    def describe(self) -> dict[str, Any]: ...


@dataclass
class Engine:
    """One engine on the tiny Llama: opened plain, or with a continuous batch of `slots`."""

    name: str
    artifact: Artifact

    def plain(self) -> Generator:
        return open_engine(self.name, self.artifact, ONE_THREAD)

    def batched(self, slots: int) -> Batched:
        generator = open_engine(self.name, self.artifact, RuntimeOptions(threads=1, slots=slots))
        assert generator.max_concurrency == slots
        assert isinstance(getattr(generator, "batch", None), BatchLoop)
        return cast(Batched, generator)


@pytest.fixture(params=["torch", "llama.cpp"])
def engine(request: pytest.FixtureRequest, tiny_llm: LanguageModel) -> Engine:
    if request.param == "llama.cpp":
        return Engine("llama.cpp", request.getfixturevalue("tiny_gguf"))
    return Engine("torch", tiny_llm.original())


def _batched(llm: LanguageModel, slots: int, engine: str = "torch") -> Batched:
    return Engine(engine, llm.original()).batched(slots)


def _prompts(llm: LanguageModel) -> list[list[int]]:
    """Four prompts of different lengths."""
    asked = llm.family.prompt_ids("What is the capital of France?")
    return [asked, asked[:3], llm.family.held_out(1, 24)[0], [7]]


def _staggered(generator: Generator, prompts: list[list[int]], news: list[int]) -> list[list[int]]:
    """Each prompt streamed on its own thread; each starts once the one before has its second
    token, so every one joins a batch that is mid-generation."""
    started = [threading.Event() for _ in prompts]
    out: list[list[int]] = [[] for _ in prompts]

    def consume(i: int) -> None:
        if i:
            started[i - 1].wait()
        for token in generator.stream(prompts[i], Sampling(news[i])):
            out[i].append(token)
            if len(out[i]) == 2:
                started[i].set()
        started[i].set()

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return out


@pytest.mark.parametrize("arch", DECODERS)
def test_staggered_streams_each_get_what_they_get_alone(
    decoder_folders: dict[str, Path], arch: str
) -> None:
    llm = load_model(decoder_folders[arch], llm=True)
    plain = open_engine("torch", llm.original(), ONE_THREAD)
    prompts = _prompts(llm)
    news = [200, 150, 90, 40]  # the first runs on while the others join; each its own length
    alone = [list(plain.stream(p, Sampling(n))) for p, n in zip(prompts, news, strict=True)]
    batched = _batched(llm, slots=4)
    assert _staggered(batched, prompts, news) == alone
    assert batched.batch.stats.most == 4  # all four were decoded in one step


def _chunked(engine: Engine, slots: int, step_tokens: int) -> Batched:
    """The engine with a continuous batch that prefills at most `step_tokens` a step."""
    if engine.name == "llama.cpp":  # imported here: a GPU machine has no llama.cpp
        from mahir.runtimes.llamacpp import LlamaCppOptions
        from mahir.runtimes.llamacpp import open_generator as open_llamacpp

        options = LlamaCppOptions(threads=1, slots=slots, step_tokens=step_tokens)
        return cast(Batched, open_llamacpp(engine.artifact, options))
    settings = TorchEngineOptions(threads=1, slots=slots, step_tokens=step_tokens)
    return cast(Batched, open_torch(engine.artifact, settings))


def test_prompts_go_in_chunks_beside_the_decoding_rows(
    tiny_llm: LanguageModel, engine: Engine
) -> None:
    """Steps of at most 8 prompt tokens: every prompt but the last takes several steps, each
    beside the rows already decoding, and still each stream gets what it gets alone."""
    prompts = _prompts(tiny_llm)
    assert sorted(len(p) for p in prompts)[-2] > 8
    news = [200, 150, 90, 40]
    plain = engine.plain()
    alone = [list(plain.stream(p, Sampling(n))) for p, n in zip(prompts, news, strict=True)]
    batched = _chunked(engine, slots=4, step_tokens=8)
    assert batched.describe()["slots"] == batched.max_concurrency == 4
    assert _staggered(batched, prompts, news) == alone
    assert batched.batch.stats.most == 4
    cast(Generator, batched).close()  # the engine thread stops before its state is freed
    with pytest.raises(RuntimeFailure, match="closed"):
        list(batched.stream(prompts[0], Sampling(2)))


def test_a_long_prompt_in_chunks_does_not_stall_a_decoding_row(tiny_llm: LanguageModel) -> None:
    """PyTorch: a short prompt submitted first decodes its 6 tokens while a 40-token prompt
    behind it goes in 4 tokens a step, so no step decodes both (prefilled whole between two
    steps, the long one would have decoded beside it from the first)."""
    long = tiny_llm.family.held_out(1, 40)[0]
    assert len(long) >= 40
    engine = Engine("torch", tiny_llm.original())
    batched = _chunked(engine, slots=2, step_tokens=4)
    answers = batched.batch.generate([[5, 6], long], Sampling(6))
    plain = engine.plain()
    assert answers == [list(plain.stream(p, Sampling(6))) for p in ([5, 6], long)]
    assert batched.batch.stats.most == 1
    whole = _chunked(engine, slots=2, step_tokens=256)
    assert whole.batch.generate([[5, 6], long], Sampling(6)) == answers
    assert whole.batch.stats.most == 2


def test_more_streams_than_slots_wait_for_a_row(tiny_llm: LanguageModel, engine: Engine) -> None:
    prompts = _prompts(tiny_llm) * 2
    plain = engine.plain()
    alone = [list(plain.stream(p, Sampling(12))) for p in prompts]
    batched = engine.batched(slots=3)
    assert batched.batch.generate(prompts, Sampling(12)) == alone
    assert batched.batch.stats.most == 3


def test_a_closed_stream_frees_its_row(tiny_llm: LanguageModel, engine: Engine) -> None:
    batched = engine.batched(slots=2)
    prompt = _prompts(tiny_llm)[0]
    left: Iterator[int] = batched.stream(prompt, Sampling(200))
    staying = batched.stream(prompt[:3], Sampling(200))
    next(left), next(staying)
    left.close()  # its row frees at the next step; the other row stays busy
    later = list(batched.stream([5, 6], Sampling(4)))  # needs the freed row
    assert later == list(engine.plain().stream([5, 6], Sampling(4)))
    assert len(list(staying)) == 199
    # the closed stream stopped within a few steps, not after its 200 tokens
    assert batched.batch.stats.rows < 200 + 3 + 50


def test_stop_tokens_end_one_row_while_others_go_on(
    tiny_llm: LanguageModel, engine: Engine
) -> None:
    plain = engine.plain()
    prompts = _prompts(tiny_llm)[:3]
    alone = [list(plain.stream(p, Sampling(16))) for p in prompts]
    stop = alone[1][3]
    expected = [row[: row.index(stop) + 1] if stop in row else row for row in alone]
    assert any(len(row) == 16 for row in expected)  # some row runs past the stopped one
    batched = engine.batched(slots=3)
    assert batched.batch.generate(prompts, Sampling(16, stop_token_ids=(stop,))) == expected


def test_a_seeded_sample_repeats_and_equals_the_plain_engines(
    tiny_llm: LanguageModel, engine: Engine
) -> None:
    plain = engine.plain()
    batched = engine.batched(slots=2)
    prompt = _prompts(tiny_llm)[0]
    sampling = Sampling(24, temperature=1.0, seed=7)
    sampled = list(batched.stream(prompt, sampling))
    assert sampled == list(plain.stream(prompt, sampling))
    assert sampled == list(batched.stream(prompt, sampling))
    assert sampled != list(batched.stream(prompt, Sampling(24, temperature=1.0, seed=8)))
    if engine.name == "torch":
        # A torch row rounds alike whatever decodes beside it; llama.cpp's matmuls take another
        # path for more than one row, and a sample at a near-tie may then differ.
        greedy = batched.stream(prompt[:3], Sampling(40))
        next(greedy)
        assert list(batched.stream(prompt, sampling)) == sampled
        greedy.close()


def test_a_sliding_window_model_is_refused(tiny_llm: LanguageModel) -> None:
    from mahir.runtimes.torch_batching import attention_layers

    config = tiny_llm.module.config.__class__(**tiny_llm.module.config.to_dict())
    config.layer_types = ["sliding_attention"] * config.num_hidden_layers
    config.sliding_window = 8
    with pytest.raises(Unsupported, match="full attention in every layer"):
        attention_layers(config)


@pytest.mark.slow
def test_the_compiled_batch_decodes_as_eager_does(tiny_llm: LanguageModel) -> None:
    """torch.compile of the batched step (all slots, the whole cache) when the generator opens."""
    plain = open_engine("torch", tiny_llm.original(), ONE_THREAD)
    prompts = _prompts(tiny_llm)[:3]
    news = [60, 40, 20]
    alone = [list(plain.stream(p, Sampling(n))) for p, n in zip(prompts, news, strict=True)]
    compiled = _batched(tiny_llm, slots=3, engine="torch-compile")
    assert compiled.describe()["compile_s"] > 0
    assert _staggered(compiled, prompts, news) == alone


@pytest.mark.gpu
def test_on_a_gpu_the_batch_decodes_as_the_cpu_engine_does(tiny_llm: LanguageModel) -> None:
    """fp32 on a GPU, eager and compiled (the step captured as a CUDA graph), prompts in 8-token
    chunks: each stream gets the CPU engine's greedy tokens."""
    prompts = _prompts(tiny_llm)[:3]
    news = [24, 16, 12]
    cpu = open_engine("torch", tiny_llm.original(), ONE_THREAD)
    alone = [list(cpu.stream(p, Sampling(n))) for p, n in zip(prompts, news, strict=True)]
    gpu = RuntimeOptions(threads=1, slots=3, step_tokens=8, device=Device.parse("cuda"))
    for name in ("torch", "torch-compile"):
        batched = cast(Batched, open_engine(name, tiny_llm.original(), gpu))
        assert batched.describe()["device"] == "cuda:0"
        assert _staggered(batched, prompts, news) == alone, name
        cast(Generator, batched).close()


def test_tokens_carry_the_log_probabilities_the_model_gives_them(
    tiny_llm: LanguageModel, engine: Engine
) -> None:
    """Asked (`Sampling.logprobs`), plain and batched streams yield `Token`s: the same ids, each
    with its teacher-forced log-probability and the most likely alternatives, best first."""
    prompt = _prompts(tiny_llm)[0]
    plain = engine.plain()
    want = list(plain.stream(prompt, Sampling(12)))
    for generator in (plain, engine.batched(slots=2)):
        got = list(generator.stream(prompt, Sampling(12, logprobs=3)))
        assert got == want
        check_greedy_scores(got, prompt, plain, alternatives=3)
