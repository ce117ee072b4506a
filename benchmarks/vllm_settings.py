"""vLLM's own settings and mahir's W8A8 folders, side by side at 16 sequences at once on a CPU.

Each setting is one `vllm.LLM` in a single process (mahir's vLLM environment), all loaded first,
then timed in turns, round after round: generating 128 tokens (greedy, stop tokens ignored) for
16 prompts of 20-170 random token ids, the shape of `benchmarks/llm_serving.py`'s load at
concurrency 16. Medians over rounds and each setting's speed against vLLM's bf16 default.
Settings whose wins are a few percent need this layout: on a shared 2-core machine, separate
processes started minutes apart differ by 10% with no change at all.

    .venv/bin/python -m benchmarks.vllm_settings [--rounds 6] [--only w8a8-head ...] [--json out]

The timing half runs under the vLLM environment's Python (`--inside SPEC`), so nothing of mahir
is imported at module level.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PROMPTS, NEW_TOKENS = 16, 128


def settings(folders: dict[str, str]) -> dict[str, tuple[str, dict[str, Any]]]:
    """Name -> (folder, `vllm.LLM` keywords beyond the common ones, and `attention`: what
    `attention_choices` sets around that engine)."""
    w8a8 = folders["w8a8"]
    kernels = ["+rms_norm", "+silu_and_mul", "+rotary_embedding"]  # vLLM's C++ CPU kernels
    return {
        "bf16": (folders["reference"], {}),
        "w8a8": (w8a8, {}),
        "w8a8-head": (folders["w8a8-head"], {}),
        "w8a8-block32": (w8a8, {"block_size": 32}),
        "w8a8-block64": (w8a8, {"block_size": 64}),
        "w8a8-block32-fp8-kv": (w8a8, {"block_size": 32, "kv_cache_dtype": "fp8"}),
        "w8a8-fp8-kv": (w8a8, {"kv_cache_dtype": "fp8"}),
        "w8a8-async": (w8a8, {"async_scheduling": True}),
        "w8a8-custom-ops": (w8a8, {"compilation_config": {"custom_ops": kernels}}),
        "w8a8-all-ops": (w8a8, {"compilation_config": {"custom_ops": ["all"]}}),
        # vLLM's CPU attention: its kernel for AMX (chosen for bf16 with AMX) or its AVX-512 one,
        # and decode attention split along the keys and values (its default) or not
        "w8a8-attention-vec": (w8a8, {"attention": {"isa": "vec"}}),
        "w8a8-no-kv-split": (w8a8, {"attention": {"split_kv": False}}),
        "w8a8-attention-vec-no-kv-split": (w8a8, {"attention": {"isa": "vec", "split_kv": False}}),
    }


@contextlib.contextmanager
def attention_choices(isa: str | None = None, split_kv: bool | None = None) -> Iterator[None]:
    """vLLM's CPU attention kernel (`isa`, fixed when an engine is built) and its decode split
    (`split_kv`, read at every step from `VLLM_CPU_ATTN_SPLIT_KV`, which vLLM caches once its
    engine has started, hence the cache cleared on the way in and out)."""
    import vllm.envs
    from vllm.v1.attention.backends import cpu_attn

    chosen_isa = cpu_attn._get_attn_isa
    before = os.environ.get("VLLM_CPU_ATTN_SPLIT_KV")
    if isa is not None:
        cpu_attn._get_attn_isa = lambda *args, **kwargs: isa
    if split_kv is not None:
        os.environ["VLLM_CPU_ATTN_SPLIT_KV"] = str(int(split_kv))
    clear = getattr(vllm.envs.__getattr__, "cache_clear", lambda: None)
    clear()
    try:
        yield
    finally:
        cpu_attn._get_attn_isa = chosen_isa
        if before is None:
            os.environ.pop("VLLM_CPU_ATTN_SPLIT_KV", None)
        else:
            os.environ["VLLM_CPU_ATTN_SPLIT_KV"] = before
        clear()


def time_inside(spec: dict[str, Any]) -> dict[str, Any]:
    """In the vLLM environment: load every setting, then time them in turns."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams

    engines, attention = {}, {}
    for name, (folder, keywords) in spec["settings"].items():
        attention[name] = keywords.pop("attention", {})
        with attention_choices(**attention[name]):
            engines[name] = LLM(
                folder, dtype="bfloat16", max_model_len=2048, kv_cache_memory_bytes=2**30,
                **keywords,
            )  # fmt: skip
    draw = random.Random(0)
    prompts: list[Any] = [
        {"prompt_token_ids": [draw.randrange(1000, 40000) for _ in range(draw.randrange(20, 170))]}
        for _ in range(PROMPTS)
    ]
    sampling = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True, temperature=0)
    for name, engine in engines.items():  # compile every shape the timed calls meet
        with attention_choices(**attention[name]):
            engine.generate(prompts, sampling, use_tqdm=False)
    seconds: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(spec["rounds"]):
        for name, engine in engines.items():
            with attention_choices(**attention[name]):
                started = time.perf_counter()
                engine.generate(prompts, sampling, use_tqdm=False)
                seconds[name].append(time.perf_counter() - started)
    return {"seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument(
        "--only", nargs="+", default=None, help="these settings (bf16 and w8a8 always run)"
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--inside", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside is not None:
        spec = json.loads(args.inside.read_text())
        args.inside.write_text(json.dumps(time_inside(spec)))
        return

    from mahir.export.hf_folder import reference_folder
    from mahir.hardware import detect
    from mahir.measure import MachineLoad
    from mahir.model import load_model
    from mahir.passes.w8a8 import W8A8, w8a8_folder
    from mahir.runtimes.vllm_cpu import VLLM_ENV
    from mahir.venvs import ensure_env

    model = load_model(None, llm=True)
    folders = {
        "reference": reference_folder(model).path,
        "w8a8": w8a8_folder(model, W8A8()).path,
        "w8a8-head": w8a8_folder(model, W8A8(head=True)).path,
    }
    chosen = settings({k: str(v) for k, v in folders.items()})
    if args.only is not None:
        unknown = set(args.only) - set(chosen)
        if unknown:
            parser.error(f"unknown settings {sorted(unknown)}: choose from {sorted(chosen)}")
        chosen = {k: v for k, v in chosen.items() if k in {"bf16", "w8a8", *args.only}}
    spec = {"settings": chosen, "rounds": args.rounds}
    python = ensure_env(VLLM_ENV).path / "bin" / "python"
    machine_load = MachineLoad(own_seconds=lambda: sum(os.times()[:4]))  # with the waited child
    with tempfile.TemporaryDirectory() as scratch:
        exchange = Path(scratch) / "spec.json"
        exchange.write_text(json.dumps(spec))
        command = [str(python), __file__, "--inside", str(exchange)]
        subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        timed = json.loads(exchange.read_text())["seconds"]
    medians = {name: statistics.median(s) for name, s in timed.items()}
    tokens = PROMPTS * NEW_TOKENS
    result = {
        "machine": detect().summary(),
        "date": dt.date.today().isoformat(),
        "command": " ".join(["python -m benchmarks.vllm_settings", *sys.argv[1:]]),
        "other_cores_busy": machine_load.other_cores(),
        "workload": f"{PROMPTS} prompts of 20-170 random ids, {NEW_TOKENS} new tokens each",
        "output_tokens_per_s": {name: tokens / m for name, m in medians.items()},
        "speed_vs_bf16": {name: medians["bf16"] / m for name, m in medians.items()},
        "speed_vs_w8a8": {name: medians["w8a8"] / m for name, m in medians.items()},
        "seconds": timed,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "seconds"}, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
