"""The vision family: image classifiers (ViT, ResNet, ConvNeXt...) with their own image processor.

A request to an image model is an image: an encoded file of any size and aspect ratio, which the
model's image processor (`preprocessor_config.json`: resize, crop, rescale, normalize) turns into
`pixel_values` of one fixed size. So every input mahir makes goes the same way: images generated
from a seed (smooth random fields, shapes and noise, of varied sizes and aspect ratios, as uint8)
run through the processor, and the model is judged on what it would see in production. A
classifier's `logits` are judged by top-1 agreement and cosine.

Images from outside (a user's folder, a server's request) are decoded here with Pillow, with a
pixel limit checked on the header before anything is decompressed: a 100-megapixel PNG of one
colour is a few KB on the wire and 300 MB once decoded.

The processor is transformers' PIL/numpy one (torchvision is not installed: DESIGN.md).
Imports types, errors, quality, workload and the frameworks (transformers, Pillow).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mahir.errors import BadInput, Unsupported, first_line
from mahir.quality import compare
from mahir.types import BATCH, InputSpec, Outputs, Quality, TensorSpec
from mahir.workload import Batch, Workload, check_batch_sizes, read_npz_batches

PROCESSOR = "processor"
"""The folder in an output directory that holds the image processor (the server preprocesses)."""
PIXELS = "pixel_values"
MAX_PIXELS = 40_000_000
"""Largest image decoded, in pixels (width x height): 40 megapixels, 120 MB as RGB; past most
cameras' photos, well below what would let one request exhaust a server's memory."""
FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
"""Image formats decoded; the rest of Pillow's parsers (TIFF, PSD, ICNS...) stay out of reach."""
_MODES = {1: "L", 3: "RGB"}
IMAGE_FILES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"})


def is_image_folder(folder: Path) -> bool:
    """Whether `folder` holds an image processor config: `image_processor_type`, or for
    configs written before transformers had image processors, the image mean they normalize
    by (an audio feature extractor, in the same file name, has none)."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return False
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise BadInput(f"{path} is not valid JSON ({err}): restore it from the original") from err
    return isinstance(config, dict) and ("image_processor_type" in config or "image_mean" in config)


def load_processor(folder: Path) -> Any:
    """The folder's image processor, in its PIL/numpy implementation."""
    from transformers import AutoImageProcessor

    # transformers 5 picks its implementation by `backend` ("pil" beside "torchvision"), where
    # transformers 4 took `use_fast=False`; the module that holds both backends tells them apart.
    new = importlib.util.find_spec("transformers.image_processing_backends") is not None
    kwargs: dict[str, Any] = {"backend": "pil"} if new else {"use_fast": False}
    try:
        return AutoImageProcessor.from_pretrained(str(folder), **kwargs)  # type: ignore[no-untyped-call, unused-ignore]
    except (OSError, ValueError, KeyError) as err:
        raise BadInput(f"cannot load the image processor in {folder}: {first_line(err)}") from err


def generate_images(count: int, rng: np.random.Generator, channels: int = 3) -> list[np.ndarray]:
    """Deterministic stand-ins for photos, (height, width, channels) uint8, 16-400 pixels a side
    and aspect ratios 1:3 to 3:1 (`photo`)."""
    images = []
    for _ in range(count):
        height = int(rng.integers(16, 401))
        width = int(np.clip(height * np.exp(rng.uniform(-1.1, 1.1)), 16, 400))
        images.append(photo(height, width, rng, channels))
    return images


def photo(height: int, width: int, rng: np.random.Generator, channels: int = 3) -> np.ndarray:
    """A smooth random field, a few filled shapes and pixel noise: what a resize, a crop and
    a normalization treat as they treat a photo."""
    from PIL import Image, ImageDraw

    coarse = rng.integers(0, 256, (4, 4, channels), dtype=np.uint8)
    image = Image.fromarray(coarse.squeeze(-1) if channels == 1 else coarse, _mode(channels))
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 5))):
        x, y = sorted(rng.integers(0, width, 2)), sorted(rng.integers(0, height, 2))
        fill = tuple(int(c) for c in rng.integers(0, 256, channels))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((int(x[0]), int(y[0]), int(x[1]), int(y[1])), fill=fill)
    pixels = np.asarray(image, np.int16).reshape(height, width, channels)
    noise = rng.normal(0, rng.uniform(0, 24), pixels.shape)
    return np.clip(pixels + noise, 0, 255).astype(np.uint8)


def edge_images(channels: int = 3) -> list[np.ndarray]:
    """Images unlike photos that a service still receives: black, white, a one-pixel image, a
    long strip, a fine checkerboard (all detail lost in the resize)."""
    checker = (np.indices((97, 97)).sum(axis=0) % 2 * 255).astype(np.uint8)
    return [
        np.zeros((64, 64, channels), np.uint8),
        np.full((64, 64, channels), 255, np.uint8),
        np.full((1, 1, channels), 128, np.uint8),
        np.repeat(np.linspace(0, 255, 900, dtype=np.uint8)[None, :, None], 24, 0).repeat(
            channels, 2
        ),
        np.repeat(checker[:, :, None], channels, 2),
    ]


def decode_image(data: bytes, channels: int = 3) -> np.ndarray:
    """An encoded image as (height, width, channels) uint8 (`open_image`, then `pixels`)."""
    return pixels(open_image(data), channels)


def open_image(data: bytes) -> Any:
    """An encoded image with only its header read, refused (BadInput) past `MAX_PIXELS`
    before any pixel is decompressed."""
    from PIL import Image

    with _decoding(len(data)), warnings.catch_warnings():
        # Pillow warns past its own limit (89 MP) when it reads the header, and raises at
        # twice that; ours is lower, and one refusal, never a warning in the server's log.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise BadInput(
            f"the image is {width}x{height} ({width * height / 1e6:.0f} megapixels); "
            f"the limit is {MAX_PIXELS / 1e6:.0f} megapixels: send it smaller"
        )
    return image


def pixels(image: Any, channels: int = 3) -> np.ndarray:
    """An opened image decoded, turned upright as its EXIF says, as (height, width, channels)
    uint8; BadInput for one that is truncated or damaged."""
    from PIL import ImageOps

    with _decoding(None):
        image.load()
        upright = ImageOps.exif_transpose(image).convert(_mode(channels))
    return np.asarray(upright, np.uint8).reshape(upright.height, upright.width, channels)


@contextlib.contextmanager
def _decoding(size: int | None) -> Iterator[None]:
    """Pillow's errors as one BadInput line saying what is wrong with the image."""
    from PIL import Image, UnidentifiedImageError

    try:
        yield
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise BadInput(
            f"the image is past the {MAX_PIXELS / 1e6:.0f}-megapixel limit (Pillow: "
            f"{first_line(err)}): send it smaller"
        ) from err
    except UnidentifiedImageError as err:
        raise BadInput(
            f"not an image ({size} bytes that no decoder recognises): send {', '.join(FORMATS)}"
        ) from err
    except (OSError, SyntaxError, ValueError) as err:  # Pillow's ways of saying "damaged"
        raise BadInput(f"the image cannot be decoded ({first_line(err)}): send it whole") from err


@dataclass(frozen=True)
class Vision:
    """An image model: its image processor and, for a classifier, the labels of its classes."""

    spec: InputSpec
    processor: Any
    labels: tuple[str, ...] = ()
    """Class names by index (the config's id2label); empty for a model without classes."""

    kind = "vision"
    transformer = False
    pools = False
    fidelity_name = "output"

    @property
    def channels(self) -> int:
        return int(self.spec.inputs[0].shape[1])

    @property
    def size(self) -> tuple[int, int]:
        """Height and width of the model's input, as the processor makes every image."""
        _, _, height, width = self.spec.inputs[0].shape
        return int(height), int(width)

    def preprocess(self, images: Sequence[np.ndarray]) -> Batch:
        return preprocess(self.processor, images)

    def generate(self, count: int, rng: np.random.Generator) -> list[np.ndarray]:
        return generate_images(count, rng, self.channels)

    def workload(
        self,
        sizes: Sequence[int],
        *,
        batches_per_size: int = 8,
        seed: int = 0,
        texts: Sequence[str] | None = None,
        token_range: tuple[int, int] | None = None,
    ) -> Workload:
        """Generated images through the processor, batched per size."""
        check_batch_sizes(sizes)
        rng = np.random.default_rng(seed)
        return Workload(
            {
                size: [self.preprocess(self.generate(size, rng)) for _ in range(batches_per_size)]
                for size in sizes
            }
        )

    def verification_batches(self) -> list[Batch]:
        """Batches of 1, 3 and 7 generated images."""
        rng = np.random.default_rng(1234)
        return [self.preprocess(self.generate(size, rng)) for size in (1, 3, 7)]

    def held_out_batches(
        self, user_held: Sequence[str] = (), *, batch_size: int = 16, seed: int = 3
    ) -> list[Batch]:
        """Generated images of their own seed, and the edge cases (`edge_images`)."""
        rng = np.random.default_rng(seed)
        images = [*edge_images(self.channels), *self.generate(3 * batch_size, rng)]
        return [
            self.preprocess(images[i : i + batch_size]) for i in range(0, len(images), batch_size)
        ]

    def compare(
        self,
        outputs: Sequence[Outputs],
        reference: Sequence[Outputs],
        batches: Sequence[Batch],
        logits: frozenset[str],
    ) -> Quality:
        """Cosine and error on every output; top-1 agreement on the class scores."""
        return compare(outputs, reference, logits=logits)

    def scored(self, outputs: Outputs, batch: Batch) -> Outputs:
        return outputs

    def token_lengths(self, batch: Batch) -> np.ndarray | None:
        return None

    def read_user_data(self, path: Path, batch_size: int) -> tuple[Any, list[Batch]]:
        """A folder of images (.png, .jpg, .webp, .bmp, .gif; the metric receives their paths,
        sorted by name) through the processor, or an .npz of `pixel_values` already
        preprocessed (the metric receives the dict of its arrays)."""
        if not path.is_dir():
            return read_npz_batches(self.spec.input_names, path, batch_size)
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_FILES)
        if not files:
            raise BadInput(f"{path} holds no images ({', '.join(sorted(IMAGE_FILES))})")
        batches = []
        for i in range(0, len(files), batch_size):
            images = [self._read(file) for file in files[i : i + batch_size]]
            batches.append(self.preprocess(images))
        return files, batches

    def _read(self, file: Path) -> np.ndarray:
        try:
            return decode_image(file.read_bytes(), self.channels)
        except BadInput as err:
            raise BadInput(f"{file}: {err}") from err

    def summary(self) -> dict[str, Any]:
        height, width = self.size
        return {
            "image_size": [height, width],
            "channels": self.channels,
            "labels": len(self.labels),
        }

    def save(self, folder: Path) -> dict[str, Any]:
        """The processor beside the model (the server preprocesses), the labels in mahir.json."""
        self.processor.save_pretrained(str(folder / PROCESSOR))
        return {"labels": list(self.labels)}

    @classmethod
    def open(cls, spec: InputSpec, folder: Path, manifest: dict[str, Any]) -> Vision:
        """The family as `save` recorded it in an output directory."""
        return cls(spec, load_processor(folder / PROCESSOR), tuple(manifest.get("labels") or ()))


@dataclass(frozen=True)
class ImageInputs:
    """What a Hugging Face image folder's processor says about the model's input: the
    processor, the `pixel_values` spec (batch dynamic, the rest fixed) and example inputs."""

    processor: Any
    input: TensorSpec
    example: Batch

    @classmethod
    def read(cls, folder: Path, channels: int) -> ImageInputs:
        """Two generated images of unlike aspect ratios through the folder's processor; they
        must come out one size, since the model's input is fixed."""
        processor = load_processor(folder)
        rng = np.random.default_rng(0)
        images = [photo(120, 360, rng, channels), photo(300, 100, rng, channels)]
        shapes = [preprocess(processor, [image])[PIXELS].shape[1:] for image in images]
        if len(set(shapes)) > 1:
            raise Unsupported(
                f"the image processor in {folder} makes inputs of shapes {sorted(set(shapes))} "
                "from images of different sizes; mahir serves models of one input size: set "
                "its size (or crop_size) to a fixed height and width"
            )
        example = preprocess(processor, images)
        return cls(processor, TensorSpec(PIXELS, "float32", (BATCH, *shapes[0])), example)


def preprocess(processor: Any, images: Sequence[np.ndarray]) -> Batch:
    """Decoded images, (height, width, channels) uint8 each, as the model's input batch."""
    encoded = processor(list(images), return_tensors="np", input_data_format="channels_last")
    return {PIXELS: np.asarray(encoded[PIXELS], np.float32)}


def labels_of(config: Any) -> tuple[str, ...]:
    """The config's id2label as names by index (a missing index named by its number)."""
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    return tuple(id2label.get(i, str(i)) for i in range(max(id2label, default=-1) + 1))


def _mode(channels: int) -> str:
    if channels not in _MODES:
        raise Unsupported(f"images of {channels} channels: mahir makes and decodes 1 or 3")
    return _MODES[channels]
