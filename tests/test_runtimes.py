"""Every runtime, for real, against the PyTorch reference on several batch sizes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mahir.errors import BadInput, Unsupported
from mahir.export import export_onnx, export_openvino
from mahir.model import Model
from mahir.runtimes import RUNTIMES, open_session
from mahir.types import Artifact, RuntimeOptions
from mahir.workload import build_workload


@pytest.fixture(scope="module", params=["mlp", "cnn"])
def artifacts(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Model, dict[str, Artifact]]:
    model: Model = request.getfixturevalue(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    onnx = export_onnx(model, folder / "model.onnx")
    ir = export_openvino(model, onnx, folder / "ov" / "model.xml")
    return model, {"torch": model.original(), "onnx": onnx, "openvino": ir}


@pytest.mark.parametrize(
    ("runtime", "fmt"),
    [
        ("torch", "torch"),
        ("torch-compile", "torch"),
        ("onnxruntime", "onnx"),
        ("openvino", "openvino"),
        ("openvino", "onnx"),
    ],
)
def test_runtime_matches_the_reference(
    artifacts: tuple[Model, dict[str, Artifact]], runtime: str, fmt: str
) -> None:
    model, built = artifacts
    session = open_session(runtime, built[fmt], RuntimeOptions(threads=1))
    assert session.runtime == runtime
    for batch in build_workload(model, [1, 3, 7], batches_per_size=1).batches.values():
        expected = model.module(**{k: torch.from_numpy(v) for k, v in batch[0].items()})
        got = session.run(batch[0])
        assert list(got) == list(model.spec.outputs)
        for name, tensor in zip(model.spec.outputs, expected, strict=True):
            np.testing.assert_allclose(got[name], tensor.detach().numpy(), rtol=1e-4, atol=1e-5)
    assert session.describe()["threads"] == 1


def test_openvino_results_survive_the_next_run(
    artifacts: tuple[Model, dict[str, Artifact]],
) -> None:
    model, built = artifacts
    session = open_session("openvino", built["openvino"])
    batches = build_workload(model, [2], batches_per_size=2, seed=3).batches[2]
    first = session.run(batches[0])["output"]
    kept = first.copy()
    session.run(batches[1])
    np.testing.assert_array_equal(first, kept)


def test_openvino_reports_the_precision_it_ran(
    artifacts: tuple[Model, dict[str, Artifact]],
) -> None:
    _, built = artifacts
    pinned = open_session("openvino", built["openvino"], RuntimeOptions(openvino_precision="f32"))
    assert pinned.describe()["precision"] == "f32"
    chosen = open_session("openvino", built["openvino"], RuntimeOptions(openvino_precision=None))
    # OpenVINO's own choice depends on the CPU (bf16 where it has bf16 or AMX): reported as is
    assert chosen.describe()["precision"] in {"f32", "bf16", "f16"}
    throughput = open_session(
        "openvino", built["openvino"], RuntimeOptions(openvino_hint="throughput")
    )
    assert throughput.describe()["hint"] == "throughput"


def test_every_runtime_is_listed_with_its_formats() -> None:
    assert set(RUNTIMES) == {"torch", "torch-compile", "onnxruntime", "openvino"}
    assert RUNTIMES["openvino"].formats == ("openvino", "onnx")


def test_unknown_runtime_and_wrong_format(artifacts: tuple[Model, dict[str, Artifact]]) -> None:
    _, built = artifacts
    with pytest.raises(BadInput, match=r"unknown runtime 'tensorrt'.*onnxruntime"):
        open_session("tensorrt", built["onnx"])
    with pytest.raises(Unsupported, match="onnxruntime runs onnx artifacts, not torch"):
        open_session("onnxruntime", built["torch"])


def test_a_module_in_training_mode_is_refused(mlp: Model) -> None:
    module = torch.nn.Sequential(torch.nn.Linear(32, 4), torch.nn.Dropout(0.5))
    with pytest.raises(BadInput, match=r"training mode.*\.eval\(\)"):
        open_session("torch", Artifact("torch", mlp.spec, module=module))


def test_corrupt_onnx_file(mlp: Model, tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x01garbage" * 100)
    for runtime in ("onnxruntime", "openvino"):
        with pytest.raises(BadInput, match=r"cannot (open|read).*re-export it"):
            open_session(runtime, Artifact("onnx", mlp.spec, path=junk))


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime", "openvino"])
def test_wrong_input_name(artifacts: tuple[Model, dict[str, Artifact]], runtime: str) -> None:
    model, built = artifacts
    fmt = RUNTIMES[runtime].formats[0]
    session = open_session(runtime, built[fmt])
    batch = build_workload(model, [1], batches_per_size=1).batches[1][0]
    renamed = {"wrong_" + name: array for name, array in batch.items()}
    with pytest.raises(BadInput):
        session.run(renamed)
