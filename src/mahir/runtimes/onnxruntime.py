"""ONNX Runtime on the CPU or a CUDA GPU. Threads are set explicitly (its default is every logical
core, which oversubscribes a shared machine); inter-op parallelism is off and execution
sequential because these graphs are one chain of ops; every graph optimization is on. `run`
costs next to nothing over calling ONNX Runtime directly: all it needs is looked up at open time,
inputs are cast only when their dtype differs from the graph's, and errors are sorted out only
after one happened.

On `cuda:N` the providers are [TensorRT (when asked, fp16 kernels allowed), CUDA, CPU] on GPU N,
the CPU taking only the ops the others lack. ONNX Runtime drops a GPU provider that fails to load
(a missing CUDA or TensorRT library) with a warning and runs on what is left, so a session whose
first provider did not load is refused: a CPU timed as a GPU would be a wrong number.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from mahir.errors import BadInput, RuntimeFailure, first_line
from mahir.hardware import physical_cores
from mahir.runtimes import input_error, inputs_fit
from mahir.types import Artifact, Device, Inputs, Outputs, RuntimeOptions

# What ONNX Runtime raises for a file that is not a usable model.
_NOT_A_MODEL = (
    ort_errors.InvalidProtobuf,
    ort_errors.InvalidGraph,
    ort_errors.NoSuchFile,
    ort_errors.NoModel,
)

# Element types numpy has; inputs of other types (string, bfloat16) are passed as given.
_NUMPY_NAMES = frozenset(
    "float32 float64 float16 bool int8 int16 int32 int64 uint8 uint16 uint32 uint64".split()
)


class OnnxRuntimeSession:
    def __init__(
        self,
        session: ort.InferenceSession,
        outputs: tuple[str, ...],
        device: Device,
        runtime: str = "onnxruntime",
    ) -> None:
        self.runtime = runtime
        self.device = device
        self._session = session
        self._outputs = list(outputs)
        declared = session.get_inputs()
        self._signature = {i.name: tuple(i.shape) for i in declared}
        dtypes = {i.name: _numpy_dtype(i.type) for i in declared}
        self._casts = tuple((name, d) for name, d in dtypes.items() if d is not None)

    def end_profiling(self) -> Path:
        """Stop profiling (a session opened with `profile`) and return the profile: a Chrome
        trace, one event per node per run."""
        return Path(self._session.end_profiling())

    def run(self, inputs: Inputs) -> Outputs:
        feed = inputs
        for name, dtype in self._casts:
            array = inputs.get(name)
            if array is not None and array.dtype != dtype:
                feed = {**feed, name: array.astype(dtype)}
        try:
            results = self._session.run(self._outputs, feed)
        except Exception as err:  # InvalidArgument, ValueError, Fail, ...: sorted out below
            if not inputs_fit(self._signature, inputs):
                raise input_error(self._signature, inputs) from err
            raise RuntimeFailure(f"ONNX Runtime failed: {first_line(err)}") from err
        # ONNX Runtime returns exactly the outputs asked for; a strict zip would add ~0.15 us
        return dict(zip(self._outputs, results, strict=False))

    def describe(self) -> dict[str, Any]:
        settings = self._session.get_session_options()
        return {
            "threads": settings.intra_op_num_threads,
            "inter_op_threads": settings.inter_op_num_threads,
            "execution_mode": settings.execution_mode.name.removeprefix("ORT_").lower(),
            "graph_optimization": settings.graph_optimization_level.name.removeprefix("ORT_"),
            "providers": self._session.get_providers(),
            "device": str(self.device),
            "version": ort.__version__,
        }


OPTIMIZED = "optimized.onnx"
"""The graph a profiled session runs, as it writes it into its profile folder."""


def open_session(
    artifact: Artifact,
    options: RuntimeOptions,
    *,
    tensorrt: bool = False,
    profile: Path | None = None,
) -> OnnxRuntimeSession:
    """Open the ONNX file with explicit threads and every optimization: on the CPU provider, or
    on a CUDA device its providers (TensorRT first when `tensorrt`); with `profile`, profiling
    into that folder."""
    path = _model_path(artifact)
    providers = _providers(options.device, tensorrt=tensorrt)
    settings = ort.SessionOptions()
    settings.intra_op_num_threads = options.threads or physical_cores()
    settings.inter_op_num_threads = 1
    settings.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    settings.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    settings.log_severity_level = 3  # errors only: warnings about unused initializers are noise
    if profile is not None:
        settings.enable_profiling = True
        settings.profile_file_prefix = str(profile / "onnxruntime")
        settings.optimized_model_filepath = str(profile / OPTIMIZED)
    try:
        session = ort.InferenceSession(str(path), settings, providers=providers)
    except _NOT_A_MODEL as err:
        reason = first_line(err)
        raise BadInput(f"{path} is not a valid ONNX model: {reason}; re-export it") from err
    except Exception as err:  # Fail, NotImplemented (an op it lacks), ...
        raise RuntimeFailure(f"ONNX Runtime cannot open {path}: {first_line(err)}") from err
    first = providers[0][0]
    if first not in session.get_providers():
        libraries = "TensorRT" if tensorrt else "CUDA and cuDNN"
        raise RuntimeFailure(
            f"ONNX Runtime {ort.__version__} could not load its {first} on {options.device} (it "
            f"fell back to {', '.join(session.get_providers())}): put the {libraries} libraries "
            "this onnxruntime-gpu was built for on the library path"
        )
    graph_outputs = [o.name for o in session.get_outputs()]
    missing = [name for name in artifact.spec.outputs if name not in graph_outputs]
    if missing:
        raise BadInput(
            f"{path} has no outputs named {missing} (it has {graph_outputs}); re-export it"
        )
    runtime = "onnxruntime-tensorrt" if tensorrt else "onnxruntime"
    return OnnxRuntimeSession(session, artifact.spec.outputs, options.device, runtime)


def _providers(device: Device, *, tensorrt: bool) -> list[tuple[str, dict[str, Any]]]:
    """The providers in ONNX Runtime's order of preference, each with its options."""
    cpu: tuple[str, dict[str, Any]] = ("CPUExecutionProvider", {})
    if device.kind == "cpu":
        return [cpu]
    on = {"device_id": device.index}
    cuda = ("CUDAExecutionProvider", on)
    if not tensorrt:
        return [cuda, cpu]
    return [("TensorrtExecutionProvider", {**on, "trt_fp16_enable": True}), cuda, cpu]


def _model_path(artifact: Artifact) -> Path:
    if artifact.path is None or not Path(artifact.path).is_file():
        raise BadInput(f"no ONNX file at {artifact.path}; export the model first")
    return Path(artifact.path)


def _numpy_dtype(onnx_type: str) -> np.dtype[Any] | None:
    """'tensor(float)' -> float32; None for a type numpy lacks."""
    name = onnx_type.removeprefix("tensor(").removesuffix(")")
    name = {"float": "float32", "double": "float64"}.get(name, name)
    return np.dtype(name) if name in _NUMPY_NAMES else None
