"""`mahir serve` as a real process on loopback, driven by real clients (httpx, tritonclient)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

import mahir
from mahir.families.text import generate_sentences
from mahir.model import Model
from mahir.pooling import pool
from mahir.runtimes import reference_outputs
from tests.helpers import Server, cli

NAME = "all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def server(served_dir: Path) -> Iterator[Server]:
    running = Server(served_dir, "--max-delay-ms", "2", "--max-body-mb", "1", "--max-queue", "4096")
    yield running
    assert running.stop() == 0


def infer_body(batch: dict[str, np.ndarray]) -> dict[str, object]:
    return {
        "inputs": [
            {"name": n, "shape": list(a.shape), "datatype": "INT64", "data": a.reshape(-1).tolist()}
            for n, a in batch.items()
        ]
    }


def sentences(minilm: Model, count: int, seed: int, max_tokens: int = 64) -> list[str]:
    rng = np.random.default_rng(seed)
    return generate_sentences(count, minilm.family.tokenizer, rng, max_tokens=max_tokens)


def test_tritonclient_round_trip_in_binary_and_json(server: Server, minilm: Model) -> None:
    import tritonclient.http as triton

    batch = minilm.family.tokenize(sentences(minilm, 3, seed=1))
    expected = reference_outputs(minilm, [batch])[0]["last_hidden_state"]
    client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
    assert client.is_server_ready()
    assert client.get_model_metadata(NAME)["inputs"][0]["shape"] == [-1, -1]
    for binary in (True, False):
        inputs = []
        for name, array in batch.items():
            tensor = triton.InferInput(name, list(array.shape), "INT64")
            tensor.set_data_from_numpy(array, binary_data=binary)
            inputs.append(tensor)
        wanted = [triton.InferRequestedOutput("last_hidden_state", binary_data=binary)]
        result = client.infer(NAME, inputs, outputs=wanted)
        got = result.as_numpy("last_hidden_state")
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-3)
    # no outputs named: tritonclient asks for every output as binary, and gets binary
    response = client.infer(NAME, inputs=inputs)
    assert response.get_output("last_hidden_state")["parameters"]["binary_data_size"] > 0
    np.testing.assert_allclose(
        response.as_numpy("last_hidden_state"), expected, atol=1e-4, rtol=1e-3
    )
    client.close()


def test_2000_concurrent_requests_each_get_their_own_answer(
    server: Server, served_dir: Path, minilm: Model
) -> None:
    # 500 distinct sentences, each sent 4 times, spread apart: any two answers swapped between
    # different inputs still show, and what each gets alone is computed 500 times, not 2000.
    texts = sentences(minilm, 500, seed=2, max_tokens=24)
    distinct = [minilm.family.tokenize([t]) for t in texts]
    alone = mahir.load(served_dir)  # what each request would get on its own
    answers = [alone.run(single)["last_hidden_state"] for single in distinct]
    singles = [distinct[i % len(distinct)] for i in range(2000)]
    expected = [answers[i % len(distinct)] for i in range(2000)]
    binary = [{"name": "last_hidden_state", "parameters": {"binary_data": True}}]

    async def send_all() -> list[tuple[int, dict[str, str], bytes]]:
        # aiohttp: 2,000 sockets at once; httpx's pool, not the server, would be the bottleneck.
        connector = aiohttp.TCPConnector(limit=len(singles))
        timeout = aiohttp.ClientTimeout(total=600)
        async with aiohttp.ClientSession(server.url, connector=connector, timeout=timeout) as s:

            async def one(batch: dict[str, np.ndarray]) -> tuple[int, dict[str, str], bytes]:
                body = {**infer_body(batch), "outputs": binary}
                async with s.post(f"/v2/models/{NAME}/infer", json=body) as response:
                    headers = {k.lower(): v for k, v in response.headers.items()}
                    return response.status, headers, await response.read()

            return await asyncio.gather(*(one(b) for b in singles))

    responses = asyncio.run(send_all())
    assert [status for status, _, _ in responses] == [200] * 2000
    for (_, headers, content), want in zip(responses, expected, strict=True):
        got = binary_output(headers, content)
        assert got.shape == want.shape  # cut back to this request's own length
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-3)


def binary_output(headers: dict[str, str], content: bytes) -> np.ndarray:
    """The one output of a response in the binary tensor extension."""
    length = int(headers["inference-header-content-length"])
    out = json.loads(content[:length])["outputs"][0]
    assert out["datatype"] == "FP32"
    return np.frombuffer(content[length:], "<f4").reshape(out["shape"])


def test_embeddings_match_sentence_transformers_pooling(server: Server, minilm: Model) -> None:
    texts = sentences(minilm, 5, seed=3)
    response = httpx.post(f"{server.url}/v1/embeddings", json={"input": texts, "model": NAME})
    assert response.status_code == 200
    body = response.json()
    assert [d["index"] for d in body["data"]] == list(range(5))
    batch = minilm.family.tokenize(texts)
    tokens = reference_outputs(minilm, [batch])[0]["last_hidden_state"]
    assert minilm.family.pooling is not None
    expected = pool(tokens, batch["attention_mask"], minilm.family.pooling)
    got = np.array([d["embedding"] for d in body["data"]], np.float32)
    cosines = (
        (got * expected).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
    )
    assert cosines.min() > 0.9999
    assert body["usage"]["prompt_tokens"] == int(batch["attention_mask"].sum())


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        (f"/v2/models/{NAME}/infer", b"{not json", 400, "not JSON"),
        (f"/v2/models/{NAME}/infer", b'{"inputs": 3}', 400, "inputs"),
        ("/v2/models/nope/infer", b'{"inputs": []}', 404, "no model"),
        (
            f"/v2/models/{NAME}/infer",
            json.dumps(
                {"inputs": [{"name": "x", "shape": [1, 1], "datatype": "INT64", "data": [1]}]}
            ).encode(),
            422,
            "exactly",
        ),
        (
            f"/v2/models/{NAME}/infer",
            json.dumps(
                infer_body({k: np.ones((1, 2), np.int64) for k in ("input_ids", "attention_mask")})
            ).encode(),
            422,
            "exactly",
        ),
        (
            f"/v2/models/{NAME}/infer",
            json.dumps(
                {
                    "inputs": [
                        {"name": k, "shape": [1, 2], "datatype": "FP32", "data": [1, 1]}
                        for k in ("input_ids", "attention_mask", "token_type_ids")
                    ]
                }
            ).encode(),
            422,
            "the model takes INT64",
        ),
        (
            f"/v2/models/{NAME}/infer",
            json.dumps(
                {
                    "inputs": [
                        {"name": k, "shape": [1, 3], "datatype": "INT64", "data": [1, 1]}
                        for k in ("input_ids", "attention_mask", "token_type_ids")
                    ]
                }
            ).encode(),
            422,
            "needs 3 values",
        ),
        (f"/v2/models/{NAME}/infer", b"x" * (2 * 2**20), 413, "limit"),
    ],
)
def test_malformed_requests_get_their_4xx(
    server: Server, path: str, body: bytes, status: int, message: str
) -> None:
    response = httpx.post(
        server.url + path, content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == status
    assert message in response.json()["error"]


def test_overload_gets_503_with_retry_after_and_never_500(served_dir: Path, minilm: Model) -> None:
    running = Server(served_dir, "--max-queue", "2", "--max-batch-size", "1", "--max-delay-ms", "0")
    body = infer_body(
        minilm.family.tokenize(["a sentence long enough to take a little while " * 4])
    )

    async def flood() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=running.url, timeout=120) as client:
            return await asyncio.gather(
                *(client.post(f"/v2/models/{NAME}/infer", json=body) for _ in range(60))
            )

    try:
        responses = asyncio.run(flood())
    finally:
        assert running.stop() == 0
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}
    refused = [r for r in responses if r.status_code == 503]
    assert refused
    assert 200 in statuses  # what fitted in the queue was answered
    assert all(r.headers["retry-after"] == "1" for r in refused)


def test_sigterm_finishes_in_flight_requests_then_exits_0(served_dir: Path, minilm: Model) -> None:
    running = Server(served_dir, "--max-delay-ms", "2000", "--max-batch-size", "64")
    body = infer_body(minilm.family.tokenize(["drain me"]))

    async def send_then_terminate() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=running.url, timeout=60) as client:
            pending = [
                asyncio.create_task(client.post(f"/v2/models/{NAME}/infer", json=body))
                for _ in range(8)
            ]
            while queue_depth(running) < 8:  # all eight are waiting for their batch
                await asyncio.sleep(0.01)
            running.terminate()
            return await asyncio.gather(*pending)

    responses = asyncio.run(send_then_terminate())
    assert [r.status_code for r in responses] == [200] * 8
    assert running.stop() == 0


def queue_depth(server: Server) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    family = next(f for f in text_string_to_metric_families(text) if f.name == "mahir_queue_depth")
    return float(family.samples[0].value)


def test_an_api_key_guards_inference_and_metrics_count_what_was_sent(
    served_dir: Path, minilm: Model
) -> None:
    """One server with a key: health stays open, inference needs the key, and /metrics (never
    behind the key) counts every answer by endpoint and status."""
    running = Server(served_dir, "--api-key", "s3cret")
    body = infer_body(minilm.family.tokenize(["hello"]))
    url = f"{running.url}/v2/models/{NAME}/infer"
    key = {"Authorization": "Bearer s3cret"}
    try:
        assert httpx.get(f"{running.url}/v2/health/live").status_code == 200
        refused = httpx.post(url, json=body)
        wrong = httpx.post(url, json=body, headers={"Authorization": "Bearer nope"})
        allowed = httpx.post(url, json=body, headers=key)
        batch = minilm.family.tokenize(["one sentence"])
        for _ in range(7):
            assert httpx.post(url, json=infer_body(batch), headers=key).status_code == 200
        for _ in range(2):
            assert httpx.post(url, content=b"{", headers=key).status_code == 400
        text = httpx.get(f"{running.url}/metrics").text
    finally:
        assert running.stop() == 0
    assert refused.status_code == 401
    assert "API key" in refused.json()["error"]
    assert wrong.status_code == 401
    assert allowed.status_code == 200
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("mahir_requests_total", (("endpoint", "infer"), ("status", "200")))] == 8
    assert samples[("mahir_requests_total", (("endpoint", "infer"), ("status", "400")))] == 2
    assert samples[("mahir_requests_total", (("endpoint", "infer"), ("status", "401")))] == 2
    assert samples[("mahir_batch_size_count", ())] == 8  # bad bodies never reach the batcher


@pytest.mark.parametrize("mode", [("--concurrency", "4"), ("--rate", "50")])
def test_loadtest_reports_what_it_sent(
    server: Server, tmp_path: Path, mode: tuple[str, str]
) -> None:
    out = tmp_path / "load.json"
    done = cli(
        "loadtest",
        server.url,
        *mode,
        "--requests",
        "40",
        "--duration",
        "30",
        "--model",
        NAME,
        "--json",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(out.read_text())
    assert summary["requests"] == 40
    assert summary["statuses"] == {"200": 40}
    assert 0 < summary["p50_ms"] <= summary["p90_ms"] <= summary["p99_ms"]
    assert summary["mode"] == ("closed" if mode[0] == "--concurrency" else "open")


def test_loadtest_fails_after_404s_naming_them(server: Server) -> None:
    done = cli(
        "loadtest", server.url, "--concurrency", "4", "--requests", "30", "--endpoint", "infer",
        "--model", "nope",
    )  # fmt: skip
    assert done.returncode == 1
    assert "30 of 30 requests failed (404: 30)" in done.stderr
