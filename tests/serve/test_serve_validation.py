"""A bad request harms nobody else: `mahir serve` on OpenVINO (whose CPU plugin could stay
broken after one bad input) checks every request before it joins a batch, answers 4xx saying
what is wrong, and keeps answering everyone else; real clients on loopback."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

import mahir
from mahir.errors import MahirError
from mahir.model import Model
from mahir.runtimes import open_session
from mahir.types import Artifact
from tests.helpers import TESTS, Server, cli
from tests.helpers import mahir as run_mahir
from tests.serve.test_serve import NAME, binary_output, infer_body

INFER = f"/v2/models/{NAME}/infer"


@pytest.fixture(scope="module")
def server(served_openvino_dir: Path) -> Iterator[Server]:
    running = Server(served_openvino_dir, "--max-delay-ms", "20", "--max-batch-size", "32")
    yield running
    assert running.stop() == 0


def token_body(
    ids: np.ndarray, mask: np.ndarray | None = None, types: np.ndarray | None = None
) -> dict[str, object]:
    return infer_body(
        {
            "input_ids": ids,
            "attention_mask": np.ones_like(ids) if mask is None else mask,
            "token_type_ids": np.zeros_like(ids) if types is None else types,
        }
    )


BAD = {
    "1000 tokens": (token_body(np.full((1, 1000), 2000)), "at most 512"),
    "zero length": (token_body(np.zeros((1, 0), np.int64)), "must be >= 1"),
    "short mask": (
        token_body(np.full((1, 5), 2000), mask=np.ones((1, 3), np.int64)),
        "one length per row",
    ),
    "id past the vocabulary": (token_body(np.full((1, 5), 30522)), "[0, 30522)"),
    "negative id": (token_body(np.full((1, 5), -1)), "never negative"),
    "token type 2": (
        token_body(np.full((1, 5), 2000), types=np.full((1, 5), 2)),
        "[0, 2)",
    ),
}


def test_bad_token_inputs_get_422_and_every_other_request_its_answer(
    server: Server, served_openvino_dir: Path, minilm: Model
) -> None:
    good = minilm.family.tokenize(["five tokens here"])  # [CLS] five tokens here [SEP]
    alone = mahir.load(served_openvino_dir).run(good)["last_hidden_state"]

    async def send() -> tuple[list[httpx.Response], list[httpx.Response], httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            first = await client.post(INFER, json=infer_body(good))  # the last good shape
            assert first.status_code == 200
            # the bad ones interleaved with good ones of that shape, batched together
            mixed = [body for body, _ in BAD.values() for body in (body, infer_body(good))]
            answers = await asyncio.gather(*(client.post(INFER, json=b) for b in mixed))
            after = await client.post(INFER, json=infer_body(good))
            return list(answers[0::2]), list(answers[1::2]), after

    bad, goods, after = asyncio.run(send())
    for (case, (_, message)), response in zip(BAD.items(), bad, strict=True):
        assert response.status_code == 422, case
        assert message in response.json()["error"], case
    for response in [*goods, after]:
        assert response.status_code == 200
        got = np.array(response.json()["outputs"][0]["data"], np.float32).reshape(alone.shape)
        np.testing.assert_allclose(got, alone, atol=1e-4, rtol=1e-3)
    assert httpx.get(f"{server.url}/v2/health/ready").json() == {"ready": True}


def test_an_openvino_session_answers_the_last_good_shape_after_a_failed_call(
    minilm: Model, minilm_onnx: Path
) -> None:
    session = open_session("openvino", Artifact("onnx", minilm.spec, path=minilm_onnx))
    good = minilm.family.tokenize(["five tokens here"])
    expected = session.run(good)["last_hidden_state"]
    too_long = {name: np.ones((1, 1000), np.int64) for name in good}  # past 512 positions
    with pytest.raises(MahirError):
        session.run(too_long)
    np.testing.assert_allclose(session.run(good)["last_hidden_state"], expected, atol=1e-5)


def test_a_request_with_more_rows_than_a_batch_holds_gets_413(
    server: Server, minilm: Model
) -> None:
    rows = minilm.family.tokenize(["a sentence"] * 33)
    response = httpx.post(f"{server.url}{INFER}", json=infer_body(rows), timeout=60)
    assert response.status_code == 413
    assert "a batch holds 32" in response.json()["error"]


def test_a_second_server_on_a_busy_port_fails_before_loading_the_model(
    served_openvino_dir: Path,
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = run_mahir("serve", str(served_openvino_dir), "--port", str(port))
    assert done.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "serving" not in done.stderr  # it never got as far as loading


@pytest.mark.parametrize("port", ["0", "-1", "70000"])
def test_a_port_that_is_none_is_refused_before_loading_the_model(
    served_openvino_dir: Path, port: str
) -> None:
    done = cli("serve", str(served_openvino_dir), "--port", port)
    assert done.returncode == 2
    assert f"--port {port} is no TCP port: give one in 1-65535" in done.stderr
    assert "serving" not in done.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--max-body-mb", "0"), "--max-body-mb must be > 0, got 0"),
        (("--timeout-ms", "0"), "--timeout-ms must be > 0, got 0"),
        (("--max-delay-ms", "-1"), "--max-delay-ms must be >= 0, got -1"),
        (("--max-padding", "-0.5"), "--max-padding must be >= 0, got -0.5"),
        (("--max-batch-size", "0"), "--max-batch-size must be >= 1, got 0"),
        (("--max-queue", "0"), "--max-queue must be >= 1, got 0"),
        (("--workers", "0"), "--workers must be >= 1, got 0"),
        (("--tune", "--p99-ms", "50", "--tune-seconds", "0"), "--tune-seconds must be > 0, got 0"),
        (
            ("--api-key", " "),
            "--api-key (or MAHIR_API_KEY) is empty: give the key clients "
            "must send, or leave it unset to serve without one",
        ),
    ],
)
def test_a_limit_out_of_range_is_refused_by_its_flag_before_loading_the_model(
    served_openvino_dir: Path, flags: tuple[str, ...], message: str
) -> None:
    """Named as typed, not by the batcher's field (max_delay_ms); a body limit of 0, which
    would refuse every request with 413, once started a server."""
    done = cli("serve", str(served_openvino_dir), *flags)
    assert done.returncode == 2
    assert [line for line in done.stderr.splitlines() if line.strip()] == [f"error: {message}"]


@pytest.fixture(scope="module")
def mlp_server() -> Iterator[Server]:
    """A model source, not an output directory: `mahir serve` writes its fp32 ONNX Runtime
    directory itself."""
    running = Server(Path(f"{TESTS / 'models.py'}:mlp"))
    yield running
    assert running.stop() == 0


def test_non_finite_values_never_reach_json(mlp_server: Server) -> None:
    url = f"{mlp_server.url}/v2/models/mlp/infer"
    nan = np.array([[np.nan] + [0.0] * 31], np.float32)
    binary = {
        "inputs": [
            {
                "name": "x",
                "shape": [1, 32],
                "datatype": "FP32",
                "parameters": {"binary_data_size": nan.nbytes},
            }
        ]
    }
    header = httpx.Request("POST", url, json=binary).content
    refused = httpx.post(
        url,
        content=header + nan.tobytes(),
        headers={"inference-header-content-length": str(len(header))},
    )
    assert refused.status_code == 422
    assert "NaN or infinity" in refused.json()["error"]
    literal = b'{"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [NaN]}]}'
    assert httpx.post(url, content=literal).status_code == 400
    huge = {"inputs": [{"name": "x", "shape": [1, 32], "datatype": "FP32", "data": [3e38] * 32}]}
    overflowed = httpx.post(url, json=huge)
    assert overflowed.status_code == 422
    assert "ask for it as binary data" in overflowed.json()["error"]
    wanted = [{"name": "output", "parameters": {"binary_data": True}}]
    as_binary = httpx.post(url, json={**huge, "outputs": wanted})
    assert as_binary.status_code == 200
    assert not np.isfinite(binary_output(dict(as_binary.headers), as_binary.content)).all()
