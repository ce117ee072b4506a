"""OpenAI's embeddings API (`POST /v1/embeddings`) for sentence encoders, as the stock `openai`
client speaks it.

A request's `input` is a string, a list of strings, a list of token ids or a list of such lists
(ids of the served model's own tokenizer, passed to the model as given, special tokens included:
what `tokenizer(text)["input_ids"]` returns). `encoding_format` is `float` or `base64`
(little-endian float32 bytes: the client asks for it by default). `dimensions` is honoured for
the sizes the server was told the model was trained to be cut to (Matryoshka; `mahir serve
--matryoshka-dims`), and the native size; anything else is refused, never silently ignored. Inputs
longer than the model's max length are cut (`usage.prompt_tokens` counts the tokens used) unless
the request sends `"truncate": false` or the server runs with `--no-truncate`: then they are
refused. Each input is batched on its own, with others of its length. Errors take OpenAI's
shape, `{"error": {"message", "type", "param", "code"}}`; the server maps them to HTTP statuses.
A small request is tokenized on the event loop (a thread's round trip would cost more than the
work); a larger one on a thread of its own, so it never stalls the other requests or the
batcher (`INLINE_CHARACTERS`).
Knows the batcher, the output directory and pooling; nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import base64
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from mahir.errors import BadInput, Malformed
from mahir.families.text import Text, TextEncoder
from mahir.outdir import OutputDir
from mahir.pooling import EMBEDDING, pool
from mahir.serve.batcher import Batcher
from mahir.serve.validate import InputRules

TokenIds = tuple[int, ...]
_NUMPY = orjson.OPT_SERIALIZE_NUMPY
_NORMALIZE_EPS = 1e-12  # torch.nn.functional.normalize's, as sentence-transformers uses
INLINE_CHARACTERS = 2_000
"""Characters (or token ids) a request may hold and still be tokenized on the event loop: about
a millisecond's work on the development CPU, less than a thread's round trip costs. More goes
to the tokenizer's thread: 1,024 sentences took 87 ms to tokenize, all of it a stall of the
event loop (every other request, and the batcher's next batch, waited); from the thread the
loop's longest stall was 1.2 ms, 6 ms on a busy machine (benchmarks/tokenize_stall.py)."""


@dataclass(frozen=True, slots=True)
class EmbeddingRequest:
    inputs: tuple[str | TokenIds, ...]
    model: str | None
    base64: bool
    dimensions: int | None
    truncate: bool | None
    """None: the server's default."""


def parse_embeddings(body: Any) -> EmbeddingRequest:
    """Check a request body's shape and fields; what the model makes of them is checked later."""
    if not isinstance(body, dict) or "input" not in body:
        raise Malformed('the request needs "input": a string or a list of strings', param="input")
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise Malformed(
            f'"encoding_format" is {encoding!r}: send "float" or "base64"', param="encoding_format"
        )
    dimensions = body.get("dimensions")
    if dimensions is not None and (not _is_int(dimensions) or dimensions < 1):
        raise Malformed(
            f'"dimensions" is {dimensions!r}: send a positive integer', param="dimensions"
        )
    truncate = body.get("truncate")
    if truncate is not None and not isinstance(truncate, bool):
        raise Malformed(f'"truncate" is {truncate!r}: send true or false', param="truncate")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise Malformed(f'"model" is {model!r}: send the served model\'s name', param="model")
    return EmbeddingRequest(
        _inputs(body["input"]), model, encoding == "base64", dimensions, truncate
    )


def _inputs(given: Any) -> tuple[str | TokenIds, ...]:
    if isinstance(given, str) or (isinstance(given, list) and given and _is_int(given[0])):
        given = [given]
    wanted = "a string, a list of strings, a list of token ids, or a list of such lists"
    if not isinstance(given, list) or not given:
        raise Malformed(f'"input" must be {wanted}', param="input")
    inputs: list[str | TokenIds] = []
    for i, item in enumerate(given):
        if isinstance(item, str):
            inputs.append(item)
        elif isinstance(item, list) and item and all(_is_int(t) for t in item):
            inputs.append(tuple(item))
        else:
            raise Malformed(
                f'"input"[{i}] is not a string or a non-empty list of token ids', param="input"
            )
    return tuple(inputs)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class Embedder:
    """Inputs to pooled vectors through the batcher: the model's own tokenizer, truncation and
    pooling, then the size asked for."""

    def __init__(
        self,
        opened: OutputDir,
        batcher: Batcher,
        rules: InputRules,
        *,
        native: int,
        dimensions: Sequence[int] = (),
        truncate: bool = True,
    ) -> None:
        text = opened.family
        if not isinstance(text, Text) or text.pooling is None or text.max_length is None:
            raise ValueError("an Embedder needs a text model with pooling and a max length")
        wrong = [d for d in dimensions if not 0 < d < native]
        if wrong:
            raise BadInput(
                f"--matryoshka-dims {wrong}: the model gives {native}-dimensional embeddings; "
                f"give sizes below {native}"
            )
        self.opened, self.batcher, self.rules = opened, batcher, rules
        self.pooling, self.max_length = text.pooling, text.max_length
        self.tokenizer = text.tokenizer
        # Python's tokenizing (`TextEncoder`'s default) on any device: a small request is
        # tokenized on the event loop, where one sentence's time is what counts (15 us in Python
        # against 38 in lean Rust on 2 cores), not what the GIL lets another thread do meanwhile
        self.encode = TextEncoder(text.tokenizer, text.spec, text.max_length)
        self.native, self.sizes, self.truncate = native, frozenset(dimensions), truncate
        self._tokenizing = threading.Lock()
        """One tokenization at a time: transformers sets truncation on the shared Rust tokenizer
        per call, and a call while another thread encodes fails ("Already borrowed",
        huggingface/tokenizers#537)."""
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mahir-tokenize")

    def close(self) -> None:
        """Let the tokenizer's thread go, once no request is being served."""
        self._thread.shutdown(wait=True)

    def check(self, request: EmbeddingRequest) -> None:
        """What can be refused before any work: the size asked for, the number of inputs."""
        size = request.dimensions
        if size is not None and size != self.native and size not in self.sizes:
            shorter = f" or one of {sorted(self.sizes)}" if self.sizes else ""
            raise Malformed(
                f"{self.opened.name} gives {self.native}-dimensional embeddings and was not "
                f'declared to allow {size}: send "dimensions": {self.native}{shorter}, or none',
                param="dimensions",
            )
        self.batcher.check_admission(len(request.inputs))

    async def embed(self, request: EmbeddingRequest) -> tuple[list[np.ndarray], int]:
        """One vector per input, in order, and the tokens the model read for them."""
        self.check(request)
        truncate = self.truncate if request.truncate is None else request.truncate
        parts = await self._encode_all(request.inputs, truncate)
        outputs = await self.batcher.submit_many(parts)
        name = self.opened.spec.outputs[0]
        vectors = []
        for part, out in zip(parts, outputs, strict=True):
            if name == EMBEDDING:  # pooled inside the model (passes/pooling.py)
                vector = out[name][0]
            else:
                vector = pool(out[name], part["attention_mask"], self.pooling)[0]
            vectors.append(self._sized(vector, request.dimensions))
        return vectors, sum(int(part["attention_mask"].sum()) for part in parts)

    async def _encode_all(
        self, inputs: Sequence[str | TokenIds], truncate: bool
    ) -> list[dict[str, np.ndarray]]:
        """Each input's model inputs: a small request's on the event loop unless the tokenizer
        is busy, any other on the tokenizer's thread."""
        small = sum(len(item) for item in inputs) <= INLINE_CHARACTERS
        if small and self._tokenizing.acquire(blocking=False):
            try:
                return self._encode_each(inputs, truncate)
            finally:
                self._tokenizing.release()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, self._encode_locked, inputs, truncate)

    def _encode_locked(
        self, inputs: Sequence[str | TokenIds], truncate: bool
    ) -> list[dict[str, np.ndarray]]:
        with self._tokenizing:
            return self._encode_each(inputs, truncate)

    def _encode_each(
        self, inputs: Sequence[str | TokenIds], truncate: bool
    ) -> list[dict[str, np.ndarray]]:
        return [self._encode(i, item, truncate) for i, item in enumerate(inputs)]

    def _encode(self, index: int, item: str | TokenIds, truncate: bool) -> dict[str, np.ndarray]:
        if isinstance(item, str):
            inputs = self.encode([item])
            if not truncate and inputs["attention_mask"].shape[1] == self.max_length:
                self._refuse_long(index, self._full_length(item))
            return inputs
        if len(item) > self.max_length:
            if not truncate:
                self._refuse_long(index, len(item))
            item = item[: self.max_length]
        inputs = self._from_ids(item)
        self.rules.check(inputs)
        return inputs

    def _full_length(self, text: str) -> int:
        """Tokens before truncation (asked only of texts that reached the max length)."""
        encoded = self.tokenizer(text, truncation=False, verbose=False)
        return len(encoded["input_ids"])

    def _refuse_long(self, index: int, tokens: int) -> None:
        if tokens > self.max_length:
            raise Malformed(
                f'"input"[{index}] is {tokens} tokens; the model reads at most '
                f'{self.max_length}: shorten it, or send "truncate": true to have it cut',
                param="input",
            )

    def _from_ids(self, ids: TokenIds) -> dict[str, np.ndarray]:
        fill = {"input_ids": ids, "attention_mask": 1, "token_type_ids": 0}
        spec = self.opened.spec.inputs
        unknown = [t.name for t in spec if t.name not in fill]
        if unknown:
            raise Malformed(
                f"the model also takes {unknown}, which token ids alone do not give: send text",
                param="input",
            )
        try:
            return {t.name: np.full((1, len(ids)), fill[t.name], t.dtype) for t in spec}
        except OverflowError as err:  # an id past int64
            raise Malformed(f"a token id is too large ({err})", param="input") from err

    def _sized(self, vector: np.ndarray, size: int | None) -> np.ndarray:
        if size is None or size == self.native:
            return vector
        cut = vector[:size]
        if self.pooling.normalize:  # the full vector was unit length; so is the cut one
            cut = cut / max(float(np.linalg.norm(cut)), _NORMALIZE_EPS)
        return cut


def encode_embeddings(
    request: EmbeddingRequest, vectors: Sequence[np.ndarray], tokens: int, model: str
) -> bytes:
    """The response body. orjson writes the float arrays straight from numpy, each in its
    shortest exact form (~20x faster than json.dumps of a list); base64 is the float32 bytes,
    little-endian, as OpenAI returns them."""
    data = [
        {
            "object": "embedding",
            "index": i,
            "embedding": _base64(vector) if request.base64 else np.ascontiguousarray(vector),
        }
        for i, vector in enumerate(vectors)
    ]
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    body = {"object": "list", "data": data, "model": model, "usage": usage}
    return orjson.dumps(body, option=_NUMPY)


def _base64(vector: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(vector, "<f4").tobytes()).decode("ascii")
