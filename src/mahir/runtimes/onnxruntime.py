"""ONNX Runtime on the CPU. Threads are set explicitly (the default is every logical core, and
on a shared machine that oversubscribes); inter-op parallelism is off because these graphs are
one chain of ops. `run` does as little as possible: everything is looked up at open time.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort

from mahir.errors import BadInput, RuntimeFailure, first_line
from mahir.hardware import physical_cores
from mahir.types import Artifact, Inputs, Outputs, RuntimeOptions

# Errors ONNX Runtime raises for inputs the graph does not take.
_BAD_INPUT_ERRORS = (ort.capi.onnxruntime_pybind11_state.InvalidArgument, ValueError)


class OnnxRuntimeSession:
    runtime = "onnxruntime"

    def __init__(self, session: ort.InferenceSession, threads: int) -> None:
        self._session = session
        self._threads = threads
        self._dtypes = {i.name: _numpy_dtype(i.type) for i in session.get_inputs()}
        self._outputs = [o.name for o in session.get_outputs()]

    def run(self, inputs: Inputs) -> Outputs:
        feed = {
            name: array
            if array.dtype == self._dtypes.get(name, array.dtype)
            else array.astype(self._dtypes[name])
            for name, array in inputs.items()
        }
        try:
            results = self._session.run(self._outputs, feed)
        except _BAD_INPUT_ERRORS as err:
            raise BadInput(
                f"{first_line(err)}; the model takes {_signature(self._dtypes)}"
            ) from err
        except Exception as err:  # ONNX Runtime's Fail/RuntimeException/...: all are failures
            raise RuntimeFailure(f"ONNX Runtime failed: {first_line(err)}") from err
        return dict(zip(self._outputs, results, strict=True))

    def describe(self) -> dict[str, Any]:
        return {
            "threads": self._threads,
            "providers": self._session.get_providers(),
            "graph_optimization": "all",
            "version": ort.__version__,
        }


def open_session(artifact: Artifact, options: RuntimeOptions) -> OnnxRuntimeSession:
    threads = options.threads or physical_cores()
    settings = ort.SessionOptions()
    settings.intra_op_num_threads = threads
    settings.inter_op_num_threads = 1
    settings.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    settings.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    settings.log_severity_level = 3  # errors only: warnings about unused initializers are noise
    try:
        session = ort.InferenceSession(
            str(artifact.path), settings, providers=["CPUExecutionProvider"]
        )
    except Exception as err:  # InvalidProtobuf, NoSuchFile, Fail...: the file is unusable
        raise BadInput(
            f"ONNX Runtime cannot open {artifact.path}: {first_line(err)}; re-export it"
        ) from err
    return OnnxRuntimeSession(session, threads)


def _numpy_dtype(onnx_type: str) -> np.dtype[Any]:
    """'tensor(int64)' -> int64; ONNX Runtime names types the ONNX way."""
    name = onnx_type.removeprefix("tensor(").removesuffix(")")
    return np.dtype({"float": "float32", "double": "float64", "float16": "float16"}.get(name, name))


def _signature(dtypes: dict[str, np.dtype[Any]]) -> str:
    return ", ".join(f"{name} ({dtype})" for name, dtype in dtypes.items())
