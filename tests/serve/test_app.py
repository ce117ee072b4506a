"""The app's own layer, in process through Starlette's test client (the HTTP semantics are
tested against a real `mahir serve` in test_serve*.py): errors by mahir's tree, the 500 of an
inference failure for its own request only, and what the per-route wrappers add."""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from mahir.outdir import open_output_dir
from mahir.serve.app import build_app
from mahir.serve.http import freeze_startup_heap
from mahir.serve.served import ServeConfig
from mahir.types import Inputs, Outputs, Session
from tests.serve.test_serve import NAME, infer_body


class FailsOnThreeRows:
    """The real session, except that a batch of three rows raises a plain exception, as a
    runtime's unforeseen failure would."""

    def __init__(self, session: Session) -> None:
        self.session, self.runtime, self.device = session, session.runtime, session.device

    def run(self, inputs: Inputs) -> Outputs:
        if len(inputs["input_ids"]) == 3:
            raise ValueError("three rows\nand a traceback's worth of detail")
        return self.session.run(inputs)


@pytest.fixture(scope="module")
def client(served_dir: Path) -> Iterator[TestClient]:
    opened = open_output_dir(served_dir)
    failing = dataclasses.replace(opened, session=FailsOnThreeRows(opened.session))
    with TestClient(build_app(failing, ServeConfig(api_key="k"))) as running:
        running.headers["Authorization"] = "Bearer k"
        yield running


def rows(count: int) -> dict[str, object]:
    ids = np.full((count, 4), 2000, np.int64)
    return infer_body(
        {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": ids * 0}
    )


def test_an_inference_failure_is_a_500_for_its_own_request_only(client: TestClient) -> None:
    failed = client.post(f"/v2/models/{NAME}/infer", json=rows(3))
    assert failed.status_code == 500
    assert failed.json() == {"error": "inference failed: three rows"}
    assert client.post(f"/v2/models/{NAME}/infer", json=rows(2)).status_code == 200
    assert client.get("/v2/health/ready").json() == {"ready": True}  # the probe passed
    text = client.get("/metrics").text
    counted = {
        s.labels["status"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "mahir_requests_total" and s.labels["endpoint"] == "infer"
    }
    assert (counted["500"], counted["200"]) == (1, 1)  # only this test sends these


def test_the_api_key_guards_model_endpoints_only(client: TestClient) -> None:
    refused = client.get(f"/v2/models/{NAME}", headers={"Authorization": "Bearer wrong"})
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"] == "Bearer"
    openai = client.post("/v1/embeddings", json={"input": "a"}, headers={"Authorization": ""})
    assert openai.status_code == 401
    assert openai.json()["error"]["code"] == "invalid_api_key"
    assert client.get("/v2/health/live", headers={"Authorization": ""}).status_code == 200


def test_unrouted_paths_and_methods_answer_in_the_servers_shapes(client: TestClient) -> None:
    missing = client.get("/v2/nothing")
    assert (missing.status_code, missing.json()) == (404, {"error": "Not Found"})
    wrong_method = client.get(f"/v2/models/{NAME}/infer")
    assert wrong_method.status_code == 405
    assert wrong_method.headers["allow"] == "POST"
    assert client.post("/v1/nothing").json()["error"]["type"] == "invalid_request_error"


def test_a_binary_size_that_splits_a_value_is_a_400(client: TestClient) -> None:
    body = {
        "inputs": [
            {"name": n, "shape": [1, 1], "datatype": "INT64", "parameters": {"binary_data_size": 3}}
            for n in ("input_ids", "attention_mask", "token_type_ids")
        ]
    }
    response = client.post(f"/v2/models/{NAME}/infer", json=body)
    assert response.status_code == 400
    assert "whole number of INT64 values" in response.json()["error"]


def test_what_was_loaded_before_serving_is_frozen_out_of_the_collectors_sight() -> None:
    """No full collection scans the model and its libraries while the server answers."""
    assert gc.get_freeze_count() == 0
    try:
        freeze_startup_heap()
        assert gc.get_freeze_count() > 10_000  # torch and numpy alone are that many objects
    finally:
        gc.unfreeze()
