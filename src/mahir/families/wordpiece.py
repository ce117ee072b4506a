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

That Python holds the GIL as it works. Where another thread needs the GIL as much (the one
feeding a GPU) plain text goes instead to a lean copy of the Rust tokenizer, whose normalizer is
only what BERT's comes to on it (lowercasing): the same ids, without the GIL, and 1.7x faster
than the full pipeline on one thread (1.4x on two), because the full normalizer's Unicode work
is what costs.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tokenizers import normalizers

PLAIN = re.compile(r"[\x20-\x7e\t\n\r]*")
"""Text this path tokenizes (whole match): printable ASCII, tabs and line breaks."""
WORD = re.compile(r"[A-Za-z0-9]+|[!-/:-@\[-`{-~]")
"""BERT's pre-tokenizer on such text: runs of letters and digits, and each punctuation mark
alone (Rust's `is_ascii_punctuation`); whitespace only separates."""
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
    vocabulary: dict[str, int]
    lowercase: bool
    longest_word: int
    """Characters a word may have before WordPiece calls it unknown."""
    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    """The special tokens the template puts around one sentence."""
    pieces: int
    """Word pieces a sentence keeps under the truncation."""
    written_specials: re.Pattern[str] | None
    """Any added token (e.g. [MASK]) written in the text: the Rust tokenizer matches those."""
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
        return cls(
            backend=backend,
            lean=lean,
            vocabulary=vocabulary,
            lowercase=lowercase,
            longest_word=int(spec["model"]["max_input_chars_per_word"]),
            prefix=prefix,
            suffix=suffix,
            pieces=pieces,
            written_specials=re.compile("|".join(added), re.IGNORECASE) if added else None,
        )

    def ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's ids, in order: plain text in Python or by the lean Rust tokenizer; the
        texts that are not plain go to the full one, in one call."""
        plain: list[int] = []
        others: list[int] = []
        for i, text in enumerate(texts):
            takes = PLAIN.fullmatch(text) and not (
                self.written_specials and self.written_specials.search(text)
            )
            (plain if takes else others).append(i)
        rows: list[list[int]] = [[] for _ in texts]
        if self.lean is None:
            for i in plain:
                rows[i] = self._plain(texts[i])
        else:
            _encode_into(rows, plain, texts, self.lean)
        _encode_into(rows, others, texts, self.backend)
        return rows

    def _plain(self, text: str) -> list[int]:
        pieces: list[int] = []
        vocabulary, longest = self.vocabulary, self.longest_word
        for word in WORD.findall(text.lower() if self.lowercase else text):
            known = vocabulary.get(word) if len(word) <= longest else None
            if known is None:
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


def _encode_into(rows: list[list[int]], which: list[int], texts: Sequence[str], rust: Any) -> None:
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
