"""`mahir serve` with the startup heap frozen (its default) against the same server without.

The model here is a one-layer, 32-wide encoder (random weights, all-MiniLM-L6-v2's config and
tokenizer), so that its compute is negligible and what is timed is the server: HTTP, JSON,
tokenizing, the batcher, and the garbage collector's pauses. Both servers run at once from one
output directory; the unfrozen one through `python -c` with `freeze_startup_heap` replaced by a
no-op before the command line runs. Loads alternate between them (closed loop, one sentence per
`/v1/embeddings` request, `benchmarks.serving.load`), and the report gives each round and the
medians.

    PYTHONPATH=src:. python -m benchmarks.server_heap --concurrency 64 --seconds 6 --rounds 3
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
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.gpu_serving import free_port, stop, wait_ready
from benchmarks.gpu_serving import start as serving_process
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


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="server-heap-"))
    recipe = ROOT / "benchmarks" / "recipes" / "cpu-torch-pooled.yaml"
    model = tiny_encoder(work / "model")
    apply = [sys.executable, "-m", "mahir.cli", "apply", str(recipe), str(model)]
    subprocess.run([*apply, "--out", str(work / "out")], check=True, capture_output=True)
    serve = ["serve", str(work / "out"), "--host", "127.0.0.1", "--max-batch-size", "256"]
    commands = {
        "frozen": [sys.executable, "-m", "mahir.cli", *serve],
        "unfrozen": [sys.executable, "-c", UNFROZEN, *serve],
    }
    servers = {name: start(command, work / f"{name}.log") for name, command in commands.items()}
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
    try:
        for _, url in servers.values():
            load(url, "model", args.concurrency, 2.0)  # warm up
        for i in range(args.rounds):
            order = list(servers) if i % 2 == 0 else list(reversed(servers))
            for name in order:
                summary = load(servers[name][1], "model", args.concurrency, args.seconds)
                rounds[name].append(summary)
                keys = ("throughput", "p50_ms", "p99_ms")
                print(name, {k: round(float(summary[k]), 1) for k in keys}, flush=True)  # type: ignore[arg-type]
    finally:
        for process, _ in servers.values():
            stop(process)
        shutil.rmtree(work, ignore_errors=True)
    medians = {
        name: {
            key: float(np.median([float(r[key]) for r in found]))
            for key in ("throughput", "p50_ms", "p90_ms", "p99_ms")
        }
        for name, found in rounds.items()
    }
    ratio = medians["frozen"]["throughput"] / medians["unfrozen"]["throughput"]
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
