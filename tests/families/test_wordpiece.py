import copy
import string
from typing import Any

import numpy as np
import pytest
from tokenizers import normalizers, pre_tokenizers

from mahir.families.wordpiece import PLAIN, AsciiWordPiece
from mahir.model import Model


def _backend(minilm: Model, max_length: int) -> Any:
    backend = copy.deepcopy(minilm.family.tokenizer.backend_tokenizer)
    backend.enable_truncation(max_length)
    backend.no_padding()
    return backend


def _random_texts(vocabulary: list[str], count: int, seed: int) -> list[str]:
    """Plain text of every kind the fast path takes (vocabulary words in any case, words it
    lacks, words too long for WordPiece, punctuation, digits, tabs and line breaks) and text it
    must hand to the Rust tokenizer (accents, emoji, control characters, special tokens)."""
    rng = np.random.default_rng(seed)
    soup = list(string.ascii_letters + string.digits + string.punctuation + " \t\n\r")
    lowercase = list(string.ascii_lowercase)
    odd = ["café", "naïve", "\U0001f680", "\x0b", "\x00", "\x7f", "[MASK]", "[cls]", "日本"]

    def known() -> str:
        return vocabulary[rng.integers(len(vocabulary))]

    def word() -> str:
        kind = rng.integers(6)
        if kind == 0:
            return known().upper()
        if kind == 1:
            return "".join(rng.choice(lowercase, rng.integers(4, 14)))
        if kind == 2:
            return "".join(rng.choice(soup, rng.integers(1, 8)))
        if kind == 3 and rng.random() < 0.05:
            return "x" * int(rng.integers(95, 110))  # about WordPiece's 100-character limit
        if kind == 4 and rng.random() < 0.1:
            return odd[rng.integers(len(odd))]
        return known()

    texts = [" ".join(word() for _ in range(rng.integers(0, 40))) for _ in range(count)]
    return [*texts, "", " ", "\t\n", "a", "Hello, World!", "#hash ##piece", "x" * 101, "\u00a0"]


def _rows(fast: AsciiWordPiece, texts: list[str]) -> list[list[int]]:
    """`fast.encode`'s ids, one list a text."""
    ids, lengths = fast.encode(texts)
    assert ids.dtype == lengths.dtype == np.int64
    assert len(lengths) == len(texts)
    assert lengths.sum() == len(ids)
    ends = np.cumsum(lengths)
    return [ids[end - length : end].tolist() for end, length in zip(ends, lengths, strict=True)]


@pytest.mark.parametrize("max_length", [256, 9])
def test_plain_text_gets_the_ids_the_rust_tokenizer_gives(minilm: Model, max_length: int) -> None:
    backend = _backend(minilm, max_length)
    fast = AsciiWordPiece.of(backend)
    assert fast is not None
    assert fast.lowercase
    words = [w for w in backend.get_vocab() if w.isalpha()]
    texts = _random_texts(words, 1500, seed=max_length)
    expected = [e.ids for e in backend.encode_batch_fast(texts)]
    assert _rows(fast, texts) == expected
    assert fast.remembered  # words outside the vocabulary went through the fast path
    assert fast.lean is None
    lean = AsciiWordPiece.of(backend, in_python=False)  # plain text by the lean Rust pipeline
    assert lean is not None
    assert _rows(lean, texts) == expected
    assert _rows(fast, []) == _rows(lean, []) == []


@pytest.mark.parametrize("max_length", [256, 9])
def test_a_batch_of_plain_text_alone_is_tokenized_whole(minilm: Model, max_length: int) -> None:
    """The path where no text of the batch needs the Rust tokenizer: the batch joined into one
    string, including empty texts and words outside the vocabulary or too long for WordPiece."""
    backend = _backend(minilm, max_length)
    fast = AsciiWordPiece.of(backend)
    assert fast is not None
    words = [w for w in backend.get_vocab() if w.isalpha()]
    specials = fast.written_specials
    assert specials is not None
    texts = [
        t
        for t in _random_texts(words, 600, seed=7)
        if PLAIN.fullmatch(t) and not specials.search(t)
    ]
    texts += ["", "zzyzxq, qwvj! " * 3, "x" * 150, "a\tb\nc\r"]
    assert len(texts) > 300
    expected = [e.ids for e in backend.encode_batch_fast(texts)]
    fast.remembered.clear()
    assert _rows(fast, texts) == expected
    assert "zzyzxq" in fast.remembered  # split by WordPiece, then remembered
    assert _rows(fast, [""]) == [[*fast.prefix, *fast.suffix]]


def test_a_cased_bert_keeps_its_case(minilm: Model) -> None:
    backend = _backend(minilm, 128)
    backend.normalizer = normalizers.BertNormalizer(lowercase=False)
    fast = AsciiWordPiece.of(backend)
    assert fast is not None
    assert not fast.lowercase
    words = [w for w in backend.get_vocab() if w.isalpha()]
    texts = _random_texts(words, 300, seed=1)
    expected = [e.ids for e in backend.encode_batch_fast(texts)]
    lean = AsciiWordPiece.of(backend, in_python=False)
    assert lean is not None
    assert _rows(fast, texts) == _rows(lean, texts) == expected
    assert lean.lean.normalizer is None


def test_another_pipeline_is_left_to_the_rust_tokenizer(minilm: Model) -> None:
    lowercase_only = _backend(minilm, 128)
    lowercase_only.normalizer = normalizers.Lowercase()
    whitespace = _backend(minilm, 128)
    whitespace.pre_tokenizer = pre_tokenizers.Whitespace()
    left = _backend(minilm, 128)
    left.enable_truncation(128, direction="left")
    untruncated = _backend(minilm, 128)
    untruncated.no_truncation()
    for backend in (lowercase_only, whitespace, left, untruncated):
        assert AsciiWordPiece.of(backend) is None
