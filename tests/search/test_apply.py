"""`mahir apply` end to end: a recipe builds a checked artifact in an output directory that
opens again and gives the answers it promised."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mahir.errors import BadInput, Unsupported
from mahir.files import content_hash
from mahir.model import Model
from mahir.outdir import load_output_dir, open_output_dir
from mahir.passes import STEP_TYPES
from mahir.pooling import pool
from mahir.quality import compare
from mahir.recipe import ModelSource, Recipe, load_recipe
from mahir.runtimes import reference_outputs
from mahir.search.apply import Applied, write_output_dir
from mahir.types import CPU, Artifact, OpenVinoOptions, Quality, RuntimeOptions
from tests.helpers import cli, mahir, tiny_factory

EXAMPLES = Path(__file__).parents[2] / "examples"


def test_apply_writes_a_directory_that_opens_and_answers(minilm: Model, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = mahir("apply", str(EXAMPLES / "dynamic-int8.yaml"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "sentence embedding cosine" in result.stdout
    manifest = json.loads((out / "mahir.json").read_text())
    assert manifest["runtime"] == "onnxruntime"
    assert manifest["format"] == "onnx"
    assert manifest["fidelity"]["embedding"]["cosine_mean"] >= 0.985
    assert (out / "recipe.yaml").is_file()
    assert (out / manifest["model_file"]).is_file()
    assert open_output_dir(out).family.limits == minilm.family.limits  # what the server checks
    # the directory opens again and its embeddings stay close at new shapes
    session = load_output_dir(out)
    batches = minilm.family.workload([1, 5], batches_per_size=2, seed=11).batches
    for size_batches in batches.values():
        reference = reference_outputs(minilm, size_batches)
        outputs = [session.run(b) for b in size_batches]
        masks = [b["attention_mask"] for b in size_batches]
        quality = compare(
            outputs,
            reference,
            attention_masks=masks,
            pooling=minilm.family.pooling,
            embedding_output="last_hidden_state",
        )
        assert quality.embedding is not None
        assert quality.embedding.cosine_min > 0.97
        assert minilm.family.pooling is not None
        embedding = pool(outputs[0]["last_hidden_state"], masks[0], minilm.family.pooling)
        np.testing.assert_allclose(np.linalg.norm(embedding, axis=1), 1.0, rtol=1e-5)


def test_a_failed_write_leaves_the_old_directory(minilm: Model, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "mahir.json").write_text("{}")
    (out / "keep").write_text("old")
    gone = Artifact("onnx", minilm.spec, path=tmp_path / "deleted.onnx")
    broken = Applied(gone, Recipe(steps=(), runtime="onnxruntime"), Quality({}))
    with pytest.raises(BadInput, match="has no files"):
        write_output_dir(minilm, broken, out)
    assert (out / "keep").read_text() == "old"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".mahir-staging")]


def test_a_foreign_directory_is_never_replaced(
    minilm: Model, minilm_onnx: Path, tmp_path: Path
) -> None:
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_text("precious")
    artifact = Artifact("onnx", minilm.spec, path=minilm_onnx)
    applied = Applied(artifact, Recipe(steps=(), runtime="onnxruntime"), Quality({}))
    with pytest.raises(BadInput, match="not a mahir output directory"):
        write_output_dir(minilm, applied, out)
    assert (out / "holiday.jpg").read_text() == "precious"


def test_the_options_in_mahir_json_name_the_device_and_old_flat_ones_still_open(
    minilm: Model, minilm_onnx: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    options = RuntimeOptions(threads=1, openvino=OpenVinoOptions(hint="throughput"))
    artifact = Artifact("onnx", minilm.spec, path=minilm_onnx)
    write_output_dir(minilm, Applied(artifact, Recipe((), "openvino", options), Quality({})), out)
    manifest = json.loads((out / "mahir.json").read_text())
    assert manifest["options"]["device"] == "cpu"
    assert open_output_dir(out).session.describe()["hint"] == "throughput"
    # written before devices and per-runtime options: flat OpenVINO keys, no device
    manifest["options"] = {"threads": 1, "openvino_hint": "throughput", "openvino_precision": None}
    (out / "mahir.json").write_text(json.dumps(manifest))
    session = open_output_dir(out).session
    assert (session.device, session.describe()["hint"]) == (CPU, "throughput")
    manifest["options"] = {**options.to_dict(), "device": "cuda:0"}
    (out / "mahir.json").write_text(json.dumps(manifest))
    with pytest.raises(Unsupported, match="openvino runs on cpu only"):
        open_output_dir(out)


def test_load_needs_a_manifest(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match=r"has no mahir\.json"):
        load_output_dir(tmp_path)


def test_a_recipe_replays_the_model_it_was_built_from(tmp_path: Path) -> None:
    """`mahir apply out/recipe.yaml` builds the recorded model, not the bundled one, and
    refuses in one line when that model is gone or changed, unless a model is given."""
    source = tiny_factory(tmp_path)
    Recipe((), "onnxruntime").save(tmp_path / "fp32.yaml")
    first = cli("apply", str(tmp_path / "fp32.yaml"), source, "--out", str(tmp_path / "a"))
    assert first.returncode == 0, first.stderr
    recipe = tmp_path / "a" / "recipe.yaml"
    assert load_recipe(recipe, STEP_TYPES).source == ModelSource.of(source)

    again = cli("apply", str(recipe), "--out", str(tmp_path / "b"))
    assert again.returncode == 0, again.stderr
    assert json.loads((tmp_path / "b" / "mahir.json").read_text())["source"]["name"] == "model"

    factory = tmp_path / "tiny.py"
    factory.write_text(factory.read_text().replace("Linear(8, 4)", "Linear(8, 3)"))
    changed = cli("apply", str(recipe), "--out", str(tmp_path / "c"))
    assert changed.returncode == 2
    line = _one_error_line(changed.stderr)
    recorded = load_recipe(recipe, STEP_TYPES).source
    assert recorded is not None
    assert recorded.sha256 is not None
    assert f"{factory.resolve()}:model changed" in line
    assert f"sha256 {recorded.sha256[:12]} then, {content_hash(factory)[:12]} now" in line
    assert f"mahir apply {recipe} {factory.resolve()}:model" in line
    given = cli("apply", str(recipe), source, "--out", str(tmp_path / "c"))
    assert given.returncode == 0, given.stderr

    factory.unlink()
    gone = cli("apply", str(recipe), "--out", str(tmp_path / "d"))
    assert gone.returncode == 2
    assert "which is gone: give the model" in _one_error_line(gone.stderr)
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("photos", "not a mahir output directory"),
        ("notes.txt/out", "notes.txt is a file"),
        ("notes.txt", "notes.txt is a file"),
        ("/proc/mahir-out", "cannot create files in /proc"),  # procfs refuses even root
    ],
)
def test_apply_refuses_an_unwritable_out_before_loading_the_model(
    where: str, message: str, tmp_path: Path
) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_text("precious")
    (tmp_path / "notes.txt").write_text("mine")
    source = tiny_factory(tmp_path)
    recipe = EXAMPLES / "dynamic-int8.yaml"
    result = cli("apply", str(recipe), source, "--out", str(tmp_path / where))
    assert result.returncode == 2
    assert message in _one_error_line(result.stderr)
    assert not (tmp_path / "loaded").exists()
    assert (tmp_path / "photos" / "holiday.jpg").read_text() == "precious"


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error:")
    return lines[0]
