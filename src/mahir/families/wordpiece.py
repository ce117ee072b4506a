"""BERT's WordPiece tokenizing of plain ASCII text, without the Rust tokenizer's bookkeeping.

The Rust tokenizer (`tokenizers`) records, for every character of every sentence, where it
came from in the original text, through each stage of its pipeline. For BERT's pipeline that
record is most of the work: a 17-word sentence takes ~40 us on one thread here, ~35 of them in
the normalizer (which also decomposes Unicode to strip accents) and the pre-tokenizer, and
embedding text on a GPU waits for the tokenizer (README, "GPUs"). On text made only of
printable ASCII, tabs and line breaks those two stages come down to: lowercase (where the model
does), split at whitespace, and make each ASCII punctuation mark a word of its own. Most words
are then one entry of the vocabulary; the others go through the tokenizer's own WordPiece model
once and are remembered. Every other sentence (non-ASCII, control characters, a special token
written out) goes through the Rust tokenizer whole, and `AsciiWordPiece.of` takes only a
tokenizer whose pipeline is exactly BERT's. Tests hold the two to the same ids on random text.

A batch is tokenized at once, not sentence by sentence: its plain texts are joined into one
string with a separator no plain text holds, split into words and separators by C string
methods, one dictionary lookup per word gives the ids, and numpy cuts them back into
sentences, truncates them and puts the specials around each. Only the words outside the
vocabulary go through Python one by one, so Python does almost nothing per sentence.

That Python holds the GIL as it works. Where another thread needs the GIL as much (the one
feeding a GPU) plain text can go instead to a lean copy of the Rust tokenizer, whose normalizer
is only what BERT's comes to on it (lowercasing): the same ids, without the GIL, and 1.7x faster
than the full pipeline on one thread (1.4x on two), because the full normalizer's Unicode work
is what costs.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tokenizers import normalizers

PLAIN = re.compile(r"[\x20-\x7e\t\n\r]*")
"""Text this path tokenizes (whole match): printable ASCII, tabs and line breaks."""
SEPARATOR = "\x00"
"""Between the texts of a batch joined into one string: not plain, so no plain text holds it."""
PLAIN_OR_SEPARATOR = re.compile(r"[\x20-\x7e\t\n\r\x00]*")
SPACED = tuple((mark, f" {mark} ") for mark in string.punctuation + SEPARATOR)
"""Each ASCII punctuation mark and the separator with spaces around it: then `str.split` cuts
plain text where BERT's pre-tokenizer does (runs of letters and digits, and each punctuation
mark alone, as Rust's `is_ascii_punctuation`; whitespace only separates), ~3x faster than a
regular expression's scan."""
END, OUTSIDE = -1, -2
"""What the batch lookup gives a separator, and a word the vocabulary lacks."""
JOINED = 16
"""Texts in a batch from which the joined path pays for its fixed cost (~30 numpy calls)."""
REMEMBERED = 1 << 16
"""Words outside the vocabulary whose pieces are kept: a server's traffic cannot grow it
without bound."""


@dataclass(slots=True)
class AsciiWordPiece:
    """Token ids of sentences as `backend` (a `tokenizers.Tokenizer` with BERT's pipeline and the
    model's truncation) gives them, the plain ASCII ones without its pipeline."""

    backend: Any
    lean: Any | None
    """`backend` with its normalizer cut to what it does on plain text, where plain text goes to
    Rust; None where it is tokenized in Python."""
    lowercase: bool
    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    """The special tokens the template puts around one sentence."""
    pieces: int
    """Word pieces a sentence keeps under the truncation."""
    written_specials: re.Pattern[str] | None
    """Any added token (e.g. [MASK]) written in the text: the Rust tokenizer matches those."""
    lookup: _Lookup
    """The vocabulary's words WordPiece may take whole (no longer than its
    `max_input_chars_per_word`), the separator as END, every other word OUTSIDE."""
    remembered: dict[str, list[int]] = field(default_factory=dict)

    @classmethod
    def of(cls, backend: Any, *, in_python: bool = True) -> AsciiWordPiece | None:
        """For `backend` if its pipeline is BERT's (normalizer, pre-tokenizer, WordPiece) with
        right-side truncation and a template that wraps one sentence in fixed tokens; else
        None. `in_python` False: plain text goes to a lean copy of `backend` (made only then:
        a copy costs ~50 ms)."""
        spec = json.loads(backend.to_str())
        normalizer, pre = spec.get("normalizer") or {}, spec.get("pre_tokenizer") or {}
        truncation = backend.truncation
        if (
            normalizer.get("type") != "BertNormalizer"
            or pre.get("type") != "BertPreTokenizer"
            or spec["model"].get("type") != "WordPiece"
            or truncation is None
            or truncation["direction"] != "right"
        ):
            return None
        vocabulary = backend.get_vocab(with_added_tokens=False)
        wrapped = _wrapping(backend, vocabulary)
        if wrapped is None:
            return None
        prefix, suffix = wrapped
        pieces = truncation["max_length"] - len(prefix) - len(suffix)
        if pieces < 1:
            return None
        added = [re.escape(t["content"]) for t in spec.get("added_tokens") or ()]
        lowercase = bool(normalizer.get("lowercase"))
        lean = None if in_python else copy.deepcopy(backend)
        if lean is not None:
            lean.normalizer = normalizers.Lowercase() if lowercase else None
        longest = int(spec["model"]["max_input_chars_per_word"])
        lookup = _Lookup({w: i for w, i in vocabulary.items() if len(w) <= longest})
        lookup[SEPARATOR] = END
        return cls(
            backend=backend,
            lean=lean,
            lowercase=lowercase,
            prefix=prefix,
            suffix=suffix,
            pieces=pieces,
            written_specials=re.compile("|".join(added), re.IGNORECASE) if added else None,
            lookup=lookup,
        )

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Every text's ids end to end (int64) and each text's count of them: plain text in
        Python or by the lean Rust tokenizer; the texts that are not plain go to the full one,
        in one call."""
        joined = SEPARATOR.join(texts)
        plain = self._plain_indices(texts, joined)
        at_once = self.lean is None and len(texts) >= JOINED
        if at_once and len(plain) == len(texts):
            return self._joined(joined, len(texts))
        rows: list[Any] = [None] * len(texts)
        taken = set(plain)
        others = [i for i in range(len(texts)) if i not in taken]
        if at_once and plain:
            ids, lengths = self._joined(SEPARATOR.join(texts[i] for i in plain), len(plain))
            for i, row in zip(plain, np.split(ids, np.cumsum(lengths)[:-1]), strict=True):
                rows[i] = row
        elif self.lean is None:
            for i in plain:
                rows[i] = self._sentence(texts[i])
        else:
            _encode_into(rows, plain, texts, self.lean)
        _encode_into(rows, others, texts, self.backend)
        return flatten(rows)

    def _plain_indices(self, texts: Sequence[str], joined: str) -> list[int]:
        """Which texts are plain and write no special token; the whole batch (`joined`, the
        texts with SEPARATOR between them) checked first."""
        specials = self.written_specials
        if (
            joined.count(SEPARATOR) == len(texts) - 1
            and PLAIN_OR_SEPARATOR.fullmatch(joined)
            and not (specials and specials.search(joined))
        ):
            return list(range(len(texts)))
        return [
            i
            for i, text in enumerate(texts)
            if PLAIN.fullmatch(text) and not (specials and specials.search(text))
        ]

    def _joined(self, joined: str, texts: int) -> tuple[np.ndarray, np.ndarray]:
        """`encode` of `texts` plain texts, `joined` with SEPARATOR between them: one scan,
        ids by one lookup per word."""
        joined = joined + SEPARATOR if texts else ""  # every text ends at a separator
        words = _words(joined.lower() if self.lowercase else joined)
        ids = np.fromiter(map(self.lookup.__getitem__, words), np.int64, len(words))
        outside = np.flatnonzero(ids == OUTSIDE)
        if len(outside):
            parts = np.split(ids, outside)
            pieces = [np.array(self._word_pieces(words[i]), np.int64) for i in outside]
            chunks = [parts[0]]
            for piece, part in zip(pieces, parts[1:], strict=True):
                chunks += (piece, part[1:])
            ids = np.concatenate(chunks)
        ends = np.flatnonzero(ids == END)
        counts = np.diff(ends, prepend=-1) - 1
        within = np.arange(len(ids)) - np.repeat(ends - counts, counts + 1)
        body = ids[(ids != END) & (within < self.pieces)]
        kept = np.minimum(counts, self.pieces)
        prefix, suffix = len(self.prefix), len(self.suffix)
        lengths = kept + prefix + suffix
        out = np.empty(int(lengths.sum()), np.int64)
        starts = np.cumsum(lengths) - lengths
        for offset, token in enumerate(self.prefix):
            out[starts + offset] = token
        for offset, token in enumerate(self.suffix):
            out[starts + prefix + kept + offset] = token
        before = np.cumsum(kept) - kept
        out[np.repeat(starts + prefix - before, kept) + np.arange(len(body))] = body
        return out, lengths

    def _sentence(self, text: str) -> list[int]:
        """The ids of one plain text, in Python alone: a few sentences cost less this way than
        the numpy calls of `_joined`."""
        lookup, pieces = self.lookup, []
        for word in _words(text.lower() if self.lowercase else text):
            known = lookup[word]
            if known == OUTSIDE:
                pieces += self._word_pieces(word)
            else:
                pieces.append(known)
        return [*self.prefix, *pieces[: self.pieces], *self.suffix]

    def _word_pieces(self, word: str) -> list[int]:
        """WordPiece's split of a word outside the vocabulary ([UNK] where it has none)."""
        known = self.remembered.get(word)
        if known is None:
            known = [token.id for token in self.backend.model.tokenize(word)]
            if len(self.remembered) < REMEMBERED:
                self.remembered[word] = known
        return known


def _words(text: str) -> list[str]:
    """The words and separators of plain `text`, in order (`SPACED`)."""
    for mark, spaced in SPACED:
        if mark in text:
            text = text.replace(mark, spaced)
    return text.split()


class _Lookup(dict[str, int]):
    """The vocabulary, answering OUTSIDE for a word it lacks (read through `__getitem__`, so a
    hit costs no Python call)."""

    def __missing__(self, word: str) -> int:
        return OUTSIDE


def flatten(rows: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ids end to end (int64) and each row's length."""
    if len(rows) == 1:  # a server's single sentence: one conversion, no reduction
        return np.asarray(rows[0], np.int64), np.array([len(rows[0])], np.int64)
    lengths = np.fromiter(map(len, rows), np.int64, len(rows))
    flat = np.fromiter(itertools.chain.from_iterable(rows), np.int64, int(lengths.sum()))
    return flat, lengths


def _encode_into(rows: list[Any], which: list[int], texts: Sequence[str], rust: Any) -> None:
    """The ids of the texts at `which` into `rows`, from one call of the Rust tokenizer `rust`."""
    if which:
        encodings = rust.encode_batch_fast([texts[i] for i in which])
        for i, encoding in zip(which, encodings, strict=True):
            rows[i] = encoding.ids


def _wrapping(
    backend: Any, vocabulary: dict[str, int]
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The ids the template puts before and after a sentence, read from two probes (one word,
    two words) that must agree; None where the template does something else."""
    first, second = vocabulary.get("a"), vocabulary.get("b")
    if first is None or second is None:
        return None
    one, two = backend.encode("a").ids, backend.encode("a b").ids
    if one.count(first) != 1:
        return None
    at = one.index(first)
    prefix, suffix = tuple(one[:at]), tuple(one[at + 1 :])
    if two != [*prefix, first, second, *suffix]:
        return None
    return prefix, suffix
