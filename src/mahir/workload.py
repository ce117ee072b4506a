"""Inputs shaped like the user's traffic, ready to feed any `Session`.

Text models get sentences, from the user's file (one per line) or generated with a short-skewed
length spread like real queries, tokenized per batch with padding to the longest in the batch,
as a server would. Tensor models get random inputs from their spec. A workload is saved as .npz
next to the results, so every number can be reproduced from exactly these inputs.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mahir.errors import BadInput
from mahir.families.tensor import random_inputs
from mahir.files import staged
from mahir.types import BATCH, SEQUENCE, InputSpec

if TYPE_CHECKING:
    from mahir.model import Model

Batch = dict[str, np.ndarray]

HELD_OUT_TEXT = Path(__file__).parent / "data" / "held_out.txt"
"""Sentences written for judging fidelity and never tuned on: one word to paragraphs past any
model's length, questions, reviews, code, numbers, a dozen scripts and emoji."""
HELD_OUT_EVERY = 5
"""Every fifth of the user's sentences is held out from calibration (when there are 10+)."""

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


@dataclass
class Workload:
    """Batches per batch size, and for text models the sentences they were made from."""

    batches: dict[int, list[Batch]]
    texts: tuple[str, ...] = field(default=())

    def save(self, path: Path) -> None:
        """Write as .npz (keys `b{size}/{index}/{input}`), atomically."""
        arrays: dict[str, np.ndarray] = {
            f"b{size}/{i}/{name}": array
            for size, batches in self.batches.items()
            for i, batch in enumerate(batches)
            for name, array in batch.items()
        }
        arrays["texts"] = np.array(self.texts, dtype=np.str_)
        with staged(path) as draft, draft.open("wb") as f:
            np.savez_compressed(f, **arrays)  # type: ignore[arg-type]  # stubs fear 'allow_pickle'

    @classmethod
    def load(cls, path: Path) -> Workload:
        if not path.is_file():
            raise BadInput(f"workload {path} does not exist")
        batches: dict[int, dict[int, Batch]] = {}
        try:
            with np.load(path) as data:
                texts = tuple(str(t) for t in data["texts"])
                for key in data.files:
                    if key == "texts":
                        continue
                    size, index, name = key.split("/")
                    batches.setdefault(int(size[1:]), {}).setdefault(int(index), {})[name] = data[
                        key
                    ]
        except (OSError, ValueError, KeyError) as err:
            raise BadInput(f"{path} is not a mahir workload (.npz): {err}") from err
        ordered = {s: [b[i] for i in sorted(b)] for s, b in sorted(batches.items())}
        return cls(ordered, texts)

    def describe(self) -> dict[str, Any]:
        """What a report says about the inputs: sizes, and token lengths for text."""
        info: dict[str, Any] = {
            "batch_sizes": sorted(self.batches),
            "batches_per_size": {s: len(b) for s, b in self.batches.items()},
        }
        lengths = [
            int(n)
            for batches in self.batches.values()
            for batch in batches
            if "attention_mask" in batch
            for n in batch["attention_mask"].sum(axis=1)
        ]
        if lengths:
            info["tokens"] = {
                "min": min(lengths),
                "median": float(np.median(lengths)),
                "max": max(lengths),
            }
        return info


def read_sentences(path: Path) -> list[str]:
    """Non-empty lines of a UTF-8 text file."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise BadInput(
            f"cannot read sentences from {path} ({err}): give a UTF-8 text file"
        ) from err
    sentences = [line.strip() for line in lines if line.strip()]
    if not sentences:
        raise BadInput(f"{path} has no sentences: give a text file with one sentence per line")
    return sentences


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


def refuse_text_options(model: Model, given: dict[str, bool]) -> None:
    """Refuse options that shape text (`given`: flag -> whether it was given) for a model that
    does not read text, instead of ignoring them."""
    flags = " and ".join(flag for flag, on in given.items() if on)
    if flags and not model.is_text:
        raise BadInput(
            f"{flags} shape text, and {model.name} takes tensors "
            f"({', '.join(model.spec.input_names)}): leave {flags} out"
        )


def split_held_out(sentences: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The user's sentences apart: those passes may calibrate and tune on, and every fifth held
    out to judge them by (both spread over the file). Fewer than ten: all may be tuned on."""
    if len(sentences) < 2 * HELD_OUT_EVERY:
        return tuple(sentences), ()
    held = tuple(s for i, s in enumerate(sentences) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1)
    tuning = tuple(s for i, s in enumerate(sentences) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1)
    return tuning, held


def held_out_batches(
    model: Model, user_held: Sequence[str] = (), *, batch_size: int = 16, seed: int = 3
) -> list[Batch]:
    """Inputs no pass tuned on, varied enough that the worst case is not luck: for text models
    the shipped held-out sentences, the user's held-out share, and generated inputs past the
    maximum length (truncated to it), batched by length; for others random inputs of their own
    seed."""
    if not model.is_text:
        return build_workload(model, [batch_size], batches_per_size=4, seed=seed).batches[
            batch_size
        ]
    longest = model.max_length or 512
    rng = np.random.default_rng(seed)
    past_the_end = generate_sentences(
        4, model.tokenizer, rng, token_range=(longest, longest + 32), max_tokens=longest + 32
    )
    texts = sorted([*read_sentences(HELD_OUT_TEXT), *user_held, *past_the_end], key=len)
    return [tokenize(model, texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]


def build_workload(
    model: Model,
    batch_sizes: Sequence[int],
    *,
    sentences: Sequence[str] | None = None,
    batches_per_size: int = 8,
    token_range: tuple[int, int] | None = None,
    seed: int = 0,
) -> Workload:
    """`batches_per_size` batches for each batch size, from `sentences` (cycled in a shuffled
    order) or generated text for text models, random tensors otherwise."""
    if any(size < 1 for size in batch_sizes):
        raise BadInput(f"batch sizes must be >= 1, got {list(batch_sizes)}")
    rng = np.random.default_rng(seed)
    if not model.is_text:
        return Workload(
            {
                size: [tensor_batch(model, size, rng) for _ in range(batches_per_size)]
                for size in batch_sizes
            }
        )
    needed = max(batch_sizes) * batches_per_size
    if sentences:
        order = rng.permutation(len(sentences))
        pool = [sentences[order[i % len(sentences)]] for i in range(needed)]
    else:
        pool = generate_sentences(
            needed,
            model.tokenizer,
            rng,
            token_range=token_range,
            max_tokens=model.max_length or 512,
        )
    batches = {
        size: [tokenize(model, pool[i * size : (i + 1) * size]) for i in range(batches_per_size)]
        for size in batch_sizes
    }
    return Workload(batches, tuple(pool))


def tokenize(model: Model, sentences: Sequence[str]) -> Batch:
    """One padded batch with exactly the model's input names and dtypes."""
    return encode_texts(model.tokenizer, model.spec, model.max_length, sentences)


def encode_texts(
    tokenizer: Any, spec: InputSpec, max_length: int | None, texts: Sequence[str]
) -> Batch:
    """`texts` tokenized and truncated as the model was, padded to the longest, with exactly
    the input names and dtypes of `spec`: for a loaded model and an output directory alike."""
    encoded = tokenizer(
        list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="np"
    )
    return {t.name: encoded[t.name].astype(t.dtype) for t in spec.inputs}


# Model input -> the field of a `tokenizers.Encoding` that holds it.
_ENCODING_FIELDS = {
    "input_ids": "ids",
    "attention_mask": "attention_mask",
    "token_type_ids": "type_ids",
}


class TextEncoder:
    """`encode_texts` for one tokenizer, called per request by a server. A fast (Rust)
    tokenizer is called directly, on its own copy with the truncation and padding transformers
    would set on every call set once: for one sentence the wrapper costs as much as the
    tokenizing (84 vs 40 us here). Anything else goes through `encode_texts`; tests hold the
    two to the same arrays."""

    def __init__(self, tokenizer: Any, spec: InputSpec, max_length: int | None) -> None:
        self._tokenizer, self._spec, self._max_length = tokenizer, spec, max_length
        self._backend = self._direct_backend()

    @property
    def direct(self) -> bool:
        """Whether the Rust tokenizer is called directly."""
        return self._backend is not None

    def __call__(self, texts: Sequence[str]) -> Batch:
        if self._backend is None:
            return encode_texts(self._tokenizer, self._spec, self._max_length, texts)
        encodings = self._backend.encode_batch(list(texts))
        return {
            t.name: np.array([getattr(e, _ENCODING_FIELDS[t.name]) for e in encodings], t.dtype)
            for t in self._spec.inputs
        }

    def _direct_backend(self) -> Any:
        tokenizer = self._tokenizer
        shared: Any = getattr(tokenizer, "backend_tokenizer", None)
        direct = (
            shared is not None
            and self._max_length is not None
            and tokenizer.pad_token_id is not None
            and all(t.name in _ENCODING_FIELDS for t in self._spec.inputs)
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
        backend.enable_padding(
            direction=tokenizer.padding_side,
            pad_id=tokenizer.pad_token_id,
            pad_type_id=tokenizer.pad_token_type_id,
            pad_token=tokenizer.pad_token,
        )
        return backend


def tensor_batch(model: Model, batch_size: int, rng: np.random.Generator) -> Batch:
    """Random inputs of one batch; other dynamic axes keep the example inputs' sizes."""
    return random_inputs(model.spec, {**example_dims(model), BATCH: batch_size}, rng)


def example_dims(model: Model) -> dict[str, int]:
    """Size of each named dynamic axis in the model's example inputs."""
    dims: dict[str, int] = {}
    for t in model.spec.inputs:
        for axis, name in t.dynamic_axes.items():
            dims.setdefault(name, int(model.example_inputs[t.name].shape[axis]))
    return dims


def read_user_data(model: Model, path: Path, batch_size: int = 32) -> tuple[Any, list[Batch]]:
    """What a user metric receives (the data as read) and the model's inputs made from it, in
    order, `batch_size` samples per batch. Text models read a .txt file (one sentence per
    line: the data is the list of sentences) or .jsonl (one object per line with a "text"
    field: the data is the list of objects, labels included); tensor models read an .npz
    holding every input by name (the data is the dict of all its arrays)."""
    if not path.is_file():
        raise BadInput(f"{path} does not exist: give the data file the metric scores")
    if model.is_text:
        records: list[Any] = _read_text_records(path)
        texts = [r if isinstance(r, str) else r["text"] for r in records]
        chunks = [texts[i : i + batch_size] for i in range(0, len(texts), batch_size)]
        return records, [tokenize(model, chunk) for chunk in chunks]
    try:
        with np.load(path) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (OSError, ValueError) as err:
        raise BadInput(
            f"{path} is not an .npz file ({err}): save the inputs with np.savez"
        ) from err
    missing = [name for name in model.spec.input_names if name not in arrays]
    if missing:
        raise BadInput(f"{path} lacks the model's inputs {missing}; it has {sorted(arrays)}")
    count = len(arrays[model.spec.input_names[0]])
    batches = [
        {name: arrays[name][i : i + batch_size] for name in model.spec.input_names}
        for i in range(0, count, batch_size)
    ]
    return arrays, batches


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


def verification_batches(model: Model) -> list[Batch]:
    """Three shapes unlike the traced example: one short item alone, a padded odd-sized batch of
    mixed lengths, and a batch of long items."""
    rng = np.random.default_rng(1234)
    if model.is_text:
        longest = min(model.max_length or 128, 128)
        shapes = [(1, (3, 8)), (3, None), (2, (max(4, longest - 28), longest))]
        return [
            tokenize(
                model,
                generate_sentences(
                    size,
                    model.tokenizer,
                    rng,
                    token_range=token_range,
                    max_tokens=longest,
                ),
            )
            for size, token_range in shapes
        ]
    dims = example_dims(model)
    sequence = dims.get(SEQUENCE, 8)
    variants = [(1, sequence), (3, sequence + 5), (7, max(1, sequence // 2))]
    return [
        random_inputs(model.spec, {**dims, BATCH: batch, SEQUENCE: seq}, rng)
        for batch, seq in variants
    ]
