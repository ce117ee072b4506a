"""`mahir serve` on a GPU against Infinity's torch engine on the same GPU, over HTTP.

One command, from the repository's root, does it all, each phase under its own timeout, the JSON
(and a markdown table beside it) rewritten after every phase so that a failure or a kill keeps
what was measured before it:

    PYTHONPATH=$PWD/src:$PWD python3 -m benchmarks.gpu_serving --model MINILM_FP16_FOLDER \\
        --wheels WHEELS --infinity-wheels INFINITY_WHEELS --out OUT/gpu-serving.json

1. install: each wheel folder, `pip install --no-index --no-deps --target` into a folder of its
   own that goes first on its own server's PYTHONPATH only: the machine's torch, transformers,
   sentence-transformers and numpy stay as they are, and Infinity's pins shadow nothing of
   mahir's. WHEELS: what `mahir serve` lacks there (starlette, uvicorn, orjson, httptools).
   INFINITY_WHEELS: infinity-emb 0.0.78 and its server's packages at versions it supports
   (fastapi 0.115, starlette 0.46, pydantic 2.10 + pydantic-core, annotated-types,
   prometheus-fastapi-instrumentator, uvicorn 0.32, httptools, orjson, typer 0.12, click 8.1);
   not posthog (optional: no telemetry) nor optimum (no BetterTransformer; turned off anyway).
2. Infinity starts (`infinity_emb v2 --engine torch --dtype float16 --batch-size 256`, through
   `benchmarks.infinity_compat`, which restores the one tokenizer method transformers 5 removed)
   while mahir's artifact is built; an idle server costs the other nothing.
3. `mahir apply benchmarks/recipes/cuda-graphs-fp16.yaml MODEL` (fp16, pooled inside the model,
   torch.compile + a CUDA graph per shape bucket), then `mahir serve` on it with batches of up to
   256; if that fails to build or to serve, `torch-fp16.yaml` (eager, compiles nothing), and the
   report says which served. Readiness is polled (`/v2/health/ready`, Infinity's `/health`).
   `--mahir-workers 1 2` serves the same directory with each worker count too, one server each
   ("mahir", "mahir-w2"), loaded in the same alternation; the report sets each against one.
4. loads: `mahir.serve.loadtest` (aiohttp, closed loop, one generated sentence per request on
   `/v1/embeddings`; Infinity serves it there with `--url-prefix /v1`), split over client
   processes so that the client is not what limits 256 connections; the same seeds, so the same
   sentences, for both servers. Each concurrency level is warmed up on each server first; the
   servers alternate within a level and their order flips from level to level and round to round.
   Loads that would end past `--budget-s` are skipped and say so.
5. fidelity: 64 sentences through each server, against each other and against
   sentence-transformers fp32 on the CPU.

Logs: `--logs` (default: logs/ beside --out): install.log, apply.log, mahir.log, infinity.log.
Targets (issue 15): mahir's requests/s at concurrency 256 >= 2x Infinity's with p99 no worse;
p50 at concurrency 1 no worse. A dry run without a GPU: `--device cpu --concurrency 1 8
--seconds 3 --client-procs 2` (the CPU recipe; Infinity on the CPU in fp32).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime as dt
import json
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from benchmarks.gpu_serving_report import markdown, summarize
from benchmarks.load_processes import load, start_clients

ROOT = Path(__file__).resolve().parent.parent
RECIPES = {  # in the order tried: the next where one fails to build or to serve
    "cuda": [
        ROOT / "benchmarks" / "recipes" / f"{name}.yaml"
        for name in ("cuda-graphs-fp16", "torch-fp16")
    ],
    "cpu": [ROOT / "benchmarks" / "recipes" / "cpu-torch-pooled.yaml"],
}
SERVERS = ("mahir", "infinity")
MAHIR_PACKAGES = (
    *("torch", "transformers", "numpy", "starlette", "uvicorn", "httptools", "uvloop", "orjson"),
    *("typer", "click", "aiohttp"),  # the CLI's, the load clients'
)
INFINITY_PACKAGES = (
    *("infinity-emb", "torch", "transformers", "sentence-transformers", "numpy", "fastapi"),
    *("starlette", "pydantic", "uvicorn", "httptools", "uvloop", "typer", "click"),
)
PROBE = """
import importlib.metadata as m, json, sys
def version(name):
    try:
        return m.version(name)
    except m.PackageNotFoundError:
        return None
found = {name: version(name) for name in sys.argv[1:]}
try:
    import torch
    if torch.cuda.is_available():
        found["gpu"] = torch.cuda.get_device_name(0)
        found["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
except Exception as err:
    found["torch_error"] = repr(err)
print(json.dumps(found))
"""


class Bench:
    """The report being filled, its files, and the time left."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.deadline: float = time.monotonic() + args.budget_s
        self.report: dict[str, Any] = {
            "benchmark": "mahir serve vs Infinity (torch engine), one GPU",
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python3", "-m", "benchmarks.gpu_serving", *sys.argv[1:]]),
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "phases": {},
            "loads": {server: {} for server in servers(args)},
        }
        self.latencies: dict[tuple[str, int], list[np.ndarray]] = {}
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.pool: concurrent.futures.ProcessPoolExecutor | None = None
        args.logs.mkdir(parents=True, exist_ok=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def phase(self, name: str, work: Callable[[], Any]) -> Any:
        """Run one phase; record its status, time and error; never raise."""
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
        started = time.monotonic()
        record: dict[str, Any] = {"status": "ok"}
        result = None
        try:
            result = work()
        except Exception as err:  # a failed phase is recorded; the others still run
            error = f"{type(err).__name__}: {err}"
            if len(error) > 3000:  # the start says what failed, the end of a log's tail why
                error = f"{error[:300]} [...] {error[-2700:]}"
            record = {"status": "failed", "error": error}
        record["seconds"] = round(time.monotonic() - started, 1)
        self.report["phases"][name] = record
        print(f"    {name}: {record}", flush=True)
        self.save()
        return result

    def save(self) -> None:
        """Write the JSON and the markdown; a report that cannot be summarized is still saved."""
        try:
            summarize(self.report, self.latencies)
            table = markdown(self.report)
        except Exception as err:  # never lose the raw numbers to a bug in the summary
            self.report["summary_error"] = f"{type(err).__name__}: {err}"
            table = f"summary failed: {err}\n"
        write(self.args.out, json.dumps(self.report, indent=2, default=str) + "\n")
        write(self.args.out.with_suffix(".md"), table)


def servers(args: argparse.Namespace) -> list[str]:
    """The servers loaded, in order: mahir with each worker count (the first as "mahir", the
    others as "mahir-wN"), then Infinity; each as `--servers` asks."""
    ours = [worker_server(n, args) for n in args.mahir_workers] if "mahir" in args.servers else []
    return ours + (["infinity"] if "infinity" in args.servers else [])


def worker_server(workers: int, args: argparse.Namespace) -> str:
    return "mahir" if workers == args.mahir_workers[0] else f"mahir-w{workers}"


def write(path: Path, text: str) -> None:
    draft = path.with_name(f".{path.name}.tmp")
    draft.write_text(text)
    os.replace(draft, path)


def shown(command: list[str]) -> str:
    """A command as it reads from the repository's root."""
    text = " ".join(["python3", *command[1:]] if command[0] == sys.executable else command)
    return text.replace(f"{ROOT}/", "").replace(str(ROOT), ".")


def tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


# --- environment -------------------------------------------------------------------------------


def install(wheels: Path, target: Path, log: TextIO) -> list[str]:
    found = sorted(wheels.glob("*.whl"))
    if not found:
        raise FileNotFoundError(f"no wheels in {wheels}")
    command = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile"]
    command += ["--no-cache-dir", "--upgrade", "--disable-pip-version-check", "--target"]
    log.write(f"$ {shown([*command, str(target)])} {wheels}/*.whl\n")
    log.flush()
    subprocess.run(
        [*command, str(target), *map(str, found)],
        stdout=log,
        stderr=subprocess.STDOUT,
        timeout=180,
        check=True,
    )
    return [w.name for w in found]


def environment(extra: list[Path], *, src: bool) -> dict[str, str]:
    """The environment of a child process: the installed folders first, then the repository
    (its src/ for mahir), then whatever PYTHONPATH this process was given."""
    paths = [str(p) for p in extra]
    paths += [str(ROOT / "src")] if src else []
    paths += [str(ROOT)]
    given = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    paths += [p for p in given if p and str(Path(p).resolve()) not in paths]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"PYTHONPATH": os.pathsep.join(paths), "PYTHONUNBUFFERED": "1"}
    env |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DO_NOT_TRACK": "1"}
    env["INFINITY_ANONYMOUS_USAGE_STATS"] = "0"
    return env


def versions(env: dict[str, str], names: tuple[str, ...]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *names],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-1500:])
    found: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return found


def machine() -> dict[str, Any]:
    from mahir.hardware import detect

    query = ["--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
    return {
        "host": detect(gpus=False).summary(),
        "python": sys.version,
        "platform": platform.platform(),
        "nvidia_smi": output(["nvidia-smi", *query]),
        "git_commit": output(["git", "-C", str(ROOT), "rev-parse", "HEAD"]),
    }


def output(command: list[str]) -> str | None:
    """What a command prints; None where it is missing or fails."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


# --- servers -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        out.write(f"$ {shown(command)}\n".encode())
        out.flush()
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)


def wait_ready(url: str, process: subprocess.Popen[bytes], log: Path, timeout_s: float) -> float:
    """Poll `url` until it answers 200; the seconds it took. Raises with the log's tail when the
    process exits or the time runs out."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if process.poll() is not None:
            raise RuntimeError(f"exited with {process.returncode}:\n{tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return round(time.monotonic() - started, 1)
        except (urllib.error.URLError, OSError):
            pass  # not listening yet, or 503 while it warms up
        time.sleep(0.25)
    raise TimeoutError(f"not ready after {timeout_s:.0f} s:\n{tail(log)}")


def stop(process: subprocess.Popen[bytes] | None) -> int | None:
    if process is None or process.poll() is not None:
        return None if process is None else process.returncode
    process.terminate()  # both drain in-flight requests on SIGTERM, then exit
    try:
        return process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait(timeout=30)


def mahir_command(args: argparse.Namespace, out_dir: Path, port: int, workers: int) -> list[str]:
    command = [sys.executable, "-m", "mahir.cli", "serve", str(out_dir), "--host", "127.0.0.1"]
    command += ["--port", str(port), "--max-batch-size", str(args.batch_size)]
    command += ["--workers", str(workers)]
    command += ["--max-batch-tokens", str(args.batch_size * 256)]  # 256: MiniLM's max length
    return [*command, *shlex.split(args.mahir_args)]


def infinity_command(args: argparse.Namespace, port: int) -> list[str]:
    dtype = "float16" if args.device == "cuda" else "float32"
    command = [sys.executable, "-m", "benchmarks.infinity_compat", "v2", "--model-id"]
    command += [str(args.model.resolve()), "--served-model-name", "all-MiniLM-L6-v2"]
    command += ["--engine", "torch", "--device", args.device, "--dtype", dtype]
    command += ["--batch-size", str(args.batch_size), "--no-bettertransformer"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--url-prefix", "/v1"]
    command += ["--log-level", "warning"]  # no access log, as mahir's
    return [*command, *shlex.split(args.infinity_args)]


# --- fidelity ----------------------------------------------------------------------------------


def embed(url: str, texts: list[str]) -> np.ndarray:
    body = json.dumps({"input": texts}).encode()
    request = urllib.request.Request(
        f"{url}/v1/embeddings", body, {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as reply:
        data = json.loads(reply.read())["data"]
    return np.array([d["embedding"] for d in sorted(data, key=lambda d: d["index"])])


def cosines(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    cos = np.sum(a * b, axis=1)
    return {"mean": round(float(cos.mean()), 6), "worst": round(float(cos.min()), 6)}


def fidelity(urls: dict[str, str], model: Path) -> dict[str, Any]:
    """Embedding cosine on 64 generated sentences: the servers against mahir's, and each
    against sentence-transformers fp32 on the CPU (the model folder's weights, upcast)."""
    from mahir.serve.loadtest import sentence_source

    sentence = sentence_source(7)
    texts = [sentence() for _ in range(64)]
    vectors = {server: embed(url, texts) for server, url in urls.items()}
    found: dict[str, Any] = {"sentences": len(texts)}
    for server in vectors.keys() - {"mahir"} if "mahir" in vectors else ():
        found[f"mahir_vs_{server}"] = cosines(vectors["mahir"], vectors[server])
    try:
        from sentence_transformers import SentenceTransformer

        reference = SentenceTransformer(str(model), device="cpu").float().encode(texts)
        for server, got in vectors.items():
            found[f"{server}_vs_sentence_transformers_fp32_cpu"] = cosines(got, reference)
    except Exception as err:  # the comparison between the servers stands without it
        found["reference_error"] = f"{type(err).__name__}: {err}"[:500]
    return found


# --- the run -----------------------------------------------------------------------------------


def prepare(bench: Bench, work: Path) -> dict[str, dict[str, str]]:
    """Install the wheels, record the machine and versions; each server's environment."""
    args = bench.args
    sites: dict[str, list[Path]] = {server: [] for server in SERVERS}
    with (args.logs / "install.log").open("a") as log:
        for server, wheels in (("mahir", args.wheels), ("infinity", args.infinity_wheels)):
            if wheels is not None:
                site = work / f"{server}-site"
                sites[server].append(site)
                bench.phase(f"install {server} wheels", partial(install, wheels, site, log))
    envs = {
        "mahir": environment(sites["mahir"], src=True),
        "infinity": environment(sites["infinity"], src=False),
    }
    # this process and its load clients (spawned: they read PYTHONPATH) import mahir too
    os.environ["PYTHONPATH"] = envs["mahir"]["PYTHONPATH"]
    sys.path[:0] = [str(p) for p in sites["mahir"]]
    report = bench.report
    bench.phase("machine", lambda: report.__setitem__("machine", machine()))
    report["versions"] = {}
    for server, names in (("mahir", MAHIR_PACKAGES), ("infinity", INFINITY_PACKAGES)):
        found = bench.phase(f"versions {server}", partial(versions, envs[server], names))
        report["versions"][server] = found
    return envs


def apply(bench: Bench, recipe: Path, env: dict[str, str], out: Path) -> None:
    args = bench.args
    command = [sys.executable, "-m", "mahir.cli", "apply", str(recipe), str(args.model.resolve())]
    command += ["--out", str(out)]
    log = args.logs / "apply.log"
    with log.open("ab") as handle:
        handle.write(f"$ {shown(command)}\n".encode())
        handle.flush()
        done = subprocess.run(
            command, stdout=handle, stderr=subprocess.STDOUT, env=env, timeout=args.apply_timeout_s
        )
    if done.returncode != 0:
        raise RuntimeError(f"mahir apply exited with {done.returncode}:\n{tail(log)}")


def serve(bench: Bench, envs: dict[str, dict[str, str]]) -> dict[str, str]:
    """Infinity starts while mahir's artifact is built, then mahir serves it; the URLs of the
    servers that passed their readiness check."""
    args = bench.args
    ports = {server: free_port() for server in servers(args)}
    up = {}
    if "infinity" in args.servers:
        started = time.monotonic()
        command = infinity_command(args, ports["infinity"])
        bench.report.setdefault("server_commands", {})["infinity"] = shown(command)
        bench.processes["infinity"] = start(command, envs["infinity"], args.logs / "infinity.log")
    built = serve_mahir(bench, envs["mahir"], ports["mahir"]) if "mahir" in args.servers else None
    if built is not None:
        up["mahir"] = f"http://127.0.0.1:{ports['mahir']}"
        for workers in args.mahir_workers[1:]:  # the same directory, more workers
            server = worker_server(workers, args)
            command = mahir_command(args, built, ports[server], workers)
            bench.report["server_commands"][server] = shown(command)
            log = args.logs / f"{server}.log"
            bench.processes[server] = process = start(command, envs["mahir"], log)
            url = f"http://127.0.0.1:{ports[server]}"
            wait = partial(wait_ready, url + "/v2/health/ready", process, log, args.ready_timeout_s)
            if bench.phase(f"{server} ready", wait) is not None:
                up[server] = url
    if "infinity" in bench.processes:
        url = f"http://127.0.0.1:{ports['infinity']}"
        timeout = max(30.0, args.ready_timeout_s - (time.monotonic() - started))
        log, process = args.logs / "infinity.log", bench.processes["infinity"]
        ready = bench.phase(
            "infinity ready", partial(wait_ready, url + "/health", process, log, timeout)
        )
        if ready is not None:
            up["infinity"] = url
    bench.report["servers_up"] = sorted(up)
    return up


def serve_mahir(bench: Bench, env: dict[str, str], port: int) -> Path | None:
    """Build and serve the recipe with the first worker count; where that fails, the next one
    (on a GPU: PyTorch eager fp16, pooled inside, which compiles nothing) while time is left.
    The output directory served, or None where none serves."""
    args = bench.args
    recipes = [args.recipe] if args.recipe else RECIPES[args.device]
    log = args.logs / "mahir.log"
    for i, recipe in enumerate(recipes):
        tag = "" if i == 0 else f" (fallback {recipe.stem})"
        if i and bench.left() < 120:
            bench.report["phases"][f"mahir apply{tag}"] = {
                "status": "skipped: past --budget-s",
                "seconds": 0,
            }
            break
        out = args.work / f"mahir-out-{i}"
        bench.phase(f"mahir apply{tag}", partial(apply, bench, recipe, env, out))
        if not (out / "mahir.json").is_file():
            continue
        command = mahir_command(args, out, port, args.mahir_workers[0])
        bench.report.setdefault("server_commands", {})["mahir"] = shown(command)
        bench.processes["mahir"] = process = start(command, env, log)
        url = f"http://127.0.0.1:{port}/v2/health/ready"
        wait = partial(wait_ready, url, process, log, args.ready_timeout_s)
        if bench.phase(f"mahir ready{tag}", wait) is not None:
            bench.report["served_recipe"] = {
                "path": shown([str(recipe)]),
                "text": recipe.read_text(),
            }
            return out
        stop(process)
    return None


def run_round(bench: Bench, up: dict[str, str], round_: int) -> None:
    """Every level on every server that is up, the servers alternating; warm-ups in round 1."""
    args = bench.args
    for i, level in enumerate(args.concurrency):
        order = [s for s in servers(args) if s in up]
        if (i + round_) % 2:
            order.reverse()
        for server in order:
            name = f"load {server} c{level} round {round_ + 1}"
            warmup = args.warmup if round_ == 0 else 0.0
            process = bench.processes[server]
            if process.poll() is not None:
                skipped = f"skipped: the server exited with {process.returncode}"
                bench.report["phases"][name] = {"status": skipped, "seconds": 0}
            elif bench.left() < warmup + args.seconds + 20:
                bench.report["phases"][name] = {"status": "skipped: past --budget-s", "seconds": 0}
            else:
                bench.phase(name, partial(measure, bench, server, up[server], level, warmup))


def measure(bench: Bench, server: str, url: str, level: int, warmup: float) -> None:
    args = bench.args
    assert bench.pool is not None
    procs = min(args.client_procs, level)
    if warmup:
        load(bench.pool, url, level, warmup, procs)
    summary, latencies = load(bench.pool, url, level, args.seconds, procs)
    bench.latencies.setdefault((server, level), []).append(latencies)
    bench.report["loads"][server].setdefault(str(level), []).append(summary)
    keys = ("requests_per_s", "p50_ms", "p99_ms", "error_share")
    print(f"    {server} c{level}:", {k: round(summary[k], 3) for k in keys}, flush=True)


def run(bench: Bench) -> None:
    args = bench.args
    args.work.mkdir(parents=True, exist_ok=True)
    try:
        envs = prepare(bench, args.work)
        up = serve(bench, envs)
        if not up:
            return

        def clients() -> None:
            bench.pool = start_clients(args.client_procs)

        bench.phase("client processes", clients)
        if bench.pool is None:
            return
        for round_ in range(args.rounds):
            run_round(bench, up, round_)
            if round_ == 0 and bench.left() > 30:
                found = bench.phase("fidelity", lambda: fidelity(up, args.model))
                bench.report["fidelity"] = found
    finally:
        codes = bench.phase(
            "stop servers", lambda: {s: stop(p) for s, p in bench.processes.items()}
        )
        bench.report["server_exit_codes"] = codes
        for server in bench.processes:
            bench.report.setdefault("log_tails", {})[server] = tail(
                args.logs / f"{server}.log", 1500
            )
        if bench.pool is not None:
            bench.pool.shutdown(cancel_futures=True)
        bench.save()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="sentence-transformers folder")
    parser.add_argument("--out", type=Path, required=True, help="the JSON (markdown beside it)")
    parser.add_argument("--logs", type=Path, help="server logs [default: logs/ beside --out]")
    parser.add_argument("--work", type=Path, help="mahir's output dir, installs [default: tmp]")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--recipe", type=Path, help="[default: benchmarks/recipes/, by device]")
    parser.add_argument("--wheels", type=Path, help="wheels mahir's server needs here")
    parser.add_argument("--infinity-wheels", type=Path, help="infinity-emb and its server's")
    parser.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS))
    parser.add_argument(
        "--mahir-workers",
        type=int,
        nargs="+",
        default=[1],
        help="serve mahir's directory with each worker count, one server each, loads alternating",
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--seconds", type=float, default=10.0, help="timed, per load")
    parser.add_argument("--warmup", type=float, default=8.0, help="per server and level")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256, help="both servers' largest")
    parser.add_argument("--client-procs", type=int, default=8, help="load client processes")
    parser.add_argument("--budget-s", type=float, default=420.0, help="no load ends past it")
    parser.add_argument("--apply-timeout-s", type=float, default=240.0)
    parser.add_argument("--ready-timeout-s", type=float, default=240.0)
    more = "more %s options, as one string: --%s-args='--max-padding 2'"
    parser.add_argument("--mahir-args", default="", help=more % ("mahir serve", "mahir"))
    parser.add_argument("--infinity-args", default="", help=more % ("infinity_emb v2", "infinity"))
    args = parser.parse_args()
    args.logs = args.logs or args.out.parent / "logs"
    args.work = args.work or Path(tempfile.mkdtemp(prefix="gpu-serving-"))
    return args


def main() -> None:
    # a SIGTERM still stops the servers and writes the report
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    bench = Bench(parse_args())
    try:
        run(bench)
    finally:
        print(tail(bench.args.out.with_suffix(".md"), 20_000), flush=True)


if __name__ == "__main__":
    main()
