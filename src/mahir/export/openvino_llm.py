"""A decoder LLM as a stateful OpenVINO IR (KV cache inside the model), its weights as asked:
what the OpenVINO GenAI engine (`runtimes/openvino_genai.py`) runs.

optimum-intel does the export (trace, stateful KV cache, NNCF weight compression), but it needs
transformers < 5.6 and mahir runs 5.2x, so it runs in an environment of its own
(`mahir.venvs`, created once: ~1.5 GB, 1-3 minutes) through `optimum_worker.py`. Its input is a
Hugging Face folder: a folder source as it is; a .gguf source's fp32 reference (dequantized by
transformers) saved with its tokenizer to a temporary folder first.

Weights (`LlmWeights`): fp32 as the reference; int8 (NNCF weight-only, per output channel);
int4 (groups of 128 by default, `ratio` of the layers in int4 and the rest in int8), by
round-to-nearest or, `data_aware`, with AWQ and scale estimation fitted on mahir's prompt text
(`data/llm_prompts.txt`, never the held-out text fidelity is judged on).

Every export is verified before it is kept: teacher-forced on two held-out passages and greedy
from one prompt, against the fp32 reference in PyTorch. An fp32 IR must agree at >= 0.98 of the
positions; a compressed one at >= 0.3 (far above chance: it catches a broken export, and the
generation budget judges the rest). Exports are cached by content under `files.cache_dir()`:
the source's hash, the weights, the export environment and this module's format version name
the folder, written whole or not at all (`files.staged`), so a second run reuses it.

Imports families, recipe (content hashes), files, venvs and, to verify, the runtimes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from mahir.errors import BadInput, ExportMismatch
from mahir.export.hf_folder import reference_folder
from mahir.families.decoder import DECODER_SPEC, LanguageModel
from mahir.families.prompts import PROMPT_TEXT
from mahir.files import cache_dir, content_hash, staged
from mahir.types import Artifact
from mahir.venvs import EnvSpec, OwnEnv, ensure_env, last_line, run_script

OPTIMUM_INTEL = "2.2.0"
OPTIMUM_ENV = EnvSpec(
    f"optimum-intel-{OPTIMUM_INTEL}",
    steps=(
        ("torch==2.13.0",),  # the CPU build, as mahir's own environment has it (Makefile)
        (
            "optimum==2.3.0",
            "transformers==5.5.4",  # optimum-intel 2.2 needs < 5.6
            "nncf==3.4.0",
            "openvino==2026.4.1",  # the release openvino-genai 2026.4.1.0 runs the IR on
            "openvino-tokenizers==2026.4.1.0",
            "huggingface-hub==1.21.0",
            "requests==2.34.2",
            "setuptools",
        ),
        # Without its declared dependencies: they pull PyPI's torchvision, built against the
        # CUDA torch, which breaks transformers' model classes under the CPU one.
        ("--no-deps", f"optimum-intel=={OPTIMUM_INTEL}"),
    ),
    remove=("torchvision",),
    check="from optimum.intel import OVModelForCausalLM, OVWeightQuantizationConfig",
)
WORKER = Path(__file__).with_name("optimum_worker.py")
IR_FILE = "openvino_model.xml"
RECORD = "mahir-export.json"
"""Written into a finished export: the weights, the source's hash, the verification."""
FORMAT_VERSION = 2
"""Bumped when what an export folder holds changes: older cached exports are not reused
(2: the tokenizer and detokenizer IRs)."""
MIN_TOP1 = {"fp32": 0.98, "int8": 0.3, "int4": 0.3}


@dataclass(frozen=True, slots=True, kw_only=True)
class LlmWeights:
    """How the exported IR stores its weights."""

    format: Literal["fp32", "int8", "int4"] = "fp32"
    symmetric: bool = False
    """Symmetric quantization (no zero points); asymmetric is optimum-intel's default."""
    group_size: int = 128
    """int4: weights per scale along the input dimension; -1: one scale per output channel."""
    ratio: float = 1.0
    """int4: share of the layers in int4, the rest in int8."""
    data_aware: bool = False
    """int4: AWQ and scale estimation, fitted on mahir's prompt text."""
    version: ClassVar[int] = 1

    def __post_init__(self) -> None:
        if self.format not in MIN_TOP1:
            raise ValueError(f"weights are fp32, int8 or int4, got {self.format!r}")
        if self.group_size != -1 and self.group_size < 8:
            raise ValueError(f"group_size is -1 or >= 8, got {self.group_size}")
        if not 0 < self.ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio}")
        if self.data_aware and self.format != "int4":
            raise ValueError(f"data_aware applies to int4 weights, not {self.format}")

    def tag(self) -> str:
        """Short name for folders and reports: fp32, int8, int4-g128, int4-awq-g128-r0.8 ..."""
        if self.format != "int4":
            return self.format + ("-sym" if self.symmetric else "")
        parts = ["int4", "awq" if self.data_aware else "", "sym" if self.symmetric else ""]
        parts += [f"g{self.group_size}", f"r{self.ratio:g}" if self.ratio < 1 else ""]
        return "-".join(p for p in parts if p)


def export_llm(
    model: LanguageModel,
    weights: LlmWeights = LlmWeights(),
    *,
    cache: Path | None = None,
    threads: int | None = None,
    on_step: Callable[[str], None] = lambda _: None,
) -> Artifact:
    """`model` as a verified stateful OpenVINO IR with `weights`: from the cache when this
    source was exported so before, else exported now (a minute or two; the first time also
    creates optimum-intel's environment)."""
    folder = (cache or cache_dir() / "openvino-llm") / _key(model, weights)
    if not (folder / RECORD).is_file():
        on_step("the optimum-intel environment (made the first time: about 1.5 GB)")
        env = ensure_env(OPTIMUM_ENV)
        on_step(f"exporting {model.name} to OpenVINO with {weights.tag()} weights")
        with staged(folder, folder=True) as draft:
            _export(model, weights, draft, env)
            checks = verify(model, draft, weights, threads)
            record = {"weights": dataclasses.asdict(weights), "source": model.source}
            record["verification"] = checks
            (draft / RECORD).write_text(json.dumps(record, indent=2))
    return Artifact(
        "openvino",
        DECODER_SPEC,
        path=folder / IR_FILE,
        meta={"precision": weights.format, "weights": weights.tag(), "source": model.source},
    )


def _key(model: LanguageModel, weights: LlmWeights) -> str:
    source = Path(model.source)
    if not source.exists():
        raise BadInput(f"{source} no longer exists: load the model again from where it is now")
    described = [content_hash(source), dataclasses.asdict(weights), weights.version]
    described += [OPTIMUM_ENV.key(), FORMAT_VERSION]
    digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:12]
    return f"{model.name}-{weights.tag()}-{digest}"


def _export(model: LanguageModel, weights: LlmWeights, out: Path, env: OwnEnv) -> None:
    with tempfile.TemporaryDirectory(prefix="mahir-llm-") as scratch:
        source = reference_folder(model).path
        calibration = None
        if weights.data_aware:
            text = PROMPT_TEXT.read_text()
            calibration = [p.strip() for p in text.split("\n\n") if p.strip()]
        request = {
            "source": str(source),
            "output": str(out),
            "bits": {"fp32": None, "int8": 8, "int4": 4}[weights.format],
            "sym": weights.symmetric,
            "group_size": weights.group_size,
            "ratio": weights.ratio,
            "calibration": calibration,
        }
        request_file = Path(scratch) / "request.json"
        request_file.write_text(json.dumps(request))
        done = run_script(env, WORKER, [str(request_file)])
    if done.returncode != 0 or not (out / IR_FILE).is_file():
        raise ExportMismatch(
            f"optimum-intel {OPTIMUM_INTEL} could not export {model.name} to OpenVINO "
            f"({last_line(done)}): its architecture may be one optimum-intel does not export"
        )


def verify(
    model: LanguageModel, folder: Path, weights: LlmWeights, threads: int | None = None
) -> dict[str, Any]:
    """Check the IR in `folder` against the fp32 reference (see the module's docstring); what
    was measured, or `ExportMismatch` naming it."""
    from mahir.generation import Sampling
    from mahir.generation_quality import agreed_prefix, teacher_forced
    from mahir.runtimes.openvino_genai import OpenVinoGenerator, OpenVinoLlmOptions
    from mahir.runtimes.torch_generator import TorchEngineOptions
    from mahir.runtimes.torch_generator import open_generator as open_torch

    exported = OpenVinoGenerator(folder, OpenVinoLlmOptions(threads=threads), engine="openvino")
    reference = open_torch(model.original(), TorchEngineOptions(threads=threads))
    sequences = model.family.held_out(passages=2, tokens=64)
    forced = teacher_forced(
        [exported.logprobs(s) for s in sequences],
        [reference.logprobs(s) for s in sequences],
        sequences,
    )
    prompt, greedy = sequences[0][:16], Sampling(max_new_tokens=16)
    agreed = agreed_prefix(
        list(exported.stream(prompt, greedy)), list(reference.stream(prompt, greedy))
    )
    del exported  # its files are about to move into place
    floor = MIN_TOP1[weights.format]
    if not forced["top1_agreement"] >= floor:
        raise ExportMismatch(
            f"the {weights.tag()} OpenVINO export of {model.name} agrees with the fp32 reference "
            f"on {forced['top1_agreement']:.2f} of the next tokens (needs >= {floor}, mean KL "
            f"{forced['kl_mean']:.3g}): this export is broken; report it with the model"
        )
    return {
        "top1_agreement": forced["top1_agreement"],
        "kl_mean": forced["kl_mean"],
        "greedy_agreed": agreed,
    }
