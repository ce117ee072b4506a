"""`mahir serve` of an LLM winner against `vllm serve` (vLLM's CPU build, its own OpenAI server).

    .venv/bin/mahir optimize --llm --objective throughput -b 16 --out llm-c16
    .venv/bin/python -m benchmarks.llm_serving llm-c16 [--seconds 60] [--rounds 2]

Both servers run on 127.0.0.1 at once (an idle one costs nothing) and take turns, in rounds,
under the same closed loop (`mahir.serve.llm_loadtest`: streamed `/v1/completions`, generated
prompts of 16-128 words, `--max-tokens` each): concurrency 16, then 1, the server that goes
first alternating by round. vLLM serves the reference's own weights (the fp32 folder mahir
writes from the source, `export.hf_folder`) in its default CPU precision, bf16, from mahir's
vLLM environment (`runtimes/vllm_cpu.py` makes it), its engine core and model in one process
beside its API server's (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, the faster layout on 2 cores; its
OpenAI server always runs the engine core apart) with the 1 GiB KV cache mahir's vLLM engine
has. Both keep prompts' KV blocks for reuse (vLLM's default; `mahir serve` turns it on), which
the generated prompts, random words, never share a whole block of. What each server
answers greedily to the same prompts is then compared with the fp32 reference's own greedy
tokens (tokens in agreement before the first divergence): speed only counts at equal answers.
Results: medians over rounds, the ratios mahir/vLLM, and the other load on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx

from benchmarks.infinity import free_port, start_mahir, wait_ready
from mahir.export.hf_folder import reference_folder
from mahir.generation import Sampling
from mahir.hardware import detect
from mahir.measure import MachineLoad, own_seconds
from mahir.model import load_model
from mahir.runtimes.engines import REFERENCE_ENGINE, open_engine
from mahir.runtimes.vllm_cpu import VLLM_ENV
from mahir.serve.llm_loadtest import LlmLoad, prompt_source, run_llm_load
from mahir.serve.loadtest import LoadConfig
from mahir.types import RuntimeOptions
from mahir.venvs import ensure_env

NAME = "model"
CONCURRENCY = (16, 1)


def start_vllm(folder: Path, port: int, log: Any) -> subprocess.Popen[bytes]:
    env = ensure_env(VLLM_ENV)
    command = [
        str(env.path / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(folder), "--served-model-name", NAME, "--dtype", "bfloat16",
        "--host", "127.0.0.1", "--port", str(port),
        # the KV cache mahir's vLLM engine gives it (`VllmOptions.kv_cache_gb`); the share of
        # memory it may reserve lowered from 0.92, which two servers on one host cannot both take
        "--kv-cache-memory-bytes", str(2**30), "--gpu-memory-utilization", "0.4",
    ]  # fmt: skip
    variables = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=variables)


def served_name(url: str) -> str:
    """The model name a server answers to (its first in `/v1/models`)."""
    return str(httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"])


def load(url: str, concurrency: int, seconds: float, max_tokens: int) -> dict[str, Any]:
    config = LoadConfig(url, concurrency=concurrency, duration_s=seconds, model=served_name(url))
    return asyncio.run(run_llm_load(config, LlmLoad(max_tokens=max_tokens))).summary()


def greedy_agreement(
    url: str, prompts: list[str], reference: list[list[int]], tokenizer: Any
) -> float:
    """Mean share of the reference's greedy tokens the server repeats before it first differs
    (its text tokenized again: servers answer text)."""
    shares = []
    for prompt, expected in zip(prompts, reference, strict=True):
        if not expected:  # the reference ends at once: nothing to agree on
            continue
        body = {
            "model": served_name(url),
            "prompt": prompt,
            "max_tokens": len(expected),
            "temperature": 0,
        }
        answer = httpx.post(f"{url}/v1/completions", json=body, timeout=600)
        answer.raise_for_status()
        got = tokenizer.encode(answer.json()["choices"][0]["text"], add_special_tokens=False)
        agreed = 0
        while agreed < min(len(got), len(expected)) and got[agreed] == expected[agreed]:
            agreed += 1
        shares.append(agreed / len(expected))
    return statistics.fmean(shares)


def time_rounds(
    urls: dict[str, str], rounds: int, seconds: float, max_tokens: int
) -> dict[str, dict[int, list[dict[str, Any]]]]:
    """Each concurrency by each server in turn, the first server alternating by round."""
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {
        n: {c: [] for c in CONCURRENCY} for n in urls
    }
    for r in range(rounds):
        order = list(urls) if r % 2 == 0 else list(reversed(urls))
        for concurrency in CONCURRENCY:
            for name in order:
                run = load(urls[name], concurrency, seconds, max_tokens)
                runs[name][concurrency].append(run)
                print(
                    f"round {r} c{concurrency} {name}: {run['output_tokens_per_s']:.1f} tok/s, "
                    f"TTFT p99 {run['ttft_p99_ms']:.0f} ms, ITL p50 {run['itl_p50_ms']:.1f} ms, "
                    f"TPOT p50 {run['tpot_p50_ms']:.1f} ms",
                    flush=True,
                )
    return runs


def medians(runs: dict[str, dict[int, list[dict[str, Any]]]]) -> dict[str, Any]:
    """Per concurrency and server, the median of each number over rounds; and mahir over vLLM
    for what the targets compare (tokens/s and p99 TTFT at 16, p50 inter-token at 1, beside
    it p50 time per output token, which bursts of tokens cannot flatter)."""
    keys = ("output_tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "tpot_p50_ms")
    table = {
        f"c{c}": {n: {k: statistics.median(r[k] for r in runs[n][c]) for k in keys} for n in runs}
        for c in CONCURRENCY
    }

    def ratio(level: str, key: str) -> float:
        return float(table[level]["mahir"][key] / table[level]["vllm"][key])

    return {
        **table,
        "mahir_over_vllm": {
            "c16_output_tokens_per_s": ratio("c16", "output_tokens_per_s"),
            "c16_ttft_p99": ratio("c16", "ttft_p99_ms"),
            "c1_itl_p50": ratio("c1", "itl_p50_ms"),
            "c1_tpot_p50": ratio("c1", "tpot_p50_ms"),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="the output directory of mahir optimize --llm")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--slots", type=int, default=None, help="passed to mahir serve (a slotted engine's batch)"
    )
    args = parser.parse_args()

    manifest = json.loads((args.folder / "mahir.json").read_text())
    model = load_model(manifest["source"]["source"], llm=True)
    reference = open_engine(REFERENCE_ENGINE, model.original(), RuntimeOptions())
    tokenizer, stops = model.family.tokenizer, model.family.stop_token_ids
    draw = prompt_source(LlmLoad(), seed=1)
    prompts = [draw() for _ in range(8)]
    greedy = Sampling(max_new_tokens=32, stop_token_ids=stops)
    answers = [list(reference.stream(tokenizer.encode(p), greedy)) for p in prompts]
    expected = [[t for t in answer if t not in stops] for answer in answers]
    log = tempfile.NamedTemporaryFile("w+", prefix="llm-serving-", suffix=".log", delete=False)  # noqa: SIM115
    ports = {"mahir": free_port(), "vllm": free_port()}
    urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    vllm_folder = reference_folder(model).path
    assert vllm_folder is not None  # a folder artifact always has its path
    servers = {
        "vllm": start_vllm(vllm_folder, ports["vllm"], log),
        "mahir": start_mahir(
            args.folder, ports["mahir"], log, *(["--slots", str(args.slots)] if args.slots else [])
        ),
    }
    try:
        wait_ready(urls["vllm"], servers["vllm"], "/health")
        wait_ready(urls["mahir"], servers["mahir"], "/v2/health/ready")
        quality = {n: greedy_agreement(u, prompts, expected, tokenizer) for n, u in urls.items()}
        machine_load = MachineLoad(own_seconds=lambda: own_seconds(children=True))  # the servers
        runs = time_rounds(urls, args.rounds, args.seconds, args.max_tokens)
        other = machine_load.other_cores()
    finally:
        for process in servers.values():
            process.terminate()
            process.wait(timeout=60)
    result = {
        "machine": detect().summary(),
        "date": dt.date.today().isoformat(),
        "command": " ".join(["python -m benchmarks.llm_serving", *sys.argv[1:]]),
        "winner": {k: manifest[k] for k in ("variant", "engine", "options", "objective")},
        "served_with": {"slots": args.slots} if args.slots else {},
        "other_cores_busy": other,
        "greedy_agreement_with_fp32": quality,
        "medians": medians(runs),
        "runs": runs,
    }
    print(f"server logs: {log.name}")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
