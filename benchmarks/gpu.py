"""mahir's GPU sessions against the stock ways of running an encoder on the same GPU.

Two models with random weights (only speed is measured here; tests/runtimes/test_cuda.py holds
the real all-MiniLM-L6-v2 to its fidelity on the GPU): all-MiniLM-L6-v2's shape and BERT-base's,
both with the MiniLM tokenizer and mean pooling. Shapes: batch 1 at 16 and 128 tokens, 256x128,
and a variable-length workload (4,096 generated sentences, end to end from text to embeddings on
the host, tokenization included).

Stock anchors compute the sentence embedding on the GPU and copy it to the host: eager fp16 and
bf16, `torch.compile` default and mode="reduce-overhead" (fp16), and for the variable-length
workload sentence-transformers' `encode(batch_size=256)` in fp16. mahir's rows are its
candidates as `optimize` proposes them for a sentence encoder on a GPU (`torch-compile` = CUDA
graphs over shape buckets, and eager; pooled inside the model by `PoolInModel`, so only the
embedding crosses to the host). Every variant is timed in the same
rounds, interleaved, each call synchronised; medians and ratios are reported.

Usage: python -m benchmarks.gpu --tokenizer MINILM_FOLDER [--out results.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

from benchmarks import gpu_sessions
from mahir.families.text import TextEncoder, generate_sentences
from mahir.hardware import detect
from mahir.modules import LowPrecision, PooledEmbedding, TupleOutputs
from mahir.pooling import EMBEDDING, Pooling
from mahir.runtimes import open_session
from mahir.types import Artifact, Device, RuntimeOptions

SPEC = replace(gpu_sessions.SPEC, max_sequence=512)
MEAN = Pooling("mean", normalize=False)
GPU = Device.parse("cuda")
Call = Callable[[], Any]


def fixed_batch(size: int, tokens: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(size * 1000 + tokens)
    return {
        "input_ids": rng.integers(1000, 30000, (size, tokens)).astype(np.int64),
        "attention_mask": np.ones((size, tokens), np.int64),
    }


def stock(model: torch.nn.Module) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """What a user writes: tensors to the GPU, the model, mean pooling there, the vector back."""

    def run(batch: dict[str, np.ndarray]) -> np.ndarray:
        ids = torch.from_numpy(batch["input_ids"]).to("cuda", non_blocking=True)
        mask = torch.from_numpy(batch["attention_mask"]).to("cuda", non_blocking=True)
        with torch.inference_mode():
            tokens = model(input_ids=ids, attention_mask=mask).last_hidden_state
            weights = mask.unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * weights).sum(1) / weights.sum(1).clamp(min=1)
            return pooled.float().cpu().numpy()

    return run


def mahir_call(session: Any) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """A mahir session's sentence embeddings (pooled inside the model)."""

    def run(batch: dict[str, np.ndarray]) -> np.ndarray:
        return session.run(batch)[EMBEDDING]

    return run


def timed(calls: dict[str, Call], rounds: int, per_round: int) -> dict[str, list[float]]:
    """Seconds per call, all variants in every round, in turn."""
    for call in calls.values():  # warm up: compile, record graphs, fill caches
        for _ in range(3):
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            for _ in range(per_round):
                torch.cuda.synchronize()
                start = time.perf_counter()
                call()
                torch.cuda.synchronize()
                times[name].append(time.perf_counter() - start)
    return times


def variants(bert: torch.nn.Module, with_compile: bool) -> dict[str, Callable[..., Any]]:
    """The stock anchors and mahir's sessions for one model."""
    fp16 = copy.deepcopy(bert).half().cuda()
    bf16 = copy.deepcopy(bert).to(torch.bfloat16).cuda()
    original = TupleOutputs(bert, SPEC.outputs).eval()
    runs: dict[str, Callable[..., Any]] = {
        "eager fp16": stock(fp16),
        "eager bf16": stock(bf16),
    }
    if with_compile:
        runs["compile fp16"] = stock(torch.compile(fp16))
        runs["compile reduce-overhead fp16"] = stock(torch.compile(fp16, mode="reduce-overhead"))
    options = RuntimeOptions(device=GPU)
    for runtime, dtype, label in (
        ("torch-compile", torch.float16, "mahir cuda-graphs fp16"),
        ("torch-compile", torch.bfloat16, "mahir cuda-graphs bf16"),
        ("torch", torch.float16, "mahir eager fp16"),
    ):
        runs[label] = mahir_call(open_session(runtime, pooled(original, dtype), options))
    return runs


def pooled(original: torch.nn.Module, dtype: torch.dtype) -> Artifact:
    """What `TorchLowPrecision` then `PoolInModel` make of the original."""
    low = LowPrecision(copy.deepcopy(original), dtype).eval()
    module = PooledEmbedding(low, MEAN.mode, MEAN.normalize).eval()
    return Artifact("torch", replace(SPEC, outputs=(EMBEDDING,)), module=module)


def fixed_shapes(
    runs: dict[str, Callable[..., Any]], rows: list[dict[str, Any]], name: str
) -> None:
    for size, tokens, rounds in ((1, 16, 7), (1, 128, 7), (256, 128, 5)):
        batch = fixed_batch(size, tokens)
        per_round = 20 if size == 1 else 4
        times = timed({k: (lambda r=r, b=batch: r(b)) for k, r in runs.items()}, rounds, per_round)
        for variant, seconds in times.items():
            median = float(np.median(seconds))
            rows.append(
                {
                    "model": name,
                    "workload": f"{size}x{tokens}",
                    "variant": variant,
                    "p50_ms": median * 1e3,
                    "items_per_s": size / median,
                    "calls": len(seconds),
                }
            )


def variable_length(
    bert: transformers.BertModel,
    runs: dict[str, Callable[..., Any]],
    tokenizer_folder: Path,
    rows: list[dict[str, Any]],
    name: str,
) -> None:
    """4,096 generated sentences, text to embeddings: mahir (its Rust tokenizer call, length-
    sorted batches of 256 through the bucketed session) against sentence-transformers."""
    from sentence_transformers import SentenceTransformer, models

    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_folder)
    sentences = generate_sentences(4096, tokenizer, np.random.default_rng(0))
    encode = TextEncoder(tokenizer, SPEC, 256)
    graphs = runs["mahir cuda-graphs fp16"]

    def mahir_texts() -> None:
        order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
        for start in range(0, len(order), 256):
            graphs(encode([sentences[i] for i in order[start : start + 256]]))

    with tempfile.TemporaryDirectory() as tmp:
        bert.save_pretrained(tmp)
        for file in tokenizer_folder.iterdir():
            if file.name.startswith(("tokenizer", "vocab", "special_tokens")):
                shutil.copy(file, tmp)
        word = models.Transformer(tmp, max_seq_length=256)
        st = SentenceTransformer(
            modules=[word, models.Pooling(word.get_word_embedding_dimension(), "mean")],
            device="cuda",
        ).half()

        def st_texts() -> None:
            st.encode(sentences, batch_size=256, convert_to_numpy=True)

        times = timed({"sentence-transformers encode fp16": st_texts, "mahir": mahir_texts}, 3, 1)
    for variant, seconds in times.items():
        median = float(np.median(seconds))
        rows.append(
            {
                "model": name,
                "workload": "4096 sentences, variable length",
                "variant": variant,
                "p50_ms": median * 1e3,
                "items_per_s": len(sentences) / median,
                "calls": len(seconds),
            }
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--no-compile-anchors", action="store_true")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    for name, shape in gpu_sessions.SHAPES.items():
        torch.manual_seed(0)
        bert = transformers.BertModel(transformers.BertConfig(**shape)).eval()
        runs = variants(bert, not args.no_compile_anchors)
        fixed_shapes(runs, rows, name)
        variable_length(bert, runs, args.tokenizer, rows, name)
        for row in rows:
            if row["model"] == name:
                print(json.dumps(row), flush=True)
        if args.out:  # after each model: a run cut short keeps what it measured
            args.out.write_text(json.dumps(_result(rows), indent=2) + "\n")


def _result(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "machine": detect().summary(),
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
    }


if __name__ == "__main__":
    main()
