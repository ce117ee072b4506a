"""`mahir serve` with the startup heap frozen (its default) against the same server without.

The model here is a one-layer, 32-wide encoder (random weights, all-MiniLM-L6-v2's config and
tokenizer), so that its compute is negligible and what is timed is the server: HTTP, JSON,
tokenizing, the batcher, and the garbage collector's pauses. Both servers run at once from one
output directory; the unfrozen one through `python -c` with `freeze_startup_heap` replaced by a
no-op before the command line runs. Loads alternate between them (closed loop, one sentence per
`/v1/embeddings` request, `benchmarks.serving.load`), and the report gives each round and the
medians.

With `--llm` the served model is the default LLM (SmolLM2-135M-Instruct) on mahir's PyTorch
engine, whose decode loop runs in Python, batching `--slots` generations a step; the load is
streamed `/v1/completions` of `--max-tokens` tokens (`benchmarks.llm_serving.load`), and what
is compared is the time between tokens.

    PYTHONPATH=src:. python -m benchmarks.server_heap --concurrency 64 --seconds 6 --rounds 3
    PYTHONPATH=src:. python -m benchmarks.server_heap --llm --concurrency 8 --seconds 30 --warmup 30
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.gpu_serving import free_port, stop, wait_ready
from benchmarks.gpu_serving import start as serving_process
from benchmarks.llm_serving import load as llm_load
from benchmarks.serving import load
from mahir.hardware import detect

ROOT = Path(__file__).resolve().parent.parent
UNFROZEN = (
    "import sys, mahir.serve.http as h; h.freeze_startup_heap = lambda: None; "
    "from mahir.cli import main; sys.argv[0] = 'mahir'; main()"
)


def tiny_encoder(folder: Path) -> Path:
    """A one-layer encoder with MiniLM's tokenizer and pooling, random weights."""
    from transformers import BertConfig, BertModel

    from mahir.model import default_model_folder

    source = default_model_folder()
    config = BertConfig.from_pretrained(source)
    config.update({"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2})
    config.intermediate_size = 64
    BertModel(config).eval().save_pretrained(folder)
    for item in source.iterdir():
        if item.name not in ("model.safetensors", "config.json", "pytorch_model.bin"):
            copy = shutil.copytree if item.is_dir() else shutil.copy
            copy(item, folder / item.name)
    pooling = folder / "1_Pooling" / "config.json"
    settings = json.loads(pooling.read_text()) | {"word_embedding_dimension": 32}
    pooling.write_text(json.dumps(settings))
    return folder


def start(command: list[str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`command` serving on a free port, once it is ready; the process and its URL."""
    port = free_port()
    env = os.environ | {"PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
    process = serving_process([*command, "--port", str(port)], env, log)
    url = f"http://127.0.0.1:{port}"
    wait_ready(f"{url}/v2/health/ready", process, log, timeout_s=120)
    return process, url


def encoder_directory(work: Path) -> Path:
    """The tiny encoder applied as PyTorch eager fp32, its sentence embedding pooled in-module."""
    recipe = ROOT / "benchmarks" / "recipes" / "cpu-torch-pooled.yaml"
    model = tiny_encoder(work / "model")
    apply = [sys.executable, "-m", "mahir.cli", "apply", str(recipe), str(model)]
    subprocess.run([*apply, "--out", str(work / "out")], check=True, capture_output=True)
    return work / "out"


def llm_directory(work: Path, slots: int) -> Path:
    """The default LLM on mahir's PyTorch engine (its decode loop in Python, where the collector
    pauses it), `slots` generations batched per step, replayed by `mahir apply`."""
    from mahir.families.decoder import default_llm_path
    from mahir.recipe import ModelSource, Recipe
    from mahir.types import RuntimeOptions

    recipe = work / "recipe.yaml"
    options = RuntimeOptions(threads=os.cpu_count(), slots=slots)
    Recipe((), "torch", options, ModelSource.of(str(default_llm_path()))).save(recipe)
    apply = [sys.executable, "-m", "mahir.cli", "apply", str(recipe), "--out", str(work / "out")]
    subprocess.run(apply, check=True, capture_output=True)
    return work / "out"


@dataclass(frozen=True)
class Workload:
    """What is served and how it is loaded: an embedding per request, or a streamed completion."""

    directory: Callable[[Path], Path]
    load: Callable[[str, float], dict[str, Any]]
    """A load on a URL for some seconds: its summary."""
    shown: tuple[str, ...]
    """Summary keys printed each round and kept as medians; the first is the throughput."""
    serve_options: tuple[str, ...] = ()
    """What `mahir serve` is given beside the directory."""


def workload(args: argparse.Namespace) -> Workload:
    if args.llm:
        return Workload(
            partial(llm_directory, slots=args.slots),
            lambda url, seconds: llm_load(url, args.concurrency, seconds, args.max_tokens),
            ("output_tokens_per_s", "itl_p50_ms", "itl_p99_ms", "ttft_p50_ms", "ttft_p99_ms"),
        )
    return Workload(
        encoder_directory,
        lambda url, seconds: load(url, "model", args.concurrency, seconds),
        ("throughput", "p50_ms", "p90_ms", "p99_ms"),
        ("--max-batch-size", "256"),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load first")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--llm", action="store_true", help="the default LLM, streamed completions")
    parser.add_argument("--slots", type=int, default=4, help="--llm: generations per step")
    parser.add_argument("--max-tokens", type=int, default=32, help="--llm: tokens per request")
    args = parser.parse_args()
    served = workload(args)
    work = Path(tempfile.mkdtemp(prefix="server-heap-"))
    serve = ["serve", str(served.directory(work)), "--host", "127.0.0.1", *served.serve_options]
    commands = {
        "frozen": [sys.executable, "-m", "mahir.cli", *serve],
        "unfrozen": [sys.executable, "-c", UNFROZEN, *serve],
    }
    servers = {name: start(command, work / f"{name}.log") for name, command in commands.items()}
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
    try:
        for _, url in servers.values():
            served.load(url, args.warmup)  # not recorded: kernels, caches and pools settled
        for i in range(args.rounds):
            order = list(servers) if i % 2 == 0 else list(reversed(servers))
            for name in order:
                summary = served.load(servers[name][1], args.seconds)
                rounds[name].append(summary)
                print(name, {k: round(float(summary[k]), 1) for k in served.shown}, flush=True)
    finally:
        for process, _ in servers.values():
            stop(process)
        shutil.rmtree(work, ignore_errors=True)
    medians = {
        name: {key: float(np.median([float(r[key]) for r in found])) for key in served.shown}
        for name, found in rounds.items()
    }
    throughput = served.shown[0]
    ratio = medians["frozen"][throughput] / medians["unfrozen"][throughput]
    result = {
        "benchmark": "mahir serve, startup heap frozen against not",
        "machine": detect(gpus=False).summary(),
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python -m benchmarks.server_heap", *sys.argv[1:]]),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "medians": medians,
        "throughput_ratio_frozen_over_unfrozen": ratio,
        "rounds": rounds,
    }
    print(json.dumps({"medians": medians, "ratio": round(ratio, 3)}))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
