"""The f32 GGUF writer: the file transformers reads back is the reference, tensor for tensor
(names, the query/key permutation, the tokenizer and its chat template), parsed once for all
three, and the folder that read is kept in loads the same; it is written once per source and
reused; architectures it does not cover are refused in one line."""

from __future__ import annotations

import shutil
from pathlib import Path

import gguf
import pytest
import torch

from mahir.errors import Unsupported
from mahir.export.gguf import f32_gguf, unwritable
from mahir.export.hf_folder import reference_folder
from mahir.families.decoder import LanguageModel, gguf_reference_folder
from mahir.files import CACHE_ENV
from mahir.model import load_model
from mahir.types import Artifact


def test_the_file_reads_back_as_the_reference(
    tiny_llm: LanguageModel, tiny_gguf: Artifact, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert tiny_gguf.path is not None
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))  # nothing kept yet: the file is read
    opened: list[str] = []
    open_reader = gguf.GGUFReader

    def counted(path: str, *args: object, **kwargs: object) -> object:
        opened.append(str(path))
        return open_reader(path, *args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", counted)
    back = load_model(tiny_gguf.path, llm=True)  # transformers' own GGUF reader
    assert opened == [str(tiny_gguf.path)]  # parsed once for tokenizer, config and weights
    assert gguf.GGUFReader is counted  # and gguf as it was
    ids = torch.tensor([tiny_llm.family.prompt_ids("What is the capital of France?")])
    with torch.inference_mode():
        expected = tiny_llm.module(input_ids=ids).logits
        got = back.module(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert back.family.chat
    assert back.family.stop_token_ids == tiny_llm.family.stop_token_ids
    assert back.family.vocab_size == tiny_llm.family.vocab_size
    assert tiny_gguf.meta["gguf_type"] == "F32"
    kept = load_model(gguf_reference_folder(tiny_gguf.path), llm=True)  # what later loads read
    with torch.inference_mode():
        assert torch.equal(kept.module(input_ids=ids).logits, got)
    assert kept.family.prompt_ids("What is the capital of France?") == ids[0].tolist()
    shutil.rmtree(gguf_reference_folder(tiny_gguf.path))  # gone since: vLLM's folder is kept again
    again = reference_folder(back).path
    assert again == gguf_reference_folder(tiny_gguf.path)
    assert list(again.glob("*.safetensors"))


def test_a_written_file_is_reused(tiny_llm: LanguageModel, tiny_gguf: Artifact) -> None:
    assert tiny_gguf.path is not None
    written = tiny_gguf.path.stat().st_mtime_ns
    again = f32_gguf(tiny_llm, folder=tiny_gguf.path.parent)
    assert again.path == tiny_gguf.path
    assert again.path.stat().st_mtime_ns == written
    assert [p.name for p in tiny_gguf.path.parent.iterdir()] == [tiny_gguf.path.name]


def test_other_architectures_are_refused_in_one_line(
    decoder_folders: dict[str, Path], tmp_path: Path
) -> None:
    qwen2 = load_model(decoder_folders["qwen2"], llm=True)
    why = unwritable(qwen2)
    assert why is not None
    assert "not Qwen2ForCausalLM" in why
    with pytest.raises(Unsupported, match=r"convert_hf_to_gguf\.py") as raised:
        f32_gguf(qwen2, folder=tmp_path)
    assert "\n" not in str(raised.value)
    assert not list(tmp_path.iterdir())
