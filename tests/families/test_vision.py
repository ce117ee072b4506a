"""The vision family end to end on tiny random-weight classifiers (ViT, and ResNet with ConvNeXt's
processor): loading a Hugging Face image folder, the images mahir makes and decodes, `mahir
bench` on every runtime, `mahir optimize` through the real command, the output directory
reopening the family, and its Triton export."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from mahir.errors import BadInput
from mahir.families.vision import MAX_PIXELS, PROCESSOR, Vision, decode_image
from mahir.measure import MeasureConfig
from mahir.model import Model, load_model
from mahir.outdir import open_output_dir
from mahir.runtimes import reference_outputs
from mahir.search.bench import BenchConfig, benchmark
from mahir.serve.triton import write_triton_repo
from mahir.types import BATCH
from tests.helpers import mahir
from tests.models import LABELS

QUICK = MeasureConfig(warmup_runs=1, min_time_s=0.05, min_runs=3, round_time_s=0.02)


def encoded(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt)
    return buffer.getvalue()


def blank_png(width: int, height: int) -> bytes:
    """A valid one-bit PNG of `width` x `height` pixels: a few KB, whatever the size."""
    buffer = io.BytesIO()
    Image.new("1", (width, height)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(("fixture", "classes"), [("vit", len(LABELS)), ("resnet", 4)])
def test_an_image_folder_loads_as_a_vision_model(
    fixture: str, classes: int, request: pytest.FixtureRequest
) -> None:
    model: Model = request.getfixturevalue(fixture)
    family = model.family
    assert isinstance(family, Vision)
    assert family.kind == "vision"
    assert [(t.name, t.dtype, t.shape) for t in model.spec.inputs] == [
        ("pixel_values", "float32", (BATCH, 3, 32, 32))
    ]
    assert model.spec.outputs == ("logits",)  # hidden states and the loss dropped
    assert model.logits == frozenset({"logits"})
    assert model.example_inputs["pixel_values"].shape == (2, 3, 32, 32)
    assert len(family.labels) == classes
    assert family.summary() == {"image_size": [32, 32], "channels": 3, "labels": classes}
    assert model.original().format == "torch"


def test_labels_come_from_id2label(vit: Model) -> None:
    assert isinstance(vit.family, Vision)
    assert vit.family.labels == LABELS


def test_generated_images_are_deterministic_and_go_through_the_processor(vit: Model) -> None:
    family = vit.family
    first = family.workload([1, 4], batches_per_size=2, seed=7).batches
    again = family.workload([1, 4], batches_per_size=2, seed=7).batches
    other = family.workload([4], batches_per_size=2, seed=8).batches
    assert [b["pixel_values"].shape for b in first[4]] == [(4, 3, 32, 32)] * 2
    np.testing.assert_array_equal(first[4][0]["pixel_values"], again[4][0]["pixel_values"])
    assert not np.allclose(first[4][0]["pixel_values"], other[4][0]["pixel_values"])
    # the processor normalizes (mean 0.5, std 0.5): values span [-1, 1], not raw bytes
    pixels = np.concatenate([b["pixel_values"] for b in first[4]])
    assert -1.0 <= pixels.min() < -0.5
    assert 0.5 < pixels.max() <= 1.0
    assert [b["pixel_values"].shape[0] for b in family.verification_batches()] == [1, 3, 7]
    held = family.held_out_batches(batch_size=16, seed=3)
    assert sum(b["pixel_values"].shape[0] for b in held) > 16
    assert all(b["pixel_values"].shape[1:] == (3, 32, 32) for b in held)


def test_the_resnet_processor_resizes_and_crops_any_aspect_ratio(resnet: Model) -> None:
    assert isinstance(resnet.family, Vision)
    rng = np.random.default_rng(0)
    strip = rng.integers(0, 256, (20, 300, 3), dtype=np.uint8)
    tower = rng.integers(0, 256, (500, 40, 3), dtype=np.uint8)
    batch = resnet.family.preprocess([strip, tower])
    assert batch["pixel_values"].shape == (2, 3, 32, 32)


def test_a_folder_with_neither_tokenizer_nor_image_processor_is_refused_in_one_line(
    vit_folder: Path, tmp_path: Path
) -> None:
    for name in ("config.json", "model.safetensors"):
        shutil.copy(vit_folder / name, tmp_path / name)
    with pytest.raises(BadInput) as caught:
        load_model(tmp_path)
    message = str(caught.value)
    assert "neither a tokenizer" in message
    assert "image processor (preprocessor_config.json)" in message
    assert "\n" not in message
    # an audio feature extractor's config, under the same file name, is no image processor
    (tmp_path / "preprocessor_config.json").write_text('{"sampling_rate": 16000}')
    with pytest.raises(BadInput, match="neither a tokenizer"):
        load_model(tmp_path)


def test_images_decode_and_bad_ones_say_what_is_wrong() -> None:
    rng = np.random.default_rng(0)
    picture = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    png, jpeg = encoded(picture), encoded(picture, "JPEG")
    np.testing.assert_array_equal(decode_image(png), picture)
    assert decode_image(jpeg).shape == (30, 50, 3)
    assert decode_image(encoded(picture[:, :, 0])).shape == (30, 50, 3)  # grayscale to RGB
    cases = [
        (png[: len(png) // 2], "cannot be decoded (image file is truncated)"),
        (jpeg[: len(jpeg) // 2], "cannot be decoded (image file is truncated"),
        (rng.bytes(2000), "not an image (2000 bytes"),
        (blank_png(8000, 6000), "is 8000x6000 (48 megapixels); the limit is 40 megapixels"),
        # past Pillow's own warning (89 MP): still one clear line, never a warning
        (blank_png(10_000, 10_000), "past the 40-megapixel limit"),
    ]
    assert MAX_PIXELS == 40_000_000
    for data, message in cases:
        with pytest.raises(BadInput) as caught:
            decode_image(data)
        assert message in str(caught.value)
        assert "\n" not in str(caught.value)


def test_user_data_is_a_folder_of_images_or_an_npz(vit: Model, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(5):
        size = (int(rng.integers(20, 90)), int(rng.integers(20, 90)), 3)
        (images / f"{i}.png").write_bytes(encoded(rng.integers(0, 256, size, dtype=np.uint8)))
    (images / "notes.txt").write_text("not an image: skipped")
    paths, batches = vit.family.read_user_data(images, batch_size=2)
    assert [p.name for p in paths] == [f"{i}.png" for i in range(5)]
    assert [b["pixel_values"].shape[0] for b in batches] == [2, 2, 1]
    arrays = tmp_path / "pixels.npz"
    np.savez(arrays, pixel_values=np.concatenate([b["pixel_values"] for b in batches]))
    data, again = vit.family.read_user_data(arrays, batch_size=4)
    assert sorted(data) == ["pixel_values"]
    assert [b["pixel_values"].shape[0] for b in again] == [4, 1]
    (images / "5.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(BadInput, match=r"5\.png: "):
        vit.family.read_user_data(images, batch_size=2)


def test_bench_times_every_runtime_with_top1_fidelity(vit: Model, tmp_path: Path) -> None:
    """(ResNet's bench and optimize: tests/search/test_sources.py.)"""
    model = vit
    config = BenchConfig(batch_sizes=(1, 3), measure=QUICK, batches_per_size=2)
    result = benchmark(model, config, tmp_path)
    assert {row.runtime for row in result.rows} == {"torch", "onnxruntime", "openvino"}
    for row in result.rows:
        logits = row.quality.outputs["logits"]
        assert logits.top1_agreement == 1.0, row.runtime
        assert logits.cosine_min > 0.999, row.runtime
    report = result.to_json()
    assert report["model"]["family"] == "vision"
    assert report["model"]["image_size"] == [32, 32]
    console = Console(file=io.StringIO(), width=200)
    console.print(result)
    table = console.file.getvalue()  # type: ignore[attr-defined]
    assert "top-1" in table
    assert table.count("100.0%") == len(result.rows)


def test_an_output_directory_reopens_the_vision_family(vit: Model, served_vit_dir: Path) -> None:
    out = served_vit_dir
    assert (out / PROCESSOR / "preprocessor_config.json").is_file()
    manifest = json.loads((out / "mahir.json").read_text())
    assert manifest["family"] == "vision"
    assert manifest["labels"] == list(LABELS)
    opened = open_output_dir(out)
    assert isinstance(opened.family, Vision)
    assert opened.family.labels == LABELS
    batch = opened.family.verification_batches()[2]
    expected = vit.family.verification_batches()[2]["pixel_values"]
    np.testing.assert_array_equal(batch["pixel_values"], expected)
    reference = reference_outputs(vit, [batch])[0]["logits"]
    got = opened.session.run(batch)["logits"]
    np.testing.assert_allclose(got, reference, atol=1e-4, rtol=1e-3)


def test_triton_export_carries_the_processor_for_the_client(
    served_vit_dir: Path, tmp_path: Path
) -> None:
    """Triton serves the tensors; decoding and the processor stay with the client."""
    folder = write_triton_repo(served_vit_dir, tmp_path / "repo")
    assert (folder / PROCESSOR / "preprocessor_config.json").is_file()
    config = (folder / "config.pbtxt").read_text()
    assert 'name: "pixel_values"' in config
    assert "dims: 3\n  dims: 32\n  dims: 32" in config
    assert json.loads((folder / "mahir.json").read_text())["labels"] == list(LABELS)


def test_optimize_a_vision_model_through_the_command(vit_folder: Path, tmp_path: Path) -> None:
    """On an image classifier folder the baseline is PyTorch eager, both candidates are built,
    checked and timed, and the winner's directory reopens as the vision family. (ResNet's
    optimize, through the API: tests/search/test_sources.py.)"""
    out = tmp_path / "out"
    found = mahir(
        "optimize", str(vit_folder), "--only", "onnxruntime",
        "--time-budget", "1", "--out", str(out), "--no-tune-serving",
    )  # fmt: skip
    assert found.returncode == 0, found.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["baseline"] == "torch"
    assert report["best"] in ("torch", "onnxruntime")
    assert report["model"]["family"] == "vision"
    statuses = {c["id"]: c["status"] for c in report["candidates"]}
    assert (statuses["torch"], statuses["onnxruntime"]) == ("ok", "ok"), statuses
    assert "over PyTorch eager fp32" in (out / "report.html").read_text()
    assert "- torch: The baseline every speedup is measured against" in found.stdout
    assert "PyTorch eager fp32" in found.stdout
    opened = open_output_dir(out)
    assert isinstance(opened.family, Vision)
    assert opened.family.labels == LABELS
