"""The text family: sentences like traffic, batches padded per batch, the direct tokenizer."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from mahir.families import open_tokenizer
from mahir.families.text import TextEncoder, encode_texts, generate_sentences
from mahir.model import Model
from mahir.workload import read_sentences


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


def test_the_direct_text_encoder_gives_what_transformers_gives(minilm: Model) -> None:
    long_text = "a very long sentence about nothing in particular " * 80  # past max_length
    cases = [
        ["mahir makes trained models fast."],
        ["short", "a rather longer sentence, with punctuation; and more words in it!", ""],
        [long_text, "and a short one"],
        ["Ünïcödé, emoji \U0001f680 and tabs\tand   spaces", "  leading and trailing  "],
        generate_sentences(16, minilm.family.tokenizer, np.random.default_rng(3)),
    ]
    left = copy.deepcopy(minilm.family.tokenizer)
    left.padding_side = "left"
    typed = _with_type_ids_of_its_own(minilm.family.tokenizer)
    encoders = [
        (tokenizer, TextEncoder(tokenizer, minilm.spec, minilm.family.max_length, in_python=p))
        for tokenizer in (minilm.family.tokenizer, left, typed)
        for p in (True, False)
    ]
    # BERT's template in Python where asked, except where type ids vary within a sentence
    assert [e.plain_text for _, e in encoders] == [
        *("python", "lean rust") * 2,
        *("rust", "rust"),
    ]
    for tokenizer, encoder in encoders:
        assert encoder.direct
        for texts in cases:
            expected = encode_texts(tokenizer, minilm.spec, minilm.family.max_length, texts)
            got = encoder(texts)
            assert sorted(got) == sorted(expected)
            for name, array in expected.items():
                assert got[name].dtype == array.dtype
                np.testing.assert_array_equal(got[name], array, err_msg=f"{name}: {texts[:1]}")
    assert set(np.unique(encoder(["two words"])["token_type_ids"])) == {0, 1}
    assert encoder([long_text])["input_ids"].shape[1] == minilm.family.max_length
    assert encoder([])["input_ids"].shape == (0, 0)
    # The encoder sets its own copy: the tokenizer the model shares is left as it was.
    TextEncoder(minilm.family.tokenizer, minilm.spec, 8)([long_text])
    shared = minilm.family.tokenizer.backend_tokenizer.encode(long_text)
    assert len(shared.ids) != 8


def _with_type_ids_of_its_own(tokenizer: Any) -> Any:
    """A copy of `tokenizer` whose template gives [SEP] another type id than the text, so
    that type ids vary within a sentence."""
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    backend = copy.deepcopy(tokenizer.backend_tokenizer)
    specials = [(t, tokenizer.convert_tokens_to_ids(t)) for t in ("[CLS]", "[SEP]")]
    backend.post_processor = TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:1",
        pair="[CLS]:0 $A:0 [SEP]:1 $B:1 [SEP]:1",
        special_tokens=specials,
    )
    names = ["input_ids", "token_type_ids", "attention_mask"]
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", model_input_names=names
    )


def test_a_saved_tokenizer_opens_as_autotokenizer_opens_it_without_torch(
    served_dir: Path,
) -> None:
    """A server of an ONNX directory loads neither torch nor transformers' model registry
    (half its start-up), and the tokenizer it opens is AutoTokenizer's, id for id."""
    import transformers

    folder = served_dir / "tokenizer"
    opened, auto = open_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)
    assert type(opened) is type(auto)
    texts = ["Héllo, WORLD!", "a much longer sentence " * 40, ""]
    assert opened(texts, truncation=True).input_ids == auto(texts, truncation=True).input_ids
    script = (
        f"import sys, mahir; mahir.load({str(served_dir)!r}); "
        "print(sorted(m for m in ('torch', 'transformers.models.auto') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
