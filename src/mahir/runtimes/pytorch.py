"""PyTorch: eager, the baseline every speedup is measured against, and torch.compile (inductor,
dynamic shapes so that a new batch size or sequence length does not recompile; it compiles on the
first call, which therefore takes seconds), on the CPU or a CUDA GPU. On a GPU the session runs a
copy of the module moved there (the original stays the CPU reference); inputs and outputs travel
through pinned host memory (torch's caching host allocator, so no page-locking per call), and
outputs come back as numpy once the device has finished. Compiled on a GPU, the module is
captured as one CUDA graph per shape bucket (`runtimes/cuda_graphs.py`, `runtimes/buckets.py`):
one launch per batch instead of one per kernel, which is what bounds small batches. The module
takes the spec's inputs by keyword and returns a tuple in the spec's output order
(`mahir.modules.TupleOutputs` adapts a user's model). A module in training mode is refused:
dropout and batch-norm statistics would silently change every answer. Torch's thread count is
process-wide: opening a session sets it for every torch session in the process, and `describe()`
reports the count in effect.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch

from mahir.errors import BadInput, MahirError, RuntimeFailure, Unsupported, first_line
from mahir.hardware import physical_cores
from mahir.runtimes import Signature, input_error, inputs_fit
from mahir.runtimes.buckets import Buckets
from mahir.runtimes.cuda_graphs import CudaGraphs, check_returned
from mahir.runtimes.packing import Packing, packed_spec
from mahir.runtimes.pending import Done
from mahir.types import (
    CPU,
    Artifact,
    Device,
    Inputs,
    InputSpec,
    Outputs,
    Pending,
    RuntimeOptions,
    Session,
)

_PRECISIONS = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


class TorchSession:
    def __init__(
        self,
        module: Any,
        spec: InputSpec,
        *,
        runtime: str,
        precision: str,
        device: Device = CPU,
        replay: CudaGraphs | None = None,
    ) -> None:
        self.runtime = runtime
        self.device = device
        self._where = "cpu" if device.kind == "cpu" else str(device)
        self._module = module
        self._outputs = spec.outputs
        self._signature: Signature = {t.name: t.shape for t in spec.inputs}
        self._dtypes = {t.name: np.dtype(t.dtype) for t in spec.inputs}
        self._precision = precision
        self._replay = replay

    @property
    def queues(self) -> bool:
        """Whether `submit` returns before the batch is computed: on a GPU, in CUDA graphs."""
        return self._replay is not None

    def submit(self, inputs: Inputs) -> Pending:
        """Queue the batch on the GPU where it replays CUDA graphs; else run it now."""
        if self._replay is None:
            return Done(self.run(inputs))
        if inputs.keys() != self._signature.keys():
            raise input_error(self._signature, inputs)
        try:
            return self._replay.submit(
                {n: a.astype(self._dtypes[n], copy=False) for n, a in inputs.items()}
            )
        except MahirError:
            raise
        except Exception as err:  # shape errors on the first capture of a shape, ...
            raise self._failure(err, inputs) from err

    def run(self, inputs: Inputs) -> Outputs:
        if self._replay is not None:
            return self.submit(inputs).result()
        if inputs.keys() != self._signature.keys():
            raise input_error(self._signature, inputs)
        tensors = {
            name: _to(_tensor(array, self._dtypes[name]), self._where)
            for name, array in inputs.items()
        }
        try:
            with torch.inference_mode():
                results = self._module(**tensors)
        except Exception as err:  # shape errors, compile failures on the first call, ...
            raise self._failure(err, inputs) from err
        check_returned(results, self._outputs)
        return dict(zip(self._outputs, self._to_host(results), strict=True))

    def describe(self) -> dict[str, Any]:
        settings = {
            "threads": torch.get_num_threads(),
            "precision": self._precision,
            "device": str(self.device),
        }
        if self.runtime == "torch-compile":
            settings |= {"backend": "inductor", "dynamic": True}
        if self._replay is not None:
            settings |= {"cuda_graphs": True, "graphs_captured": self._replay.shapes}
        return settings | {"version": str(torch.__version__)}

    def _to_host(self, results: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
        """The outputs as numpy; from a GPU through pinned buffers, after one synchronise."""
        if self._where == "cpu":
            return [r.numpy() for r in results]
        host = [torch.empty(r.shape, dtype=r.dtype, pin_memory=True) for r in results]
        for buffer, result in zip(host, results, strict=True):
            buffer.copy_(result, non_blocking=True)
        torch.cuda.current_stream(self._where).synchronize()
        return [buffer.numpy() for buffer in host]  # each array keeps its buffer alive

    def _failure(self, err: Exception, inputs: Inputs) -> MahirError:
        if not inputs_fit(self._signature, inputs):
            return input_error(self._signature, inputs)
        if type(err).__module__.startswith(("torch._dynamo", "torch._inductor")):
            return Unsupported(
                f"torch.compile cannot compile this model: {first_line(err)}; use 'torch'"
            )
        return RuntimeFailure(f"{self.runtime} failed: {first_line(err)}")


def open_session(artifact: Artifact, options: RuntimeOptions, *, compile: bool) -> Session:
    """Check the module is ready for inference, set torch's threads, and compile if asked."""
    device = options.device
    spec = packed_spec(artifact.spec) if artifact.spec.packed else artifact.spec
    module = (
        artifact.module if artifact.module is not None else _load_program(artifact, spec, device)
    )
    if not isinstance(module, torch.nn.Module):
        raise BadInput(f"a torch artifact needs a live nn.Module, got {type(module).__name__}")
    training = [name or "the module" for name, m in module.named_modules() if m.training]
    if training and artifact.module is not None:  # a loaded program is traced in eval mode
        raise BadInput(
            f"{training[0]} is in training mode (dropout on, batch-norm statistics updating): "
            "call .eval() on the module first"
        )
    torch.set_num_threads(options.threads or physical_cores())
    dtypes = [p.dtype for p in module.parameters() if p.is_floating_point()]
    precision = _PRECISIONS.get(dtypes[0], str(dtypes[0])) if dtypes else "f32"
    if device.kind == "cuda" and artifact.module is not None:  # a loaded program is there
        module = copy.deepcopy(module).to(_cuda(device))
    session: Session = _session(module, spec, precision, device, compile)
    if artifact.spec.packed:
        return Packing(session, artifact.spec)
    return Buckets(session, spec) if compile and device.kind == "cuda" else session


def _session(
    module: torch.nn.Module, spec: InputSpec, precision: str, device: Device, compile: bool
) -> TorchSession:
    if not compile:
        return TorchSession(module, spec, runtime="torch", precision=precision, device=device)
    try:
        compiled = torch.compile(module, backend="inductor", dynamic=True)
    except Exception as err:  # no compiler support on this Python or platform
        raise Unsupported(f"torch.compile is not available here: {first_line(err)}") from err
    on_gpu = device.kind == "cuda"
    return TorchSession(
        compiled,
        spec,
        runtime="torch-compile",
        precision=precision,
        device=device,
        replay=CudaGraphs(compiled, spec.outputs, device) if on_gpu else None,
    )


def _load_program(artifact: Artifact, spec: InputSpec, device: Device) -> torch.nn.Module:
    """A program saved by `mahir.export.onnx.export_program`, called by keyword like any module;
    for a GPU its graph is moved there too (a traced graph names the device of the tensors it
    creates, e.g. position ids, which moving the parameters alone leaves on the CPU)."""
    import mahir.varlen  # noqa: F401  (a packed program calls its custom op)
    from mahir.modules import KeywordInputs

    if artifact.path is None or not artifact.path.is_file():
        raise BadInput(f"a torch artifact needs a module or a saved .pt2 program: {artifact.path}")
    try:
        program = torch.export.load(str(artifact.path))
    except Exception as err:  # a damaged or foreign file
        raise BadInput(f"{artifact.path} is not a saved torch program: {first_line(err)}") from err
    if device.kind == "cuda":
        from torch.export.passes import move_to_device_pass

        program = move_to_device_pass(program, _cuda(device))
    return KeywordInputs(program.module(), spec.input_names)


def _cuda(device: Device) -> str:
    """The torch name of a CUDA device this machine has, or one line saying it has none."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.index >= count:
        seen = f"torch sees {count} CUDA GPU{'s' * (count != 1)}"
        build = "" if torch.version.cuda else " (this torch is a CPU build)"
        raise Unsupported(f"no {device} here: {seen}{build}; open it on cpu")
    return str(device)


def _to(tensor: torch.Tensor, where: str) -> torch.Tensor:
    """On the CPU, the tensor itself; for a GPU, copied through pinned host memory, without
    waiting for the copy (the stream orders it before the model's kernels)."""
    if where == "cpu":
        return tensor
    return tensor.pin_memory().to(where, non_blocking=True)


def _tensor(array: np.ndarray, dtype: np.dtype[Any]) -> torch.Tensor:
    """The array as a tensor, sharing its memory where it can: cast only to the spec's dtype,
    copied only when read-only (torch warns about non-writable arrays, e.g. np.frombuffer's)."""
    if array.dtype != dtype:
        array = array.astype(dtype)
    elif not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(array)
