"""The contract between decoder LLM engines and everything above them: a `Generator`.

An encoder answers in one forward pass (`Session`); a decoder answers by generating. A prefill
runs the prompt and fills the KV cache, then each decode step reads the whole cache to make one
token, greedy or sampled, until a stop token or `max_new_tokens`. What users feel is split the
same way: time to first token (prefill) and time per output token (decode), so a generator
streams its tokens one by one and the caller's clock reads each.

Engines (PyTorch, OpenVINO GenAI, llama.cpp, vLLM) implement `Generator` on token ids: the
family (`families/decoder.py`) owns the tokenizer, the chat template and the prompts. Fidelity
needs the distribution, not only the argmax, so every engine also answers `logprobs`: the
teacher-forced next-token log-probabilities over a whole sequence, from which `quality` reads
top-1 agreement, KL divergence and perplexity against the fp32 reference. Nothing here imports
a framework; `choose` picks a token from logits in numpy for engines that hand out logits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np

from mahir.errors import BadInput
from mahir.types import Device

Logits = TypeVar("Logits")


@dataclass(frozen=True, slots=True)
class Structure:
    """What a structured answer is: one JSON value of `schema`; or, with `tags`, blocks of the
    opening tag, a JSON value of `schema` and the closing tag, each tag on its own line (tool
    calls), one block or, `repeat`, several a line apart, or else a JSON value of
    `alternative`."""

    schema: dict[str, Any]
    tags: tuple[str, str] | None = None
    repeat: bool = False
    alternative: dict[str, Any] | None = None


class Constraint(Protocol):
    """What one generation may write next (structured outputs: a JSON schema, a tool call),
    followed token by token. `choose` masks the logits with it before choosing and tells it
    the token chosen; it belongs to one sequence. An engine that chooses tokens in its own
    process holds them to `grammar` (its grammar engine reads llguidance's Lark) or to
    `structure` (one that takes JSON schemas and tags) itself."""

    grammar: str
    """The grammar, in llguidance's Lark dialect."""
    structure: Structure
    """The same answer's shape, from which `grammar` was written."""

    def allowed(self, logits: np.ndarray) -> np.ndarray:
        """A copy of `logits` with every token the constraint forbids at -inf."""
        ...

    def advance(self, token: int) -> None:
        """`token` was chosen: what may follow changes."""
        ...


@dataclass(frozen=True, slots=True)
class Sampling:
    """How tokens are chosen and when generation stops."""

    max_new_tokens: int = 64
    """New tokens at most (the prompt not counted)."""
    temperature: float = 0.0
    """0: greedy (argmax, deterministic); above 0: sample from softmax(logits / temperature)."""
    top_p: float = 1.0
    """Sample only from the smallest set of tokens whose probabilities add up to top_p."""
    seed: int | None = None
    """Seed of a sampled generation: the same seed, prompt and engine give the same tokens."""
    stop_token_ids: tuple[int, ...] = ()
    """Tokens that end the generation (the model's end-of-turn and end-of-text); the stop token
    itself is yielded last."""
    logprobs: int | None = None
    """Yield each token as a `Token` with its log-probability and this many of the most likely
    alternatives (0: its own only); None: plain ids. Engines with `token_logprobs` honour it."""
    constraint: Constraint | None = field(default=None, compare=False)
    """What the tokens may be (structured outputs), applied by `choose`; one per sequence.
    Engines with `constrained` honour it."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be >= 0, got {self.logprobs}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def argmax_only(self) -> bool:
        """Greedy with nothing else to do per token (no log-probabilities, no constraint): an
        engine may take the argmax where the logits are, without `choose`."""
        return self.greedy and self.logprobs is None and self.constraint is None


class Generator(Protocol):
    """One decoder LLM on one engine and device."""

    engine: str
    device: Device
    context_length: int
    """Prompt plus new tokens at most."""
    max_concurrency: int
    """`stream` calls that may run at once, each on its own thread, and that the engine runs
    together (a server runs this many generations and queues the rest). 1 for an engine with one
    KV cache and no scheduler of its own."""

    def stream(self, prompt: Sequence[int], sampling: Sampling) -> Iterator[int]:
        """Prefill `prompt` (token ids), then yield each new token as soon as it is chosen."""
        ...

    def logprobs(self, tokens: Sequence[int]) -> np.ndarray:
        """(len(tokens), vocab) float32: log-probabilities of the token after each position,
        teacher-forced over `tokens` (one prefill, no sampling)."""
        ...

    def describe(self) -> dict[str, Any]:
        """The settings in effect (precision, threads, KV cache, version), for reports."""
        ...

    def close(self) -> None:
        """Release now what the engine holds beyond Python objects (a worker process, native
        memory) rather than when collected; the generator is not used after."""
        ...


@dataclass(frozen=True, slots=True)
class PromptCached:
    """How many of the prompt's tokens the engine read from its prefix cache instead of
    prefilling them: handed on before the first token, where there were any."""

    tokens: int


Item = int | PromptCached | BaseException | None
"""What a generation hands on: a token, the exception that stopped it, or None at the end;
first, an engine with a prefix cache may say how much of the prompt it found there."""
Put = Callable[[Item], None]
"""Takes a generation's items in turn: a `PromptCached` where there is one, each token, the
exception that stopped it, then None."""


@runtime_checkable
class Pushing(Protocol):
    """A `Generator` whose engine multiplexes its streams itself (vLLM's worker): `start` hands
    tokens to a callback as they arrive, so a server streaming many at once needs no thread per
    stream. On 2 cores a thread per stream woke ~85 times per decode step at 16 streams and
    preempted the engine's own threads."""

    def start(self, prompt: Sequence[int], sampling: Sampling, put: Put) -> Callable[[], None]:
        """Start generating; `put` gets the items (`Put`) on a thread of the engine's. Returns
        what stops it (idempotent); after that `put` may or may not be called again."""
        ...


class Token(int):
    """A chosen token id that also carries its log-probability under the model (before
    temperature and top-p) and the most likely alternatives, as `Sampling.logprobs` asks:
    everywhere else it is the int it is, so nothing between the engine and the server changes."""

    logprob: float
    top: tuple[tuple[int, float], ...]
    """(id, log-probability) of the most likely tokens, the most likely first."""

    def __new__(cls, value: int, logprob: float, top: tuple[tuple[int, float], ...]) -> Token:
        token = super().__new__(cls, value)
        token.logprob, token.top = logprob, top
        return token


def scored(token: int, logits: np.ndarray, sampling: Sampling) -> int:
    """`token` as a `Token` with its log-probability from `logits` where `sampling` asks for
    them; else the id as it is."""
    if sampling.logprobs is None:
        return token
    row = logits.astype(np.float64)
    shifted = row - row.max()
    logprobs = shifted - np.log(np.exp(shifted).sum())
    k = min(sampling.logprobs, len(row))
    best = np.argpartition(-logprobs, k - 1)[:k] if k else np.array([], dtype=np.int64)
    best = best[np.argsort(-logprobs[best], kind="stable")]
    top = tuple((int(i), float(logprobs[i])) for i in best)
    return Token(token, float(logprobs[token]), top)


def choose(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    """The next token from one row of logits: argmax when greedy, else a top-p sample at the
    sampling temperature (ties in argmax go to the lowest id, as torch.argmax does); a `Token`
    with its log-probabilities where `sampling.logprobs` asks. A constraint masks what it
    forbids first and learns the token chosen; the log-probabilities stay the model's own."""
    constraint = sampling.constraint
    if constraint is None:
        return scored(_chosen(logits, sampling, rng), logits, sampling)
    token = _chosen(constraint.allowed(logits), sampling, rng)
    constraint.advance(token)
    return scored(token, logits, sampling)


def _chosen(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    if sampling.greedy:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / sampling.temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if sampling.top_p < 1:
        order = np.argsort(-probs, kind="stable")
        keep = np.cumsum(probs[order]) - probs[order] < sampling.top_p  # at least the first
        kept = np.zeros_like(probs)
        kept[order[keep]] = probs[order[keep]]
        probs = kept / kept.sum()
    return int(rng.choice(len(probs), p=probs))


def check_shared(sampling: Sampling) -> None:
    """Refuse a constraint handed to several sequences at once (a batch's one `Sampling`): it
    follows one sequence, so each prompt must be streamed with its own."""
    if sampling.constraint is not None:
        raise ValueError("a constraint follows one sequence: stream each prompt with its own")


def check_request(
    tokens: Sequence[int], new: int, *, vocab: int, context: int, engine: str
) -> None:
    """Refuse, before any work, what no engine can run: an empty prompt, ids outside the
    vocabulary, more tokens than the engine's context holds."""
    if not tokens:
        raise BadInput("the prompt is empty: give at least one token")
    if min(tokens) < 0 or max(tokens) >= vocab:
        raise BadInput(f"token ids must be in [0, {vocab}), got {min(tokens)}..{max(tokens)}")
    if len(tokens) + new > context:
        raise BadInput(
            f"{len(tokens)} tokens plus {new} new ones exceed the {engine} engine's context of "
            f"{context} tokens: shorten the prompt or ask fewer"
        )


def decode_loop(
    prompt: Sequence[int],
    sampling: Sampling,
    prefill: Callable[[Sequence[int]], Logits],
    decode_one_token: Callable[[int, int], Logits],
    pick: Callable[[Logits, Sampling, np.random.Generator], int],
) -> Iterator[int]:
    """The generation every engine runs on its own logits: prefill the prompt, then pick a
    token, yield it, stop at a stop token or `max_new_tokens`, else decode it at the next
    position."""
    rng = np.random.default_rng(sampling.seed)
    stops = frozenset(sampling.stop_token_ids)
    logits = prefill(prompt)
    position = len(prompt)
    for count in range(1, sampling.max_new_tokens + 1):
        token = pick(logits, sampling, rng)
        yield token
        if token in stops or count == sampling.max_new_tokens:
            return
        logits = decode_one_token(token, position)
        position += 1
