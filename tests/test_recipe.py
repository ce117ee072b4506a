from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from mahir.errors import BadInput
from mahir.files import content_hash
from mahir.passes import STEP_TYPES
from mahir.passes.graph import OrtOptimize, TransformerFusion
from mahir.passes.quantize import DynamicInt8, StaticInt8
from mahir.recipe import (
    ModelSource,
    Recipe,
    config_from_dict,
    config_to_dict,
    load_recipe,
)
from mahir.types import CPU, OpenVinoOptions, RuntimeOptions

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_round_trip_through_yaml(tmp_path: Path) -> None:
    recipe = Recipe(
        steps=(TransformerFusion(), DynamicInt8(per_channel=True, op_types=("MatMul",))),
        runtime="onnxruntime",
        options=RuntimeOptions(threads=2),
    )
    recipe.save(tmp_path / "recipe.yaml")
    loaded = load_recipe(tmp_path / "recipe.yaml", STEP_TYPES)
    assert loaded == recipe
    assert loaded.hash() == recipe.hash()
    other = Recipe(steps=(DynamicInt8(),), runtime="onnxruntime")
    assert other.hash() != recipe.hash()


def test_step_serialization_is_type_version_data() -> None:
    data = config_to_dict(StaticInt8(calibration="entropy"))
    assert data["_type"] == "StaticInt8"
    assert data["_version"] == 1
    assert data["_data"]["calibration"] == "entropy"
    assert "version" not in data["_data"]
    assert "input_formats" not in data["_data"]
    assert config_from_dict(data, STEP_TYPES) == StaticInt8(calibration="entropy")


@pytest.mark.parametrize(
    ("step", "message"),
    [
        ({"_type": "os.system", "_version": 1, "_data": {}}, "unknown recipe step 'os.system'"),
        ({"_type": "OrtOptimize", "_version": 9, "_data": {}}, "version 9"),
        ({"_type": "OrtOptimize", "_version": 1, "_data": {"speed": 11}}, "no field 'speed'"),
        ({"_type": "OrtOptimize", "_version": 1}, "{_type, _version, _data}"),
        ({"_type": "StaticInt8", "_version": 1, "_data": {"percentile": 120}}, "percentile"),
    ],
)
def test_bad_steps_are_refused(step: dict, message: str) -> None:
    with pytest.raises(BadInput, match=None) as caught:
        config_from_dict(step, STEP_TYPES)
    assert message in str(caught.value)


def test_bad_recipe_files(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("steps: [unclosed")
    with pytest.raises(
        BadInput,
        match=r"broken.yaml is not YAML \(expected ',' or ']'.*at line 1, column 17\): fix it",
    ) as caught:
        load_recipe(broken, STEP_TYPES)
    assert "\n" not in str(caught.value)
    with pytest.raises(BadInput, match=r"cannot read recipe .*missing\.yaml"):
        load_recipe(tmp_path / "missing.yaml", STEP_TYPES)
    empty = tmp_path / "empty.yaml"
    empty.write_text("steps: []\n")
    with pytest.raises(BadInput, match="needs `runtime:` and `steps:`"):
        load_recipe(empty, STEP_TYPES)


@pytest.mark.parametrize("example", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_examples_load(example: Path) -> None:
    recipe = load_recipe(example, STEP_TYPES)
    assert recipe.steps
    assert all(type(step) in STEP_TYPES.values() for step in recipe.steps)


def test_a_recipe_written_before_devices_loads_on_the_cpu(tmp_path: Path) -> None:
    """Flat `openvino_hint`/`openvino_precision`, no device: what every recipe held before."""
    path = tmp_path / "recipe.yaml"
    path.write_text(
        "runtime: openvino\n"
        "options: {threads: 2, openvino_hint: throughput, openvino_precision: bf16}\n"
        "steps: []\n"
    )
    recipe = load_recipe(path, STEP_TYPES)
    assert recipe.options == RuntimeOptions(
        threads=2, openvino=OpenVinoOptions(hint="throughput", precision="bf16")
    )
    assert recipe.options.device == CPU
    assert recipe.to_dict()["options"] == {
        "threads": 2,
        "device": "cpu",
        "openvino": {"hint": "throughput", "precision": "bf16"},
    }


def test_bad_runtime_options_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text("runtime: torch\noptions: {device: tpu}\nsteps: []\n")
    with pytest.raises(BadInput, match=r"recipe\.yaml: bad runtime options: unknown device 'tpu'"):
        load_recipe(path, STEP_TYPES)


def test_every_pass_has_a_version_and_input_formats() -> None:
    for cls in STEP_TYPES.values():
        config = cls()
        assert config.version >= 1
        assert set(config.input_formats) <= {"torch", "onnx", "openvino"}
    assert OrtOptimize().level == "extended"


def test_the_source_is_saved_but_not_hashed(tmp_path: Path) -> None:
    """The source travels in recipe.yaml; the hash keys candidates' caches, which carry none."""
    recipe = Recipe(steps=(DynamicInt8(),), runtime="onnxruntime")
    built = dataclasses.replace(recipe, source=ModelSource("/models/bert", "ab" * 32))
    built.save(tmp_path / "recipe.yaml")
    loaded = load_recipe(tmp_path / "recipe.yaml", STEP_TYPES)
    assert loaded == built
    assert loaded.source == ModelSource("/models/bert", "ab" * 32)
    assert built.hash() == recipe.hash()
    assert load_recipe(EXAMPLES / "dynamic-int8.yaml", STEP_TYPES).source is None


def test_a_malformed_source_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text("source: /models/bert\nruntime: onnxruntime\nsteps: []\n")
    with pytest.raises(BadInput, match=r"`source:` is \{path, sha256\}"):
        load_recipe(path, STEP_TYPES)


def test_a_factory_source_is_recorded_absolute_with_its_file_hash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "factory.py").write_text("def model(): ...\n")
    monkeypatch.chdir(tmp_path)
    source = ModelSource.of("factory.py:model")
    assert source.path == f"{tmp_path.resolve() / 'factory.py'}:model"
    assert source.sha256 == content_hash(tmp_path / "factory.py")
    assert source.hashed() == tmp_path.resolve() / "factory.py"
    module = ModelSource.of("some.package:model")  # on the import path: recorded, not hashed
    assert module == ModelSource("some.package:model", None)
    assert module.hashed() is None
