"""Python environments of mahir's own, for tools whose pins cannot live beside mahir's.

Some tools mahir drives need releases its own environment cannot hold: optimum-intel, which
exports an LLM to a stateful OpenVINO IR, wants transformers < 5.6 where mahir runs 5.2x; vLLM
wants another transformers again. Such a tool runs in an environment of its own, described by
an `EnvSpec` (exact pins, installed in steps) and created once per machine in the user's cache
(`files.cache_dir()/envs/<name>-<hash of the spec>`), then reused by every later call. mahir
talks to it only through processes: `run_script` runs a file in it with arguments, and the file
imports nothing of mahir.

Creation is atomic: the environment is built in a hidden folder beside its target and renamed
into place only when every step and the check have passed, so a crash or a failed pip leaves
nothing a later call would mistake for a working environment. Two processes creating the same
one at once both build it; the second rename loses and its copy is dropped. A moved venv keeps
working when run as `<env>/bin/python -m ...` (its console scripts' shebangs still name the
build folder, so mahir never calls them).

Bottom layer: imports errors and files only.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from mahir.errors import RuntimeFailure
from mahir.files import cache_dir

SPEC_FILE = "mahir-env.json"
"""Written last into a finished environment: what it was built from and how long it took."""


@dataclass(frozen=True, slots=True)
class EnvSpec:
    """An environment: pip installs in order, packages removed after, and a line of Python that
    must run in it. Any change to these makes a new environment (the folder name hashes them)."""

    name: str
    steps: tuple[tuple[str, ...], ...]
    """Arguments of each `pip install`, in order (exact pins; `--no-deps` where a package's
    declared requirements would pull what must stay out)."""
    remove: tuple[str, ...] = ()
    """Uninstalled after the steps if something pulled them in (PyPI's torchvision, built
    against the CUDA torch, breaks transformers under the CPU one)."""
    check: str = ""
    """Python source that must run without error in the finished environment."""

    def __post_init__(self) -> None:
        if not self.name.replace("-", "").replace(".", "").isalnum():
            raise ValueError(f"an environment name is letters, digits, - and ., got {self.name!r}")
        if not self.steps or not all(self.steps):
            raise ValueError("an environment needs at least one pip install step, none empty")

    def key(self) -> str:
        """Folder name: the name and a hash of the spec and of the Python that builds it."""
        text = json.dumps([asdict(self), sys.version_info[:2]], sort_keys=True)
        return f"{self.name}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


@dataclass(frozen=True, slots=True)
class OwnEnv:
    """A finished environment on disk."""

    path: Path
    created_s: float | None
    """Seconds this call spent creating it; None when it was already there."""

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"


def env_root() -> Path:
    """Where environments live: `envs/` in mahir's cache folder."""
    return cache_dir() / "envs"


def ensure_env(spec: EnvSpec, *, root: Path | None = None, timeout_s: float = 1800) -> OwnEnv:
    """The environment `spec` describes: the finished one under `root` if there is one, else
    created now (minutes: pip downloads and installs every pin)."""
    target = (root or env_root()) / spec.key()
    if (target / SPEC_FILE).is_file():
        return OwnEnv(target, None)
    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    draft = Path(tempfile.mkdtemp(prefix=f".{spec.key()}-", dir=target.parent))
    try:
        _build(spec, draft, timeout_s)
        seconds = round(time.perf_counter() - started, 1)
        (draft / SPEC_FILE).write_text(json.dumps({**asdict(spec), "seconds": seconds}, indent=2))
        try:
            draft.rename(target)
        except OSError:  # another process finished first: use its copy
            if not (target / SPEC_FILE).is_file():
                raise
            return OwnEnv(target, None)
        return OwnEnv(target, seconds)
    finally:
        shutil.rmtree(draft, ignore_errors=True)


def _build(spec: EnvSpec, folder: Path, timeout_s: float) -> None:
    python = str(folder / "bin" / "python")
    _call(spec, [sys.executable, "-m", "venv", str(folder)], "python -m venv", timeout_s)
    pip = [python, "-m", "pip", "--disable-pip-version-check", "-q"]
    for step in spec.steps:
        _call(spec, [*pip, "install", *step], f"pip install {' '.join(step)}", timeout_s)
    if spec.remove:
        _call(spec, [*pip, "uninstall", "-y", *spec.remove], "pip uninstall", timeout_s)
    if spec.check:
        _call(spec, [python, "-c", spec.check], f"the check {spec.check!r}", timeout_s)


def _call(spec: EnvSpec, command: list[str], what: str, timeout_s: float) -> None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as err:
        raise RuntimeFailure(
            f"creating mahir's {spec.name} environment: {what} ran past {timeout_s:.0f} s: "
            "check the network and the package index, then run again"
        ) from err
    if done.returncode != 0:
        raise RuntimeFailure(
            f"creating mahir's {spec.name} environment: {what} failed ({last_line(done)}): "
            "check the network and the package index, then run again"
        )


def run_script(
    env: OwnEnv, script: Path, args: Sequence[str], *, timeout_s: float = 3600
) -> subprocess.CompletedProcess[str]:
    """Run `script` (a file that imports nothing of mahir) with `env`'s Python; its output is
    captured and returned whatever its exit status (the caller reads both)."""
    try:
        return subprocess.run(
            [str(env.python), str(script), *args], capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired as err:
        raise RuntimeFailure(f"{script.name} ran past {timeout_s:.0f} s in {env.path}") from err


def last_line(done: subprocess.CompletedProcess[str]) -> str:
    """The last non-empty line a failed process printed (stderr first): where Python puts the
    exception."""
    lines = [line.strip() for line in (done.stderr or done.stdout or "").splitlines()]
    return next((line for line in reversed(lines) if line), f"exit status {done.returncode}")
