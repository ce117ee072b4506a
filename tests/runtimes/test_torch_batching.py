"""Continuous batching in the PyTorch engine: streams from several threads, joining while others
are mid-generation, each get exactly the tokens the plain engine gives that prompt alone; a
closed stream frees its row; stop tokens and `max_new_tokens` end one row while others go on; a
seeded sample repeats; the compiled step decodes as eager does."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from mahir.errors import Unsupported
from mahir.families.decoder import LanguageModel
from mahir.generation import Generator, Sampling
from mahir.model import load_model
from mahir.runtimes.engines import open_engine
from mahir.runtimes.torch_generator import TorchGenerator
from mahir.types import RuntimeOptions
from tests.models import DECODERS

ONE_THREAD = RuntimeOptions(threads=1)


def _batched(llm: LanguageModel, slots: int, engine: str = "torch") -> TorchGenerator:
    generator = open_engine(engine, llm.original(), RuntimeOptions(threads=1, slots=slots))
    assert isinstance(generator, TorchGenerator)
    assert generator.batch is not None
    assert generator.max_concurrency == slots
    return generator


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
    assert batched.batch is not None
    assert _staggered(batched, prompts, news) == alone
    assert batched.batch.stats.most == 4  # all four were decoded in one step


def test_more_streams_than_slots_wait_for_a_row(tiny_llm: LanguageModel) -> None:
    plain = open_engine("torch", tiny_llm.original(), ONE_THREAD)
    prompts = _prompts(tiny_llm) * 2
    alone = [list(plain.stream(p, Sampling(12))) for p in prompts]
    batched = _batched(tiny_llm, slots=3)
    assert batched.generate_batch(prompts, Sampling(12)) == alone
    assert batched.batch is not None
    assert batched.batch.stats.most == 3


def test_a_closed_stream_frees_its_row(tiny_llm: LanguageModel) -> None:
    batched = _batched(tiny_llm, slots=2)
    assert batched.batch is not None
    prompt = _prompts(tiny_llm)[0]
    left: Iterator[int] = batched.stream(prompt, Sampling(200))
    staying = batched.stream(prompt[:3], Sampling(200))
    next(left), next(staying)
    left.close()  # its row frees at the next step; the other row stays busy
    later = list(batched.stream([5, 6], Sampling(4)))  # needs the freed row
    assert later == list(
        open_engine("torch", tiny_llm.original(), ONE_THREAD).stream([5, 6], Sampling(4))
    )
    assert len(list(staying)) == 199
    # the closed stream stopped within a few steps, not after its 200 tokens
    assert batched.batch.stats.rows < 200 + 3 + 50


def test_stop_tokens_end_one_row_while_others_go_on(tiny_llm: LanguageModel) -> None:
    plain = open_engine("torch", tiny_llm.original(), ONE_THREAD)
    prompts = _prompts(tiny_llm)[:3]
    alone = [list(plain.stream(p, Sampling(16))) for p in prompts]
    stop = alone[1][3]
    expected = [row[: row.index(stop) + 1] if stop in row else row for row in alone]
    assert any(len(row) == 16 for row in expected)  # some row runs past the stopped one
    batched = _batched(tiny_llm, slots=3)
    assert batched.generate_batch(prompts, Sampling(16, stop_token_ids=(stop,))) == expected


def test_a_seeded_sample_repeats_and_equals_the_plain_engines(tiny_llm: LanguageModel) -> None:
    plain = open_engine("torch", tiny_llm.original(), ONE_THREAD)
    batched = _batched(tiny_llm, slots=2)
    prompt = _prompts(tiny_llm)[0]
    sampling = Sampling(24, temperature=1.0, seed=7)
    greedy = batched.stream(prompt[:3], Sampling(40))  # a greedy row beside the sampled one
    next(greedy)
    sampled = list(batched.stream(prompt, sampling))
    assert sampled == list(batched.stream(prompt, sampling))
    assert sampled == list(plain.stream(prompt, sampling))
    assert sampled != list(batched.stream(prompt, Sampling(24, temperature=1.0, seed=8)))
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
