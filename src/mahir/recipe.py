"""A recipe: the steps that built an artifact from the model, as plain data.

A step is a frozen config dataclass. On disk (recipe.yaml) each step is
`{_type: ClassName, _version: N, _data: {field: value}}`; reading resolves `_type` against an
allow-list the caller passes in (never an import path read from a file), and refuses a version it
does not know. Nested option dataclasses are written the same way. The runtime's options are
written as `RuntimeOptions.to_dict` gives them (`{threads, device, openvino: {hint, precision}}`)
and read with `RuntimeOptions.from_dict`, which also reads recipes written before devices (flat
`openvino_hint`, `openvino_precision`). The hash of a recipe is the hash of that canonical form,
so equal recipes share cached results.

A recipe written with an output directory also records its source: the model's path and a hash
of its content, so `mahir apply` can replay it on the same model or say why it cannot.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mahir.errors import BadInput, first_line
from mahir.files import content_hash, write_text_atomically
from mahir.types import RuntimeOptions


@dataclass(frozen=True)
class ModelSource:
    """The model a recipe was built from: where it is, as `load_model` takes it, and a hash of
    what is there, so a replay builds that model or says why it cannot."""

    path: str
    """An absolute folder or .onnx path, or `/abs/file.py:fn`, or `package.module:fn`."""
    sha256: str | None
    """`content_hash` of the folder, the .onnx file, or the factory's .py file; None for a
    module on the import path, whose content is not checked."""

    @classmethod
    def of(cls, source: str) -> ModelSource:
        """`source` (a loaded model's source string), made absolute, with its hash as it is now."""
        py = _python_file(source)
        if py is not None:
            return cls(f"{py.resolve()}:{source.rpartition(':')[2]}", content_hash(py))
        path = Path(source)
        if path.exists():
            return cls(str(path.resolve()), content_hash(path))
        return cls(source, None)

    def hashed(self) -> Path | None:
        """What the hash covers: the folder, the .onnx file or the .py file; None for a module."""
        if self.sha256 is None:
            return None
        return _python_file(self.path) or Path(self.path)


def _python_file(source: str) -> Path | None:
    """The file of a `file.py:fn` source; None for any other source."""
    target, _, fn = source.rpartition(":")
    return Path(target) if target.endswith(".py") and fn.isidentifier() else None


@dataclass(frozen=True)
class Recipe:
    """Steps applied in order to the model, then the runtime (and its settings) that runs it;
    with the source it was built from once written into an output directory."""

    steps: tuple[Any, ...]
    runtime: str
    options: RuntimeOptions = field(default_factory=RuntimeOptions)
    source: ModelSource | None = None

    def to_dict(self) -> dict[str, Any]:
        built = {} if self.source is None else {"source": dataclasses.asdict(self.source)}
        return {**built, **self._how()}

    def _how(self) -> dict[str, Any]:
        return {
            "runtime": self.runtime,
            "options": self.options.to_dict(),
            "steps": [config_to_dict(step) for step in self.steps],
        }

    def hash(self) -> str:
        """The hash of the steps, runtime and options, not of the source: it keys caches of
        candidates, which carry none (a run's key checks the model itself)."""
        canonical = json.dumps(self._how(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def save(self, path: Path) -> None:
        """Write YAML atomically."""
        write_text_atomically(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


def config_to_dict(config: Any) -> dict[str, Any]:
    """`{_type, _version, _data}` for a config dataclass; nested dataclasses likewise."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"a recipe step must be a config dataclass, got {type(config).__name__}")
    data = {
        f.name: _value_to_data(getattr(config, f.name))
        for f in dataclasses.fields(config)
        if f.name != "version"
    }
    version = getattr(config, "version", 1)
    return {"_type": type(config).__name__, "_version": version, "_data": data}


def _value_to_data(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return config_to_dict(value)
    if isinstance(value, tuple):
        return [_value_to_data(v) for v in value]
    return value


def config_from_dict(data: Any, allowed: Mapping[str, type]) -> Any:
    """The config `data` describes; `_type` must be in `allowed`, `_version` must match."""
    if not isinstance(data, dict) or set(data) != {"_type", "_version", "_data"}:
        raise BadInput(f"a recipe step is {{_type, _version, _data}}, got {data!r}")
    cls = allowed.get(data["_type"])
    if cls is None:
        known_steps = ", ".join(allowed)
        raise BadInput(f"unknown recipe step {data['_type']!r}: known steps are {known_steps}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    known = fields["version"].default if "version" in fields else 1
    if data["_version"] != known:
        raise BadInput(
            f"recipe step {data['_type']} has version {data['_version']}, this mahir reads "
            f"version {known}: rebuild the recipe"
        )
    kwargs = {}
    for name, value in (data["_data"] or {}).items():
        if name not in fields or name == "version":
            raise BadInput(f"recipe step {data['_type']} has no field {name!r}")
        kwargs[name] = _data_to_value(value, allowed)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise BadInput(f"recipe step {data['_type']}: {err}") from err


def _data_to_value(value: Any, allowed: Mapping[str, type]) -> Any:
    if isinstance(value, dict) and "_type" in value:
        return config_from_dict(value, allowed)
    if isinstance(value, list):
        return tuple(_data_to_value(v, allowed) for v in value)
    return value


def _where(err: yaml.YAMLError) -> str:
    """What the YAML parser found wrong and where, in one line (its own message takes five)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or first_line(err)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def load_recipe(path: Path, allowed: Mapping[str, type]) -> Recipe:
    """Read recipe.yaml; every step type must be in `allowed`."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise BadInput(f"cannot read recipe {path}: {err}") from err
    except yaml.YAMLError as err:
        raise BadInput(f"{path} is not YAML ({_where(err)}): fix it, or write it again") from err
    if not isinstance(data, dict) or "steps" not in data or "runtime" not in data:
        raise BadInput(f"{path} is not a recipe: it needs `runtime:` and `steps:`")
    try:
        options = RuntimeOptions.from_dict(data.get("options"))
    except BadInput as err:
        raise BadInput(f"{path}: bad runtime options: {err}") from err
    steps = tuple(config_from_dict(step, allowed) for step in data["steps"] or ())
    source = _source(path, data.get("source"))
    return Recipe(steps=steps, runtime=str(data["runtime"]), options=options, source=source)


def _source(path: Path, data: Any) -> ModelSource | None:
    if data is None:
        return None
    if (
        not isinstance(data, dict)
        or set(data) != {"path", "sha256"}
        or not isinstance(data["path"], str)
        or not isinstance(data["sha256"], (str, type(None)))
    ):
        raise BadInput(f"{path}: `source:` is {{path, sha256}}, got {data!r}: fix or remove it")
    return ModelSource(data["path"], data["sha256"])
