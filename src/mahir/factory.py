"""A PyTorch factory as a model source: `path/to/file.py:fn` or `package.module:fn`, a function
returning (nn.Module, {input name: example tensor}). The module is run once on its examples to
learn its outputs (a tensor, a tuple or a dict of tensors) and their shapes; the first axis of
every input is the batch, and token inputs also have a dynamic sequence axis.

`import_function` also imports the user's metric (`evidence.py`). Everything the user's code
raises is their bad input: one `BadInput` line that names the factory. Sits beside `model.py`,
which imports it when a source names a factory.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mahir.errors import BadInput
from mahir.families.tensor import Tensor
from mahir.model import NOT_OUTPUTS, TEXT_INPUTS, Model, logits_of
from mahir.modules import TupleOutputs
from mahir.sources import FACTORY_SPEC, USAGE
from mahir.types import BATCH, SEQUENCE, InputSpec, TensorSpec


def load_factory(target: str, fn_name: str) -> Model:
    """`path/to/file.py:fn` or `package.module:fn`, returning (nn.Module, {name: Tensor})."""
    source = f"{target}:{fn_name}"
    factory = import_function(source, USAGE)
    try:
        returned = factory()
    except Exception as err:  # the user's code: anything it raises is their bad input
        raise BadInput(f"factory {source} raised {type(err).__name__}: {err}") from err
    if not (
        isinstance(returned, tuple)
        and len(returned) == 2
        and isinstance(returned[0], torch.nn.Module)
        and isinstance(returned[1], dict)
        and returned[1]
        and all(isinstance(k, str) and torch.is_tensor(v) for k, v in returned[1].items())
    ):
        raise BadInput(
            f"factory {source} must return (nn.Module, dict[str, Tensor]) with at least one "
            f"input; it returned {_describe(returned)}"
        )
    module, tensors = returned
    module.eval()
    example = {k: v.detach().cpu().numpy() for k, v in tensors.items()}
    try:
        with torch.inference_mode():
            raw = module(**{k: torch.from_numpy(v) for k, v in example.items()})
    except Exception as err:  # the user's model failing on its own example inputs
        raise BadInput(
            f"the model from {source} raised {type(err).__name__} on its example inputs: {err}"
        ) from err
    output_names = _output_names(raw, source)
    spec = InputSpec(
        inputs=tuple(_factory_tensor_spec(k, v) for k, v in example.items()),
        outputs=output_names,
    )
    return Model(
        name=fn_name,
        source=source,
        spec=spec,
        example_inputs=example,
        family=Tensor.from_example(spec, example),
        module=TupleOutputs(module, output_names).eval(),
        logits=logits_of(_shapes(raw, output_names)),
    )


def import_function(spec: str, usage: str) -> Any:
    """The function `spec` names: `path/to/file.py:fn` or `package.module:fn`."""
    match = FACTORY_SPEC.match(spec)
    if match is None:
        raise BadInput(f"{spec!r} names no function: {usage}")
    fn = getattr(_import_target(match["target"], usage), match["fn"], None)
    if not callable(fn):
        raise BadInput(f"{match['target']} has no function {match['fn']}: {usage}")
    return fn


def _import_target(target: str, usage: str) -> Any:
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise BadInput(f"{target} does not exist: {usage}")
        module_name = f"mahir_factory_{abs(hash(path.resolve()))}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise BadInput(f"{target} cannot be imported as a Python file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses and pickling look modules up here
        try:
            spec.loader.exec_module(module)
        except Exception as err:  # the user's file failing to import
            del sys.modules[module_name]
            raise BadInput(f"importing {target} raised {type(err).__name__}: {err}") from err
        return module
    try:
        return importlib.import_module(target)
    except ImportError as err:
        raise BadInput(f"cannot import {target} ({err}): {usage}") from err


def _output_names(raw: Any, source: str) -> tuple[str, ...]:
    if torch.is_tensor(raw):
        return ("output",)
    if isinstance(raw, dict):  # includes transformers' ModelOutput
        names = tuple(k for k, v in raw.items() if k not in NOT_OUTPUTS and torch.is_tensor(v))
    elif isinstance(raw, (tuple, list)) and all(torch.is_tensor(v) for v in raw):
        names = tuple(f"output_{i}" for i in range(len(raw)))
    else:
        names = ()
    if not names:
        raise BadInput(
            f"the model from {source} must return a tensor, a tuple of tensors or a dict of "
            f"tensors; it returned {_describe(raw)}"
        )
    return names


def _shapes(raw: Any, names: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """Each output's shape, by name, from what the model returned (see `_output_names`)."""
    if torch.is_tensor(raw):
        return {names[0]: tuple(raw.shape)}
    values = [raw[name] for name in names] if isinstance(raw, dict) else list(raw)
    return {name: tuple(value.shape) for name, value in zip(names, values, strict=True)}


def _factory_tensor_spec(name: str, array: np.ndarray) -> TensorSpec:
    """The first axis is the batch; token inputs also have a dynamic sequence axis."""
    shape: list[int | str] = [BATCH, *array.shape[1:]]
    if name in TEXT_INPUTS and array.ndim == 2:
        shape[1] = SEQUENCE
    return TensorSpec(name, array.dtype.name, tuple(shape))


def _describe(value: Any) -> str:
    if isinstance(value, tuple):
        return f"a tuple of {len(value)} ({', '.join(type(v).__name__ for v in value)})"
    return type(value).__name__
