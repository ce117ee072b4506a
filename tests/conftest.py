"""Shared fixtures. Models load once per session: loading and exporting dominate test time."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from subprocess import CompletedProcess
from typing import Any

import numpy as np
import pytest

from mahir.families.decoder import LanguageModel
from mahir.model import Model, load_model, with_logits
from mahir.types import Artifact

TESTS = Path(__file__).parent


# No model hub is reachable: a test that tries one must fail fast, not hang.
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session", autouse=True)
def peaks_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Measured peaks (`mahir.peaks`) cached for the session in its own folder, never in the
    user's: measured once, by whichever test first needs them (CLI processes inherit it)."""
    from mahir.files import CACHE_ENV

    folder = tmp_path_factory.mktemp("mahir-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(folder))
        yield folder


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`own_env` modules' environments (`OWN_ENVS`) start being made in the background;
    `gpu` tests run where torch sees a CUDA GPU and are skipped, saying so, elsewhere."""
    import torch

    from tests.helpers import make_own_envs_early

    own = [item.module for item in items if "own_env" in item.keywords]
    make_own_envs_early(spec for module in own for spec in getattr(module, "OWN_ENVS", ()))

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch sees none)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def llm_tokenizer() -> Any:
    """The default LLM's tokenizer (byte-level BPE, ChatML template), read from its GGUF once
    per session: the tiny decoders' tokenizer too. MAHIR_TEST_LLM_TOKENIZER names a folder it
    was saved to, where the package is not installed (a GPU machine)."""
    import transformers

    from mahir.families.decoder import default_llm_path
    from mahir.silence import quiet_transformers

    saved = os.environ.get("MAHIR_TEST_LLM_TOKENIZER")
    if saved:
        return transformers.AutoTokenizer.from_pretrained(saved)
    path = default_llm_path()
    with quiet_transformers():
        return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="session")
def decoder_folders(
    tmp_path_factory: pytest.TempPathFactory, llm_tokenizer: Any
) -> dict[str, Path]:
    """Tiny random-weight causal LMs (`tests.models.DECODERS`) as Hugging Face folders."""
    from tests.models import DECODERS, decoder_folder

    root = tmp_path_factory.mktemp("decoders")
    return {arch: decoder_folder(root / arch, arch, llm_tokenizer) for arch in DECODERS}


@pytest.fixture(scope="session")
def tiny_llm(decoder_folders: dict[str, Path]) -> LanguageModel:
    """The tiny Llama, loaded."""
    return load_model(decoder_folders["llama"], llm=True)


@pytest.fixture(scope="session")
def tiny_gguf(tiny_llm: LanguageModel, tmp_path_factory: pytest.TempPathFactory) -> Artifact:
    """The tiny Llama written as an f32 GGUF (checked in llama.cpp against torch on writing)."""
    from mahir.export.gguf import f32_gguf

    return f32_gguf(tiny_llm, folder=tmp_path_factory.mktemp("gguf"))


@pytest.fixture(scope="session")
def smollm2() -> LanguageModel:
    """The default LLM (SmolLM2-135M-Instruct from its Q4_1 GGUF, fp32): about a minute to read
    on 2 cores, so only slow tests ask for it."""
    return load_model(llm=True)


@pytest.fixture(scope="session")
def minilm() -> Model:
    return load_model()


@pytest.fixture(scope="session")
def mlp() -> Model:
    """A 10-class classifier; its output is named "output", so it is declared logits as a
    user would (`--logits output`)."""
    return with_logits(load_model(f"{TESTS / 'models.py'}:mlp"), ["output"])


@pytest.fixture(scope="session")
def cnn() -> Model:
    """A 10-class image classifier, its logits declared like the MLP's."""
    return with_logits(load_model(f"{TESTS / 'models.py'}:cnn"), ["output"])


@pytest.fixture(scope="session")
def vit_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ViT image classifier with its image processor, as a Hugging Face folder."""
    from tests.models import vit_folder as write

    return write(tmp_path_factory.mktemp("vit", numbered=False))


@pytest.fixture(scope="session")
def resnet_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ResNet image classifier with ConvNeXt's image processor, as a folder."""
    from tests.models import resnet_folder as write

    return write(tmp_path_factory.mktemp("resnet", numbered=False))


@pytest.fixture(scope="session")
def vit(vit_folder: Path) -> Model:
    return load_model(vit_folder)


@pytest.fixture(scope="session")
def resnet(resnet_folder: Path) -> Model:
    return load_model(resnet_folder)


@pytest.fixture(scope="session")
def minilm_onnx(minilm: Model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mahir.export.onnx import export_onnx

    path = tmp_path_factory.mktemp("minilm") / "model.onnx"
    export_onnx(minilm, path)
    return path


@pytest.fixture(scope="session")
def minilm_calibration(minilm: Model) -> tuple[dict[str, np.ndarray], ...]:

    return tuple(minilm.family.workload([8], batches_per_size=4, seed=5).batches[8])


@pytest.fixture(scope="session")
def minilm_eval(minilm: Model) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    """Held-out batches (two traffic-shaped, three verification shapes) and their references."""
    from mahir.runtimes import reference_outputs

    batches = minilm.family.workload([8], batches_per_size=2, seed=9).batches[8]
    batches += minilm.family.verification_batches()
    return batches, reference_outputs(minilm, batches)


@pytest.fixture(scope="session")
def minilm_ir(
    minilm: Model, minilm_onnx: Path, tmp_path_factory: pytest.TempPathFactory
) -> Artifact:
    """The default model as OpenVINO IR, converted (and verified) once for the session."""
    from mahir.export.conversions import convert

    onnx = Artifact("onnx", minilm.spec, path=minilm_onnx)
    return convert(minilm, onnx, ("openvino",), tmp_path_factory.mktemp("minilm-ir") / "input")


@pytest.fixture(scope="session")
def served_dir(minilm: Model, minilm_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model, fp32 on ONNX Runtime, as an output directory (served read-only),
    around the session's export of it."""
    from tests.helpers import fp32_output_dir

    onnx = Artifact("onnx", minilm.spec, path=minilm_onnx)
    return fp32_output_dir(minilm, tmp_path_factory.mktemp("served"), artifact=onnx)


@pytest.fixture(scope="session")
def served_vit_dir(vit: Model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny ViT classifier, fp32 on ONNX Runtime, as an output directory (served read-only)."""
    from tests.helpers import fp32_output_dir

    return fp32_output_dir(vit, tmp_path_factory.mktemp("served-vit"))


@pytest.fixture(scope="session")
def served_openvino_dir(
    minilm: Model, minilm_ir: Artifact, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The default model, fp32 on OpenVINO, as an output directory (served read-only), around
    the session's OpenVINO IR of it."""
    from tests.helpers import fp32_output_dir

    work = tmp_path_factory.mktemp("served-openvino")
    return fp32_output_dir(minilm, work, artifact=minilm_ir, runtime="openvino")


@pytest.fixture(scope="session")
def served_mlp_dir(mlp: Model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small tensor model (float inputs), fp32 on ONNX Runtime, as an output directory."""
    from tests.helpers import fp32_output_dir

    return fp32_output_dir(mlp, tmp_path_factory.mktemp("served-mlp"))


@pytest.fixture(scope="session")
def served_llm_dir(tiny_llm: LanguageModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama's LLM output directory (`mahir optimize --llm` with the torch engine on
    one thread, the cheapest search), served read-only."""
    from tests.helpers import cheapest_llm_output

    return cheapest_llm_output(tiny_llm, tmp_path_factory.mktemp("llm") / "out")


@pytest.fixture(scope="module")
def short_rungs() -> Iterator[None]:
    """The search's first timing rung capped at 0.2 s per candidate (1 s without a time budget):
    for modules whose point is what a search keeps, resumes or reports, not how precise its
    timings are. Later rungs still double it, and the baseline is timed in each."""
    import mahir.search.halving as halving

    real = halving.first_rung_seconds

    def short(time_left_s: float | None, contenders: int, batch_sizes: int) -> float:
        return min(0.2, real(time_left_s, contenders, batch_sizes))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(halving, "first_rung_seconds", short)
        yield


@pytest.fixture(scope="session")
def optimized_mlp(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CompletedProcess[str]]:
    """`mahir optimize tests/models.py:mlp --only onnxruntime --out OUT` as a real process, run
    once for the session: (OUT, what the command returned). Read-only: test_cli exports it,
    test_tune serves it."""
    from tests.helpers import mahir

    out = tmp_path_factory.mktemp("optimized-mlp") / "out"
    found = mahir(
        "optimize", f"{TESTS / 'models.py'}:mlp", "--only", "onnxruntime", "--out", str(out)
    )
    return out, found
