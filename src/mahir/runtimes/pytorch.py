"""PyTorch on the CPU: eager (the baseline every speedup is measured against) and torch.compile.

The module takes the spec's inputs by keyword and returns a tuple in the spec's output order
(`mahir.modules.TupleOutputs`). A module in training mode is refused: dropout and batch-norm
statistics would silently change every answer. Thread count is process-wide in torch, so
opening a session sets it for the whole process.
"""

from __future__ import annotations

from typing import Any

import torch

from mahir.errors import BadInput, RuntimeFailure, Unsupported, first_line
from mahir.hardware import physical_cores
from mahir.types import Artifact, Inputs, Outputs, RuntimeOptions


class TorchSession:
    def __init__(
        self, module: Any, output_names: tuple[str, ...], *, runtime: str, threads: int
    ) -> None:
        self.runtime = runtime
        self._module = module
        self._outputs = output_names
        self._threads = threads

    def run(self, inputs: Inputs) -> Outputs:
        tensors = {name: torch.from_numpy(array) for name, array in inputs.items()}
        try:
            with torch.inference_mode():
                results = self._module(**tensors)
        except TypeError as err:  # unexpected or missing keyword inputs
            raise BadInput(f"the model rejected its inputs: {first_line(err)}") from err
        except Exception as err:  # shape errors, compile failures at first call, ...
            failure = Unsupported if _is_compile_error(err) else RuntimeFailure
            raise failure(f"{self.runtime} failed: {first_line(err)}") from err
        return {name: r.numpy() for name, r in zip(self._outputs, results, strict=True)}

    def describe(self) -> dict[str, Any]:
        return {"threads": self._threads, "precision": "f32", "version": torch.__version__}


def open_session(artifact: Artifact, options: RuntimeOptions, *, compile: bool) -> TorchSession:
    module = artifact.module
    if not isinstance(module, torch.nn.Module):
        raise BadInput("a torch artifact needs a live nn.Module")
    if any(m.training for m in module.modules()):
        raise BadInput("the module is in training mode (dropout, batch-norm updates): call .eval()")
    threads = options.threads or physical_cores()
    torch.set_num_threads(threads)
    runnable = torch.compile(module, backend="inductor", dynamic=True) if compile else module
    name = "torch-compile" if compile else "torch"
    return TorchSession(runnable, artifact.spec.outputs, runtime=name, threads=threads)


def _is_compile_error(err: Exception) -> bool:
    return type(err).__module__.startswith(("torch._dynamo", "torch._inductor"))
