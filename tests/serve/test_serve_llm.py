"""`mahir serve` on an LLM output directory (a tiny random Llama, PyTorch engine) as a real
process on loopback, driven by the stock `openai` client: answers equal the generator's own,
streams carry only their own tokens, a client that leaves frees its slot, overload is a 503,
bad requests are 400s in OpenAI's shape, SIGTERM lets a running stream finish, and an engine
with slots (continuous batching, carried by `mahir.json`'s options) generates concurrent requests
together, each answer the one the engine gives alone."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mahir.errors import BadInput
from mahir.families.decoder import Decoder
from mahir.generation import Generator
from mahir.llm_outdir import open_llm_output
from mahir.serve.llm_text import TextStream
from mahir.serve.metrics import LlmMetrics
from mahir.types import RuntimeOptions
from tests.helpers import Server, cli


@pytest.fixture(scope="module")
def llm_dir(served_llm_dir: Path) -> Path:
    return served_llm_dir


@pytest.fixture(scope="module")
def opened(llm_dir: Path) -> tuple[Generator, Decoder]:
    return open_llm_output(llm_dir)


@pytest.fixture(scope="module")
def server(llm_dir: Path) -> Iterator[Server]:
    running = Server(llm_dir)
    yield running
    assert running.stop() == 0


def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)


def expected(opened: tuple[Generator, Decoder], prompt: list[int], new: int) -> tuple[str, int]:
    """The generator's own greedy text and token count for `prompt`."""
    generator, family = opened
    tokens = list(generator.stream(prompt, family.sampling(new)))
    return family.decode(tokens), len(tokens)


def chat(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


def test_chat_and_completions_equal_the_generator(
    server: Server, opened: tuple[Generator, Decoder]
) -> None:
    family = opened[1]
    api = client(server)
    want, count = expected(opened, family.prompt_ids(chat("Hello there")), 12)
    answer = api.chat.completions.create(
        model=api.models.list().data[0].id,
        messages=chat("Hello there"),
        max_tokens=12,
        temperature=0,
    )
    assert answer.choices[0].message.content == want
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert answer.usage is not None
    assert answer.usage.completion_tokens == count
    prompt_ids = family.prompt_ids(chat("Hello there"))
    assert answer.usage.prompt_tokens == len(prompt_ids)
    streamed = api.chat.completions.create(
        model=answer.model,
        messages=chat("Hello there"),
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(streamed)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == count
    want, count = expected(opened, family.encode("Once upon a time"), 10)
    done = api.completions.create(
        model=answer.model, prompt="Once upon a time", max_tokens=10, temperature=0
    )
    assert done.choices[0].text == want
    assert done.usage is not None
    assert done.usage.total_tokens == count + len(family.encode("Once upon a time"))
    assert done.usage.prompt_tokens_details is not None
    assert done.usage.prompt_tokens_details.cached_tokens == 0  # this engine keeps no prefixes
    pieces = api.completions.create(
        model=answer.model, prompt="Once upon a time", max_tokens=10, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in pieces) == want


def test_n_choices_each_carry_their_index_and_seeded_ones_their_own_seed(
    server: Server, opened: tuple[Generator, Decoder]
) -> None:
    """Greedy choices are the one greedy answer n times; seeded ones sample with seed + index,
    each the generator's own answer for that seed; a stream names each chunk's choice."""
    generator, family = opened
    api = client(server)
    name = api.models.list().data[0].id
    want, count = expected(opened, family.prompt_ids(chat("Hi")), 8)
    greedy = api.chat.completions.create(
        model=name, messages=chat("Hi"), max_tokens=8, temperature=0, n=3
    )
    assert [c.index for c in greedy.choices] == [0, 1, 2]
    assert [c.message.content for c in greedy.choices] == [want] * 3
    assert greedy.usage is not None
    assert greedy.usage.completion_tokens == 3 * count
    prompt = family.encode("Once upon a time")
    sampled = api.completions.create(
        model=name, prompt="Once upon a time", max_tokens=8, temperature=1, seed=5, n=2
    )
    for choice in sampled.choices:
        own = family.sampling(8, temperature=1.0, top_p=1.0, seed=5 + choice.index)
        assert choice.text == family.decode(list(generator.stream(prompt, own)))
    events = api.chat.completions.create(
        model=name,
        messages=chat("Hi"),
        max_tokens=8,
        temperature=0,
        n=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts, finished = ["", ""], [None, None]
    chunks = list(events)
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            finished[choice.index] = choice.finish_reason or finished[choice.index]
    assert texts == [want, want]
    assert None not in finished
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 2 * count


def test_logprobs_come_with_each_token_in_openais_shapes(
    server: Server, opened: tuple[Generator, Decoder]
) -> None:
    """Chat's `logprobs` + `top_logprobs`, completions' `logprobs`, streamed and not: each
    generated token's text, its teacher-forced log-probability, the alternatives best first."""
    generator, family = opened
    api = client(server)
    name = api.models.list().data[0].id
    prompt = family.prompt_ids(chat("Hi"))
    tokens = list(generator.stream(prompt, family.sampling(8)))
    kept = [t for t in tokens if t not in family.stop_token_ids]
    forced = generator.logprobs([*prompt, *tokens])[len(prompt) - 1 : -1]
    answer = api.chat.completions.create(
        model=name, messages=chat("Hi"), max_tokens=8, temperature=0, logprobs=True, top_logprobs=2
    )
    scored = answer.choices[0].logprobs
    assert scored is not None
    assert scored.content is not None
    assert [entry.token for entry in scored.content] == [family.tokenizer.decode([t]) for t in kept]
    for entry, token, row in zip(scored.content, kept, forced, strict=False):
        assert entry.logprob == pytest.approx(float(row[token]), abs=1e-3)
        best = [top.token for top in entry.top_logprobs]
        assert (best[0], len(best)) == (entry.token, 2)  # greedy: the most likely first
    asked: dict[str, Any] = {"model": name, "prompt": "Once upon a time", "max_tokens": 6}
    done = api.completions.create(**asked, temperature=0, logprobs=2)
    listed = done.choices[0].logprobs
    assert listed is not None
    assert listed.tokens
    assert listed.text_offset
    assert listed.text_offset[0] == 0
    steps = [b - a for a, b in zip(listed.text_offset, listed.text_offset[1:], strict=False)]
    assert steps == [len(token) for token in listed.tokens[:-1]]
    assert all(len(top) <= 2 for top in listed.top_logprobs or [])
    pieces = api.completions.create(**asked, temperature=0, logprobs=2, stream=True)
    streamed = [
        token
        for chunk in pieces
        if chunk.choices and chunk.choices[0].logprobs
        for token in chunk.choices[0].logprobs.tokens or []
    ]
    assert streamed == listed.tokens
    plain = api.completions.create(**asked, temperature=0)
    assert plain.choices[0].logprobs is None


def test_64_concurrent_streams_each_get_their_own_tokens(
    server: Server, opened: tuple[Generator, Decoder]
) -> None:
    family = opened[1]
    prompts = [f"Tell me about the number {i}" for i in range(64)]
    wants = [expected(opened, family.prompt_ids(chat(p)), 6)[0] for p in prompts]
    api = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
    name = client(server).models.list().data[0].id

    async def one(prompt: str) -> str:
        stream = await api.chat.completions.create(
            model=name, messages=chat(prompt), max_tokens=6, temperature=0, stream=True
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream])

    async def all_of_them() -> list[str]:
        async with api:
            return await asyncio.gather(*(one(p) for p in prompts))

    assert asyncio.run(all_of_them()) == wants
    with pytest.raises(openai.NotFoundError):  # the model's name is checked
        client(server).chat.completions.create(model="another", messages=chat("hi"))


KV_CACHE = "mahir_llm_kv_cache_usage"


def metric(server: Server, name: str) -> float:
    return _sample(httpx.get(f"{server.url}/metrics").text, name)


def _sample(text: str, name: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    raise KeyError(name)


def test_the_kv_cache_gauge_is_there_only_where_the_engine_reports_one() -> None:
    """vLLM says how full its KV cache is (`VllmGenerator.kv_cache_usage`); engines that do
    not get no gauge rather than one stuck at 0."""
    assert _sample(LlmMetrics(lambda: 0.25).render().decode(), KV_CACHE) == 0.25
    assert _sample(LlmMetrics(lambda: None).render().decode(), KV_CACHE) == 0.0  # no step yet
    with pytest.raises(KeyError):
        _sample(LlmMetrics().render().decode(), KV_CACHE)


def test_a_client_that_leaves_frees_its_slot_at_the_next_token(server: Server) -> None:
    before = metric(server, "mahir_llm_output_tokens_total")
    body = {"prompt": "Hello", "max_tokens": 240, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as response:
        assert response.status_code == 200
        next(response.iter_lines())  # the first event: it is generating
    # the next request runs alone: the one that left no longer holds the slot
    api = client(server)
    name = api.models.list().data[0].id
    api.completions.create(model=name, prompt="Hi", max_tokens=4, temperature=0)
    while metric(server, "mahir_llm_running") != 0:
        pass  # polled: the last request's slot is freed just after its answer
    generated = metric(server, "mahir_llm_output_tokens_total") - before
    assert generated < 240, "the generation went on after its client left"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b'{"model": "m"}', "messages"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}', "max_tokens"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "n": 17}', "n"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}', "top_logprobs"),
        (
            b'{"messages": [{"role": "user", "content": "hi"}], "logprobs": true, '
            b'"top_logprobs": 21}',
            "top_logprobs",
        ),
        (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}', "messages"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": -1}', "temperature"),
        (b'{"messages": [{"role": "wizard", "content": "hi"}]}', "messages[0]"),
        (  # no engine here is given penalties or biases: refused, never silently dropped
            b'{"messages": [{"role": "user", "content": "hi"}], "frequency_penalty": 0.5}',
            "frequency_penalty",
        ),
        (
            b'{"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"5": 100}}',
            "logit_bias",
        ),
        (  # the default LLM's chat template takes no tools
            b'{"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", '
            b'"function": {"name": "f", "parameters": {}}}]}',
            "tools",
        ),
    ],
)
def test_bad_requests_are_400s_in_openais_shape(
    server: Server, body: bytes, param: str | None
) -> None:
    response = httpx.post(f"{server.url}/v1/chat/completions", content=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


def test_penalties_and_biases_that_ask_for_nothing_are_accepted(server: Server) -> None:
    """What clients send as defaults: zero penalties, an empty bias."""
    api = client(server)
    answer = api.completions.create(
        model=api.models.list().data[0].id,
        prompt="Hi",
        max_tokens=2,
        frequency_penalty=0,
        presence_penalty=0.0,
        logit_bias={},
    )
    assert answer.usage is not None
    assert answer.usage.completion_tokens == 2


def test_a_prompt_past_the_context_is_refused_by_the_client_too(server: Server) -> None:
    api = client(server)
    with pytest.raises(openai.BadRequestError, match="context holds"):
        api.completions.create(model=api.models.list().data[0].id, prompt="word " * 300)


def test_overload_is_503_never_500_and_sigterm_lets_a_stream_finish(llm_dir: Path) -> None:
    server = Server(llm_dir, "--max-queue", "2")
    try:
        body = {"prompt": "Hello", "max_tokens": 200, "temperature": 0, "stream": True}

        async def flood() -> list[int]:
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:

                async def one() -> int:
                    async with http.stream("POST", "/v1/completions", json=body) as response:
                        await response.aread()
                        if response.status_code == 503:
                            assert response.headers["retry-after"]
                        return response.status_code

                return await asyncio.gather(*(one() for _ in range(16)))

        statuses = asyncio.run(flood())
        assert set(statuses) == {200, 503}, statuses
        lines = []
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as response:
            events = response.iter_lines()
            lines.append(next(events))
            server.terminate()
            lines += list(events)
        assert lines[-2:] == ["data: [DONE]", ""] or lines[-1] == "data: [DONE]"
        assert any('"finish_reason":"length"' in line for line in lines)
    finally:
        assert server.stop() == 0


def test_a_batched_engine_generates_concurrent_requests_together(
    llm_dir: Path, opened: tuple[Generator, Decoder]
) -> None:
    prompts = [f"Count to {i}" for i in range(4, 8)]
    family = opened[1]
    wants = [expected(opened, family.encode(p), 160)[0] for p in prompts]
    server = Server(llm_dir, "--slots", "4")  # the torch engine's continuous batch
    try:
        assert metric(server, "mahir_llm_running") == 0
        name = client(server).models.list().data[0].id

        async def generate() -> tuple[list[str], float]:
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:

                async def one(prompt: str) -> str:
                    body = {"model": name, "prompt": prompt, "max_tokens": 160, "temperature": 0}
                    response = await http.post("/v1/completions", json=body)
                    return str(response.json()["choices"][0]["text"])

                answers = asyncio.gather(*(one(p) for p in prompts))
                most = 0.0
                while not answers.done():  # polled while the four generate
                    metrics = (await http.get("/metrics")).text
                    most = max(most, _sample(metrics, "mahir_llm_running"))
                return await answers, most

        answers, most = asyncio.run(generate())
        assert answers == wants
        assert most > 1, "the requests were generated one at a time"
    finally:
        assert server.stop() == 0


def test_slots_are_refused_where_mahir_does_not_batch(llm_dir: Path, tmp_path: Path) -> None:
    scheduled = tmp_path / "scheduled"
    shutil.copytree(llm_dir, scheduled)
    manifest = json.loads((scheduled / "mahir.json").read_text())
    manifest["engine"] = "vllm"  # an engine with a scheduler of its own
    (scheduled / "mahir.json").write_text(json.dumps(manifest))
    with pytest.raises(BadInput, match="schedules requests itself"):
        open_llm_output(scheduled, slots=4)
    done = cli("serve", str(llm_dir.parent / "nothing-here"), "--slots", "4")
    assert done.returncode == 2, done.stderr
    assert "LLM output directory" in done.stderr


def test_an_llm_is_not_exported_to_triton(llm_dir: Path, tmp_path: Path) -> None:
    done = cli("export", str(llm_dir), "--triton", str(tmp_path / "repo"))
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "holds an LLM; Triton export takes encoders and tensor models" in line
    assert not (tmp_path / "repo").exists()


def test_an_encoders_batching_flags_are_refused_for_an_llm(llm_dir: Path) -> None:
    done = cli("serve", str(llm_dir), "--workers", "2", "--max-delay-ms", "3", "--no-truncate")
    assert done.returncode == 2, done.stderr
    assert "--max-delay-ms and --no-truncate and --workers are for an encoder's" in done.stderr
    done = cli("serve", str(llm_dir), "--max-batch-tokens", "8192")  # its default, but typed
    assert done.returncode == 2, done.stderr
    assert "--max-batch-tokens is for an encoder's requests" in done.stderr
    assert "serving" not in done.stderr  # refused before the engine opened


def test_tune_chooses_slots_under_the_bound_records_them_and_serves_with_them(
    llm_dir: Path, tmp_path: Path
) -> None:
    folder = shutil.copytree(llm_dir, tmp_path / "out")  # the tuner writes into mahir.json
    args = ("--tune", "--p99-ms", "10000", "--tune-seconds", "0.3", "--tune-concurrency", "2")
    server = Server(folder, *args)
    try:
        manifest = json.loads((folder / "mahir.json").read_text())
        reply = httpx.post(
            f"{server.url}/v1/completions",
            json={"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0},
            timeout=60,
        )
        running = metric(server, "mahir_llm_running")
    finally:
        assert server.stop() == 0
    recorded = manifest["batching"]
    assert recorded["slots"] in (1, 2)  # the counts tried, capped at the concurrency
    assert recorded["step_tokens"] in ((None,) if recorded["slots"] == 1 else (256, 32))
    options = RuntimeOptions.from_dict(manifest["options"])  # what serve opens the engine with
    assert (options.slots, options.step_tokens) == (recorded["slots"], recorded["step_tokens"])
    assert recorded["itl_p99_ms"] <= recorded["itl_p99_bound_ms"] == 10000
    assert recorded["output_tokens_per_s"] > 0
    assert reply.status_code == 200, reply.text
    assert running == 0


def test_a_tune_nothing_meets_or_an_engine_without_slots_is_one_line(
    llm_dir: Path, tmp_path: Path
) -> None:
    from mahir.serve.llm_tune import LlmTuneConfig, LlmTuneResult, SlotTrial

    fast = SlotTrial(1, None, 1.0, 50, (10.0,) * 50, (20.0,))
    busy = SlotTrial(4, 32, 1.0, 120, (40.0,) * 120, (60.0,))
    assert LlmTuneConfig(50.0, 4).settings() == [(1, None), (2, 256), (2, 32), (4, 256), (4, 32)]
    assert LlmTuneResult(LlmTuneConfig(50.0, 4), (fast, busy), "m").best is busy
    assert LlmTuneResult(LlmTuneConfig(20.0, 4), (fast, busy), "m").best is fast
    with pytest.raises(BadInput, match=r"lowest: 10\.0 ms with 1 slots"):
        LlmTuneResult(LlmTuneConfig(5.0, 4), (fast, busy), "m").record()
    scheduled = shutil.copytree(llm_dir, tmp_path / "scheduled")
    manifest = json.loads((scheduled / "mahir.json").read_text())
    (scheduled / "mahir.json").write_text(json.dumps({**manifest, "engine": "vllm"}))
    for args, message in [
        (("--tune", "--p99-ms", "50"), "the vllm engine schedules requests itself"),
        (("--tune", "--p99-ms", "50", "--slots", "2"), "--tune chooses the slots"),
    ]:
        done = cli("serve", str(scheduled), *args)
        assert done.returncode == 2, done.stderr
        assert message in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    assert json.loads((scheduled / "mahir.json").read_text())["engine"] == "vllm"  # untouched


def test_text_never_splits_a_character_and_stops_before_a_stop_string(
    opened: tuple[Generator, Decoder],
) -> None:
    tokenizer = opened[1].tokenizer
    ids = tokenizer("naïve café 日本語 done", add_special_tokens=False)["input_ids"]
    text = TextStream(tokenizer, [])
    pieces = [text.add(t) for t in ids] + [text.finish()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == "naïve café 日本語 done"
    stopping = TextStream(tokenizer, [], stops=("語 d",))
    out = "".join(stopping.add(t) for t in ids) + stopping.finish()
    assert out == "naïve café 日本"
    assert stopping.stopped


def test_loadtest_reads_ttft_itl_and_tokens_from_the_stream(server: Server) -> None:
    from mahir.cli.loadtesting import _serves_llm
    from mahir.serve.llm_loadtest import LlmLoad, run_llm_load
    from mahir.serve.loadtest import LoadConfig

    assert _serves_llm(server.url, None)
    config = LoadConfig(server.url, concurrency=2, duration_s=60, max_requests=4)
    result = asyncio.run(run_llm_load(config, LlmLoad(max_tokens=8, prompt_words=(4, 8))))
    result.check()
    summary = result.summary()
    assert summary["ok"] == 4
    assert len(result.ttft_ms) == 4
    assert 4 <= result.output_tokens <= 32
    assert summary["ttft_p50_ms"] > 0
    assert len(result.tpot_ms) <= 4
    assert all(0 < t <= max(result.latencies_ms) for t in result.tpot_ms)
    assert summary["output_tokens_per_s"] > 0
