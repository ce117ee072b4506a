"""The public API is what `__all__` says, and every name in it is documented."""

from __future__ import annotations

import mahir


def test_all_is_pinned() -> None:
    assert sorted(mahir.__all__) == sorted(
        [
            "RUNTIMES", "Artifact", "BadInput", "BenchConfig", "BenchResult", "ExportMismatch",
            "MahirError", "MeasureConfig", "Model", "OptimizeConfig", "OptimizeResult",
            "RuntimeFailure", "RuntimeOptions", "Session",
            "Unsupported", "benchmark", "export_onnx", "export_openvino", "load", "load_model",
            "open_session", "optimize",
        ]
    )  # fmt: skip


def test_every_public_member_exists_and_has_a_docstring() -> None:
    for name in mahir.__all__:
        member = getattr(mahir, name)
        if callable(member):
            assert member.__doc__, f"mahir.{name} has no docstring"
