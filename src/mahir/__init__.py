"""mahir: make a trained model run faster and cheaper without changing its answers.

model = mahir.load_model()                     # a folder, an .onnx file, "file.py:factory"
result = mahir.benchmark(model, mahir.BenchConfig(batch_sizes=(1, 32)), workdir)
session = mahir.open_session("onnxruntime", artifact)
result = mahir.search.optimize(model, mahir.OptimizeConfig(time_budget_s=600)); result.save(out)
session = mahir.load(out)                      # the winner, on the runtime it won on
profile = mahir.profile_model(model, mahir.ProfileConfig(batch_size=8), workdir)  # per-op roofline
"""

from __future__ import annotations

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
