"""OpenVINO on the CPU, from IR (.xml) or straight from ONNX.

The precision is pinned (f32 unless asked otherwise) because OpenVINO otherwise picks bf16 by
itself on CPUs that have it, and an "fp32" result would silently not be fp32; `describe()` reads
back what the compiled model actually uses. Output buffers belong to the infer request and are
overwritten by the next call, so `run` copies them out.
"""

from __future__ import annotations

from typing import Any

import openvino as ov

from mahir.errors import BadInput, RuntimeFailure, first_line
from mahir.hardware import physical_cores
from mahir.types import Artifact, Inputs, Outputs, RuntimeOptions


class OpenVINOSession:
    runtime = "openvino"

    def __init__(self, compiled: ov.CompiledModel, output_names: tuple[str, ...]) -> None:
        self._compiled = compiled
        self._request = compiled.create_infer_request()
        ports = {name: port for port in compiled.outputs for name in port.get_names()}
        missing = [name for name in output_names if name not in ports]
        if missing:
            raise BadInput(f"the OpenVINO model has no outputs named {missing}; re-export it")
        self._outputs = [(name, ports[name]) for name in output_names]
        self._input_names = {name for port in compiled.inputs for name in port.get_names()}

    def run(self, inputs: Inputs) -> Outputs:
        unknown = set(inputs) - self._input_names
        if unknown:
            raise BadInput(
                f"unknown inputs {sorted(unknown)}; the model takes {sorted(self._input_names)}"
            )
        try:
            self._request.infer(dict(inputs), share_inputs=True)
        except Exception as err:  # OpenVINO raises RuntimeError for bad shapes and failures alike
            raise RuntimeFailure(f"OpenVINO failed: {first_line(err)}") from err
        return {name: self._request.get_tensor(port).data.copy() for name, port in self._outputs}

    def describe(self) -> dict[str, Any]:
        return {
            "threads": int(self._compiled.get_property("INFERENCE_NUM_THREADS")),
            "precision": self._compiled.get_property("INFERENCE_PRECISION_HINT").to_string(),
            "hint": str(self._compiled.get_property("PERFORMANCE_HINT")).lower(),
            "streams": int(self._compiled.get_property("NUM_STREAMS")),
            "version": ov.__version__,
        }


def open_session(artifact: Artifact, options: RuntimeOptions) -> OpenVINOSession:
    config: dict[str, Any] = {
        "PERFORMANCE_HINT": options.openvino_hint.upper(),
        "INFERENCE_NUM_THREADS": options.threads or physical_cores(),
    }
    if options.openvino_precision is not None:
        config["INFERENCE_PRECISION_HINT"] = options.openvino_precision
    core = ov.Core()
    try:
        model = core.read_model(str(artifact.path))
    except Exception as err:  # unreadable or corrupt file
        raise BadInput(
            f"OpenVINO cannot read {artifact.path}: {first_line(err)}; re-export it"
        ) from err
    try:
        compiled = core.compile_model(model, "CPU", config)
    except Exception as err:  # an op or setting the CPU plugin does not support
        raise RuntimeFailure(f"OpenVINO cannot compile {artifact.path}: {first_line(err)}") from err
    return OpenVINOSession(compiled, artifact.spec.outputs)
