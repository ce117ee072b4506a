"""The image codec: encoded images in, class scores and names out, for models of the vision family.

A KServe v2 request may send images as they are stored: one BYTES input named `image`, one
encoded PNG/JPEG/WebP/BMP/GIF per row (binary tensor data: what `tritonclient` sends for BYTES).
Each image is decoded with Pillow (a pixel limit checked on the header first, so a
decompression bomb is refused before it is decoded: `families.vision.decode_image`) and run
through the model's own image processor, saved in the output directory, so the batcher receives
rows of `pixel_values` like any other request. A bad image fails its request only (422, naming
the row and what is wrong), before it may join a batch.

Answers follow Triton's classification extension: an output asked for with the parameter
`classification: k` (tritonclient's `class_count=k`) comes back as its top k classes, BYTES
strings "score:index:label". An image classifier also offers `labels`: the top `TOP_K` (or its
own `classification` count) of its `logits`, sent with every answer that names no outputs.

Decoding runs on the event loop, like JSON parsing (a few ms for a photo-sized JPEG).
Knows the family and the protocol; nothing of batching or HTTP.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mahir.errors import BadInput, Mismatch, TooLarge
from mahir.families import Family
from mahir.families.vision import MAX_PIXELS, PIXELS, Vision, open_image, pixels
from mahir.serve.protocol import BYTES, InferRequest
from mahir.types import Outputs

IMAGE = "image"
"""The input that carries encoded images."""
LOGITS = "logits"
LABELS = "labels"
TOP_K = 5
REQUEST_PIXELS = 3 * MAX_PIXELS
"""Pixels one request may hold in all, checked on the headers before any image is decoded:
decoding runs on the event loop, so this bounds how long one request can hold it (~1 s)."""


@dataclass(frozen=True)
class ImageCodec:
    """Encoded images to a vision model's inputs, its class scores to names."""

    family: Vision
    admit: Callable[[int, int], None]
    """The batcher's `check_admission(items, widest)`, asked before any image is decoded:
    more images than a batch holds, or a full queue, are refused without the work."""

    @classmethod
    def of(cls, family: Family, admit: Callable[[int, int], None]) -> ImageCodec | None:
        """The codec for a model of the vision family; None for any other."""
        return cls(family, admit) if isinstance(family, Vision) else None

    @property
    def classifier(self) -> bool:
        """Whether the model answers class scores named by its labels."""
        return LOGITS in self.family.spec.outputs and bool(self.family.labels)

    def decode(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A request's encoded images (one BYTES input `image`, shape [n] or [n, 1]) as the
        model's `pixel_values`."""
        column = inputs.get(IMAGE)
        if set(inputs) != {IMAGE} or column is None or column.dtype != object:
            raise Mismatch(
                f"encoded images go in one {BYTES} input named {IMAGE!r}, one image per row; "
                f"got {sorted(inputs)}"
            )
        if column.ndim not in (1, 2) or column.shape[1:] not in ((), (1,)) or not column.size:
            raise Mismatch(
                f"input {IMAGE!r} has shape {list(column.shape)}: send [n] or [n, 1], one "
                "encoded image per row"
            )
        blobs = column.reshape(-1).tolist()
        self.admit(len(blobs), len(blobs))
        opened = [_each(row, open_image, blob) for row, blob in enumerate(blobs)]
        total = sum(image.width * image.height for image in opened)
        if total > REQUEST_PIXELS:
            raise TooLarge(
                f"the request's {len(opened)} images hold {total / 1e6:.0f} megapixels; one "
                f"request may hold {REQUEST_PIXELS / 1e6:.0f}: split it"
            )
        channels = self.family.channels
        images = [_each(row, pixels, image, channels) for row, image in enumerate(opened)]
        return {PIXELS: self.family.preprocess(images)[PIXELS]}

    def answer(self, outputs: Outputs, request: InferRequest) -> Outputs:
        """`outputs` with `labels` added where it is asked for (or no output is named)."""
        wanted = request.outputs
        if not self.classifier or (wanted and LABELS not in wanted):
            return outputs
        k = request.classification.get(LABELS, TOP_K)
        return {**outputs, LABELS: top_k(outputs[LOGITS], k, self.family.labels)}


def _each(row: int, step: Callable[..., Any], *args: Any) -> Any:
    """One image's step, its BadInput naming the row."""
    try:
        return step(*args)
    except BadInput as err:
        raise Mismatch(f"image {row}: {err}") from err


def classified(outputs: Outputs, request: InferRequest, codec: ImageCodec | None = None) -> Outputs:
    """The outputs a request gets: Triton's classification extension applied to the outputs
    asked for with `classification` (class names from an image classifier's labels), and an
    image classifier's `labels`."""
    if codec is not None:
        outputs = codec.answer(outputs, request)
    labels = codec.family.labels if codec is not None else ()
    converted = dict(outputs)
    for name, k in request.classification.items():
        if name in outputs and name != LABELS:
            converted[name] = top_k(outputs[name], k, labels)
    return converted


def top_k(scores: np.ndarray, k: int, labels: Sequence[str] = ()) -> np.ndarray:
    """Each row's `k` best classes (highest first) as Triton writes them: b"score:index:label",
    or b"score:index" where no label is known; shape (batch, k) of bytes."""
    if scores.ndim != 2:
        raise Mismatch(f"classification needs (batch, classes) scores, got shape {scores.shape}")
    k = min(k, scores.shape[1])
    best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    named = len(labels) == scores.shape[1]
    rows = [
        [f"{scores[r, i]:f}:{i}" + (f":{labels[i]}" if named else "") for i in best[r].tolist()]
        for r in range(scores.shape[0])
    ]
    answer = np.empty((scores.shape[0], k), dtype=object)
    answer[:] = [[s.encode() for s in row] for row in rows]
    return answer
