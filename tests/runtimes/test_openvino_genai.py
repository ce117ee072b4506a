"""The OpenVINO GenAI engine on a tiny random-weight Llama exported through mahir's optimum-intel
environment: greedy output and logprobs of the fp32 IR equal the PyTorch reference's; stop
tokens stop, seeds repeat, an abandoned stream cancels; int8 weights are judged against the
budget; an export is cached by content; what the engine cannot run is refused in one line.

The environment (~1.5 GB of pins) is shared with the user's mahir cache, keyed by its pins, so
only the first run on a machine creates it (1-3 minutes); everything else is per session."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mahir.errors import BadInput, Unsupported
from mahir.export.openvino_llm import OPTIMUM_ENV, RECORD, LlmWeights, export_llm
from mahir.families.decoder import LanguageModel
from mahir.files import cache_dir
from mahir.generation import Generator, Sampling
from mahir.generation_quality import (
    GenerationBudget,
    Judging,
    held_out_answers,
    judge,
    teacher_forced,
)
from mahir.runtimes.engines import open_engine
from mahir.runtimes.openvino_genai import OpenVinoGenerator
from mahir.types import Artifact, RuntimeOptions
from tests.helpers import cli, question_ids, shared_env

pytestmark = pytest.mark.own_env
OWN_ENVS = (OPTIMUM_ENV,)
"""Made from the start of the run, beside other tests (`helpers.make_own_envs_early`)."""
ONE_THREAD = RuntimeOptions(threads=1)


@pytest.fixture(scope="module")
def optimum_env() -> None:
    shared_env(OPTIMUM_ENV)


@pytest.fixture(scope="module")
def exports(optimum_env: None) -> Path:
    """Where mahir caches exports in this session: the bench's CLI process finds them too."""
    return cache_dir() / "openvino-llm"


@pytest.fixture(scope="module")
def fp32_ir(tiny_llm: LanguageModel, exports: Path) -> Artifact:
    return export_llm(tiny_llm, LlmWeights(), cache=exports, threads=1)


@pytest.fixture(scope="module")
def openvino(fp32_ir: Artifact) -> Generator:
    return open_engine("openvino", fp32_ir, ONE_THREAD)


@pytest.fixture(scope="module")
def reference(tiny_llm: LanguageModel) -> Generator:
    return open_engine("torch", tiny_llm.original(), ONE_THREAD)


def test_fp32_greedy_equals_the_torch_reference(
    tiny_llm: LanguageModel, openvino: Generator, reference: Generator
) -> None:
    prompt, greedy = question_ids(tiny_llm), Sampling(max_new_tokens=16)
    tokens = list(openvino.stream(prompt, greedy))
    assert tokens == list(reference.stream(prompt, greedy))
    assert len(set(tokens)) > 4  # a real sequence, not one token repeated


@pytest.mark.parametrize("engine", ["openvino", "openvino-paged"])
def test_a_padded_batch_gives_each_row_what_it_gives_alone(
    tiny_llm: LanguageModel, fp32_ir: Artifact, engine: str
) -> None:
    generator = open_engine(engine, fp32_ir, ONE_THREAD)
    prompts = [
        question_ids(tiny_llm),
        question_ids(tiny_llm)[:3],
        tiny_llm.family.held_out(1, 24)[0],
    ]
    greedy = Sampling(max_new_tokens=10)
    alone = [list(generator.stream(p, greedy)) for p in prompts]
    assert isinstance(generator, OpenVinoGenerator)
    assert generator.generate_batch(prompts, greedy) == alone


def test_paged_slots_stream_concurrent_requests_each_as_alone(
    tiny_llm: LanguageModel, fp32_ir: Artifact, openvino: Generator
) -> None:
    """With slots, the paged engine runs concurrent streams as requests of one continuous
    batch, stepped by mahir's loop, prompts split into steps of 8 tokens: each gets the
    stateful engine's tokens for it alone, a closed stream's request is dropped, a seeded
    sample repeats."""
    prompts = [
        question_ids(tiny_llm),
        question_ids(tiny_llm)[:3],
        tiny_llm.family.held_out(1, 24)[0],
        [7],
    ]
    news = [60, 40, 30, 20]
    alone = [list(openvino.stream(p, Sampling(n))) for p, n in zip(prompts, news, strict=True)]
    chunked = RuntimeOptions(threads=1, slots=4, step_tokens=8)  # the 24-token prompt in 3+
    batched = open_engine("openvino-paged", fp32_ir, chunked)
    assert isinstance(batched, OpenVinoGenerator)
    assert batched.batch is not None
    assert batched.max_concurrency == batched.describe()["slots"] == 4
    assert batched.describe()["step_tokens"] == 8
    with ThreadPoolExecutor(4) as pool:
        streams = pool.map(lambda i: list(batched.stream(prompts[i], Sampling(news[i]))), range(4))
        assert list(streams) == alone
    assert batched.batch.stats.most >= 2  # some steps ran several requests together
    left = batched.stream(prompts[0], Sampling(200))
    next(left)
    left.close()  # its request is dropped at the next step; the engine serves the next call
    assert list(batched.stream(prompts[1], Sampling(40))) == alone[1]
    sampling = Sampling(24, temperature=1.0, seed=7)
    assert list(batched.stream(prompts[0], sampling)) == list(batched.stream(prompts[0], sampling))
    batched.close()


def test_fp32_logprobs_agree_with_torch(
    tiny_llm: LanguageModel, openvino: Generator, reference: Generator
) -> None:
    sequences = tiny_llm.family.held_out(passages=3, tokens=64)
    mine = [openvino.logprobs(s) for s in sequences]
    assert mine[0].shape == (len(sequences[0]), tiny_llm.family.vocab_size)
    assert mine[0].dtype == np.float32
    forced = teacher_forced(mine, [reference.logprobs(s) for s in sequences], sequences)
    assert forced["top1_agreement"] == 1.0
    assert forced["kl_mean"] < 1e-5
    described = openvino.describe()
    assert described["precision"] == "f32"
    assert described["kv_cache_precision"] == "f32"
    assert described["weight_format"] == "fp32"
    assert described["threads"] == 1
    assert described["weights_mb"] > 0


def test_stop_tokens_stop_seeds_repeat_and_an_abandoned_stream_cancels(
    tiny_llm: LanguageModel, openvino: Generator
) -> None:
    prompt = question_ids(tiny_llm)
    free = list(openvino.stream(prompt, Sampling(max_new_tokens=12)))
    stop = free[4]
    stopped = list(openvino.stream(prompt, Sampling(12, stop_token_ids=(stop,))))
    assert stopped == free[: free.index(stop) + 1]

    def sample(seed: int) -> list[int]:
        return list(openvino.stream(prompt, Sampling(24, temperature=1.0, seed=seed)))

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)

    stream = openvino.stream(prompt, Sampling(max_new_tokens=200))
    assert [next(stream) for _ in range(3)] == free[:3]
    stream.close()  # cancels the generation on its thread; the engine serves the next call
    assert list(openvino.stream(prompt, Sampling(max_new_tokens=12))) == free


def test_prompt_lookup_drafts_and_keeps_the_greedy_answer(
    tiny_llm: LanguageModel, fp32_ir: Artifact, openvino: Generator
) -> None:
    """Prompt lookup drafts tokens from earlier text and verifies them in one pass: its greedy
    answers are the plain pipeline's, on a prompt that repeats itself (drafts found) and on one
    that does not; a seeded sample repeats; a batch gives each row its own answer."""
    lookup = open_engine("openvino-lookup", fp32_ir, ONE_THREAD)
    assert lookup.describe()["prompt_lookup"] == 4
    passage = list(tiny_llm.family.held_out(1, 24)[0])
    for prompt in (passage * 3, question_ids(tiny_llm)):
        assert list(lookup.stream(prompt, Sampling(24))) == list(
            openvino.stream(prompt, Sampling(24))
        )
    sampled = Sampling(16, temperature=1.0, seed=5)
    assert list(lookup.stream(passage, sampled)) == list(lookup.stream(passage, sampled))
    rows = [passage * 2, question_ids(tiny_llm)]
    alone = [list(openvino.stream(p, Sampling(12))) for p in rows]
    assert lookup.generate_batch(rows, Sampling(12)) == alone  # type: ignore[attr-defined]


def test_int8_weights_are_judged_against_the_reference(
    tiny_llm: LanguageModel, exports: Path, reference: Generator
) -> None:
    artifact = export_llm(tiny_llm, LlmWeights(format="int8"), cache=exports, threads=1)
    record = json.loads((artifact.path.parent / RECORD).read_text())  # type: ignore[union-attr]
    assert record["weights"]["format"] == "int8"
    generator = open_engine("openvino", artifact, ONE_THREAD)
    answers = held_out_answers(reference, tiny_llm.family, Judging(greedy_tokens=16))
    quality = judge(generator, answers)
    assert quality.top1_agreement < 1.0 or quality.kl_mean > 0  # the weights did change
    assert GenerationBudget(min_top1=0.8, max_kl=0.1).failures(quality) == []
    fp32_mb = open_engine("openvino", export_llm(tiny_llm, cache=exports), ONE_THREAD)
    assert generator.describe()["weights_mb"] < 0.6 * fp32_mb.describe()["weights_mb"]


def test_a_second_export_is_the_cached_one(
    tiny_llm: LanguageModel, exports: Path, fp32_ir: Artifact
) -> None:
    assert fp32_ir.path is not None
    written = fp32_ir.path.stat().st_mtime_ns
    steps: list[str] = []
    again = export_llm(tiny_llm, LlmWeights(), cache=exports, on_step=steps.append)
    assert again.path == fp32_ir.path
    assert again.path.stat().st_mtime_ns == written
    assert steps == []  # neither the environment nor the export was touched
    assert "verification" in json.loads((again.path.parent / RECORD).read_text())


def test_what_the_engine_cannot_run_is_refused_in_one_line(
    tiny_llm: LanguageModel, openvino: Generator, tmp_path: Path
) -> None:
    with pytest.raises(Unsupported, match="runs a stateful OpenVINO IR"):
        open_engine("openvino", tiny_llm.original(), ONE_THREAD)
    with pytest.raises(BadInput, match="exceed the openvino engine's context of 256"):
        openvino.stream([5] * 250, Sampling(8))
    gone = LanguageModel("gone", str(tmp_path / "gone"), tiny_llm.module, tiny_llm.family, False)
    with pytest.raises(BadInput, match="no longer exists") as raised:
        export_llm(gone, cache=tmp_path)
    assert len(str(raised.value).splitlines()) == 1


def test_bench_llm_times_and_judges_openvino_rows(
    decoder_folders: dict[str, Path], tmp_path: Path, optimum_env: None
) -> None:
    out = tmp_path / "bench.json"
    small = ("--tokens", "48-96", "--new-tokens", "4-8", "--prompts", "2", "--threads", "1")
    found = cli("bench", str(decoder_folders["llama"]), "-r", "torch", "-r", "openvino-int8",
                *small, "--json", str(out))  # fmt: skip
    assert found.returncode == 0, found.stderr
    rows = {row["engine"]: row for row in json.loads(out.read_text())["results"]}
    row = rows["openvino-int8"]
    assert row["settings"]["weights"] == "OpenVINO IR int8"
    assert row["settings"]["weight_format"] == "int8"
    assert 8 <= row["tokens"] <= 16
    assert row["decode_ms"]["p50"] > 0
    assert row["quality"]["top1_agreement"] > 0.8


def test_paged_slots_stream_each_tokens_own_logprob(
    tiny_llm: LanguageModel, fp32_ir: Artifact, openvino: Generator
) -> None:
    """In the continuous batch GenAI's sampler scores each token it chose: that score is the
    IR's own log-probability of the token (before temperature and top-p), greedy and sampled;
    alternatives it cannot give are refused in one line, and a server built on it takes
    logprobs 0 and refuses more before any work."""
    from mahir.errors import Mismatch
    from mahir.generation import Token
    from mahir.serve.llm_app import LlmServed
    from mahir.serve.openai_chat import parse_chat, parse_completion
    from mahir.serve.served import ServeConfig

    batched = open_engine("openvino-paged", fp32_ir, RuntimeOptions(threads=1, slots=2))
    prompt = question_ids(tiny_llm)
    for sampling in (Sampling(12, logprobs=0), Sampling(12, temperature=1.2, seed=3, logprobs=0)):
        tokens = list(batched.stream(prompt, sampling))
        assert all(isinstance(t, Token) and t.top == () for t in tokens)
        forced = openvino.logprobs(prompt + tokens)
        own = [forced[len(prompt) - 1 + i, t] for i, t in enumerate(tokens)]
        np.testing.assert_allclose([t.logprob for t in tokens], own, atol=2e-3)  # type: ignore[attr-defined]
    with pytest.raises(Unsupported, match="not the most likely alternatives"):
        batched.stream(prompt, Sampling(4, logprobs=2))
    served = LlmServed(batched, tiny_llm.family, "tiny", ServeConfig())
    once = tiny_llm.family.encode("Once")
    asked = parse_completion({"prompt": "Once", "max_tokens": 4, "logprobs": 0})
    assert served.sampling(asked, once).logprobs == 0
    messages = [{"role": "user", "content": "Once"}]
    more = parse_chat({"messages": messages, "logprobs": True, "top_logprobs": 3})
    with pytest.raises(Mismatch, match="at most 0 alternatives") as refused:
        served.sampling(more, once)
    assert refused.value.param == "top_logprobs"
    batched.close()


def test_a_server_on_it_refuses_logprobs_before_any_work(
    tiny_llm: LanguageModel, openvino: Generator
) -> None:
    """The stateful pipeline streams ids and reports no log-probabilities: a request asking
    for them is a 400 naming the field, the engine untouched; handed one directly, the engine
    refuses it rather than ignore it."""
    from mahir.errors import Mismatch
    from mahir.serve.llm_app import LlmServed
    from mahir.serve.openai_chat import parse_completion
    from mahir.serve.served import ServeConfig

    served = LlmServed(openvino, tiny_llm.family, "tiny", ServeConfig())
    asked = parse_completion({"prompt": "Once", "max_tokens": 4, "logprobs": 1})
    with pytest.raises(Mismatch, match="does not report log-probabilities") as refused:
        served.sampling(asked, tiny_llm.family.encode("Once"))
    assert refused.value.param == "logprobs"
    plain = parse_completion({"prompt": "Once", "max_tokens": 4})
    assert served.sampling(plain, tiny_llm.family.encode("Once")).logprobs is None
    with pytest.raises(Unsupported, match="log-probabilities"):
        openvino.stream([5, 6], Sampling(4, logprobs=0))


@pytest.mark.parametrize("engine", ["openvino", "openvino-paged"])
def test_structured_outputs_hold_its_tokens_to_a_schema_and_to_tool_calls(
    tiny_llm: LanguageModel, fp32_ir: Artifact, engine: str
) -> None:
    """The tiny random model left alone writes no JSON; held by GenAI's own structured outputs
    (the tokenizer IRs the export wrote beside the model), it writes a value of the schema and
    stops, greedy or sampled, alone or with slots; a forced tool call (one or several) opens as
    the server's reader expects, and with tools beside a JSON schema the answer is either.
    (xgrammar leaves JSON's whitespace free, and a random model fills it: so the schema is a
    bare enum, and a call is checked as far as its first whitespace.)"""
    from mahir.serve.openai_chat import parse_chat
    from mahir.serve.structured import Grammars, structure_of

    family = tiny_llm.family
    grammars = Grammars(family.tokenizer, family.vocab_size, family.stop_token_ids)
    slots = 2 if engine == "openvino-paged" else 1
    generator = open_engine(engine, fp32_ir, RuntimeOptions(threads=1, slots=slots))
    assert generator.constrained  # type: ignore[attr-defined]
    prompt = question_ids(tiny_llm)
    free = family.decode(list(generator.stream(prompt, family.sampling(24))))
    assert not free.lstrip().startswith(('"', "<tool_call>"))

    def held(fields: dict[str, Any], new: int, seed: int | None = None) -> list[int]:
        request = parse_chat({"messages": [{"role": "user", "content": "hi"}], **fields})
        asked = structure_of(request)
        assert asked is not None
        temperature = 0 if seed is None else 1.0
        constraint = grammars.constraint(*asked)
        sampling = family.sampling(new, temperature=temperature, seed=seed, constraint=constraint)
        return list(generator.stream(prompt, sampling))

    schema = {"type": "json_schema", "json_schema": {"name": "a", "schema": ANSWER}}
    for seed in (None, 3):
        tokens = held({"response_format": schema}, 12, seed)
        assert tokens[-1] in family.stop_token_ids
        assert json.loads(family.decode(tokens[:-1])) in ("yes", "no")
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}
    forced = {"tools": [weather], "tool_choice": "required"}
    for fields in (forced, {**forced, "parallel_tool_calls": False}):
        assert family.decode(held(fields, 16)).startswith("<tool_call>\n{")
    either = {"tools": [weather], "response_format": {"type": "json_object"}}  # a call or JSON
    assert family.decode(held(either, 16)).startswith(("<tool_call>\n{", "{"))


ANSWER = {"enum": ["yes", "no"]}


def test_an_export_without_tokenizer_irs_refuses_grammars_in_one_line(
    tiny_llm: LanguageModel, fp32_ir: Artifact, tmp_path: Path
) -> None:
    """An IR exported before the tokenizer IRs were written: a request for structure is a 400
    naming the field, before any work; handed one directly, the engine refuses it; a batch
    refuses a constraint shared by its rows."""
    import shutil

    from mahir.errors import Mismatch
    from mahir.generation import Structure
    from mahir.serve.llm_app import LlmServed
    from mahir.serve.openai_chat import parse_chat
    from mahir.serve.served import ServeConfig
    from mahir.serve.structured import Grammars

    assert fp32_ir.path is not None
    older = tmp_path / "older"
    shutil.copytree(fp32_ir.path.parent, older, ignore=shutil.ignore_patterns("*tokenizer*"))
    copied = Artifact("openvino", fp32_ir.spec, path=older / fp32_ir.path.name)
    generator = open_engine("openvino", copied, ONE_THREAD)
    served = LlmServed(generator, tiny_llm.family, "tiny", ServeConfig())
    shaped = parse_chat(
        {
            "messages": [{"role": "user", "content": "Hi"}],
            "response_format": {"type": "json_object"},
        }
    )
    with pytest.raises(Mismatch, match="cannot hold its tokens to a grammar") as refused:
        served.sampling(shaped, tiny_llm.family.encode("Hi"))
    assert refused.value.param == "response_format"
    family = tiny_llm.family
    grammars = Grammars(family.tokenizer, family.vocab_size, family.stop_token_ids)
    held = Sampling(4, constraint=grammars.constraint(Structure({"type": "object"}), "x"))
    with pytest.raises(Unsupported, match="no tokenizer IR"):
        generator.stream([5, 6], held)
    with pytest.raises(ValueError, match="follows one sequence"):  # nor in a batch
        generator.generate_batch([[5, 6], [7]], held)  # type: ignore[attr-defined]
