"""`mahir serve` against Infinity (infinity-emb), the embedding server users pick today.

    python3 -m venv .venv-infinity && .venv-infinity/bin/pip install torch==2.13.0 \\
        'infinity-emb[server,torch,optimum]==0.0.78'        # once; torch pinned: CPU build
    .venv/bin/mahir apply examples/dynamic-int8.yaml --out serve-int8
    .venv/bin/python benchmarks/infinity.py serve-int8 [--seconds 15] [--rounds 2]

Both servers run on 127.0.0.1 at once (an idle one costs nothing) and are loaded in turn, in
rounds, with the same closed loop (`mahir.serve.loadtest`, aiohttp, one generated sentence per
request on `/v1/embeddings`): concurrency 32, then 1. Infinity gets its best CPU engine as the
project's notes found it: ONNX (optimum) with `model_quantized.onnx`, a per-channel dynamic int8
export of the same model (ONNX Runtime's `quantize_dynamic`, as `optimum-cli ... quantize` makes
it), beside `model.onnx` at the root of a copy of the model folder, started from inside it with
`--model-id .` and `--pooling-method mean` (its default pooling for ONNX is CLS: cosine ~0.5 to
the real embeddings, silently). Each server's embeddings are then compared with
sentence-transformers' own on the same sentences: speed only counts at equal fidelity.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from mahir.hardware import detect
from mahir.model import default_model_folder
from mahir.outdir import open_output_dir
from mahir.serve.loadtest import LoadConfig, run_load, sentence_source

LOADS = ((32, "concurrency 32"), (1, "concurrency 1"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, process: subprocess.Popen[bytes], path: str) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url} exited with {process.returncode}")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.5)  # not listening yet
    raise RuntimeError(f"{url} not ready in 300 s")


def infinity_folder(work: Path) -> Path:
    """A copy of the model folder with model.onnx (fp32) and model_quantized.onnx (per-channel
    dynamic int8) at its root, as Infinity's optimum engine looks for them."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from mahir.export.onnx import export_onnx
    from mahir.model import load_model

    folder = shutil.copytree(default_model_folder(), work / "minilm")
    export_onnx(load_model(), folder / "model.onnx")
    quantize_dynamic(
        folder / "model.onnx",
        folder / "model_quantized.onnx",
        per_channel=True,
        weight_type=QuantType.QInt8,
    )
    return folder


def start_infinity(venv: Path, folder: Path, port: int, log: Any) -> subprocess.Popen[bytes]:
    command = [
        str(venv / "bin" / "infinity_emb"),
        "v2",
        "--model-id",
        ".",
        "--served-model-name",
        "all-MiniLM-L6-v2",
        "--engine",
        "optimum",
        "--device",
        "cpu",
        "--pooling-method",
        "mean",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--url-prefix",
        "/v1",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0"}
    return subprocess.Popen(command, cwd=folder, stdout=log, stderr=subprocess.STDOUT, env=env)


def start_mahir(folder: Path, port: int, log: Any, *extra: str) -> subprocess.Popen[bytes]:
    """`mahir serve FOLDER` on `port`, with `extra` arguments."""
    command = [sys.executable, "-m", "mahir.cli", "serve", str(folder), "--port", str(port)]
    command += extra
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)


def load(url: str, name: str, concurrency: int, seconds: float) -> dict[str, Any]:
    config = LoadConfig(url, concurrency=concurrency, duration_s=seconds, model=name)
    result = asyncio.run(run_load(config))
    return {"latencies": result.latencies_ms, "elapsed": result.elapsed_s, **result.summary()}


def embeddings(url: str, name: str, texts: list[str]) -> np.ndarray:
    vectors = []
    for text in texts:
        body = {"input": [text], "model": name}
        reply = httpx.post(f"{url}/v1/embeddings", json=body, timeout=60).json()
        vectors.append(reply["data"][0]["embedding"])
    return np.array(vectors, dtype=np.float64)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.sum(a * b, axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="the mahir output directory to serve")
    parser.add_argument("--infinity-venv", type=Path, default=Path(".venv-infinity"))
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    venv = args.infinity_venv.resolve()  # Infinity starts from inside the model folder
    machine = detect(gpus=False)
    print(machine.summary(), dt.date.today())
    name = open_output_dir(args.folder).name
    with tempfile.TemporaryDirectory(prefix="mahir-infinity-") as tmp:
        folder = infinity_folder(Path(tmp))
        logs = {s: open(Path(tmp) / f"{s}.log", "wb") for s in ("infinity", "mahir")}  # noqa: SIM115
        ports = {"infinity": free_port(), "mahir": free_port()}
        servers = {
            "infinity": start_infinity(venv, folder, ports["infinity"], logs["infinity"]),
            "mahir": start_mahir(args.folder, ports["mahir"], logs["mahir"]),
        }
        urls = {s: f"http://127.0.0.1:{p}" for s, p in ports.items()}
        try:
            wait_ready(urls["infinity"], servers["infinity"], "/health")  # not under the prefix
            wait_ready(urls["mahir"], servers["mahir"], "/v2/health/ready")
            report = compare(urls, name, args.seconds, args.rounds)
        finally:
            for process in servers.values():
                process.send_signal(signal.SIGTERM)
            for process in servers.values():
                process.wait(timeout=60)
            for log in logs.values():
                log.close()
    report["machine"], report["date"] = machine.summary(), str(dt.date.today())
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


def compare(urls: dict[str, str], name: str, seconds: float, rounds: int) -> dict[str, Any]:
    for server, url in urls.items():  # warm-up, untimed
        load(url, name if server == "mahir" else "all-MiniLM-L6-v2", 32, 3)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {s: {} for s in urls}
    for _ in range(rounds):
        for concurrency, label in LOADS:
            for server, url in urls.items():
                model = name if server == "mahir" else "all-MiniLM-L6-v2"
                runs[server].setdefault(label, []).append(load(url, model, concurrency, seconds))
    sentence = sentence_source(7)
    texts = [sentence() for _ in range(200)]
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(default_model_folder()), device="cpu").encode(texts)
    report: dict[str, Any] = {"seconds": seconds, "rounds": rounds, "servers": {}}
    for server, url in urls.items():
        model = name if server == "mahir" else "all-MiniLM-L6-v2"
        cos = cosines(embeddings(url, model, texts), np.asarray(reference, dtype=np.float64))
        rows = {}
        for label, results in runs[server].items():
            latencies = np.concatenate([r["latencies"] for r in results])
            rows[label] = {
                "throughput": float(np.median([r["throughput"] for r in results])),
                "throughput_per_round": [round(r["throughput"], 1) for r in results],
                "p50_ms": float(np.percentile(latencies, 50)),
                "p99_ms": float(np.percentile(latencies, 99)),
                "statuses": [r["statuses"] for r in results],
            }
        report["servers"][server] = {
            "loads": rows,
            "cosine_mean": float(cos.mean()),
            "cosine_worst": float(cos.min()),
        }
    return report


def print_report(report: dict[str, Any]) -> None:
    print(f"{'server':10} {'load':16} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}  cosine mean/worst")
    for server, data in report["servers"].items():
        for label, row in data["loads"].items():
            print(
                f"{server:10} {label:16} {row['throughput']:8.1f} {row['p50_ms']:8.2f} "
                f"{row['p99_ms']:8.2f}  {data['cosine_mean']:.5f} / {data['cosine_worst']:.5f}"
                f"  rounds {row['throughput_per_round']}"
            )
    mahir, infinity = report["servers"]["mahir"]["loads"], report["servers"]["infinity"]["loads"]
    ratio = mahir["concurrency 32"]["throughput"] / infinity["concurrency 32"]["throughput"]
    print(f"throughput at concurrency 32, mahir / infinity: {ratio:.2f}x")


if __name__ == "__main__":
    main()
