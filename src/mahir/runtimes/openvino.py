"""OpenVINO on the CPU plugin, from IR (the .xml) or straight from an ONNX file; dynamic shapes
stay dynamic. The precision is pinned to `OpenVinoOptions.precision` (f32 by default),
because left to itself OpenVINO runs bf16 on CPUs that support it and an "fp32" result would
silently not be fp32; `describe()` reads back the precision the compiled model actually uses.
Each calling thread gets its own infer request, so a session compiled with N streams
(`OpenVinoOptions.streams`) runs the batches of N threads at once; a request reuses its output
buffers on the next call, so results are copied out, and it keeps the last inputs, so every
input must be given on every call. A call that raised is followed by a recovery (`_recover`)
before `run` raises: the CPU plugin can otherwise keep failing valid inputs afterwards.

Opened with `profiling=True` (for `mahir profile`), the plugin keeps per-node performance
counters (`PERF_COUNT`): `profiling_info()` gives the calling thread's last call's, and
`runtime_model()` the graph the plugin runs (its nodes name the IR's ops each one fused).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov

from mahir.errors import BadInput, RuntimeFailure, first_line
from mahir.hardware import physical_cores
from mahir.runtimes import Signature, input_error, inputs_fit
from mahir.types import CPU, Artifact, Dim, Inputs, Outputs, RuntimeOptions


class OpenVINOSession:
    runtime = "openvino"
    device = CPU

    def __init__(
        self, compile_model: Callable[[], ov.CompiledModel], outputs: tuple[str, ...], path: Path
    ) -> None:
        self._compile = compile_model
        self._compiled = compiled = compile_model()
        self._local = threading.local()
        self._probes = _probes(compiled)
        self._signature: Signature = {
            port.get_any_name(): _dims(port.get_partial_shape()) for port in compiled.inputs
        }
        ports = {name: port for port in compiled.outputs for name in port.get_names()}
        missing = [name for name in outputs if name not in ports]
        if missing:
            raise BadInput(f"{path} has no outputs named {missing} (it has {sorted(ports)})")
        self._outputs = tuple((name, ports[name]) for name in outputs)

    def run(self, inputs: Inputs) -> Outputs:
        if inputs.keys() != self._signature.keys():  # a missing input would rerun stale data
            raise input_error(self._signature, inputs)
        try:
            # share_outputs=False: OpenVINO copies the results out of buffers the next call reuses
            results = self._request().infer(dict(inputs), share_inputs=True, share_outputs=False)
        except Exception as err:  # OpenVINO raises RuntimeError for bad shapes and failures alike
            self._recover()
            if not inputs_fit(self._signature, inputs):
                raise input_error(self._signature, inputs) from err
            raise RuntimeFailure(f"OpenVINO failed: {_reason(err)}") from err
        return {name: results[port] for name, port in self._outputs}

    def profiling_info(self) -> list[ov.ProfilingInfo]:
        """Per-node counters of this thread's last call (a session opened with `profiling`)."""
        return list(self._request().get_profiling_info())

    def runtime_model(self) -> ov.Model:
        """The graph the CPU plugin runs, at the shapes of the last call."""
        return self._compiled.get_runtime_model()

    def _request(self) -> ov.InferRequest:
        """This thread's infer request, made on its first call (from the model compiled now)."""
        local = self._local
        if getattr(local, "compiled", None) is not self._compiled:
            local.compiled, local.request = self._compiled, self._compiled.create_infer_request()
        return local.request

    def _recover(self) -> None:
        """After a failed call the CPU plugin keeps failing every call of the sequence length
        that last succeeded, until a call of another length succeeds; a new infer request does
        not help (seen on 2026.4). So one small call is made with every dynamic axis 1, else 2
        (one of them differs from the last good length); a model that takes neither is
        compiled afresh."""
        for probe in self._probes:
            try:
                self._request().infer(probe)
                return
            except Exception:  # this probe's shape does not suit the model: try the next
                continue
        self._compiled = self._compile()  # every thread's next call makes a request from it

    def describe(self) -> dict[str, Any]:
        compiled = self._compiled
        return {
            "threads": compiled.get_property("INFERENCE_NUM_THREADS"),
            "precision": compiled.get_property("INFERENCE_PRECISION_HINT").to_string(),
            "hint": str(compiled.get_property("PERFORMANCE_HINT")).lower(),
            "streams": compiled.get_property("NUM_STREAMS"),
            "version": ov.__version__,
        }


def open_session(
    artifact: Artifact, options: RuntimeOptions, *, profiling: bool = False
) -> OpenVINOSession:
    """Read the IR or ONNX file and compile it for the CPU with the threads `options` ask for
    and the hint and precision of `options.openvino`; with `profiling`, per-node counters on."""
    kind = "OpenVINO IR" if artifact.format == "openvino" else "ONNX"
    if artifact.path is None or not Path(artifact.path).is_file():
        raise BadInput(f"no {kind} file at {artifact.path}; export the model first")
    path = Path(artifact.path)
    config: dict[str, Any] = {
        "PERFORMANCE_HINT": options.openvino.hint.upper(),
        "INFERENCE_NUM_THREADS": options.threads or physical_cores(),
    }
    if options.openvino.precision is not None:
        config["INFERENCE_PRECISION_HINT"] = options.openvino.precision
    if options.openvino.streams is not None:
        config["NUM_STREAMS"] = options.openvino.streams
    if profiling:
        config["PERF_COUNT"] = True
    core = ov.Core()
    try:
        model = core.read_model(str(path))
    except Exception as err:  # RuntimeError whatever is wrong with the file
        raise BadInput(f"{path} is not a valid {kind} model: {_reason(err)}; re-export it") from err

    def compile_model() -> ov.CompiledModel:
        try:
            return core.compile_model(model, "CPU", config)
        except Exception as err:  # an op or setting the CPU plugin does not support
            raise RuntimeFailure(f"OpenVINO cannot compile {path}: {_reason(err)}") from err

    return OpenVINOSession(compile_model, artifact.spec.outputs, path)


def _probes(compiled: ov.CompiledModel) -> tuple[dict[str, np.ndarray], ...]:
    """Zero inputs with every dynamic axis 1, then 2; none when an input's rank is dynamic."""
    shapes = {port.get_any_name(): port.get_partial_shape() for port in compiled.inputs}
    if any(shape.rank.is_dynamic for shape in shapes.values()):
        return ()
    dtypes = {port.get_any_name(): port.get_element_type().to_dtype() for port in compiled.inputs}
    return tuple(
        {
            name: np.zeros([d.get_length() if d.is_static else size for d in shape], dtypes[name])
            for name, shape in shapes.items()
        }
        for size in (1, 2)
    )


def _dims(shape: ov.PartialShape) -> tuple[Dim | None, ...] | None:
    """Fixed sizes as ints, dynamic ones as None; None when even the rank is dynamic."""
    if shape.rank.is_dynamic:
        return None
    return tuple(d.get_length() if d.is_static else None for d in shape)


def _reason(err: Exception) -> str:
    """OpenVINO's message without the C++ source locations its first lines are made of."""
    lines = (line.strip() for line in str(err).splitlines())
    useful = [line for line in lines if line and not line.startswith(("Exception from", "Check '"))]
    return useful[0] if useful else first_line(err)
