"""Records name the device a candidate ran on, and records written before devices read back as
the CPU's."""

from __future__ import annotations

import json

from mahir.recipe import Recipe
from mahir.report.schema import CandidateRecord
from mahir.search.candidates import Candidate
from mahir.search.halving import Outcome
from mahir.search.records import outcome_from_record, outcome_record
from mahir.types import OutputFidelity, Perf, Quality


def test_a_record_carries_the_device_and_an_old_one_reads_as_the_cpu() -> None:
    perf = Perf(1, (2.0,), 2.0, 2.0, 2.0, 500.0, None, 0.0, False)
    candidate = Candidate("ort", "ONNX Runtime fp32", Recipe((), "onnxruntime"))
    fidelity = OutputFidelity(0.0, 0.0, 1.0, 1.0)
    outcome = Outcome(
        candidate, "ok", quality=Quality({"y": fidelity}), perf={1: perf}, baseline_perf={1: perf}
    )
    record = json.loads(json.dumps(outcome_record(outcome, "latency").to_dict()))
    assert record["device"] == "cpu"
    assert record["recipe"]["options"]["device"] == "cpu"
    assert record["perf"]["1"]["device"] == "cpu"
    del record["perf"]["1"]["device"], record["device"]  # as written before devices
    assert outcome_from_record(candidate, CandidateRecord.from_dict(record)).perf[1] == perf
