"""The public API is what `__all__` says, and every name in it is documented."""

from __future__ import annotations

import inspect
import re

import pytest

import mahir


def test_all_is_pinned() -> None:
    assert sorted(mahir.__all__) == sorted(
        [
            "RUNTIMES", "Artifact", "BadInput", "BenchConfig", "BenchResult", "Device",
            "ExportMismatch", "MahirError", "MeasureConfig", "Model", "OpenVinoOptions",
            "OptimizeConfig", "OptimizeResult", "Profile", "ProfileConfig",
            "RuntimeFailure", "RuntimeOptions", "Session",
            "Unsupported", "benchmark", "export_onnx", "export_openvino", "load", "load_model",
            "open_session", "optimize", "profile_model", "profile_output_dir",
        ]
    )  # fmt: skip


def test_every_public_name_is_loaded_where_it_lives() -> None:
    """`import mahir` loads a public name on first use, from the module its table names."""
    assert sorted(mahir._EXPORTS) == sorted(mahir.__all__)
    assert mahir.optimize.__module__ == "mahir.search.optimize"
    assert mahir.search.__name__ == "mahir.search"  # a subpackage resolves too
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        mahir.nothing_here  # noqa: B018


def test_every_public_member_exists_and_has_a_docstring() -> None:
    for name in mahir.__all__:
        member = getattr(mahir, name)
        if callable(member):
            assert member.__doc__, f"mahir.{name} has no docstring"


def test_public_functions_take_paths_as_str_or_pathlike() -> None:
    """`mahir.load("mahir-out")`, as the README writes it: a bare `Path` parameter would make
    a str fail deep inside with a TypeError."""
    functions = [getattr(mahir, name) for name in mahir.__all__]
    functions = [f for f in functions if inspect.isfunction(f)] + [mahir.OptimizeResult.save]
    for function in functions:
        for param in inspect.signature(function).parameters.values():
            annotation = str(param.annotation)
            assert not re.search(r"\bPath\b", annotation), (function.__name__, param.name)
            if "PathLike" in annotation:
                assert "str | os.PathLike[str]" in annotation, (function.__name__, param.name)
