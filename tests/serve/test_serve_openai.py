"""`mahir serve`'s /v1/embeddings through the stock `openai` client, its defaults untouched
(it asks for base64), and the errors every OpenAI client knows how to read."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mahir.model import Model
from mahir.pooling import pool
from mahir.runtimes import reference_outputs
from tests.helpers import Server
from tests.serve.test_serve import NAME, sentences


@pytest.fixture(scope="module")
def server(served_dir: Path) -> Iterator[Server]:
    running = Server(served_dir, "--matryoshka-dims", "128,64", "--max-queue", "256")
    yield running
    assert running.stop() == 0


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused") as made:
        yield made


def expected_embeddings(minilm: Model, texts: list[str]) -> np.ndarray:
    batch = minilm.family.tokenize(texts)
    tokens = reference_outputs(minilm, [batch])[0]["last_hidden_state"]
    assert minilm.family.pooling is not None
    return pool(tokens, batch["attention_mask"], minilm.family.pooling)


def cosines(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    return (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)


def test_the_stock_client_gets_the_models_embeddings(client: openai.OpenAI, minilm: Model) -> None:
    texts = sentences(minilm, 4, seed=11)
    want = expected_embeddings(minilm, texts)
    default = client.embeddings.create(model=NAME, input=texts)  # base64 on the wire
    floats = client.embeddings.create(model=NAME, input=texts, encoding_format="float")
    for response in (default, floats):
        got = np.array([d.embedding for d in response.data], np.float32)
        assert got.shape == (4, 384)
        assert cosines(got, want).min() > 0.9999
    assert default.usage.prompt_tokens == int(minilm.family.tokenize(texts)["attention_mask"].sum())


def test_token_ids_embed_as_their_text(client: openai.OpenAI, minilm: Model) -> None:
    texts = sentences(minilm, 2, seed=12)
    ids = [minilm.family.tokenizer(text)["input_ids"] for text in texts]
    by_ids = client.embeddings.create(model=NAME, input=ids)
    one = client.embeddings.create(model=NAME, input=ids[0])  # a single list of ids
    got = np.array([d.embedding for d in by_ids.data], np.float32)
    assert cosines(got, expected_embeddings(minilm, texts)).min() > 0.9999
    np.testing.assert_allclose(one.data[0].embedding, got[0], atol=1e-6)
    assert by_ids.usage.prompt_tokens == sum(map(len, ids))


def test_dimensions_honoured_where_declared_refused_elsewhere(
    client: openai.OpenAI, minilm: Model
) -> None:
    text = sentences(minilm, 1, seed=13)
    full = np.array(client.embeddings.create(model=NAME, input=text).data[0].embedding)
    native = client.embeddings.create(model=NAME, input=text, dimensions=384)
    np.testing.assert_allclose(native.data[0].embedding, full, atol=1e-6)
    cut = np.array(
        client.embeddings.create(model=NAME, input=text, dimensions=64).data[0].embedding
    )
    assert cut.shape == (64,)
    np.testing.assert_allclose(cut, full[:64] / np.linalg.norm(full[:64]), atol=1e-6)
    with pytest.raises(openai.BadRequestError, match='send "dimensions": 384') as refused:
        client.embeddings.create(model=NAME, input=text, dimensions=100)
    assert refused.value.param == "dimensions"
    assert refused.value.type == "invalid_request_error"


def test_a_wrong_model_name_gets_openais_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError, match="does not exist") as missing:
        client.embeddings.create(model="text-embedding-3-small", input="hello")
    assert missing.value.code == "model_not_found"
    assert missing.value.param == "model"


def test_long_inputs_are_cut_and_counted_or_refused_when_asked(
    client: openai.OpenAI,
) -> None:
    text = "word " * 10_000  # 50,000 characters
    cut = client.embeddings.create(model=NAME, input=text)
    assert cut.usage.prompt_tokens == 256  # the tokens the model read: its max length
    with pytest.raises(openai.BadRequestError, match="10002 tokens; the model reads at most 256"):
        client.embeddings.create(model=NAME, input=text, extra_body={"truncate": False})
    ids = list(range(1000, 1300))
    assert client.embeddings.create(model=NAME, input=ids).usage.prompt_tokens == 256
    with pytest.raises(openai.BadRequestError, match="300 tokens"):
        client.embeddings.create(model=NAME, input=ids, extra_body={"truncate": False})
    exact = "word " * 254  # [CLS] + 254 + [SEP]: exactly the max length, nothing cut
    fits = client.embeddings.create(model=NAME, input=exact, extra_body={"truncate": False})
    assert fits.usage.prompt_tokens == 256


def batch_items(server: Server) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    family = next(f for f in text_string_to_metric_families(text) if f.name == "mahir_batch_size")
    return next(s.value for s in family.samples if s.name == "mahir_batch_size_sum")


def test_a_request_larger_than_the_queue_gets_413_and_costs_nothing(
    server: Server, client: openai.OpenAI
) -> None:
    computed = batch_items(server)
    with pytest.raises(openai.APIStatusError, match="2000 items in one request; at most 256") as e:
        client.embeddings.create(model=NAME, input=["a sentence"] * 2000)
    assert e.value.status_code == 413
    assert batch_items(server) == computed  # none of its work was started
    after = client.embeddings.create(model=NAME, input=["a sentence"] * 256)  # fits whole
    assert len(after.data) == 256


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "param", "message"),
    [
        ("POST", "/v1/embeddings", b"{not json", 400, None, "not JSON"),
        ("POST", "/v1/embeddings", b'{"input": "\\ud800"}', 400, None, "surrogate"),
        ("POST", "/v1/embeddings", b'{"texts": "a"}', 400, "input", '"input"'),
        ("POST", "/v1/embeddings", b'{"input": [1.5]}', 400, "input", "token ids"),
        ("POST", "/v1/embeddings", b'{"input": [[]]}', 400, "input", "non-empty"),
        ("POST", "/v1/embeddings", b'{"input": [99999]}', 400, None, "[0, 30522)"),
        (
            "POST",
            "/v1/embeddings",
            b'{"input": "a", "encoding_format": "int8"}',
            400,
            "encoding_format",
            "base64",
        ),
        ("POST", "/v1/embeddings", b"x" * (9 * 2**20), 413, None, "limit"),
        ("GET", "/v1/embeddings", b"", 405, None, "Method Not Allowed"),
        ("POST", "/v1/nothing", b"{}", 404, None, "Not Found"),
    ],
)
def test_every_v1_error_takes_openais_shape(
    server: Server,
    method: str,
    path: str,
    body: bytes,
    status: int,
    param: str | None,
    message: str,
) -> None:
    response = httpx.request(
        method, server.url + path, content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert message in error["message"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
