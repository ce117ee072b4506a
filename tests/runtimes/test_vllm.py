"""vLLM's CPU build on a tiny random-weight Llama, in mahir's vLLM environment: fp32 greedy
tokens and logprobs equal the PyTorch reference's; stop tokens stop, seeds repeat, an abandoned
stream is aborted; streams from two threads run in one batch and each gets its own tokens; a
bad request is refused before any work; a dead worker is one line, never a hang; Intel's OpenMP
is in the worker only when asked.

The environment (~3.5 GB of pins) is shared with the user's mahir cache, keyed by its pins, so
only the first run on a machine creates it (about 3 minutes on 2 cores); the engines run eager
(no torch.compile), so each starts in ~10 s, mostly one core's imports and loading: the
module's other engines start in the background while the first one's tests run (`started`)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mahir.errors import BadInput, RuntimeFailure, Unsupported
from mahir.export.hf_folder import reference_folder
from mahir.families.decoder import LanguageModel
from mahir.families.prompts import Prompt
from mahir.generation import Generator, Pushing, Sampling
from mahir.generation_quality import teacher_forced
from mahir.model import load_model
from mahir.passes.w8a8 import W8A8, w8a8_folder
from mahir.runtimes.engines import open_engine
from mahir.runtimes.vllm_cpu import (
    VLLM_ENV,
    VllmGenerator,
    VllmOptions,
    open_generator,
    openmp_preload,
)
from mahir.search.llm_timing import time_at_once
from mahir.serve.llm_scheduler import Scheduler
from mahir.types import Artifact, Device, RuntimeOptions
from mahir.venvs import ensure_env
from tests.helpers import check_greedy_scores, question_ids, shared_env
from tests.models import decoder_folder

pytestmark = pytest.mark.own_env
OWN_ENVS = (VLLM_ENV,)
"""Made from the start of the run, beside other tests (`helpers.make_own_envs_early`)."""
FP32_EAGER = VllmOptions(dtype="fp32", compile=False, threads=1)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory, llm_tokenizer: Any) -> LanguageModel:
    """The tiny Llama with 2 heads of 32 dimensions: vLLM's CPU attention takes head sizes
    from 32 up (the session's tiny Llama has 16)."""
    root = tmp_path_factory.mktemp("vllm")
    return load_model(decoder_folder(root / "llama", "llama", llm_tokenizer, heads=2), llm=True)


@pytest.fixture(scope="module")
def folder(llama: LanguageModel) -> Artifact:
    shared_env(VLLM_ENV)
    return reference_folder(llama)


W8A8S = {"w8a8": W8A8(), "w8a8-head": W8A8(head=True)}
"""The W8A8 folders vLLM runs: every linear layer int8 but the output one, and that one too."""


@pytest.fixture(scope="module")
def w8a8_folders(
    llama: LanguageModel, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Artifact]:
    cache = tmp_path_factory.mktemp("w8a8")
    return {name: w8a8_folder(llama, config, cache=cache) for name, config in W8A8S.items()}


@pytest.fixture(scope="module")
def started(
    folder: Artifact, w8a8_folders: dict[str, Artifact]
) -> Iterator[dict[str, Future[VllmGenerator]]]:
    """The module's other engines, by name: one per W8A8 folder (bf16), and a spare fp32 one
    with prefix caching and Intel's OpenMP, whose worker the last test to use it kills (tests
    run in the file's order). They start one after another on a background thread while
    `vllm` starts and its tests run: two starts at a time, one per core of a 2-core machine
    (more at once only slow each other down). Any a test left open is closed at the end of
    the module (closing one twice does nothing)."""
    bf16 = replace(FP32_EAGER, dtype="bf16")
    with ThreadPoolExecutor(1, thread_name_prefix="vllm-start") as pool:
        futures = {
            name: pool.submit(open_generator, artifact, bf16, engine="vllm")
            for name, artifact in w8a8_folders.items()
        }
        spare = replace(FP32_EAGER, prefix_caching=True, intel_openmp=True)
        futures["spare"] = pool.submit(open_generator, folder, spare, engine="vllm-fp32")
        try:
            yield futures
        finally:
            for future in futures.values():
                if future.exception() is None:
                    future.result().close()


@pytest.fixture(scope="module")
def vllm(folder: Artifact, started: dict[str, Future[VllmGenerator]]) -> Iterator[VllmGenerator]:
    """The fp32 engine most tests share, started beside `started`'s first."""
    with open_generator(folder, FP32_EAGER, engine="vllm-fp32") as generator:
        yield generator


@pytest.fixture(scope="module")
def reference(llama: LanguageModel) -> Generator:
    return open_engine("torch", llama.original(), RuntimeOptions(threads=1))


def test_fp32_greedy_and_logprobs_equal_the_torch_reference(
    llama: LanguageModel, vllm: VllmGenerator, reference: Generator
) -> None:
    prompt, greedy = question_ids(llama), Sampling(max_new_tokens=16)
    tokens = list(vllm.stream(prompt, greedy))
    assert tokens == list(reference.stream(prompt, greedy))
    assert len(set(tokens)) > 4  # a real sequence, not one token repeated
    sequences = llama.family.held_out(passages=2, tokens=64)
    mine = [vllm.logprobs(s) for s in sequences]
    assert mine[0].shape == (len(sequences[0]), llama.family.vocab_size)  # the whole vocabulary
    assert mine[0].dtype == np.float32
    forced = teacher_forced(mine, [reference.logprobs(s) for s in sequences], sequences)
    assert forced["top1_agreement"] == 1.0
    assert forced["kl_mean"] < 1e-5
    described = vllm.describe()
    assert (described["precision"], described["threads"], described["compiled"]) == (
        "fp32",
        1,
        False,
    )
    assert described["vllm"] == "0.32.0"
    assert described["openmp"] == "torch's"  # what the worker loaded
    assert described["kv_cache"] == "paged, 1 GiB, float32, blocks of 128 tokens"  # vLLM's own
    assert described["sampler"].startswith("inverse CDF")  # mahir's draw replaced vLLM's


@pytest.mark.parametrize("name", list(W8A8S))
def test_a_w8a8_folder_runs_on_vllms_int8_kernels_close_to_the_reference(
    llama: LanguageModel,
    w8a8_folders: dict[str, Artifact],
    started: dict[str, Future[VllmGenerator]],
    reference: Generator,
    name: str,
) -> None:
    """vLLM loads mahir's compressed-tensors folder (int8 weights per channel, int8 activations
    per token, smoothed; the tied output layer untied and int8 too, with `head`) as int8 layers
    and answers close to the fp32 reference: teacher-forced within the budget's KL, though not
    exactly (int8 arithmetic, not the fp32 weights)."""
    sequences = llama.family.held_out(passages=2, tokens=64)
    with pytest.raises(Unsupported, match="take bf16 activations, not fp32"):
        open_generator(w8a8_folders[name], FP32_EAGER, engine="vllm")
    with started[name].result() as int8:  # the folder in bf16, opened in `started`
        found = teacher_forced(
            [int8.logprobs(s) for s in sequences],
            [reference.logprobs(s) for s in sequences],
            sequences,
        )
        assert len(list(int8.stream(question_ids(llama), Sampling(8)))) == 8
    assert 0 < found["kl_mean"] <= 0.02


def test_stop_tokens_stop_seeds_repeat_and_an_abandoned_stream_is_aborted(
    llama: LanguageModel, vllm: VllmGenerator
) -> None:
    prompt = question_ids(llama)
    free = list(vllm.stream(prompt, Sampling(max_new_tokens=12)))
    stop = free[4]
    assert (
        list(vllm.stream(prompt, Sampling(12, stop_token_ids=(stop,))))
        == free[: free.index(stop) + 1]
    )

    def sample(seed: int) -> list[int]:
        return list(vllm.stream(prompt, Sampling(24, temperature=1.0, top_p=0.9, seed=seed)))

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)

    def plain(seed: int) -> list[int]:  # no top-p: mahir's inverse-CDF draw, not vLLM's
        return list(vllm.stream(prompt, Sampling(24, temperature=1.0, seed=seed)))

    assert plain(7) == plain(7)
    assert plain(7) != plain(8)
    stream = vllm.stream(prompt, Sampling(max_new_tokens=200))
    assert [next(stream) for _ in range(3)] == free[:3]
    stream.close()  # aborts the request in vLLM; the engine serves the next call
    assert list(vllm.stream(prompt, Sampling(max_new_tokens=12))) == free


def test_streams_from_two_threads_share_the_engine_and_get_their_own_tokens(
    llama: LanguageModel, vllm: VllmGenerator, reference: Generator
) -> None:
    prompts = [question_ids(llama), llama.family.held_out(passages=1, tokens=40)[0]]
    stamps: dict[int, list[tuple[float, int]]] = {0: [], 1: []}
    start = threading.Barrier(2)

    def run(which: int) -> None:
        start.wait()
        for token in vllm.stream(prompts[which], Sampling(max_new_tokens=64)):
            stamps[which].append((time.perf_counter(), token))

    threads = [threading.Thread(target=run, args=(which,)) for which in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for which, prompt in enumerate(prompts):
        mine = [token for _, token in stamps[which]]
        assert mine == list(reference.stream(prompt, Sampling(max_new_tokens=64)))
    first_ends = min(stamps[0][-1][0], stamps[1][-1][0])
    assert max(stamps[0][0][0], stamps[1][0][0]) < first_ends  # both ran in one batch


def test_the_servers_scheduler_takes_pushed_tokens_and_a_cancel_frees_the_slot(
    llama: LanguageModel, vllm: VllmGenerator, reference: Generator
) -> None:
    """No thread per stream: the worker's reader pushes each token into its stream's queue.
    Streams at once each get their own greedy tokens; a cancelled one frees its slot at once
    and is aborted, and the engine serves the next request."""
    assert isinstance(vllm, Pushing)
    prompts = llama.family.held_out(passages=3, tokens=30)
    expected = [list(reference.stream(p, Sampling(16))) for p in prompts]

    async def serve() -> tuple[list[list[int]], list[int], list[int]]:
        scheduler = Scheduler(vllm)

        async def one(prompt: list[int]) -> list[int]:
            stream = await scheduler.start(prompt, Sampling(16))
            try:
                return [token async for token in stream]
            finally:
                stream.cancel()

        together = await asyncio.gather(*(one(p) for p in prompts))
        assert scheduler.running == 0
        long = await scheduler.start(prompts[0], Sampling(max_new_tokens=200))
        first = [await anext(long) for _ in range(3)]
        long.cancel()
        assert scheduler.running == 0  # at the cancel, not at the 200th token
        after = await one(prompts[1])
        await scheduler.stop()
        return together, first, after

    together, first, after = asyncio.run(serve())
    assert together == expected
    assert first == expected[0][:3]
    assert after == expected[1]


def test_with_prefix_caching_a_prompt_that_starts_alike_reads_the_cache_and_answers_alike(
    llama: LanguageModel, started: dict[str, Future[VllmGenerator]], reference: Generator
) -> None:
    """As a server opens it (`RuntimeOptions.prefix_cache`): a prompt sharing another's first
    130 tokens reads their first whole block (128 tokens) from the cache and says so before
    its first token, and its greedy tokens are still the reference's. The engine says how full
    its KV cache is after each step (a server's gauge)."""
    one, two = llama.family.held_out(passages=2, tokens=150)
    prompts = [one, one[:130] + two[:20]]
    expected = [list(reference.stream(p, Sampling(12))) for p in prompts]

    async def serve(vllm: VllmGenerator) -> list[tuple[list[int], int]]:
        scheduler = Scheduler(vllm)
        answers = []
        for prompt in prompts:  # one after the other: the first's blocks are cached by then
            stream = await scheduler.start(prompt, Sampling(12))
            tokens = []
            async for token in stream:
                tokens.append(token)
                used.append(vllm.kv_cache_usage())  # as of the step before this token's
            answers.append((tokens, stream.cached_tokens))
        await scheduler.stop()
        return answers

    used: list[float | None] = []
    vllm = started["spare"].result()
    assert vllm.kv_cache_usage() is None  # no step yet
    assert vllm.describe()["prefix_caching"] is True
    (first, not_cached), (second, cached) = asyncio.run(serve(vllm))
    assert (not_cached, cached) == (0, 128)
    assert [first, second] == expected
    # a few blocks of thousands while a sequence runs; none once the step that ends it frees
    # them, which a stream's last token may or may not be read after
    assert all(u is not None and 0 <= u < 0.5 for u in used[1:])
    assert sum(1 for u in used if u) >= len(used) - 3


def test_the_bench_runs_requests_at_once_as_streams_vllm_batches(
    llama: LanguageModel, vllm: VllmGenerator
) -> None:
    prompts = [Prompt(tuple(ids), 6) for ids in llama.family.held_out(passages=3, tokens=20)]
    run = time_at_once({"vllm": vllm}, prompts, 3, llama.family.context_length)["vllm"]
    assert run.how == "streams"  # three threads' streams, not one after another
    assert run.tokens == 3 * 6


def test_a_bad_request_is_refused_before_any_work(
    llama: LanguageModel, vllm: VllmGenerator, folder: Artifact
) -> None:
    with pytest.raises(BadInput, match="the prompt is empty"):
        vllm.stream([], Sampling(8))
    with pytest.raises(BadInput, match="exceed the vllm-fp32 engine's context of 256"):
        vllm.stream([5] * 250, Sampling(8))
    with pytest.raises(BadInput, match="exceed"):
        vllm.logprobs([5] * 256)  # its last row needs one generated step
    with pytest.raises(Unsupported, match="runs a Hugging Face model folder"):
        open_engine("vllm", llama.original(), RuntimeOptions())
    with pytest.raises(Unsupported, match="runs on cpu only"):
        open_engine("vllm", folder, RuntimeOptions(device=Device.parse("cuda")))


def test_a_dead_worker_is_one_line_and_close_leaves_nothing_running(
    started: dict[str, Future[VllmGenerator]],
) -> None:
    generator = started["spare"].result()  # an fp32 engine of its own, opened in `started`
    intel = bool(openmp_preload(ensure_env(VLLM_ENV).path))  # vllm-cpu ships it on x86
    assert generator.describe()["openmp"] == ("intel" if intel else "torch's")  # as asked
    worker = generator._worker._process  # the test kills it as a crash would
    os.kill(worker.pid, signal.SIGKILL)
    with pytest.raises(RuntimeFailure, match="exited") as raised:
        list(generator.stream([5, 6, 7], Sampling(8)))
    assert len(str(raised.value).splitlines()) == 1
    generator.close()
    assert worker.poll() is not None
    assert not Path(generator._worker.folder).exists()


def test_streamed_tokens_carry_vllms_log_probabilities(
    llama: LanguageModel, vllm: VllmGenerator, reference: Generator
) -> None:
    """Asked, each streamed token is a `Token` with its raw log-probability (the fp32 torch
    reference's teacher-forced one) and vLLM's ranked alternatives, best first."""
    prompt = question_ids(llama)
    tokens = list(vllm.stream(prompt, Sampling(max_new_tokens=8, logprobs=2)))
    assert tokens == list(vllm.stream(prompt, Sampling(max_new_tokens=8)))
    check_greedy_scores(tokens, prompt, reference, alternatives=2)


def test_a_grammar_holds_vllms_tokens_as_it_holds_mahirs(
    llama: LanguageModel, vllm: VllmGenerator, reference: Generator
) -> None:
    """Held to a JSON schema's grammar, vLLM (its llguidance backend, in its own process)
    writes greedily the tokens mahir's own engine writes under the same grammar: valid JSON
    the tiny random model would never write alone."""
    from mahir.generation import Structure
    from mahir.serve.structured import Grammars

    family = llama.family
    grammars = Grammars(family.tokenizer, family.vocab_size, family.stop_token_ids)
    schema = {
        "type": "object",
        "properties": {"answer": {"enum": ["yes", "no"]}},
        "required": ["answer"],
        "additionalProperties": False,  # else a weak model may write keys until max_tokens
    }
    structure = Structure(schema)
    prompt = question_ids(llama)

    def held(generator: Generator) -> list[int]:
        sampling = family.sampling(24, constraint=grammars.constraint(structure, "response_format"))
        return list(generator.stream(prompt, sampling))

    tokens = held(vllm)
    assert tokens == held(reference)
    assert json.loads(family.decode(tokens))["answer"] in ("yes", "no")
