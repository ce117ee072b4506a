"""mahir: make a trained model run faster and cheaper without changing its answers.

model = mahir.load_model()                     # a folder, an .onnx file, "file.py:factory"
result = mahir.benchmark(model, mahir.BenchConfig(batch_sizes=(1, 32)), workdir)
session = mahir.open_session("onnxruntime", artifact)
result = mahir.optimize(model, mahir.OptimizeConfig(time_budget_s=600)); result.save(out)
session = mahir.load(out)                      # the winner, on the runtime it won on
profile = mahir.profile_model(model, mahir.ProfileConfig(batch_size=8), workdir)  # per-op roofline
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mahir.errors import BadInput, ExportMismatch, MahirError, RuntimeFailure, Unsupported
    from mahir.export.onnx import export_onnx, export_openvino
    from mahir.measure import MeasureConfig
    from mahir.model import Model, load_model
    from mahir.outdir import load_output_dir as load
    from mahir.profile.result import Profile
    from mahir.profile.run import ProfileConfig, profile_model, profile_output_dir
    from mahir.runtimes import RUNTIMES, open_session
    from mahir.search.bench import BenchConfig, BenchResult, benchmark
    from mahir.search.optimize import optimize
    from mahir.search.optimize_config import OptimizeConfig
    from mahir.search.optimize_result import OptimizeResult
    from mahir.types import Artifact, Device, OpenVinoOptions, RuntimeOptions, Session

_EXPORTS: dict[str, tuple[str, str]] = {
    "BadInput": ("mahir.errors", "BadInput"),
    "ExportMismatch": ("mahir.errors", "ExportMismatch"),
    "MahirError": ("mahir.errors", "MahirError"),
    "RuntimeFailure": ("mahir.errors", "RuntimeFailure"),
    "Unsupported": ("mahir.errors", "Unsupported"),
    "export_onnx": ("mahir.export.onnx", "export_onnx"),
    "export_openvino": ("mahir.export.onnx", "export_openvino"),
    "MeasureConfig": ("mahir.measure", "MeasureConfig"),
    "Model": ("mahir.model", "Model"),
    "load_model": ("mahir.model", "load_model"),
    "load": ("mahir.outdir", "load_output_dir"),
    "Profile": ("mahir.profile.result", "Profile"),
    "ProfileConfig": ("mahir.profile.run", "ProfileConfig"),
    "profile_model": ("mahir.profile.run", "profile_model"),
    "profile_output_dir": ("mahir.profile.run", "profile_output_dir"),
    "RUNTIMES": ("mahir.runtimes", "RUNTIMES"),
    "open_session": ("mahir.runtimes", "open_session"),
    "BenchConfig": ("mahir.search.bench", "BenchConfig"),
    "BenchResult": ("mahir.search.bench", "BenchResult"),
    "benchmark": ("mahir.search.bench", "benchmark"),
    "optimize": ("mahir.search.optimize", "optimize"),
    "OptimizeConfig": ("mahir.search.optimize_config", "OptimizeConfig"),
    "OptimizeResult": ("mahir.search.optimize_result", "OptimizeResult"),
    "Artifact": ("mahir.types", "Artifact"),
    "Device": ("mahir.types", "Device"),
    "OpenVinoOptions": ("mahir.types", "OpenVinoOptions"),
    "RuntimeOptions": ("mahir.types", "RuntimeOptions"),
    "Session": ("mahir.types", "Session"),
}
"""Each public name and where it lives: imported on first use, so that `import mahir` (and
`mahir serve` of an ONNX or OpenVINO directory) does not pay for torch and transformers."""


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:  # a subpackage not imported yet: mahir.search, mahir.passes, ...
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    module, attribute = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


__version__ = "0.1.0"

__all__ = [
    "RUNTIMES",
    "Artifact",
    "BadInput",
    "BenchConfig",
    "BenchResult",
    "Device",
    "ExportMismatch",
    "MahirError",
    "MeasureConfig",
    "Model",
    "OpenVinoOptions",
    "OptimizeConfig",
    "OptimizeResult",
    "Profile",
    "ProfileConfig",
    "RuntimeFailure",
    "RuntimeOptions",
    "Session",
    "Unsupported",
    "benchmark",
    "export_onnx",
    "export_openvino",
    "load",
    "load_model",
    "open_session",
    "optimize",
    "profile_model",
    "profile_output_dir",
]
