"""What several test modules need: the real `mahir` command in a fresh process, the same
command run in this process (for what a fresh interpreter adds nothing to), and a real `mahir
serve` on a free loopback port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from mahir.families.decoder import LanguageModel
from mahir.files import CACHE_ENV
from mahir.generation import Generator, Token
from mahir.model import Model
from mahir.quality import fidelity
from mahir.recipe import Recipe
from mahir.runtimes import open_session, reference_outputs
from mahir.search.apply import Applied, apply_recipe, write_output_dir
from mahir.types import Artifact
from mahir.venvs import EnvSpec, OwnEnv, ensure_env, env_root

TESTS = Path(__file__).parent
"""This folder: `TESTS / "models.py"` holds the factories tests load as `file.py:fn`."""


def fp32_output_dir(
    model: Model, work: Path, *, artifact: Artifact | None = None, runtime: str = "onnxruntime"
) -> Path:
    """`model`, fp32 on `runtime`, as an output directory (what `mahir serve` and the exports
    take), written under `work`: built by `apply_recipe`, or around `artifact` (an export the
    session already made and verified) with the fidelity apply would record, on the
    verification shapes."""
    recipe = Recipe((), runtime)
    if artifact is None:
        applied = apply_recipe(model, recipe, work / "w", calibration=(), evaluation=())
    else:
        batches = model.family.verification_batches()
        session = open_session(runtime, artifact, recipe.options)
        quality = fidelity(model, session, batches, reference_outputs(model, batches))
        applied = Applied(artifact, recipe, quality)
    write_output_dir(model, applied, work / "out")
    return work / "out"


def tiny_factory(folder: Path) -> str:
    """The source of a tiny model defined in `folder/tiny.py`; loading it leaves `folder/loaded`,
    so a test can tell whether a command got as far as loading the model."""
    (folder / "tiny.py").write_text(
        "from pathlib import Path\n"
        "import torch\n\n\n"
        "def model():\n"
        '    Path(__file__).with_name("loaded").touch()\n'
        "    torch.manual_seed(0)\n"
        '    return torch.nn.Linear(8, 4), {"input": torch.zeros(2, 8)}\n'
    )
    return f"{folder / 'tiny.py'}:model"


def mahir(
    *args: str, env: dict[str, str] | None = None, installed: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run `python -m mahir.cli ARGS`, as a user's shell would, and capture what it printed;
    `env` adds to the environment. `installed`: run the `mahir` console script that installing
    the package put beside this Python instead, entry point and all."""
    command = [sys.executable, "-m", "mahir.cli"]
    if installed:
        script = Path(sys.executable).with_name("mahir")
        assert script.is_file(), f"no {script}: `pip install -e .` installs the mahir command"
        command = [str(script)]
    return subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, **(env or {})},
    )


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`mahir ARGS` in this process through typer's CliRunner, for tests of what the command
    line parses, refuses and prints: the same app, exit codes, stdout and stderr as `mahir()`,
    without a fresh interpreter's seconds of imports. An exception the command lets out ends it
    as the interpreter would: exit code 1, its traceback on stderr. `env` adds to the
    environment for the call."""
    from typer.testing import CliRunner

    from mahir.cli import app

    result = CliRunner().invoke(app, list(args), env=env, prog_name="mahir")
    stderr = result.stderr
    code = result.exit_code
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))
        code = 1
    return subprocess.CompletedProcess(["mahir", *args], code, result.stdout, stderr)


class Server:
    """`mahir serve FOLDER ARGS` in its own process on a free loopback port, ready (its
    readiness polled) once constructed; `stop()` sends SIGTERM and returns the exit code."""

    def __init__(self, folder: Path, *args: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._terminated = False
        # A file, not a pipe: a pipe nobody reads could fill and block the server.
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115  # closed in stop()
        command = [sys.executable, "-m", "mahir.cli", "serve", str(folder)]
        self.process = subprocess.Popen(
            [*command, "--port", str(self.port), *args], stdout=self.log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                output = self.log.read()
                self.log.close()
                raise RuntimeError(f"server exited: {output}")
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)  # not listening yet: poll again
        self.stop()
        raise RuntimeError("server did not become ready in 120 s")

    def terminate(self) -> None:
        """SIGTERM, once: a second one while Python finalizes (its handlers back to the
        default) would kill a server that was exiting 0."""
        if not self._terminated and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        self._terminated = True

    def stop(self) -> int:
        self.terminate()
        try:
            return self.process.wait(timeout=60)
        finally:
            self.log.close()


_BEING_MADE: dict[str, Future[OwnEnv]] = {}
"""Environments of mahir's own being created since collection (`make_own_envs_early`)."""


def make_own_envs_early(specs: Iterable[EnvSpec]) -> None:
    """Start creating, one after another on a background thread, the environments the selected
    tests need, so that minutes of pip overlap the tests before them instead of adding to the
    run. Not a daemon: a run that ends first waits for the one being made rather than leave half
    an environment behind."""
    wanted = {spec.key(): spec for spec in specs if spec.key() not in _BEING_MADE}
    if not wanted:
        return
    root = _user_env_root()
    pool = ThreadPoolExecutor(1, thread_name_prefix="own-env")
    for key, spec in wanted.items():
        _BEING_MADE[key] = pool.submit(ensure_env, spec, root=root)
    pool.shutdown(wait=False)


def _user_env_root() -> Path:
    """The user's environments folder, not the session's cache (environments are minutes to
    make and the same for every run)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(CACHE_ENV, raising=False)
        return env_root()


def shared_env(spec: EnvSpec) -> None:
    """`spec`'s environment in the user's cache (created there once per machine: minutes),
    linked into this session's cache, where mahir (and its CLI processes) look for it."""
    early = _BEING_MADE.get(spec.key())
    shared = early.result() if early else ensure_env(spec, root=_user_env_root())
    link = env_root() / spec.key()
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(shared.path, target_is_directory=True)


def question_ids(llm: LanguageModel) -> list[int]:
    """A short chat prompt every LLM engine test asks, as token ids of the model's template."""
    return llm.family.prompt_ids("What is the capital of France?")


def check_greedy_scores(
    tokens: list[int], prompt: list[int], reference: Generator, alternatives: int
) -> None:
    """Greedy `tokens` after `prompt`, each a `Token` carrying `reference`'s teacher-forced
    log-probability of it (within 1e-3) and `alternatives` ranked ones, best first, its own id
    the first of them."""
    forced = reference.logprobs([*prompt, *tokens])[len(prompt) - 1 : -1]
    for token, row in zip(tokens, forced, strict=True):
        assert isinstance(token, Token)
        assert token.logprob == pytest.approx(float(row[token]), abs=1e-3)
        ids, scores = zip(*token.top, strict=True)
        assert (ids[0], len(ids)) == (int(token), alternatives)
        assert list(scores) == sorted(scores, reverse=True)


def cheapest_llm_output(model: LanguageModel, out: Path) -> Path:
    """`model`'s LLM output directory from the cheapest search (`mahir optimize --llm` with the
    torch engine on one thread, two short prompts, judged on little text)."""
    from mahir.generation_quality import Judging
    from mahir.search.llm_optimize import LlmOptimizeConfig, optimize_llm
    from mahir.search.llm_output import save_llm_output

    cheap = LlmOptimizeConfig(
        variants=("torch",),
        threads=(1,),
        prompts=2,
        prompt_tokens=(8, 16),
        new_tokens=(4, 8),
        judging=Judging(passages=2, tokens=16, prompts=2, prompt_tokens=8, greedy_tokens=4),
    )
    return save_llm_output(optimize_llm(model, cheap), out)
