"""Prompt workloads for decoder LLMs: what `mahir bench --llm` times every engine on.

Time to first token grows with the prompt, and time per output token with what the KV cache
holds, so a workload spreads both: prompt lengths log-uniform over a range (default 32-1,024
tokens: as many short chat turns as long documents) and new tokens uniform over another
(default 64-256), seeded. Generated prompts are small tasks over excerpts of text that ships
with mahir (`data/llm_prompts.txt`, never the held-out text fidelity is judged on), wrapped in
the model's chat template. The user's prompts come from a file: `.txt`, one prompt per line, or
`.jsonl`, one object per line with "prompt" (or "text") or chat "messages", and optionally
"max_new_tokens". Imports the decoder family, errors and numpy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mahir.errors import BadInput
from mahir.families.decoder import Decoder

PROMPT_TEXT = Path(__file__).parent.parent / "data" / "llm_prompts.txt"
PROMPT_TOKENS = (32, 1024)
NEW_TOKENS = (64, 256)
TASKS = (
    "Summarize the following text in three sentences.\n\n{text}",
    "What is the main point of this passage? Answer briefly.\n\n{text}",
    "Continue the following text for a few more paragraphs.\n\n{text}",
    "Write three questions a reader might ask about this text, and answer them.\n\n{text}",
)


@dataclass(frozen=True, slots=True)
class Prompt:
    """One request: the prompt's token ids (chat template applied) and how many new tokens to
    generate."""

    ids: tuple[int, ...]
    max_new_tokens: int


@dataclass(frozen=True)
class PromptWorkload:
    """Prompts to time engines on, and where they came from."""

    prompts: tuple[Prompt, ...]
    origin: str
    """"generated" or the user's file."""

    def describe(self) -> dict[str, Any]:
        lengths = [len(p.ids) for p in self.prompts]
        new = [p.max_new_tokens for p in self.prompts]
        return {
            "origin": self.origin,
            "prompts": len(self.prompts),
            "prompt_tokens": _spread(lengths),
            "new_tokens": _spread(new),
        }


def _spread(values: list[int]) -> dict[str, float]:
    return {"min": min(values), "median": float(np.median(values)), "max": max(values)}


def check_range(option: str, limits: tuple[int, int]) -> None:
    low, high = limits
    if not 1 <= low <= high:
        raise BadInput(f"{option} {low}-{high} is empty: give MIN-MAX with 1 <= MIN <= MAX")


def generate_prompts(
    decoder: Decoder,
    count: int,
    *,
    prompt_tokens: tuple[int, int] = PROMPT_TOKENS,
    new_tokens: tuple[int, int] = NEW_TOKENS,
    seed: int = 0,
) -> PromptWorkload:
    """`count` tasks over excerpts of `PROMPT_TEXT`, each about a log-uniform number of tokens
    in `prompt_tokens` (template included), with a uniform number of new tokens."""
    check_range("--tokens", prompt_tokens)
    check_range("--new-tokens", new_tokens)
    if count < 1:
        raise BadInput(f"--prompts must be >= 1, got {count}")
    if prompt_tokens[1] + new_tokens[1] > decoder.context_length:
        raise BadInput(
            f"prompts of up to {prompt_tokens[1]} tokens plus {new_tokens[1]} new ones exceed "
            f"the model's context of {decoder.context_length} tokens: lower --tokens or "
            "--new-tokens"
        )
    rng = np.random.default_rng(seed)
    corpus = decoder.tokenizer(PROMPT_TEXT.read_text(), add_special_tokens=False)["input_ids"]
    logs = np.log(prompt_tokens)
    prompts = []
    for i in range(count):
        target = round(float(np.exp(rng.uniform(*logs))))
        new = int(rng.integers(new_tokens[0], new_tokens[1] + 1))
        start = int(rng.integers(len(corpus)))
        ids = _task(decoder, TASKS[i % len(TASKS)], corpus, start, target)
        prompts.append(Prompt(tuple(ids), new))
    return PromptWorkload(tuple(prompts), "generated")


def _task(decoder: Decoder, task: str, corpus: list[int], start: int, target: int) -> list[int]:
    """`task` over an excerpt of `corpus` (cycled from `start`) long enough that the prompt has
    about `target` tokens; text decoded and tokenized again can move a few tokens, so the
    excerpt shrinks until the prompt is not longer than `target`."""
    overhead = len(decoder.prompt_ids(task.format(text="")))
    size = max(1, target - overhead)
    ids: list[int] = []
    for _ in range(4):
        window = [corpus[(start + k) % len(corpus)] for k in range(size)]
        text = decoder.tokenizer.decode(window, skip_special_tokens=True)
        ids = decoder.prompt_ids(task.format(text=text))
        if len(ids) <= target or size == 1:
            break
        size = max(1, size - (len(ids) - target))
    return ids


def read_prompts(
    decoder: Decoder, path: Path, *, new_tokens: tuple[int, int] = NEW_TOKENS, seed: int = 0
) -> PromptWorkload:
    """The user's prompts: `.jsonl` objects or `.txt` lines (see the module's docstring), each
    with the file's max_new_tokens or a uniform draw from `new_tokens`."""
    check_range("--new-tokens", new_tokens)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise BadInput(f"cannot read prompts from {path} ({err}): give a UTF-8 file") from err
    rng = np.random.default_rng(seed)
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        prompt, new = _parse(line, path, number) if path.suffix == ".jsonl" else (line, None)
        new = new or int(rng.integers(new_tokens[0], new_tokens[1] + 1))
        ids = decoder.prompt_ids(prompt)
        if len(ids) + new > decoder.context_length:
            raise BadInput(
                f"{path}:{number}: {len(ids)} prompt tokens plus {new} new ones exceed the "
                f"model's context of {decoder.context_length} tokens: shorten the prompt"
            )
        prompts.append(Prompt(tuple(ids), new))
    if not prompts:
        raise BadInput(f"{path} has no prompts: give one per line (.txt) or per object (.jsonl)")
    return PromptWorkload(tuple(prompts), str(path))


def _parse(line: str, path: Path, number: int) -> tuple[str | list[dict[str, str]], int | None]:
    where = f"{path}:{number}"
    try:
        item = json.loads(line)
    except json.JSONDecodeError as err:
        raise BadInput(f"{where} is not JSON ({err})") from err
    if not isinstance(item, dict):
        raise BadInput(f'{where}: each line is an object with "prompt" or "messages"')
    prompt = item.get("messages", item.get("prompt", item.get("text")))
    messages_ok = isinstance(prompt, list) and all(
        isinstance(m, dict) and isinstance(m.get("content"), str) for m in prompt
    )
    if not (isinstance(prompt, str) or messages_ok):
        raise BadInput(
            f'{where}: give "prompt" (text) or "messages" (a list of role/content objects)'
        )
    new = item.get("max_new_tokens")
    if new is not None and (not isinstance(new, int) or new < 1):
        raise BadInput(f"{where}: max_new_tokens must be an integer >= 1, got {new!r}")
    return prompt, new  # type: ignore[return-value]  # checked above
