"""2:4 semi-structured sparsity on a GPU: what it buys at a big encoder batch, and what pruning
to it without fine-tuning does to the answers.

Speed: BERT-base (random weights) at 256x128 in fp16, every nn.Linear's weight pruned to 2:4 by
magnitude (2 of each 4 consecutive inputs kept) and stored as PyTorch's semi-structured sparse
tensor (`torch.sparse.to_sparse_semi_structured`: cuSPARSELt where this torch has it, else
CUTLASS), eager and compiled (mode="reduce-overhead"), against the same model dense; timed by
CUDA events in turns (`gpu_attention.gpu_ms`, 20 calls a turn, 5 turns), medians. Answers: the
real all-MiniLM-L6-v2 (an fp16 copy of it) pruned the same way, its mean-pooled sentence
embeddings of 512 generated sentences against the dense fp32 model's (cosine, mean and worst).

Usage: python -m benchmarks.gpu_sparse24 --model MINILM_FP16_FOLDER [--out results.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

from benchmarks import gpu
from benchmarks.gpu_attention import gpu_ms

BATCH, TOKENS, ROUNDS, CALLS, SENTENCES = 256, 128, 5, 20, 512


def two_of_four(weight: torch.Tensor) -> torch.Tensor:
    """`weight` with the 2 smallest magnitudes of each 4 consecutive inputs set to zero."""
    groups = weight.reshape(-1, 4)
    keep = groups.abs().topk(2, dim=1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, keep, True)
    return (groups * mask).reshape(weight.shape)


def pruned(model: torch.nn.Module, sparse: bool) -> tuple[torch.nn.Module, int]:
    """Every nn.Linear pruned to 2:4 (and stored semi-structured if `sparse`); the count of
    layers stored so (a layer whose shape the kernels refuse stays dense, pruned)."""
    from torch.sparse import to_sparse_semi_structured

    stored = 0
    for layer in model.modules():
        if isinstance(layer, torch.nn.Linear):
            weight = two_of_four(layer.weight.detach())
            layer.weight = torch.nn.Parameter(weight, requires_grad=False)
            if sparse:
                try:
                    semi = to_sparse_semi_structured(weight)
                except (RuntimeError, ValueError):
                    continue
                layer.weight = torch.nn.Parameter(semi, requires_grad=False)
                stored += 1
    return model, stored


Call = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def speed(rows: list[dict[str, Any]]) -> None:
    config = transformers.BertConfig(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072
    )
    torch.manual_seed(0)
    dense = transformers.BertModel(config, add_pooling_layer=False).eval().cuda().half()
    ids = torch.randint(1000, 30000, (BATCH, TOKENS), device="cuda")
    mask = torch.ones_like(ids)
    sparse, stored = pruned(copy.deepcopy(dense), sparse=True)

    def run(model: torch.nn.Module) -> Call:
        return lambda i, m: model(input_ids=i, attention_mask=m).last_hidden_state

    calls: dict[str, Call] = {
        "eager fp16": run(dense),
        "eager fp16, 2:4 sparse": run(sparse),
        "compiled fp16": torch.compile(run(dense), mode="reduce-overhead"),
        "compiled fp16, 2:4 sparse": torch.compile(run(sparse), mode="reduce-overhead"),
    }
    ms: dict[str, list[float]] = {name: [] for name in calls}
    errors: dict[str, str] = {}
    with torch.inference_mode():
        for name in list(calls):
            try:
                for _ in range(3):  # compiles and captures
                    calls[name](ids, mask)
                torch.cuda.synchronize()
            except Exception as err:  # a kernel or compiler refusing semi-structured weights
                errors[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
                del calls[name]
        names = list(calls)
        for turn in range(ROUNDS):
            for name in names[turn % len(names) :] + names[: turn % len(names)]:
                ms[name].append(gpu_ms(lambda n=name: calls[n](ids, mask), CALLS))
    eager = statistics.median(ms["eager fp16"])
    for name in ms:
        row: dict[str, Any] = {"model": "bert-base", "workload": "256x128", "variant": name}
        if name in errors:
            row["error"] = errors[name]
        else:
            p50 = statistics.median(ms[name])
            row |= {
                "p50_ms": p50,
                "sequences_per_s": BATCH / p50 * 1e3,
                "vs_eager_fp16": eager / p50,
            }
        if "sparse" in name:
            row["layers_semi_structured"] = stored
        rows.append(row)


def answers(folder: Path, rows: list[dict[str, Any]]) -> None:
    from mahir.model import load_model

    sentences = load_model(folder).family.generate(SENTENCES, np.random.default_rng(0))  # type: ignore[attr-defined]
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(sentences, padding=True, truncation=True, return_tensors="pt").to("cuda")
    reference = transformers.AutoModel.from_pretrained(folder).float().cuda().eval()
    half = copy.deepcopy(reference).half()

    def embedding(model: torch.nn.Module) -> torch.Tensor:
        hidden = model(**batch).last_hidden_state.float()
        weights = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * weights).sum(1) / weights.sum(1)
        return torch.nn.functional.normalize(pooled, dim=-1)

    with torch.inference_mode():
        want = embedding(reference)
        for name, model in (
            ("MiniLM fp16 dense", half),
            ("MiniLM fp16, 2:4 sparse", pruned(copy.deepcopy(half), sparse=True)[0]),
            ("MiniLM fp32, pruned to 2:4", pruned(copy.deepcopy(reference), sparse=False)[0]),
        ):
            cosine = (embedding(model) * want).sum(-1)
            rows.append(
                {
                    "model": "all-MiniLM-L6-v2",
                    "workload": f"{SENTENCES} generated sentences",
                    "variant": name,
                    "cosine_mean": cosine.mean().item(),
                    "cosine_min": cosine.min().item(),
                }
            )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True, help="an fp16 MiniLM folder")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    speed(rows)
    answers(args.model, rows)
    for row in rows:
        print(json.dumps(row), flush=True)
    if args.out:
        result = gpu.result(rows) | {"cusparselt": torch.backends.cusparselt.version()}
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
