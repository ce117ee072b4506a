"""The runtimes mahir can run an artifact on, each behind the one `Session` interface.

`RUNTIMES` is written out by hand: to add a runtime, add a module with
`open_session(artifact, options) -> Session` and one entry here, naming the device kinds it runs
on (`open_session` refuses others before the framework is imported). The runtime modules import
their framework at the top, so they are imported only when a session is opened: listing runtimes
costs nothing. `inputs_fit` and `input_error` are shared by the runtime modules: after a runtime
raised, they tell the caller's mistake (BadInput naming the expected inputs) from the runtime's
own failure. A runtime that needs ONNX Runtime providers on a GPU names them (`providers`):
`unavailable` reads this machine's build before a session opens, and search and bench leave it
out with that reason. A runtime knows nothing of passes, search or serving.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from mahir.errors import BadInput, Unsupported
from mahir.types import (
    Artifact,
    ArtifactFormat,
    Device,
    Dim,
    Inputs,
    OpenVinoOptions,
    Outputs,
    RuntimeOptions,
    Session,
)

if TYPE_CHECKING:
    from mahir.model import Model

Signature = Mapping[str, tuple[Dim | None, ...] | None]
"""The inputs a runtime declares, in order: name -> dims (an int is fixed, a name or None is
dynamic), or None where even the rank is dynamic."""


@dataclass(frozen=True, slots=True)
class Runtime:
    """A runtime's name, the artifact formats it opens, and how to open one."""

    name: str
    formats: tuple[ArtifactFormat, ...]
    """Artifact formats it opens, most preferred first."""
    open: Callable[[Artifact, RuntimeOptions], Session]
    summary: str
    """One line for `--help` and reports."""
    devices: tuple[str, ...] = ("cpu",)
    """Device kinds (`Device.kind`) it runs on."""
    package: str = "torch"
    """The package it imports (module and pip name alike): a machine may lack it (a GPU
    machine without OpenVINO), and then the runtime is left out, not crashed into."""
    concurrent: tuple[str, ...] = ()
    """Device kinds on which one session runs batches from several threads at once (a server's
    workers): where each thread's batch runs while another prepares its own."""
    worker_streams: bool = False
    """Whether a session is opened for a number of workers (OpenVINO compiles a stream for
    each); the other concurrent runtimes serve any number of workers from one session."""
    providers: tuple[str, ...] = ()
    """ONNX Runtime execution providers it needs on a CUDA GPU: the CPU wheel has none of them,
    and then it is left out there with the reason (`unavailable`), not crashed into."""

    def missing(self) -> str | None:
        """The package to install before this runtime can run here, or None."""
        return None if importlib.util.find_spec(self.package) else self.package

    def unavailable(self, device: Device) -> str | None:
        """Why it cannot run on `device` on this machine although its package is installed (on a
        GPU, an ONNX Runtime provider this build lacks), in one line with the fix; else None."""
        if device.kind != "cuda" or not self.providers:
            return None
        have = available_providers()
        lacking = [p for p in self.providers if p not in have]
        return _NO_PROVIDER[lacking[0]] if lacking else None

    def concurrent_on(self, device: Device) -> bool:
        """Whether a session on `device` takes batches from several workers at once."""
        return device.kind in self.concurrent


_NO_PROVIDER = {
    "CUDAExecutionProvider": "onnxruntime here has no CUDA provider: pip install onnxruntime-gpu "
    "(in place of onnxruntime)",
    "TensorrtExecutionProvider": "onnxruntime here has no TensorRT provider: pip install "
    "onnxruntime-gpu (in place of onnxruntime) and TensorRT",
}


def available_providers() -> tuple[str, ...]:
    """The execution providers this machine's onnxruntime build has; none without onnxruntime.
    Read when asked, so that listing runtimes imports nothing."""
    if importlib.util.find_spec("onnxruntime") is None:
        return ()
    import onnxruntime

    return tuple(onnxruntime.get_available_providers())


def _torch_eager(artifact: Artifact, options: RuntimeOptions) -> Session:
    from mahir.runtimes import pytorch

    return pytorch.open_session(artifact, options, compile=False)


def _torch_compile(artifact: Artifact, options: RuntimeOptions) -> Session:
    from mahir.runtimes import pytorch

    return pytorch.open_session(artifact, options, compile=True)


def _onnxruntime(artifact: Artifact, options: RuntimeOptions) -> Session:
    from mahir.runtimes import onnxruntime

    return onnxruntime.open_session(artifact, options)


def _onnxruntime_tensorrt(artifact: Artifact, options: RuntimeOptions) -> Session:
    from mahir.runtimes import onnxruntime

    return onnxruntime.open_session(artifact, options, tensorrt=True)


def _openvino(artifact: Artifact, options: RuntimeOptions) -> Session:
    from mahir.runtimes import openvino

    return openvino.open_session(artifact, options)


RUNTIMES: dict[str, Runtime] = {
    "torch": Runtime(
        "torch",
        ("torch",),
        _torch_eager,
        "PyTorch eager, fp32 (the baseline); on the CPU or a CUDA GPU",
        devices=("cpu", "cuda"),
        concurrent=("cuda",),  # kernels queue on the GPU while another thread launches
    ),
    "torch-compile": Runtime(
        "torch-compile",
        ("torch",),
        _torch_compile,
        "torch.compile (inductor), dynamic shapes; on a GPU with CUDA graphs over shape buckets",
        devices=("cpu", "cuda"),
        concurrent=("cuda",),  # a batch queued on the GPU while a worker prepares the next
    ),
    "onnxruntime": Runtime(
        "onnxruntime",
        ("onnx",),
        _onnxruntime,
        "ONNX Runtime, CPU provider; on a CUDA GPU its CUDA provider (onnxruntime-gpu)",
        devices=("cpu", "cuda"),
        package="onnxruntime",
        concurrent=("cpu", "cuda"),  # InferenceSession.run is thread-safe
        providers=("CUDAExecutionProvider",),
    ),
    "onnxruntime-tensorrt": Runtime(
        "onnxruntime-tensorrt",
        ("onnx",),
        _onnxruntime_tensorrt,
        "ONNX Runtime's TensorRT provider, fp16 kernels allowed, CUDA for the rest; CUDA GPUs",
        devices=("cuda",),
        package="onnxruntime",
        concurrent=("cuda",),
        providers=("CUDAExecutionProvider", "TensorrtExecutionProvider"),
    ),
    "openvino": Runtime(
        "openvino",
        ("openvino", "onnx"),
        _openvino,
        "OpenVINO, CPU plugin",
        package="openvino",
        concurrent=("cpu",),  # an infer request per thread, one stream each
        worker_streams=True,
    ),
}


def get_runtime(name: str) -> Runtime:
    """The runtime called `name`; an unknown name gets one line listing the known ones."""
    try:
        return RUNTIMES[name]
    except KeyError:
        raise BadInput(f"unknown runtime {name!r}: choose from {', '.join(RUNTIMES)}") from None


_DEFAULTS = RuntimeOptions()


def open_session(runtime: str, artifact: Artifact, options: RuntimeOptions = _DEFAULTS) -> Session:
    """Open `artifact` on the named runtime, refusing a format or device it cannot run."""
    chosen = get_runtime(runtime)
    if artifact.format not in chosen.formats:
        raise Unsupported(
            f"{runtime} runs {' or '.join(chosen.formats)} artifacts, not {artifact.format}"
        )
    check_runnable(runtime, options.device)
    return chosen.open(artifact, options)


def check_runnable(runtime: str, device: Device) -> Runtime:
    """The runtime called `runtime`, refusing in one line one that cannot run on `device` on
    this machine (its device kinds, its package, its ONNX Runtime providers): callers that
    build before they open ask first."""
    chosen = get_runtime(runtime)
    if device.kind not in chosen.devices:
        raise Unsupported(
            f"{runtime} runs on {' or '.join(chosen.devices)} only; {_elsewhere(device)}"
        )
    missing = chosen.missing()
    if missing:
        raise Unsupported(
            f"{runtime} needs {missing}, which is not installed: pip install {missing}"
        )
    why = chosen.unavailable(device)
    if why:
        raise Unsupported(why)
    return chosen


def _elsewhere(device: Device) -> str:
    """Where to turn for `device`: the runtimes that run there on this machine, or that none
    does yet."""
    able = [
        r.name
        for r in RUNTIMES.values()
        if device.kind in r.devices and not r.missing() and not r.unavailable(device)
    ]
    if able:
        return f"for {device} choose {', '.join(able)}"
    return f"no runtime runs on {device.kind} yet: open it on cpu"


def inputs_fit(expected: Signature, inputs: Inputs) -> bool:
    """Whether `inputs` have the expected names, ranks and fixed sizes. Runtimes ask only after
    they raised, so a successful call never pays for the check."""
    return inputs.keys() == expected.keys() and all(
        _fits(dims, np.shape(inputs[name])) for name, dims in expected.items()
    )


def input_error(expected: Signature, inputs: Inputs) -> BadInput:
    """One line naming the inputs the model takes and the ones it got."""
    want = ", ".join(f"{name} {_show(dims)}" for name, dims in expected.items())
    got = ", ".join(f"{name} {_show(np.shape(array))}" for name, array in inputs.items())
    return BadInput(f"the model takes {want}; got {got or 'no inputs'}")


def _fits(dims: tuple[Dim | None, ...] | None, shape: tuple[int, ...]) -> bool:
    if dims is None:
        return True
    return len(dims) == len(shape) and all(
        not isinstance(d, int) or d == s for d, s in zip(dims, shape, strict=True)
    )


def _show(dims: tuple[Dim | None, ...] | None) -> str:
    if dims is None:
        return "[any shape]"
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


REFERENCE_OPTIONS = RuntimeOptions(openvino=OpenVinoOptions(precision="f32"))
"""What reference answers are computed with: fp32 on the CPU, whatever the defaults become."""


def reference_outputs(
    model: Model, batches: Sequence[Inputs], source: Artifact | None = None
) -> list[Outputs]:
    """Outputs of `source` (default: the fp32 original) on its reference runtime."""
    session = reference_session(source or model.original())
    return [session.run(batch) for batch in batches]


def reference_runtime(artifact: Artifact) -> str:
    """The runtime an artifact's own answers come from: PyTorch eager for torch artifacts, ONNX
    Runtime for ONNX, OpenVINO for IR. A model's baseline is its original on this runtime."""
    return {"torch": "torch", "onnx": "onnxruntime", "openvino": "openvino"}[artifact.format]


def reference_session(artifact: Artifact) -> Session:
    """The artifact on its reference runtime, in fp32 (OpenVINO pinned to f32), on the CPU."""
    return open_session(reference_runtime(artifact), artifact, REFERENCE_OPTIONS)
