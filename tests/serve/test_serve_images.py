"""`mahir serve` on an image classifier, as a real process on loopback, driven by tritonclient:
encoded images in (KServe v2 BYTES), logits and labels out, bad images refused one by one."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton
from PIL import Image
from tritonclient.utils import InferenceServerException

from mahir.model import Model
from mahir.runtimes import reference_outputs
from tests.helpers import Server
from tests.models import LABELS

NAME = "vit"  # the output directory's model is named after its source folder


@pytest.fixture(scope="module")
def server(served_vit_dir: Path) -> Iterator[Server]:
    running = Server(served_vit_dir, "--max-delay-ms", "5", "--max-batch-size", "16")
    yield running
    assert running.stop() == 0


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[triton.InferenceServerClient]:
    connected = triton.InferenceServerClient(f"127.0.0.1:{server.port}", concurrency=8)
    yield connected
    connected.close()


def pictures(count: int, seed: int) -> list[np.ndarray]:
    """Random-sized images with structure (a gradient and a block), so that the classes vary."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        height, width = (int(n) for n in rng.integers(12, 120, 2))
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        image[: height // 2] = rng.integers(0, 256, 3, dtype=np.uint8)
        images.append(image)
    return images


def encode(image: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, fmt)
    return buffer.getvalue()


def image_input(blobs: list[bytes]) -> triton.InferInput:
    tensor = triton.InferInput("image", [len(blobs)], "BYTES")
    tensor.set_data_from_numpy(np.array(blobs, dtype=object))
    return tensor


def expected_logits(vit: Model, blobs: list[bytes]) -> np.ndarray:
    """The fp32 original's answer on what its own processor makes of the decoded images."""
    decoded = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs]
    batch = vit.family.preprocess(decoded)  # type: ignore[attr-defined]
    logits: np.ndarray = reference_outputs(vit, [batch])[0]["logits"]
    return logits


def test_png_and_jpeg_images_get_the_fp32_models_classes(
    client: triton.InferenceServerClient, vit: Model
) -> None:
    images = pictures(12, seed=1)
    blobs = [encode(image, "PNG" if i % 2 else "JPEG") for i, image in enumerate(images)]
    expected = expected_logits(vit, blobs)
    top1 = expected.argmax(axis=1)
    assert len(set(top1.tolist())) > 1  # the images do not all fall into one class
    result = client.infer(NAME, [image_input(blobs)])  # no outputs named: logits and labels
    np.testing.assert_allclose(result.as_numpy("logits"), expected, atol=1e-4, rtol=1e-3)
    labels = result.as_numpy("labels")
    assert labels.shape == (12, 5)
    best = [row[0].decode().split(":") for row in labels]
    assert [int(index) for _, index, _ in best] == top1.tolist()
    assert [label for _, _, label in best] == [LABELS[i] for i in top1]
    np.testing.assert_allclose([float(s) for s, _, _ in best], expected.max(axis=1), atol=1e-4)


def test_triton_classification_extension_and_json_answers(
    client: triton.InferenceServerClient, vit: Model
) -> None:
    blobs = [encode(image, "PNG") for image in pictures(3, seed=2)]
    top1 = expected_logits(vit, blobs).argmax(axis=1)
    wanted = [triton.InferRequestedOutput("logits", binary_data=False, class_count=2)]
    classes = client.infer(NAME, [image_input(blobs)], outputs=wanted).as_numpy("logits")
    assert classes.shape == (3, 2)
    # JSON carries strings: tritonclient gives them back as str, binary BYTES as bytes
    assert [row[0].split(":")[1:] for row in classes] == [[str(i), LABELS[i]] for i in top1]
    wanted = [triton.InferRequestedOutput("labels", binary_data=False, class_count=1)]
    response = client.infer(NAME, [image_input(blobs)], outputs=wanted).get_response()
    assert [o["name"] for o in response["outputs"]] == ["labels"]
    assert [s.split(":")[2] for s in response["outputs"][0]["data"]] == [LABELS[i] for i in top1]


def test_concurrent_single_image_requests_each_get_their_own_answer(
    client: triton.InferenceServerClient, vit: Model
) -> None:
    blobs = [encode(image, "PNG") for image in pictures(24, seed=3)]
    expected = expected_logits(vit, blobs)
    pending = [client.async_infer(NAME, [image_input([blob])]) for blob in blobs]
    got = np.concatenate([p.get_result().as_numpy("logits") for p in pending])
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-3)


def test_tensors_of_pixel_values_are_still_served(
    client: triton.InferenceServerClient, vit: Model
) -> None:
    batch = vit.family.verification_batches()[1]
    tensor = triton.InferInput("pixel_values", list(batch["pixel_values"].shape), "FP32")
    tensor.set_data_from_numpy(batch["pixel_values"])
    result = client.infer(NAME, [tensor])
    expected = reference_outputs(vit, [batch])[0]["logits"]
    np.testing.assert_allclose(result.as_numpy("logits"), expected, atol=1e-4, rtol=1e-3)
    assert result.as_numpy("labels").shape == (3, 5)


def blank_png(width: int, height: int) -> bytes:
    """A valid one-bit PNG: a few KB, however many pixels it holds."""
    buffer = io.BytesIO()
    Image.new("1", (width, height)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda good: [good, good[: len(good) // 2]], "image 1: the image cannot be decoded"),
        (
            lambda good: [encode(pictures(1, seed=7)[0], "JPEG")[:300]],
            "image 0: the image cannot be decoded (",
        ),
        (
            lambda good: [np.random.default_rng(0).bytes(3000)],
            "image 0: not an image (3000 bytes that no decoder recognises)",
        ),
        (
            lambda good: [blank_png(10_000, 10_000)],  # 100 megapixels in ~12 KB
            "image 0: the image is past the 40-megapixel limit",
        ),
        (
            lambda good: [blank_png(7000, 7000)],
            "image 0: the image is 7000x7000 (49 megapixels); the limit is 40 megapixels",
        ),
    ],
)
def test_bad_images_get_422_saying_what_is_wrong_and_the_next_request_is_answered(
    client: triton.InferenceServerClient, vit: Model, make, message: str
) -> None:
    good = encode(pictures(1, seed=4)[0], "PNG")
    with pytest.raises(InferenceServerException) as caught:
        client.infer(NAME, [image_input(make(good))])
    assert caught.value.status() == "422"
    assert message in str(caught.value.message())
    result = client.infer(NAME, [image_input([good])])
    np.testing.assert_allclose(
        result.as_numpy("logits"), expected_logits(vit, [good]), atol=1e-4, rtol=1e-3
    )


def test_requests_too_large_to_decode_are_refused_before_decoding(
    client: triton.InferenceServerClient,
) -> None:
    good = encode(pictures(1, seed=6)[0], "PNG")
    with pytest.raises(InferenceServerException) as caught:
        client.infer(NAME, [image_input([good] * 17)])
    assert caught.value.status() == "413"
    assert "17 items in one input; a batch holds 16" in str(caught.value.message())
    with pytest.raises(InferenceServerException) as caught:
        client.infer(NAME, [image_input([blank_png(7000, 5000)] * 4)])  # 35 MP each
    assert caught.value.status() == "413"
    assert "4 images hold 140 megapixels; one request may hold 120" in caught.value.message()


def test_images_under_another_name_are_refused_with_the_name_to_use(
    client: triton.InferenceServerClient,
) -> None:
    tensor = triton.InferInput("pixel_values", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([encode(pictures(1, seed=5)[0], "PNG")], dtype=object))
    with pytest.raises(InferenceServerException) as caught:
        client.infer(NAME, [tensor])
    assert caught.value.status() == "422"
    assert "one BYTES input named 'image'" in str(caught.value.message())
