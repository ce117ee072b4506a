"""`mahir optimize` against what a user would pick instead, timed side by side in one process.

    benchmarks/peers_setup.sh        # once: the peer venv (.venv-peers), see that script
    HF_HUB_OFFLINE=1 .venv-peers/bin/python benchmarks/peers.py [--seconds 10]
        [--time-budget 10] [--winners DIR] [--json-prefix PATH] [--workload 64-128|mixed]

For each workload (batch 1; sentences of 64-128 tokens, and short-skewed mixed lengths) it runs
`mahir.search.optimize` for that workload (or reuses a winner saved in `--winners DIR/<workload>`),
opens the winner with `mahir.load`, builds the peers, and times them all in ONE interleaved
`mahir.measure.measure` call, so drift of the machine hits all alike:

1. the winner of `mahir optimize` for the workload;
2. PyTorch eager fp32, the baseline every speedup is a ratio of medians against;
3. OpenVINO's default: the fp32 IR compiled with no precision hint (bf16 on bf16-capable CPUs);
4. OpenVINO + NNCF int8 with its defaults (`NncfInt8()`), no precision hint either;
5. ONNX Runtime dynamic int8 as `optimum-cli onnxruntime quantize --avx512_vnni` makes it
   (sentence-transformers' `export_dynamic_quantized_onnx_model`), run by plain ONNX Runtime;
6. the same file through sentence-transformers' own `backend="onnx"` (optimum's ORTModel);
7. sentence-transformers' `backend="openvino"` after `export_static_quantized_openvino_model`,
   calibrated on a local CSV of generated sentences shaped like the workload (no hub here).

Peers 6 and 7 sit behind a small adapter that feeds the same tokenized batch to the backend's
underlying optimum model (torch tensors in, `last_hidden_state` out), so every contestant gets
identical inputs and fidelity is measured alike for all: pooled sentence-embedding cosine to the
fp32 original (`mahir.export.onnx.fidelity`) on the timed batches, held-out batches of 8 and mahir's
three verification shapes. A contestant counts against the winner only where it meets the same
bar the winner had to (mean >= 0.99, worst >= 0.98). Timing batches are drawn with a seed apart
from the ones `optimize` searched on, and calibration data (NNCF, sentence-transformers'
OpenVINO int8) is shaped like the workload, as the winner's was.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

import mahir
from mahir.families.text import generate_sentences
from mahir.hardware import Machine, detect
from mahir.measure import MeasureConfig, measure
from mahir.model import Model, load_model
from mahir.passes import PassContext
from mahir.passes.nncf import NncfInt8
from mahir.quality import fidelity
from mahir.recipe import Recipe
from mahir.runtimes import get_runtime, open_session, reference_outputs
from mahir.search.budget import FidelityBudget
from mahir.search.builder import ArtifactBuilder
from mahir.types import (
    CPU,
    Artifact,
    Inputs,
    OpenVinoOptions,
    Outputs,
    Perf,
    Quality,
    RuntimeOptions,
    Session,
)
from mahir.workload import Batch

WORKLOADS: dict[str, tuple[int, int] | None] = {"64-128": (64, 128), "mixed": None}
BASELINE = "PyTorch eager fp32"
WINNER = "mahir optimize winner"
BUDGET = FidelityBudget()  # the default `--max-drop 0.01`: mean >= 0.99, worst >= 0.98
TIMING_SEED = 100  # apart from optimize's seeds (0: its timing, 1: calibration, 2: its check)
DEFAULT = RuntimeOptions(
    openvino=OpenVinoOptions(precision=None)
)  # OpenVINO picks the precision, as users get
# Peers mahir can build itself, as recipes: a winner with the same recipe is the same model.
RECIPES = {
    BASELINE: (Recipe((), "torch"), "mahir's torch runtime"),
    "OpenVINO default": (Recipe((), "openvino", DEFAULT), "fp32 IR, no precision hint"),
    "OpenVINO + NNCF int8": (
        Recipe((NncfInt8(),), "openvino", DEFAULT),
        "NncfInt8() defaults, calibrated like the winner, no precision hint",
    ),
}
VERSIONS = """mahir torch transformers sentence-transformers optimum optimum-onnx optimum-intel
onnxruntime openvino nncf huggingface-hub""".split()


@dataclass
class Contestant:
    session: Session
    how: str
    """How it was made, in one line, for the JSON."""
    recipe_hash: str | None = None
    """For what mahir builds: the recipe's hash, to tell a peer that is the winner itself."""


class OptimumSession:
    """A sentence-transformers backend's own model (optimum's ORTModel or OVModel) behind
    mahir's Session protocol: the batch goes in as torch tensors, as sentence-transformers
    passes it, and the token embeddings come back under the reference's output name."""

    device = CPU

    def __init__(self, st_model: Any, runtime: str, output: str) -> None:
        self.runtime = runtime
        self._model = st_model[0].auto_model
        self._output = output

    def run(self, inputs: Inputs) -> Outputs:
        import torch

        with torch.inference_mode():
            out = self._model(**{name: torch.from_numpy(a) for name, a in inputs.items()})
        return {self._output: out.last_hidden_state.numpy()}

    def describe(self) -> dict[str, Any]:
        inner = self._model.model if hasattr(self._model, "model") else None
        if self.runtime.endswith("onnxruntime") and inner is not None:
            options = inner.get_session_options()
            threads = options.intra_op_num_threads
            return {
                "threads": threads or "onnxruntime default (all cores)",
                "graph_optimization": options.graph_optimization_level.name,
                "providers": inner.get_providers(),
            }
        compiled = self._model.request
        return {
            "threads": compiled.get_property("INFERENCE_NUM_THREADS"),
            "precision": compiled.get_property("INFERENCE_PRECISION_HINT").to_string(),
            "hint": str(compiled.get_property("PERFORMANCE_HINT")).lower(),
            "ov_config": dict(self._model.ov_config or {}),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds each")
    parser.add_argument("--time-budget", type=float, default=10.0, help="optimize, minutes")
    parser.add_argument("--winners", type=Path, help="save winners here; reuse saved ones")
    parser.add_argument("--json-prefix", type=Path, help="write <prefix>-<workload>.json")
    parser.add_argument("--workload", action="append", choices=sorted(WORKLOADS))
    parser.add_argument(
        "--quiet-load", type=float, default=0.5, help="wait for a 1-min load below this to time"
    )
    parser.add_argument("--quiet-wait", type=float, default=0.0, help="wait at most, minutes")
    args = parser.parse_args()
    # Read when huggingface_hub is first imported, which none of the imports above does.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    console = Console(width=max(Console().width, 130))
    model = load_model()
    machine = detect(gpus=False)
    console.print(f"machine: {machine.summary()}; load {_load()}")
    with tempfile.TemporaryDirectory(prefix="mahir-peers-") as tmp:
        winners = args.winners or Path(tmp) / "winners"
        for name in args.workload or list(WORKLOADS):
            record = run_workload(model, machine, name, args, winners / name, Path(tmp) / name)
            console.print(table(record))
            console.print(verdict(record))
            if args.json_prefix is not None:
                path = Path(f"{args.json_prefix}-{name}.json")
                path.write_text(json.dumps(record, indent=2, default=str) + "\n")
                console.print(f"wrote {path}")
            gc.collect()


def run_workload(
    model: Model,
    machine: Machine,
    name: str,
    args: argparse.Namespace,
    winner_dir: Path,
    workdir: Path,
) -> dict[str, Any]:
    """Optimize for the workload (or reuse its saved winner), build the peers, check them all
    on the same batches, then time them all in one interleaved measurement."""
    token_range = WORKLOADS[name]
    workload = model.family.workload(
        [1], token_range=token_range, batches_per_size=16, seed=TIMING_SEED
    )
    report = optimize_winner(model, token_range, args.time_budget, winner_dir, workdir / "opt")
    best = next(c for c in report["candidates"] if c["id"] == report["best"])
    how = f"mahir optimize winner {best['id']}: {best['label']}"
    contestants = {WINNER: Contestant(mahir.load(winner_dir), how, best["recipe_hash"])}
    contestants.update(build_peers(model, machine, token_range, workdir))
    checked = _fidelity_batches(model, workload.batches[1], token_range)
    reference = reference_outputs(model, checked)
    quality = {n: fidelity(model, c.session, checked, reference) for n, c in contestants.items()}
    load_before = _wait_for_quiet(args.quiet_load, args.quiet_wait)
    sessions = {n: c.session for n, c in contestants.items()}
    perfs = measure(sessions, workload.batches[1], MeasureConfig(min_time_s=args.seconds))
    rows = {
        n: _row(c, perfs[n], perfs[BASELINE], quality[n], None if n == WINNER else best)
        for n, c in contestants.items()
    }
    return {
        "workload": name,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine.summary(),
        "machine_detail": machine.to_dict(),
        "load_average": {"before_timing": load_before, "after_timing": _load()},
        "versions": _versions(),
        "timing": {"batch_size": 1, "batches": workload.describe(), "seconds_each": args.seconds},
        "fidelity_on": f"{len(checked)} batches: the 16 timed, 4 held-out of 8, 3 shapes",
        "budget": BUDGET.describe("embedding"),
        "optimize": _optimize_summary(report),
        "rows": rows,
        "acceptance": acceptance(rows, perfs),
    }


def optimize_winner(
    model: Model,
    token_range: tuple[int, int] | None,
    minutes: float,
    out: Path,
    workdir: Path,
) -> dict[str, Any]:
    """Run `mahir optimize` for the workload and save its winner to `out`, unless `out` already
    holds one; either way return its report.json."""
    if not (out / "mahir.json").is_file():
        config = mahir.OptimizeConfig(token_range=token_range, time_budget_s=minutes * 60)
        result = mahir.optimize(model, config, workdir, on_event=_progress)
        if result.best is None:
            raise SystemExit(f"mahir optimize found no winner: see {result.save(out)}")
        result.save(out)
    report: dict[str, Any] = json.loads((out / "report.json").read_text())
    return report


def build_peers(
    model: Model, machine: Machine, token_range: tuple[int, int] | None, workdir: Path
) -> dict[str, Contestant]:
    """Peers 2-7 (see the module docstring), each opened the way its users open it."""
    # The winner's calibration: optimize samples 4 batches of 8 like the workload, seed 1.
    calibration = model.family.workload([8], token_range=token_range, batches_per_size=4, seed=1)
    ctx = PassContext(model, workdir / "mahir", tuple(calibration.batches[8]), machine)
    builder = ArtifactBuilder(ctx)
    peers = {}
    for name, (recipe, how) in RECIPES.items():
        artifact = builder.build(recipe.steps, get_runtime(recipe.runtime).formats)
        session = open_session(recipe.runtime, artifact, recipe.options)
        peers[name] = Contestant(session, how, recipe.hash())
    folder = workdir / "st-model"
    shutil.copytree(_model_folder(model), folder)
    peers.update(sentence_transformers_onnx(model, folder))
    peers.update(sentence_transformers_openvino(model, folder, token_range, workdir))
    return peers


def sentence_transformers_onnx(model: Model, folder: Path) -> dict[str, Contestant]:
    """Dynamic int8 exactly as `optimum-cli onnxruntime quantize --avx512_vnni` makes it, run by
    plain ONNX Runtime (mahir's session) and by sentence-transformers' ONNX backend."""
    from sentence_transformers import SentenceTransformer, export_dynamic_quantized_onnx_model

    fp32 = SentenceTransformer(str(folder), backend="onnx", device="cpu")
    export_dynamic_quantized_onnx_model(fp32, "avx512_vnni", str(folder))
    del fp32
    file_name = "onnx/model_qint8_avx512_vnni.onnx"
    artifact = Artifact("onnx", model.spec, path=folder / file_name)
    st_model = SentenceTransformer(
        str(folder), backend="onnx", device="cpu", model_kwargs={"file_name": file_name}
    )
    how = "export_dynamic_quantized_onnx_model(model, 'avx512_vnni', folder)"
    output = model.spec.outputs[0]
    return {
        "ORT dynamic int8 (optimum avx512_vnni)": Contestant(
            open_session("onnxruntime", artifact), f"{how}; mahir's ONNX Runtime session"
        ),
        "sentence-transformers ONNX int8": Contestant(
            OptimumSession(st_model, "st-onnxruntime", output),
            f"{how}; SentenceTransformer(folder, backend='onnx', file_name={file_name!r})",
        ),
    }


def sentence_transformers_openvino(
    model: Model, folder: Path, token_range: tuple[int, int] | None, workdir: Path
) -> dict[str, Contestant]:
    """sentence-transformers' OpenVINO static int8, calibrated on a local dataset. OVQuantizer
    quantizes the model it is given in place, so it gets a fresh copy used for nothing else."""
    from sentence_transformers import SentenceTransformer, export_static_quantized_openvino_model

    data = workdir / "calibration"
    data.mkdir(parents=True)
    rng = np.random.default_rng(1)
    sentences = generate_sentences(300, model.family.tokenizer, rng, token_range=token_range)
    with (data / "train.csv").open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["text"])
        writer.writerows([s] for s in sentences)
    fresh = SentenceTransformer(str(folder), backend="openvino", device="cpu")
    export_static_quantized_openvino_model(
        fresh,
        None,
        str(folder),
        dataset_name=str(data),
        dataset_config_name="default",
        dataset_split="train",
        column_name="text",
    )
    del fresh
    file_name = "openvino/openvino_model_qint8_quantized.xml"
    st_model = SentenceTransformer(
        str(folder), backend="openvino", device="cpu", model_kwargs={"file_name": file_name}
    )
    how = "export_static_quantized_openvino_model(fresh copy, None, folder, local train.csv)"
    return {
        "sentence-transformers OpenVINO int8": Contestant(
            OptimumSession(st_model, "st-openvino", model.spec.outputs[0]),
            f"{how}; SentenceTransformer(folder, backend='openvino', file_name={file_name!r})",
        )
    }


def _fidelity_batches(
    model: Model, timed: list[Batch], token_range: tuple[int, int] | None
) -> list[Batch]:
    held_out = model.family.workload([8], token_range=token_range, batches_per_size=4, seed=2)
    return [*timed, *held_out.batches[8], *model.family.verification_batches()]


def _row(
    contestant: Contestant,
    perf: Perf,
    base: Perf,
    quality: Quality,
    winner: dict[str, Any] | None,
) -> dict[str, Any]:
    """One contestant's numbers; `winner` (the winner's report entry) for a peer, else None."""
    head = quality.headline
    same = winner is not None and contestant.recipe_hash == winner["recipe_hash"]
    return {
        "how": contestant.how,
        "same_recipe_as_winner": same,
        "runtime": contestant.session.runtime,
        "settings": contestant.session.describe(),
        "p50_ms": perf.p50_ms,
        "p90_ms": perf.p90_ms,
        "p99_ms": perf.p99_ms,
        "samples_per_s": perf.throughput,
        "speedup": base.p50_ms / perf.p50_ms,
        "noisy": perf.noisy,
        "spread": perf.spread,
        "runs": len(perf.latencies_ms),
        "cosine_mean": head.cosine_mean,
        "cosine_min": head.cosine_min,
        "meets_bar": BUDGET.judge(quality) is None,
        "misses": BUDGET.judge(quality),
    }


def table(record: dict[str, Any]) -> Table:
    rows = record["rows"]
    title = f"all-MiniLM-L6-v2, batch 1, {record['workload']} ({record['machine']})"
    caption = f"bar: {record['budget']}; ~ = noisy (jitter over 10%)"
    result = Table(title=title, caption=caption)
    columns = ("contestant", "p50 ms", "p90 ms", "samples/s", "speedup", "cosine", "meets bar")
    for column in columns:
        result.add_column(column, justify="left" if column == "contestant" else "right")
    for name, row in rows.items():
        label = f"{name}: {record['optimize']['best']}" if name == WINNER else name
        result.add_row(
            f"[bold]{label}[/bold]" if name == WINNER else label,
            f"{row['p50_ms']:.2f}{' ~' if row['noisy'] else ''}",
            f"{row['p90_ms']:.2f}",
            f"{row['samples_per_s']:,.0f}",
            f"{row['speedup']:.2f}x",
            f"{row['cosine_mean']:.5f} / {row['cosine_min']:.5f}",
            "yes" if row["meets_bar"] else f"no: {row['misses']}",
        )
    return result


def acceptance(rows: dict[str, dict[str, Any]], perfs: dict[str, Perf]) -> dict[str, Any]:
    """Whether the winner is at least as fast (p50) as every peer that meets the same bar. Per
    peer: its p50 over the winner's (above 1: the winner is faster) with a bootstrap 95%
    interval. A peer with the winner's own recipe is the same model: its ratio shows the noise
    of the measurement, and `holds` leaves it out (`holds_counting_itself` does not)."""
    against = {}
    for name, row in rows.items():
        if name == WINNER or not row["meets_bar"]:
            continue
        low, high = _ratio_interval(perfs[name], perfs[WINNER])
        against[name] = {
            "ratio": row["p50_ms"] / rows[WINNER]["p50_ms"],
            "ci95": [low, high],
            "same_recipe_as_winner": row["same_recipe_as_winner"],
        }
    others = [a["ratio"] >= 1 for a in against.values() if not a["same_recipe_as_winner"]]
    return {
        "holds": all(others),
        "holds_counting_itself": all(a["ratio"] >= 1 for a in against.values()),
        "peer_p50_over_winner": against,
    }


def _ratio_interval(peer: Perf, winner: Perf, draws: int = 2000) -> tuple[float, float]:
    """95% bootstrap interval of the ratio of medians, runs resampled independently."""
    rng = np.random.default_rng(0)
    medians = []
    for perf in (peer, winner):
        latencies = np.asarray(perf.latencies_ms)
        medians.append(np.median(rng.choice(latencies, (draws, latencies.size)), axis=1))
    low, high = np.percentile(medians[0] / medians[1], [2.5, 97.5])
    return float(low), float(high)


def verdict(record: dict[str, Any]) -> str:
    result = record["acceptance"]
    lines = [f"acceptance {'holds' if result['holds'] else 'FAILS'} (p50, peers within the bar):"]
    for name, peer in result["peer_p50_over_winner"].items():
        state = "ok   " if peer["ratio"] >= 1 else "LOSES"
        low, high = peer["ci95"]
        note = " (the winner's own recipe: noise)" if peer["same_recipe_as_winner"] else ""
        lines.append(
            f"  {state} winner {peer['ratio']:.3f}x as fast as {name} "
            f"[95% {low:.3f}-{high:.3f}]{note}"
        )
    return "\n".join(lines)


def _optimize_summary(report: dict[str, Any]) -> dict[str, Any]:
    keep = ("id", "status", "reason", "speedup", "quality")
    return {
        "best": report["best"],
        "elapsed_s": report["elapsed_s"],
        "complete": report["complete"],
        "time_budget_s": report["time_budget_s"],
        "workload": report["workload"],
        "candidates": [{k: c.get(k) for k in keep} for c in report["candidates"]],
    }


def _model_folder(model: Model) -> Path:
    if model.folder is None:
        raise SystemExit("the peers need a Hugging Face folder (sentence-transformers loads it)")
    return model.folder


def _versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in VERSIONS:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def _progress(candidate: str, text: str) -> None:
    print(f"  optimize: {candidate}: {text}", flush=True)


def _wait_for_quiet(threshold: float, minutes: float) -> list[float]:
    """Wait until the 1-minute load average is below `threshold` (other processes share these
    cores), for at most `minutes`; the load when timing starts goes into the record."""
    deadline = time.monotonic() + minutes * 60
    while os.getloadavg()[0] >= threshold and time.monotonic() < deadline:
        time.sleep(10)
    return _load()


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


if __name__ == "__main__":
    main()
