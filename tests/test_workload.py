from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mahir.errors import BadInput
from mahir.families.text import TextEncoder, encode_texts, generate_sentences
from mahir.model import Model
from mahir.workload import Workload, read_sentences


def test_generated_text_is_short_skewed_with_a_long_tail(minilm: Model) -> None:
    rng = np.random.default_rng(0)
    sentences = generate_sentences(400, minilm.family.tokenizer, rng, max_tokens=256)
    lengths = np.array([len(minilm.family.tokenizer(s)["input_ids"]) for s in sentences])
    assert 12 <= np.median(lengths) <= 30
    assert np.mean(lengths) > np.median(lengths)  # right-skewed
    assert lengths.max() > 3 * np.median(lengths)
    assert lengths.max() <= 256 + 8  # one word may overshoot the target by a few tokens


def test_token_range_is_respected(minilm: Model) -> None:
    rng = np.random.default_rng(0)
    sentences = generate_sentences(50, minilm.family.tokenizer, rng, token_range=(64, 128))
    lengths = [len(minilm.family.tokenizer(s)["input_ids"]) for s in sentences]
    assert min(lengths) >= 64
    assert max(lengths) <= 128 + 8


def test_text_batches_are_padded_per_batch(minilm: Model) -> None:
    workload = minilm.family.workload([1, 4], batches_per_size=3)
    assert sorted(workload.batches) == [1, 4]
    for size, batches in workload.batches.items():
        assert len(batches) == 3
        for batch in batches:
            assert set(batch) == set(minilm.spec.input_names)
            assert batch["input_ids"].shape[0] == size
            assert batch["input_ids"].dtype == np.int64
            # padded to the longest sentence of this batch, not to a global maximum
            assert batch["attention_mask"].sum(axis=1).max() == batch["input_ids"].shape[1]


def test_user_sentences_are_used(minilm: Model, tmp_path: Path) -> None:
    data = tmp_path / "data.txt"
    data.write_text("first query\n\nsecond, rather longer query about latency\n")
    sentences = read_sentences(data)
    assert sentences == ["first query", "second, rather longer query about latency"]
    workload = minilm.family.workload([2], texts=sentences, batches_per_size=2)
    assert set(workload.texts) == set(sentences)


def test_tensor_workload_follows_the_spec(cnn: Model) -> None:
    workload = cnn.family.workload([1, 5], batches_per_size=2)
    assert workload.batches[5][0]["image"].shape == (5, 3, 32, 32)
    assert workload.batches[1][1]["image"].dtype == np.float32
    assert workload.texts == ()


def test_save_and_load_round_trip(minilm: Model, tmp_path: Path) -> None:
    workload = minilm.family.workload([1, 3], batches_per_size=2)
    path = tmp_path / "w.npz"
    workload.save(path)
    loaded = Workload.load(path)
    assert loaded.texts == workload.texts
    assert sorted(loaded.batches) == [1, 3]
    for size in (1, 3):
        for a, b in zip(loaded.batches[size], workload.batches[size], strict=True):
            assert a.keys() == b.keys()
            for name in a:
                np.testing.assert_array_equal(a[name], b[name])
    tokens = loaded.describe(minilm.family.token_lengths)["tokens"]
    assert tokens["max"] >= tokens["min"]


def test_bad_data_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(BadInput, match="has no sentences"):
        read_sentences(empty)
    with pytest.raises(BadInput, match="cannot read sentences"):
        read_sentences(tmp_path / "missing.txt")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(BadInput, match="not a mahir workload"):
        Workload.load(junk)


def test_the_direct_text_encoder_gives_what_transformers_gives(minilm: Model) -> None:
    encoder = TextEncoder(minilm.family.tokenizer, minilm.spec, minilm.family.max_length)
    assert encoder.direct
    long_text = "a very long sentence about nothing in particular " * 80  # past max_length
    cases = [
        ["mahir makes trained models fast."],
        ["short", "a rather longer sentence, with punctuation; and more words in it!", ""],
        [long_text, "and a short one"],
        ["Ünïcödé, emoji \U0001f680 and tabs\tand   spaces", "  leading and trailing  "],
        generate_sentences(16, minilm.family.tokenizer, np.random.default_rng(3)),
    ]
    for texts in cases:
        expected = encode_texts(
            minilm.family.tokenizer, minilm.spec, minilm.family.max_length, texts
        )
        got = encoder(texts)
        assert sorted(got) == sorted(expected)
        for name, array in expected.items():
            assert got[name].dtype == array.dtype
            np.testing.assert_array_equal(got[name], array, err_msg=f"{name} for {texts[:1]}")
    assert encoder([long_text])["input_ids"].shape[1] == minilm.family.max_length
    # The encoder sets its own copy: the tokenizer the model shares is left as it was.
    TextEncoder(minilm.family.tokenizer, minilm.spec, 8)([long_text])
    shared = minilm.family.tokenizer.backend_tokenizer.encode(long_text)
    assert len(shared.ids) != 8
