"""The runtimes mahir can run an artifact on, each behind the one `Session` interface.

`RUNTIMES` is written out by hand: to add a runtime, add a module with
`open_session(artifact, options) -> Session` and one entry here. Runtime modules import their
framework only when a session is opened, so listing runtimes costs nothing. A runtime knows
nothing of passes, search or serving.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mahir.errors import BadInput, Unsupported
from mahir.types import Artifact, ArtifactFormat, RuntimeOptions, Session


@dataclass(frozen=True, slots=True)
class Runtime:
    name: str
    formats: tuple[ArtifactFormat, ...]
    """Artifact formats it opens, most preferred first."""
    open: Callable[[Artifact, RuntimeOptions], Session]
    summary: str


def _torch_eager(artifact: Artifact, options: RuntimeOptions) -> Session:
    from mahir.runtimes import pytorch

    return pytorch.open_session(artifact, options, compile=False)


def _torch_compile(artifact: Artifact, options: RuntimeOptions) -> Session:
    from mahir.runtimes import pytorch

    return pytorch.open_session(artifact, options, compile=True)


def _onnxruntime(artifact: Artifact, options: RuntimeOptions) -> Session:
    from mahir.runtimes import onnxruntime

    return onnxruntime.open_session(artifact, options)


def _openvino(artifact: Artifact, options: RuntimeOptions) -> Session:
    from mahir.runtimes import openvino

    return openvino.open_session(artifact, options)


RUNTIMES: dict[str, Runtime] = {
    "torch": Runtime("torch", ("torch",), _torch_eager, "PyTorch eager"),
    "torch-compile": Runtime(
        "torch-compile", ("torch",), _torch_compile, "torch.compile (inductor), dynamic shapes"
    ),
    "onnxruntime": Runtime("onnxruntime", ("onnx",), _onnxruntime, "ONNX Runtime, CPU provider"),
    "openvino": Runtime("openvino", ("openvino", "onnx"), _openvino, "OpenVINO, CPU plugin"),
}


def get_runtime(name: str) -> Runtime:
    try:
        return RUNTIMES[name]
    except KeyError:
        raise BadInput(f"unknown runtime {name!r}: choose from {', '.join(RUNTIMES)}") from None


def open_session(
    runtime: str, artifact: Artifact, options: RuntimeOptions | None = None
) -> Session:
    """Open `artifact` on the named runtime."""
    chosen = get_runtime(runtime)
    if artifact.format not in chosen.formats:
        raise Unsupported(
            f"{runtime} runs {' or '.join(chosen.formats)} artifacts, not {artifact.format}"
        )
    return chosen.open(artifact, options or RuntimeOptions())
