"""The text family: models that read tokenized text (sentence embeddings, token outputs,
sequence classifiers).

Workloads are sentences, from the user's file (one per line, or .jsonl with a "text" field) or
generated with a short-skewed length spread like real queries, tokenized per batch with padding to
the longest in the batch and truncated where the model truncates, as a server would. Padded
positions carry no meaning, so fidelity leaves them out; a sentence encoder is judged on its
pooled vector (`pooling.py`), since that is what its users get.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mahir.errors import BadInput
from mahir.families import open_tokenizer
from mahir.families.wordpiece import AsciiWordPiece, flatten
from mahir.pooling import EMBEDDING, Pooling, pool
from mahir.quality import compare
from mahir.types import InputSpec, Outputs, Quality, TokenLimits
from mahir.workload import HELD_OUT_TEXT, Batch, Workload, check_batch_sizes, read_sentences

TOKENIZER = "tokenizer"
"""The folder in an output directory that holds the tokenizer (the server tokenizes)."""

# Common English words; generated sentences are drawn from them so that tokenizers see real words.
WORDS = """
the of and to in is was for that on with as by at from his her it an be are this which or have
had not but were one their all new more first can after time two been other years when would
there who they some into only its most also over made such where him many then these through
between about during under both while three before city used known people school year later
world found each war part music well album what state four game family several life best name
released member series team since high national season under river small around each another
model faster cheaper server request answer machine memory latency batch token sentence quick
brown fox jumps lazy dog weather today market price report data search result user question
please help order delivery account password change support email phone service product review
great good bad late early open close start stop find make take give look think know want need
""".split()


def generate_sentences(
    count: int,
    tokenizer: Any,
    rng: np.random.Generator,
    *,
    token_range: tuple[int, int] | None = None,
    max_tokens: int = 512,
) -> list[str]:
    """Sentences whose token counts follow real traffic: by default short-skewed (log-normal,
    median about 20 tokens, a long tail up to `max_tokens`); with `token_range`, uniform in it."""
    word_tokens = {w: len(tokenizer.tokenize(w)) for w in WORDS}
    special = len(tokenizer("")["input_ids"])  # [CLS] and [SEP], or the model's equivalent
    targets: np.ndarray
    if token_range is None:
        targets = np.clip(rng.lognormal(np.log(20), 0.7, size=count), 4, max_tokens)
    else:
        low, high = token_range
        if not 1 <= low <= high:
            raise BadInput(f"token range {low}-{high} is empty: give MIN-MAX with 1 <= MIN <= MAX")
        targets = rng.integers(low, high + 1, size=count)
    sentences = []
    for target in targets.astype(int):
        words, tokens = [], special
        while tokens < min(target, max_tokens):
            word = WORDS[rng.integers(len(WORDS))]
            words.append(word)
            tokens += word_tokens[word]
        sentences.append(" ".join(words).capitalize() + ".")
    return sentences


def encode_texts(
    tokenizer: Any, spec: InputSpec, max_length: int | None, texts: Sequence[str]
) -> Batch:
    """`texts` tokenized and truncated as the model was, padded to the longest, with exactly
    the input names and dtypes of `spec`: for a loaded model and an output directory alike."""
    encoded = tokenizer(
        list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="np"
    )
    return {t.name: encoded[t.name].astype(t.dtype) for t in spec.inputs}


class TextEncoder:
    """`encode_texts` for one tokenizer, called per request by a server and per batch by
    `embed`. A fast (Rust) tokenizer is called directly, on its own copy with the truncation
    transformers would set on every call set once: for one sentence the wrapper costs as much as
    the tokenizing (84 vs 40 us here). Its encodings come back unpadded and only their ids cross
    into Python; the padding, the mask and constant type ids are laid out by numpy. Reading three
    padded lists per sentence instead cost 7 us a sentence, a third of the tokenizing, and while
    the Rust tokenizer works without the GIL that conversion holds it. BERT's tokenizers skip
    the Rust pipeline on plain ASCII text (`wordpiece.AsciiWordPiece`: the same ids, a batch
    ~5x faster than the lean Rust pipeline on 2 cores) or run a lean copy of it. Anything else
    goes through `encode_texts`; tests hold them all to the same arrays."""

    def __init__(
        self, tokenizer: Any, spec: InputSpec, max_length: int | None, *, in_python: bool = True
    ) -> None:
        """`in_python`: BERT's tokenizers take plain text in Python (`AsciiWordPiece`), ~5x
        faster than lean Rust on 2 cores but holding the GIL; off, the Rust tokenizer's lean
        pipeline, which works without it, for a caller whose other threads need it meanwhile
        (`mahir.embed` feeding a GPU no longer does: it tokenizes inline, 40.0 against 42.3 ms
        for lean Rust on a thread on an H100 host, 2026-12-06)."""
        self._tokenizer, self._spec, self._max_length = tokenizer, spec, max_length
        self._backend = self._direct_backend()
        # without offsets (tokenizers >= 0.20): ~20% less time, the same ids and masks
        self._encode_batch: Any = getattr(self._backend, "encode_batch_fast", None) or getattr(
            self._backend, "encode_batch", None
        )
        self._type_id = self._constant_type_id()
        self._wordpiece = (
            AsciiWordPiece.of(self._backend, in_python=in_python)
            if self._type_id is not None
            else None
        )

    @property
    def direct(self) -> bool:
        """Whether the Rust tokenizer is called directly."""
        return self._backend is not None

    @property
    def plain_text(self) -> Literal["python", "lean rust", "rust"]:
        """How plain text is tokenized: "python" (`AsciiWordPiece`), "lean rust" (its lean
        copy of the Rust pipeline) or "rust" (the tokenizer's own pipeline)."""
        if self._wordpiece is None:
            return "rust"
        return "python" if self._wordpiece.lean is None else "lean rust"

    def __call__(self, texts: Sequence[str]) -> Batch:
        if self._backend is None:
            return encode_texts(self._tokenizer, self._spec, self._max_length, texts)
        if self._wordpiece is not None:
            (ids, lengths), encodings = self._wordpiece.encode(texts), []
        else:
            encodings = self._encode_batch(list(texts))
            ids, lengths = flatten([e.ids for e in encodings])
        tokenizer = self._tokenizer
        layout = _Layout.of(lengths, left=tokenizer.padding_side == "left")
        batch = {}
        for t in self._spec.inputs:
            if t.name == "input_ids":
                batch[t.name] = layout.rows(ids, tokenizer.pad_token_id, t.dtype)
            elif t.name == "attention_mask":
                batch[t.name] = layout.mask(t.dtype)
            elif self._type_id is not None:
                batch[t.name] = layout.constant(self._type_id, tokenizer.pad_token_type_id, t.dtype)
            else:
                type_ids, _ = flatten([e.type_ids for e in encodings])
                batch[t.name] = layout.rows(type_ids, tokenizer.pad_token_type_id, t.dtype)
        return batch

    def _direct_backend(self) -> Any:
        tokenizer = self._tokenizer
        shared: Any = getattr(tokenizer, "backend_tokenizer", None)
        direct = (
            shared is not None
            and self._max_length is not None
            and tokenizer.pad_token_id is not None
            and tokenizer.padding_side in ("left", "right")
            and all(t.name in _DIRECT_INPUTS for t in self._spec.inputs)
        )
        if not direct:
            return None
        backend = copy.deepcopy(shared)  # the tokenizer's own stays as transformers sets it
        backend.enable_truncation(
            self._max_length,
            stride=0,
            strategy="longest_first",
            direction=tokenizer.truncation_side,
        )
        backend.no_padding()
        return backend

    def _constant_type_id(self) -> int | None:
        """The type id of every token of one sentence, where the tokenizer's template gives
        them all the same one (BERT's gives 0). A template's pieces (specials and the text)
        each carry a fixed type id, so a probe that holds them all shows every one."""
        if self._backend is None:
            return None
        type_ids = set(self._backend.encode("a b").type_ids)
        return type_ids.pop() if len(type_ids) == 1 else None


_DIRECT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass(frozen=True, slots=True)
class _Layout:
    """Where the values of unpadded rows go in a padded batch: `real` marks them; None when no
    row needs padding (one sentence, or all of one length), which numpy lays out at once: a
    server's request is often one sentence, and marking costs more than tokenizing it."""

    shape: tuple[int, int]
    real: np.ndarray | None

    @classmethod
    def of(cls, lengths: np.ndarray, *, left: bool) -> _Layout:
        """For rows of these `lengths`."""
        if len(lengths) < 2:  # a server's single sentence: no reductions
            return cls((len(lengths), int(lengths[0]) if len(lengths) else 0), None)
        longest = int(lengths.max())
        if int(lengths.min()) == longest:
            return cls((len(lengths), longest), None)
        positions = np.arange(longest)
        if left:
            return cls((len(lengths), longest), positions >= (longest - lengths)[:, None])
        return cls((len(lengths), longest), positions < lengths[:, None])

    def rows(self, values: np.ndarray, pad: int, dtype: Any) -> np.ndarray:
        """The rows' `values`, end to end, laid out padded with `pad`."""
        if self.real is None:
            return values.astype(dtype, copy=False).reshape(self.shape)
        out = np.full(self.shape, pad, dtype)
        out[self.real] = values
        return out

    def mask(self, dtype: Any) -> np.ndarray:
        return np.ones(self.shape, dtype) if self.real is None else self.real.astype(dtype)

    def constant(self, value: int, pad: int, dtype: Any) -> np.ndarray:
        if self.real is None:
            return np.full(self.shape, value, dtype)
        return np.where(self.real, value, pad).astype(dtype)


@dataclass(frozen=True)
class Text:
    """A model that reads tokenized text: its tokenizer, where it truncates, what its token
    inputs may hold, and for a sentence encoder its pooling."""

    spec: InputSpec
    tokenizer: Any
    max_length: int | None
    """Where text is truncated (sentence-transformers' max_seq_length, else the limits')."""
    limits: TokenLimits | None = None
    """What the token inputs may hold, checked by the server before a batch."""
    pooling: Pooling | None = None
    """sentence-transformers' pooling: part of a sentence encoder's answer."""

    kind = "text"
    transformer = True

    @property
    def pools(self) -> bool:
        return self.pooling is not None

    @property
    def fidelity_name(self) -> str:
        return "embedding" if self.pooling else "output"

    def tokenize(self, sentences: Sequence[str]) -> Batch:
        """One padded batch with exactly the model's input names and dtypes."""
        return encode_texts(self.tokenizer, self.spec, self.max_length, sentences)

    def generate(self, count: int, rng: np.random.Generator, **kwargs: Any) -> list[str]:
        """`generate_sentences` with this model's tokenizer and length."""
        kwargs.setdefault("max_tokens", self.max_length or 512)
        return generate_sentences(count, self.tokenizer, rng, **kwargs)

    def workload(
        self,
        sizes: Sequence[int],
        *,
        batches_per_size: int = 8,
        seed: int = 0,
        texts: Sequence[str] | None = None,
        token_range: tuple[int, int] | None = None,
    ) -> Workload:
        """`texts` cycled in a shuffled order, or generated sentences, batched per size."""
        check_batch_sizes(sizes)
        rng = np.random.default_rng(seed)
        needed = max(sizes) * batches_per_size
        if texts:
            order = rng.permutation(len(texts))
            pool_ = [texts[order[i % len(texts)]] for i in range(needed)]
        else:
            pool_ = self.generate(needed, rng, token_range=token_range)
        batches = {
            size: [self.tokenize(pool_[i * size : (i + 1) * size]) for i in range(batches_per_size)]
            for size in sizes
        }
        return Workload(batches, tuple(pool_))

    def verification_batches(self) -> list[Batch]:
        """One short sentence alone, a padded odd-sized batch of mixed lengths, and a batch of
        long sentences."""
        rng = np.random.default_rng(1234)
        longest = min(self.max_length or 128, 128)
        shapes = [(1, (3, 8)), (3, None), (2, (max(4, longest - 28), longest))]
        return [
            self.tokenize(self.generate(size, rng, token_range=span, max_tokens=longest))
            for size, span in shapes
        ]

    def held_out_batches(
        self, user_held: Sequence[str] = (), *, batch_size: int = 16, seed: int = 3
    ) -> list[Batch]:
        """The shipped held-out sentences, the user's held-out share, and generated sentences
        past the maximum length (truncated to it), batched by length."""
        longest = self.max_length or 512
        rng = np.random.default_rng(seed)
        past_the_end = self.generate(
            4, rng, token_range=(longest, longest + 32), max_tokens=longest + 32
        )
        texts = sorted([*read_sentences(HELD_OUT_TEXT), *user_held, *past_the_end], key=len)
        return [self.tokenize(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]

    def compare(
        self,
        outputs: Sequence[Outputs],
        reference: Sequence[Outputs],
        batches: Sequence[Batch],
        logits: frozenset[str],
    ) -> Quality:
        """Padded positions left out; a sentence encoder's pooled vector measured too, and
        alone when the artifact answers with it (`passes/pooling.py`)."""
        masks = [b["attention_mask"] for b in batches] if "attention_mask" in batches[0] else None
        if self.pooling is not None and masks is not None and EMBEDDING in outputs[0]:
            pooled = [
                {EMBEDDING: pool(ref[self.spec.outputs[0]], mask, self.pooling)}
                for ref, mask in zip(reference, masks, strict=True)
            ]
            quality = compare(outputs, pooled)
            return Quality(quality.outputs, embedding=quality.outputs[EMBEDDING])
        return compare(
            outputs,
            reference,
            attention_masks=masks,
            pooling=self.pooling,
            embedding_output=self.spec.outputs[0] if self.pooling else None,
            logits=logits,
        )

    def scored(self, outputs: Outputs, batch: Batch) -> Outputs:
        """A sentence encoder's users score its pooled "sentence_embedding"."""
        if self.pooling is None or EMBEDDING in outputs:
            return outputs
        tokens = outputs[self.spec.outputs[0]]
        return {**outputs, EMBEDDING: pool(tokens, _mask(batch, tokens), self.pooling)}

    def token_lengths(self, batch: Batch) -> np.ndarray | None:
        if "attention_mask" in batch:
            return np.asarray(batch["attention_mask"].sum(axis=1))
        return None

    def read_user_data(self, path: Path, batch_size: int) -> tuple[Any, list[Batch]]:
        """.txt: one sentence per line (the data is the list of sentences); .jsonl: one object
        per line with a "text" field (the data is the list of objects, labels included)."""
        records: list[Any] = _read_text_records(path)
        texts = [r if isinstance(r, str) else r["text"] for r in records]
        chunks = [texts[i : i + batch_size] for i in range(0, len(texts), batch_size)]
        return records, [self.tokenize(chunk) for chunk in chunks]

    def summary(self) -> dict[str, Any]:
        pooling = self.pooling
        return {
            "pooling": None
            if pooling is None
            else {"mode": pooling.mode, "normalize": pooling.normalize},
            "max_length": self.max_length,
        }

    def save(self, folder: Path) -> dict[str, Any]:
        """The tokenizer beside the model (part of its answer: the server tokenizes)."""
        self.tokenizer.save_pretrained(str(folder / TOKENIZER))
        return {
            "pooling": None if self.pooling is None else dataclasses.asdict(self.pooling),
            "max_length": self.max_length,
            "token_limits": None if self.limits is None else dataclasses.asdict(self.limits),
        }

    @classmethod
    def open(cls, spec: InputSpec, folder: Path, manifest: dict[str, Any]) -> Text:
        """The family as `save` recorded it in an output directory."""
        limits = manifest.get("token_limits")
        return cls(
            spec,
            open_tokenizer(folder / TOKENIZER),
            manifest.get("max_length"),
            TokenLimits(**limits) if limits else None,
            Pooling(**manifest["pooling"]) if manifest.get("pooling") else None,
        )


def _mask(batch: Batch, tokens: np.ndarray) -> np.ndarray:
    """The attention mask, or all ones where the model takes none."""
    mask = batch.get("attention_mask")
    return np.ones(tokens.shape[:2], np.int64) if mask is None else mask


def _read_text_records(path: Path) -> list[Any]:
    if path.suffix != ".jsonl":
        return read_sentences(path)
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise BadInput(f"{path}:{number} is not JSON ({err.msg})") from err
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise BadInput(f'{path}:{number} needs a "text" field holding the sentence')
        records.append(record)
    if not records:
        raise BadInput(f'{path} has no records: one JSON object per line with a "text" field')
    return records
