"""What holding an answer to a grammar costs per token (structured outputs, `serve/structured.py`):
the default LLM on llama.cpp (the shipped GGUF, or `--gguf FILE`), one generation at a time, the
same prompts decoded free and held to a JSON schema, interleaved, 3 rounds; the median time per
decoded token of each, and the mask's own time per token (llguidance's mask computed and
applied to a vocabulary-wide row, `GrammarConstraint.allowed`).

The schema is unbounded (an object of string values), so the held answers run as long as the
free ones: `max_tokens` ends both.

    PYTHONPATH=src .venv/bin/python benchmarks/llm_structured.py [--out results.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from mahir.families.decoder import DECODER_SPEC, default_llm_path
from mahir.families.prompts import generate_prompts
from mahir.generation import Generator, Sampling, Structure
from mahir.hardware import detect
from mahir.model import load_model
from mahir.runtimes.llamacpp import LlamaCppOptions, open_generator
from mahir.serve.structured import Grammars
from mahir.types import Artifact

SCHEMA = {"type": "object", "additionalProperties": {"type": "string"}}
ROUNDS, PROMPTS, NEW_TOKENS = 3, 6, 96


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gguf", type=Path, default=None)
    parser.add_argument("--out")
    args = parser.parse_args()
    family = load_model(llm=True).family
    gguf = args.gguf or default_llm_path()
    generator = open_generator(Artifact("gguf", DECODER_SPEC, path=gguf), LlamaCppOptions())
    grammars = Grammars(family.tokenizer, family.vocab_size, family.stop_token_ids)
    structure = Structure(SCHEMA)
    prompts = [
        p.ids for p in generate_prompts(family, PROMPTS, prompt_tokens=(32, 256), seed=0).prompts
    ]
    per_token: dict[str, list[float]] = {"free": [], "json schema": []}
    for _ in range(ROUNDS):
        for name in per_token:
            for prompt in prompts:
                constraint = grammars.constraint(structure, "x") if name != "free" else None
                sampling = family.sampling(NEW_TOKENS, constraint=constraint)
                per_token[name].append(decode_ms(generator, prompt, sampling))
    mask = grammars.constraint(structure, "x")
    row = np.zeros(family.vocab_size, np.float32)
    started = time.perf_counter()
    for _ in range(200):
        mask.allowed(row)
    mask_ms = (time.perf_counter() - started) / 200 * 1e3
    rows = {name: float(np.nanmedian(times)) for name, times in per_token.items()}
    for name, ms in rows.items():
        print(f"{name:12s} {ms:6.2f} ms per decoded token")
    ratio = rows["json schema"] / rows["free"]
    print(f"mask alone   {mask_ms:6.3f} ms per token; held/free {ratio:.3f}")
    if args.out:
        result: dict[str, Any] = {
            "date": datetime.date.today().isoformat(),
            "machine": detect(gpus=False).summary(),
            "command": "benchmarks/llm_structured.py",
            "engine": generator.describe(),
            "schema": SCHEMA,
            "decode_ms_per_token": rows,
            "mask_ms_per_token": mask_ms,
        }
        Path(args.out).write_text(json.dumps(result, indent=2))


def decode_ms(generator: Generator, prompt: tuple[int, ...], sampling: Sampling) -> float:
    """Milliseconds per token after the first (the decode steps, not the prefill)."""
    stamps = [time.perf_counter() for _ in generator.stream(prompt, sampling)]
    return float(np.median(np.diff(stamps))) * 1e3 if len(stamps) > 2 else float("nan")


if __name__ == "__main__":
    main()
