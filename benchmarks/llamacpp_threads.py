"""llama.cpp's decode latency by thread count and OpenMP wait policy, on a busy machine.

llama.cpp (built with OpenMP, as `make install` builds it) runs each step's graph on `threads`
OpenMP threads that meet at a barrier after every operation. How a thread waits there is
libgomp's OMP_WAIT_POLICY, read once, when libgomp loads: torch loads the same libgomp first,
so the policy is the process's and only the environment can set it. Each configuration
therefore runs in a fresh process. `--spinners N` adds N busy-looping processes for the time
of each run, to make a quiet machine busy; `--site DIR` puts another llama-cpp-python build
first on the path (one built with -DGGML_OPENMP=OFF, llama.cpp's own threads, for example).

    python benchmarks/llamacpp_threads.py --spinners 0 --spinners 1 --repeats 2
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

CHILD = """
import json, sys, time
import numpy as np
import torch  # first, as in mahir: its libgomp is the one llama.cpp then uses
from mahir.families.decoder import DECODER_SPEC, default_llm_path
from mahir.generation import Sampling
from mahir.runtimes.llamacpp import LlamaCppOptions, open_generator
from mahir.types import Artifact

options = LlamaCppOptions(threads=int(sys.argv[1]))
generator = open_generator(Artifact("gguf", DECODER_SPEC, path=default_llm_path()), options)
prompt, gaps, ttft = list(range(100, 228)), [], []
for run in range(4):  # the first warms up
    stamps = [time.perf_counter()]
    for _ in generator.stream(prompt, Sampling(64)):
        stamps.append(time.perf_counter())
    ms = np.diff(stamps) * 1e3
    if run:
        gaps += list(ms[1:])
        ttft.append(ms[0])
p50, p90 = np.percentile(gaps, [50, 90])
print(json.dumps({"decode_p50": p50, "decode_p90": p90, "ttft_p50": float(np.median(ttft))}))
"""


def measure(threads: int, policy: str, spinners: int, site: Path | None) -> dict[str, object]:
    """One configuration in a fresh process, with `spinners` busy loops beside it."""
    src = str(Path(__file__).resolve().parent.parent / "src")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([*([str(site)] if site else []), src]))
    env.pop("OMP_WAIT_POLICY", None)
    if policy != "default":
        env["OMP_WAIT_POLICY"] = policy
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(spinners)]
    try:
        done = subprocess.run(
            [sys.executable, "-c", CHILD, str(threads)],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        for process in busy:
            process.kill()
            process.wait()
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1]}
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main(
    threads: Annotated[list[int], typer.Option("--threads")] = [1, 2],  # noqa: B006
    policies: Annotated[list[str], typer.Option("--policy")] = ["default", "PASSIVE"],  # noqa: B006
    spinners: Annotated[list[int], typer.Option("--spinners")] = [0],  # noqa: B006
    repeats: int = 1,
    site: Path | None = None,
) -> None:
    for busy in spinners:
        for _ in range(repeats):
            for count in threads:
                for policy in policies:
                    load = os.getloadavg()[0]
                    row = measure(count, policy, busy, site)
                    print(
                        json.dumps(
                            {"spinners": busy, "threads": count, "policy": policy,
                             "load1": round(load, 2), **row}
                        ),
                        flush=True,
                    )  # fmt: skip


if __name__ == "__main__":
    typer.run(main)
