"""Every runtime, for real, against the PyTorch reference on several batch sizes, and every way
a user can hand a runtime something wrong."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
import pytest
import torch
from torch import nn

import mahir.runtimes
from mahir.errors import BadInput, RuntimeFailure, Unsupported
from mahir.runtimes import RUNTIMES, available_providers, get_runtime, open_session
from mahir.types import (
    CPU,
    Artifact,
    Device,
    InputSpec,
    OpenVinoOptions,
    RuntimeOptions,
    TensorSpec,
)
from tests import models

BATCH_SIZES = (1, 3, 7)
ONE_THREAD = RuntimeOptions(threads=1)


class Tupled(nn.Module):
    """A torch artifact returns a tuple in spec order; the test models return one tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (self.model(**inputs),)


@dataclass
class Built:
    """One test model in every format, with inputs like its example at any batch size."""

    module: nn.Module
    example: np.ndarray
    spec: InputSpec
    artifacts: dict[str, Artifact]

    def inputs(self, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
        shape = (batch, *self.example.shape[1:])
        array = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
        return {self.spec.inputs[0].name: array}

    def reference(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            tensors = {k: torch.tensor(v) for k, v in inputs.items()}
            result: np.ndarray = self.module(**tensors).numpy()
        return result


def export_onnx(module: nn.Module, example: dict[str, torch.Tensor], path: Path) -> None:
    """A few lines of torch.onnx.export, until mahir.export.onnx's verified export replaces them."""
    batch = torch.export.Dim("batch")
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (),
            str(path),
            kwargs=example,
            input_names=list(example),
            output_names=["logits"],
            dynamic_shapes={name: {0: batch} for name in example},
            dynamo=True,
            verbose=False,
        )


@pytest.fixture(scope="module", params=["mlp", "cnn"])
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Built:
    module, example = {"mlp": models.mlp, "cnn": models.cnn}[request.param]()
    module.eval()
    folder = tmp_path_factory.mktemp(request.param)
    export_onnx(module, example, folder / "model.onnx")
    assert not module.training  # the export must leave the reference in eval mode
    ov.save_model(
        ov.convert_model(folder / "model.onnx"), folder / "model.xml", compress_to_fp16=False
    )
    (name, tensor), *_ = example.items()
    spec = InputSpec((TensorSpec(name, "float32", ("batch", *tensor.shape[1:])),), ("logits",))
    return Built(
        module,
        tensor.numpy(),
        spec,
        {
            "torch": Artifact("torch", spec, module=Tupled(module).eval()),
            "onnx": Artifact("onnx", spec, path=folder / "model.onnx"),
            "openvino": Artifact("openvino", spec, path=folder / "model.xml"),
        },
    )


RUNTIME_FORMATS = [
    ("torch", "torch"),
    ("torch-compile", "torch"),
    ("onnxruntime", "onnx"),
    ("openvino", "openvino"),
    ("openvino", "onnx"),
]


@pytest.mark.parametrize(("runtime", "fmt"), RUNTIME_FORMATS)
def test_runtime_gives_the_reference_outputs(built: Built, runtime: str, fmt: str) -> None:
    session = open_session(runtime, built.artifacts[fmt], ONE_THREAD)
    assert session.runtime == runtime
    assert session.device == CPU
    for batch in BATCH_SIZES:
        inputs = built.inputs(batch)
        got = session.run(inputs)
        assert list(got) == ["logits"]
        assert got["logits"].dtype == np.float32
        np.testing.assert_allclose(got["logits"], built.reference(inputs), rtol=1e-5, atol=1e-6)
    assert session.describe()["threads"] == 1


@pytest.mark.parametrize(
    ("runtime", "fmt"), [rf for rf in RUNTIME_FORMATS if rf[0] != "torch-compile"]
)
def test_inputs_of_another_dtype_are_cast(built: Built, runtime: str, fmt: str) -> None:
    session = open_session(runtime, built.artifacts[fmt], ONE_THREAD)
    inputs = built.inputs(2)
    as_float64 = {name: array.astype(np.float64) for name, array in inputs.items()}
    np.testing.assert_allclose(
        session.run(as_float64)["logits"], built.reference(inputs), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("fmt", ["openvino", "onnx"])
def test_openvino_results_are_not_overwritten_by_the_next_run(built: Built, fmt: str) -> None:
    session = open_session("openvino", built.artifacts[fmt])
    first = session.run(built.inputs(2, seed=1))["logits"]
    kept = first.copy()
    second = session.run(built.inputs(2, seed=2))["logits"]
    assert not np.array_equal(second, kept)  # else the check below proves nothing
    np.testing.assert_array_equal(first, kept)


def test_openvino_reports_the_precision_and_hint_in_effect(built: Built) -> None:
    ir = built.artifacts["openvino"]
    pinned = open_session("openvino", ir, openvino(precision="f32"))
    assert pinned.describe()["precision"] == "f32"
    # Left alone, OpenVINO uses its CPU plugin's default (bf16 where the CPU has bf16 or AMX).
    chosen = open_session("openvino", ir, openvino(precision=None))
    plugin_default = ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").to_string()
    assert chosen.describe()["precision"] == plugin_default
    throughput = open_session("openvino", ir, openvino(hint="throughput"))
    assert throughput.describe()["hint"] == "throughput"
    assert pinned.describe()["hint"] == "latency"


def openvino(**settings: Any) -> RuntimeOptions:
    return RuntimeOptions(openvino=OpenVinoOptions(**settings))


def test_onnxruntime_reports_its_settings(built: Built) -> None:
    settings = open_session("onnxruntime", built.artifacts["onnx"], ONE_THREAD).describe()
    assert settings["inter_op_threads"] == 1
    assert settings["execution_mode"] == "sequential"
    assert settings["graph_optimization"] == "ENABLE_ALL"
    assert settings["providers"] == ["CPUExecutionProvider"]


def test_torch_sets_its_process_wide_threads(built: Built) -> None:
    before = torch.get_num_threads()
    try:
        session = open_session("torch", built.artifacts["torch"], RuntimeOptions(threads=1))
        assert torch.get_num_threads() == 1
        settings = session.describe()
        assert (settings["threads"], settings["precision"]) == (1, "f32")
    finally:
        torch.set_num_threads(before)


def test_the_registry_lists_every_runtime_and_its_formats() -> None:
    assert list(RUNTIMES) == [
        "torch",
        "torch-compile",
        "onnxruntime",
        "onnxruntime-tensorrt",
        "openvino",
    ]
    assert get_runtime("openvino").formats == ("openvino", "onnx")
    assert all(runtime.summary for runtime in RUNTIMES.values())


def test_listing_runtimes_imports_no_runtime_library() -> None:
    modules = ("mahir.runtimes.pytorch", "mahir.runtimes.onnxruntime", "mahir.runtimes.openvino")
    code = f"import sys, mahir.runtimes; print([m for m in {modules} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_unknown_runtime_names_the_known_ones(built: Built) -> None:
    with pytest.raises(BadInput, match=r"unknown runtime 'tensorrt'.*torch, .*onnxruntime"):
        open_session("tensorrt", built.artifacts["onnx"])


@pytest.mark.parametrize(
    ("runtime", "fmt"), [("onnxruntime", "torch"), ("torch", "onnx"), ("onnxruntime", "openvino")]
)
def test_a_format_the_runtime_cannot_open(built: Built, runtime: str, fmt: str) -> None:
    with pytest.raises(Unsupported, match=f"{runtime} runs .* artifacts, not {fmt}"):
        open_session(runtime, built.artifacts[fmt])


@pytest.mark.parametrize(
    ("runtime", "fmt"), [(r, f) for r, f in RUNTIME_FORMATS if r == "openvino"]
)
def test_a_device_the_runtime_cannot_run_on_is_refused(
    built: Built, runtime: str, fmt: str
) -> None:
    """Asked for a GPU, a CPU-only runtime says so in one line, naming those that run there
    on this machine, before it loads."""
    with pytest.raises(
        Unsupported,
        match=rf"^{runtime} runs on cpu only; for cuda:0 choose torch, torch-compile(, onnx.*)?$",
    ):
        open_session(runtime, built.artifacts[fmt], RuntimeOptions(device=Device.parse("cuda")))
    with pytest.raises(Unsupported, match=r"^onnxruntime-tensorrt runs on cuda only; for cpu "):
        open_session("onnxruntime-tensorrt", built.artifacts["onnx"], ONE_THREAD)


@pytest.mark.skipif(
    "CUDAExecutionProvider" in available_providers(), reason="onnxruntime-gpu is installed"
)
@pytest.mark.parametrize("runtime", ["onnxruntime", "onnxruntime-tensorrt"])
def test_onnxruntime_on_a_gpu_without_its_provider_is_refused_in_one_line(
    built: Built, runtime: str
) -> None:
    """The CPU wheel (here, and on the GPU machine mahir is measured on) has no CUDA provider:
    one line with the fix, before anything loads."""
    gpu = RuntimeOptions(device=Device.parse("cuda:1"))
    with pytest.raises(Unsupported) as refused:
        open_session(runtime, built.artifacts["onnx"], gpu)
    assert str(refused.value) == (
        "onnxruntime here has no CUDA provider: pip install onnxruntime-gpu (in place of "
        "onnxruntime)"
    )
    assert "onnxruntime here has no CUDA provider" in str(RUNTIMES[runtime].unavailable(gpu.device))
    assert RUNTIMES[runtime].unavailable(CPU) is None


def test_tensorrt_needs_its_own_provider_beside_cuda(
    built: Built, monkeypatch: pytest.MonkeyPatch
) -> None:
    cuda_only = ("CUDAExecutionProvider", "CPUExecutionProvider")
    monkeypatch.setattr(mahir.runtimes, "available_providers", lambda: cuda_only)
    gpu = Device.parse("cuda")
    assert RUNTIMES["onnxruntime"].unavailable(gpu) is None
    with pytest.raises(Unsupported, match=r"^onnxruntime here has no TensorRT provider: pip "):
        open_session("onnxruntime-tensorrt", built.artifacts["onnx"], RuntimeOptions(device=gpu))


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider':UserWarning")
def test_a_gpu_provider_that_did_not_load_is_refused_not_timed_as_a_gpu(
    built: Built, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ONNX Runtime drops a provider it cannot load and runs on the CPU: the real CPU wheel,
    told it has a CUDA provider, shows that fallback, and the session is refused."""
    monkeypatch.setattr(
        mahir.runtimes,
        "available_providers",
        lambda: ("CUDAExecutionProvider", "CPUExecutionProvider"),
    )
    with pytest.raises(
        RuntimeFailure,
        match=r"could not load its CUDAExecutionProvider on cuda:0 \(it fell back to CPUExec",
    ):
        open_session(
            "onnxruntime", built.artifacts["onnx"], RuntimeOptions(device=Device.parse("cuda"))
        )


def test_onnxruntime_providers_by_device() -> None:
    from mahir.runtimes.onnxruntime import _providers

    assert _providers(CPU, tensorrt=False) == [("CPUExecutionProvider", {})]
    gpu1 = {"device_id": 1}
    assert _providers(Device.parse("cuda:1"), tensorrt=False) == [
        ("CUDAExecutionProvider", gpu1),
        ("CPUExecutionProvider", {}),
    ]
    assert _providers(Device.parse("cuda:1"), tensorrt=True) == [
        ("TensorrtExecutionProvider", {**gpu1, "trt_fp16_enable": True}),
        ("CUDAExecutionProvider", gpu1),
        ("CPUExecutionProvider", {}),
    ]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
@pytest.mark.parametrize("runtime", ["torch", "torch-compile"])
def test_torch_on_a_gpu_this_machine_lacks_says_so(built: Built, runtime: str) -> None:
    with pytest.raises(
        Unsupported, match=r"^no cuda:3 here: torch sees 0 CUDA GPUs.*open it on cpu$"
    ):
        open_session(
            runtime, built.artifacts["torch"], RuntimeOptions(device=Device.parse("cuda:3"))
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_torch_on_a_gpu_gives_the_reference_outputs(built: Built) -> None:
    """Run where a GPU is (the lent H200): a copy on the device, the CPU original untouched."""
    artifact = built.artifacts["torch"]
    gpu = open_session("torch", artifact, RuntimeOptions(device=Device.parse("cuda")))
    assert gpu.describe()["device"] == "cuda:0"
    assert next(artifact.module.parameters()).device.type == "cpu"
    for batch in (1, 3, 16):
        inputs = built.inputs(batch, seed=batch)
        (got,) = gpu.run(inputs).values()
        np.testing.assert_allclose(got, built.reference(inputs), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("runtime", ["torch", "torch-compile"])
def test_a_module_in_training_mode_is_refused(runtime: str) -> None:
    module, _ = models.mlp()  # fresh from the factory: in training mode
    spec = InputSpec((TensorSpec("x", "float32", ("batch", 32)),), ("logits",))
    with pytest.raises(BadInput, match=r"training mode.*\.eval\(\)"):
        open_session(runtime, Artifact("torch", spec, module=Tupled(module)))


def test_a_module_that_returns_no_tuple_is_refused(built: Built) -> None:
    artifact = Artifact("torch", built.spec, module=built.module)
    with pytest.raises(BadInput, match=r"not a tuple of 1 tensors.*TupleOutputs"):
        open_session("torch", artifact).run(built.inputs(1))


def test_torch_takes_read_only_arrays(built: Built) -> None:
    inputs = built.inputs(3)
    for array in inputs.values():
        array.setflags(write=False)
    got = open_session("torch", built.artifacts["torch"]).run(inputs)["logits"]
    np.testing.assert_allclose(got, built.reference(inputs), rtol=1e-6)


def test_a_failure_inside_the_model_is_a_runtime_failure(built: Built) -> None:
    class Broken(nn.Module):
        def forward(self, **inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
            raise RuntimeError("boom")

    session = open_session("torch", Artifact("torch", built.spec, module=Broken().eval()))
    with pytest.raises(RuntimeFailure, match="torch failed: boom"):
        session.run(built.inputs(1))


@pytest.mark.parametrize(("runtime", "fmt"), [("onnxruntime", "onnx"), ("openvino", "onnx")])
def test_a_corrupt_onnx_file_is_bad_input(tmp_path: Path, runtime: str, fmt: str) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x01garbage" * 100)
    spec = InputSpec((TensorSpec("x", "float32", ("batch", 32)),), ("logits",))
    with pytest.raises(BadInput, match=r"junk\.onnx is not a valid ONNX model: .*re-export it"):
        open_session(runtime, Artifact(fmt, spec, path=junk))


def test_a_corrupt_or_missing_ir_is_bad_input(tmp_path: Path) -> None:
    spec = InputSpec((TensorSpec("x", "float32", ("batch", 32)),), ("logits",))
    junk = tmp_path / "model.xml"
    junk.write_text("<net>not a model")
    with pytest.raises(BadInput, match=r"model\.xml is not a valid OpenVINO IR model"):
        open_session("openvino", Artifact("openvino", spec, path=junk))
    with pytest.raises(BadInput, match=r"no OpenVINO IR file at .*absent\.xml; export"):
        open_session("openvino", Artifact("openvino", spec, path=tmp_path / "absent.xml"))
    with pytest.raises(BadInput, match=r"no ONNX file at .*absent\.onnx; export"):
        open_session("onnxruntime", Artifact("onnx", spec, path=tmp_path / "absent.onnx"))


@pytest.mark.parametrize(("runtime", "fmt"), RUNTIME_FORMATS)
def test_wrong_inputs_are_bad_input_naming_the_expected_ones(
    built: Built, runtime: str, fmt: str
) -> None:
    session = open_session(runtime, built.artifacts[fmt])
    (name, array), *_ = built.inputs(2).items()
    with pytest.raises(BadInput, match=rf"the model takes {name} \[.*\]; got wrong_{name}"):
        session.run({f"wrong_{name}": array})
    with pytest.raises(BadInput, match=rf"takes {name} .*; got no inputs"):
        session.run({})  # OpenVINO would otherwise rerun the last call's input
    if runtime != "torch-compile":  # a wrong shape there costs a compile first; same path
        too_narrow = {name: array[:, :-1].copy()}
        with pytest.raises(BadInput, match=rf"takes {name} \[.*\]; got {name} \[2, "):
            session.run(too_narrow)
