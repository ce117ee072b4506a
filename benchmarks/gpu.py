"""mahir's GPU sessions against the stock ways of running an encoder on the same GPU.

Two models with random weights (only speed is measured here; tests/runtimes/test_cuda.py holds
the real all-MiniLM-L6-v2 to its fidelity on the GPU): all-MiniLM-L6-v2's shape and BERT-base's,
both with the MiniLM tokenizer and mean pooling. Shapes: batch 1 at 16 and 128 tokens, 256x128,
and a variable-length workload (4,096 generated sentences, end to end from text to embeddings on
the host, tokenization included).

Stock anchors compute the sentence embedding on the GPU and copy it to the host: eager fp16 and
bf16, `torch.compile` default and mode="reduce-overhead" (fp16), and for the variable-length
workload sentence-transformers' `encode(batch_size=256)` in fp16. mahir's rows are its
candidates built and opened as `optimize --device cuda` builds them (`search/cuda.py`): CUDA
graphs over shape buckets, packed sequences (no padding computed), fp8 matmuls, eager; pooled
inside the model, so only the embedding crosses to the host. On the variable-length workload
mahir goes through `mahir.embed` (the next batch tokenized and queued while the GPU runs this
one; `--compare-waiting` adds each row waiting for each batch before making the next), and each
of its rows carries its cosine to the fp32 original's embeddings. Every variant is timed in the same
rounds, interleaved, each call synchronised; medians and ratios are reported.

Usage: python -m benchmarks.gpu --tokenizer MINILM_FOLDER [--models bert-base] [--shapes 256x128]
       [--mahir cuda-graphs-fp8-static] [--fixed-only] [--out results.json]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

from benchmarks import gpu_sessions
from mahir.embed import embed
from mahir.families.text import TextEncoder
from mahir.hardware import detect
from mahir.model import Model, load_model
from mahir.passes import PassContext, apply_steps
from mahir.passes.pooling import PoolInModel
from mahir.pooling import EMBEDDING
from mahir.runtimes import open_session
from mahir.search.cuda import cuda_entries
from mahir.types import Artifact, Device, RuntimeOptions

GPU = Device.parse("cuda")
MAHIR = (
    "packed-fp16",
    "packed-bf16",
    "cuda-graphs-fp16",
    "cuda-graphs-bf16",
    "cuda-graphs-fp8",
    "cuda-graphs-fp8-static",
)
"""mahir's GPU candidates measured here, by their ids in `search/cuda.py`. fp8 runs the fixed
shapes only: each new shape recompiles torchao's fp8 kernels (~10 s), and the variable-length
workload meets dozens of shape buckets. Static fp8 observes its scales on a batch of its own
(`CALIBRATION`), not on any batch timed here."""
CALIBRATION = (64, 128)
Call = Callable[[], Any]


def fixed_batch(size: int, tokens: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(size * 1000 + tokens)
    return {
        "input_ids": rng.integers(1000, 30000, (size, tokens)).astype(np.int64),
        "attention_mask": np.ones((size, tokens), np.int64),
        "token_type_ids": np.zeros((size, tokens), np.int64),
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


def mahir_sessions(
    model: Model, workdir: Path, candidates: tuple[str, ...] = MAHIR
) -> dict[str, Any]:
    """mahir's `candidates` as `optimize --device cuda` builds and opens them."""
    machine = detect()
    calibration = (fixed_batch(*CALIBRATION),)
    ctx = PassContext(model=model, workdir=workdir, calibration=calibration, machine=machine)
    sessions: dict[str, Any] = {}
    for id_, _, recipe, left_out in cuda_entries(model, machine, GPU):
        if id_ not in candidates:
            continue
        if left_out:
            print(f"mahir {id_} left out: {left_out}", flush=True)
            continue
        artifact = apply_steps(model.original(), recipe.steps, ctx)
        sessions[f"mahir {id_}"] = open_session(recipe.runtime, artifact, recipe.options)
    return sessions


def variants(
    bert: torch.nn.Module, sessions: dict[str, Any], with_compile: bool
) -> dict[str, Callable[..., Any]]:
    """The stock anchors and mahir's sessions for one model."""
    fp16 = copy.deepcopy(bert).half().cuda()
    bf16 = copy.deepcopy(bert).to(torch.bfloat16).cuda()
    runs: dict[str, Callable[..., Any]] = {"eager fp16": stock(fp16), "eager bf16": stock(bf16)}
    if with_compile:
        runs["compile fp16"] = stock(torch.compile(fp16))
        runs["compile reduce-overhead fp16"] = stock(torch.compile(fp16, mode="reduce-overhead"))
    return runs | {label: mahir_call(session) for label, session in sessions.items()}


FIXED = {"1x16": (1, 16, 7), "1x128": (1, 128, 7), "256x128": (256, 128, 5)}
"""The fixed shapes (batch x tokens) and the rounds each is timed in."""


def fixed_shapes(
    runs: dict[str, Callable[..., Any]],
    rows: list[dict[str, Any]],
    name: str,
    shapes: tuple[str, ...] = tuple(FIXED),
) -> None:
    for size, tokens, rounds in (FIXED[shape] for shape in shapes):
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
    model: Model,
    folder: Path,
    sessions: dict[str, Any],
    rows: list[dict[str, Any]],
    name: str,
    embed_workers: tuple[int, ...],
    embed_batches: tuple[int, ...] = (256,),
    waiting: bool = False,
) -> None:
    """4,096 generated sentences, text to embeddings: each mahir session through `mahir.embed`
    (tokenizing ahead on `embed_workers` threads while the GPU runs, in batches of each of
    `embed_batches` sentences), against
    sentence-transformers' `encode`; each mahir variant's cosine to the fp32 original's
    embeddings on the same GPU; and the host side alone (tokenizing, no model). `waiting` adds
    each mahir variant as it ran before batches were queued: each waited for before the next."""
    from sentence_transformers import SentenceTransformer

    sentences = model.family.generate(4096, np.random.default_rng(0))  # type: ignore[attr-defined]
    text: Any = model.family
    encoders = {  # BERT's plain text in Python (holds the GIL) or in lean Rust (does not)
        label: TextEncoder(text.tokenizer, model.spec, text.max_length, in_python=python)
        for label, python in (("", True), (", lean Rust tokenizer", False))
    }
    encode = encoders[""]
    reference = open_session("torch", pool_in_model(model), RuntimeOptions(device=GPU))
    want = embed(sentences, reference, encode)
    st = SentenceTransformer(str(folder), device="cuda").half()
    calls: dict[str, Call] = {
        "sentence-transformers encode fp16": lambda: st.encode(
            sentences, batch_size=256, convert_to_numpy=True
        )
    }
    for workers, size, tokenizer in itertools.product(embed_workers, embed_batches, encoders):
        how = f"{workers} tokenizing thread{'s' if workers > 1 else ''}" if workers else "inline"
        if size != 256:
            how += f", batches of {size}"
        how += tokenizer
        calls[f"tokenize only ({how})"] = lambda w=workers, n=size, e=encoders[tokenizer]: embed(
            sentences, Tokenized(), e, workers=w, batch_size=n
        )
        for label, session in sessions.items():
            if "fp8" in label:
                continue
            ways = {"": session} | (
                {", waiting for each batch": OneAtATime(session)} if waiting else {}
            )
            for way, runs in ways.items():
                calls[f"{label} ({how}{way})"] = (
                    lambda s=runs, w=workers, n=size, e=encoders[tokenizer]: embed(
                        sentences, s, e, workers=w, batch_size=n
                    )
                )
    times = timed(calls, 3, 1)
    for variant, seconds in times.items():
        median = float(np.median(seconds))
        row = {
            "model": name,
            "workload": "4096 sentences, variable length",
            "variant": variant,
            "p50_ms": median * 1e3,
            "items_per_s": len(sentences) / median,
            "calls": len(seconds),
        }
        session = next((s for k, s in sessions.items() if variant.startswith(k + " (")), None)
        if session is not None:  # fidelity on the workload, against fp32
            got = embed(sentences, session, encode)
            cosine = (
                np.sum(got * want, 1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
            )
            row |= {"cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min())}
        rows.append(row)


class OneAtATime:
    """`session` without `submit`: `embed` waits for each batch before it makes the next."""

    def __init__(self, session: Any) -> None:
        self.runtime, self.device, self._session = session.runtime, session.device, session

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._session.run(inputs)  # type: ignore[no-any-return]

    def describe(self) -> dict[str, Any]:
        return self._session.describe()  # type: ignore[no-any-return]


class Tokenized:
    """A session that computes nothing: `embed` through it times the host side alone."""

    runtime = "none"
    device = GPU

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {EMBEDDING: np.zeros((len(inputs["input_ids"]), 1), np.float32)}

    def describe(self) -> dict[str, Any]:
        return {}


def pool_in_model(model: Model) -> Artifact:
    """The fp32 original pooled inside: the reference embeddings on the GPU."""
    with tempfile.TemporaryDirectory() as tmp:
        ctx = PassContext(model=model, workdir=Path(tmp))
        return apply_steps(model.original(), (PoolInModel(),), ctx)


def sentence_encoder_folder(bert: torch.nn.Module, tokenizer: Path, folder: Path) -> Path:
    """`bert` saved as a sentence-transformers folder with MiniLM's tokenizer and mean pooling,
    which both mahir and sentence-transformers load."""
    bert.save_pretrained(folder)
    for file in tokenizer.iterdir():
        keep = ("tokenizer", "vocab", "special_tokens", "modules", "sentence_", "1_Pooling")
        if file.name.startswith(keep):
            copy_into = shutil.copytree if file.is_dir() else shutil.copy
            copy_into(file, folder / file.name)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--no-compile-anchors", action="store_true")
    parser.add_argument("--models", nargs="*", default=list(gpu_sessions.SHAPES))
    parser.add_argument("--fixed-only", action="store_true", help="skip the variable-length run")
    parser.add_argument("--variable-only", action="store_true", help="skip the fixed shapes")
    parser.add_argument("--shapes", nargs="+", choices=list(FIXED), default=list(FIXED))
    parser.add_argument("--embed-workers", type=int, nargs="+", default=[1])
    parser.add_argument("--embed-batches", type=int, nargs="+", default=[256])
    parser.add_argument("--mahir", nargs="+", default=list(MAHIR), help="candidate ids")
    parser.add_argument(
        "--compare-waiting",
        action="store_true",
        help="also run each mahir variable-length row waiting for each batch before the next",
    )
    parser.add_argument(
        "--switch-interval-ms",
        type=float,
        help="Python's GIL switch interval for the run (default 5 ms): how long a thread that "
        "wants the GIL back waits for one that holds it",
    )
    args = parser.parse_args()
    if args.switch_interval_ms is not None:
        sys.setswitchinterval(args.switch_interval_ms / 1e3)
    rows: list[dict[str, Any]] = []
    for name in args.models:
        torch.manual_seed(0)
        config = transformers.BertConfig(**gpu_sessions.SHAPES[name])
        bert = transformers.BertModel(config).eval()
        with tempfile.TemporaryDirectory() as tmp:
            folder = sentence_encoder_folder(bert, args.tokenizer, Path(tmp) / name)
            model = load_model(folder)
            sessions = mahir_sessions(model, Path(tmp) / "work", tuple(args.mahir))
            if not args.variable_only:
                runs = variants(bert, sessions, not args.no_compile_anchors)
                fixed_shapes(runs, rows, name, tuple(args.shapes))
            if not args.fixed_only:
                variable_length(
                    model,
                    folder,
                    sessions,
                    rows,
                    name,
                    tuple(args.embed_workers),
                    tuple(args.embed_batches),
                    args.compare_waiting,
                )
        for row in rows:
            if row["model"] == name:
                print(json.dumps(row), flush=True)
        if args.out:  # after each model: a run cut short keeps what it measured
            args.out.write_text(json.dumps(result(rows), indent=2) + "\n")


def result(rows: list[dict[str, Any]]) -> dict[str, Any]:
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
