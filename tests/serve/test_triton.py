"""`mahir export --triton/--kserve` on real output directories: the command's own app in this
process (`cli`), and once as a real process whose stdout is the manifest alone.

Each generated config.pbtxt is parsed back into tritonclient's own ModelConfig and checked
against the output directory's spec and against what the copied model actually returns at two
shapes (so a -1 where the model is fixed, or the reverse, shows); the copied model must still
give the fp32 reference answers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from mahir.model import Model
from mahir.outdir import open_output_dir
from mahir.passes.quantize import DynamicInt8
from mahir.quality import fidelity
from mahir.recipe import Recipe
from mahir.runtimes import open_session, reference_outputs
from mahir.search.apply import Applied, apply_recipe, write_output_dir
from mahir.serve.triton import cpu_int8_ops
from mahir.types import Artifact, Outputs
from mahir.workload import Batch
from tests.helpers import cli, mahir

TYPES = {"int64": "TYPE_INT64", "int32": "TYPE_INT32", "float32": "TYPE_FP32"}
INT8 = DynamicInt8(per_channel=True)


def write_dir(
    model: Model, runtime: str, out: Path, artifact: Artifact | None = None, steps: tuple = ()
) -> Path:
    """An output directory of `model` on `runtime`: built by apply (with `steps`), or around
    `artifact`."""
    recipe = Recipe(steps, runtime)
    if artifact is None:
        applied = apply_recipe(model, recipe, out.parent / "work", calibration=(), evaluation=())
    else:
        batches = model.family.verification_batches()
        session = open_session(runtime, artifact, recipe.options)
        quality = fidelity(model, session, batches, reference_outputs(model, batches))
        applied = Applied(artifact, recipe, quality)
    write_output_dir(model, applied, out)
    return out


def ir_of(model: Model, work: Path) -> Artifact:
    from mahir.export.conversions import convert

    return convert(model, model.original(), ("openvino",), work / "input")


@pytest.fixture(scope="module")
def dirs(
    minilm: Model,
    mlp: Model,
    cnn: Model,
    minilm_ir: Artifact,
    served_dir: Path,
    served_mlp_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, tuple[Model, Path]]:
    """Output directories: ONNX for three models (two of them the session's fp32 directories,
    which the exports only read), OpenVINO IR for two, one torch program."""
    root = tmp_path_factory.mktemp("outdirs")
    return {
        "mlp-onnx": (mlp, served_mlp_dir),
        "cnn-onnx": (cnn, write_dir(cnn, "onnxruntime", root / "b" / "cnn-onnx")),
        "minilm-onnx": (minilm, served_dir),
        "mlp-ir": (mlp, write_dir(mlp, "openvino", root / "d" / "mlp-ir", ir_of(mlp, root / "e"))),
        "minilm-ir": (minilm, write_dir(minilm, "openvino", root / "f" / "minilm-ir", minilm_ir)),
        "mlp-torch": (mlp, write_dir(mlp, "torch", root / "g" / "mlp-torch")),
        "mlp-int8": (mlp, write_dir(mlp, "onnxruntime", root / "h" / "mlp", steps=(INT8,))),
    }


def parse(folder: Path) -> Any:
    return text_format.Parse((folder / "config.pbtxt").read_text(), pb.ModelConfig())


def run_copied(folder: Path, batches: list[Batch], outputs: list[str]) -> list[Outputs]:
    """The model in the version folder, opened directly by its runtime as Triton would."""
    (model_file,) = [p for p in (folder / "1").iterdir() if p.suffix in (".onnx", ".xml")]
    if model_file.suffix == ".onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
        return [dict(zip(outputs, session.run(outputs, dict(b)), strict=True)) for b in batches]
    import openvino as ov

    compiled = ov.Core().compile_model(str(model_file), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    results = [compiled(dict(b)) for b in batches]
    return [{n: r[compiled.output(n)] for n in outputs} for r in results]


def expected_dims(a: tuple[int, ...], b: tuple[int, ...]) -> list[int]:
    """Dims as seen on two runs of different shapes, batch axis dropped: -1 where they differ."""
    return [x if x == y else -1 for x, y in zip(a[1:], b[1:], strict=True)]


def check_config(config: Any, out: Path, got: list[Outputs], name: str) -> None:
    spec = json.loads((out / "mahir.json").read_text())["spec"]
    assert config.name == name
    assert config.max_batch_size == 32
    assert [(i.name, pb.DataType.Name(i.data_type), list(i.dims)) for i in config.input] == [
        (t["name"], TYPES[t["dtype"]], [d if isinstance(d, int) else -1 for d in t["shape"][1:]])
        for t in spec["inputs"]
    ]
    assert [o.name for o in config.output] == spec["outputs"]
    for o in config.output:
        first, second = got[0][o.name], got[-1][o.name]
        assert pb.DataType.Name(o.data_type) == TYPES[first.dtype.name]
        assert list(o.dims) == expected_dims(first.shape, second.shape)
    assert list(config.dynamic_batching.preferred_batch_size) == [32]
    assert config.dynamic_batching.max_queue_delay_microseconds == 100
    ((group,),) = [config.instance_group]
    assert (group.count, group.kind) == (1, pb.ModelInstanceGroup.KIND_CPU)


@pytest.mark.parametrize(
    ("key", "name"),
    [
        ("mlp-onnx", "mlp"),
        ("cnn-onnx", "cnn"),
        ("minilm-onnx", "all-MiniLM-L6-v2"),
        ("mlp-ir", "mlp"),
        ("minilm-ir", "all-MiniLM-L6-v2"),
    ],
)
def test_repository_config_and_model_match_the_output_dir(
    dirs: dict[str, tuple[Model, Path]], tmp_path: Path, key: str, name: str
) -> None:
    model, out = dirs[key]
    done = cli("export", str(out), "--triton", str(tmp_path / "repo"))
    assert done.returncode == 0, done.stderr
    folder = tmp_path / "repo" / name
    config = parse(folder)
    batches = model.family.verification_batches()
    got = run_copied(folder, batches, list(model.spec.outputs))
    check_config(config, out, got, name)
    if key.endswith("onnx"):
        assert (config.platform, config.backend) == ("onnxruntime_onnx", "")
        assert sorted(p.name for p in (folder / "1").iterdir()) == ["model.onnx"]
    else:
        assert (config.backend, config.default_model_filename) == ("openvino", "model.xml")
        assert sorted(p.name for p in (folder / "1").iterdir()) == ["model.bin", "model.xml"]
        assert config.parameters["ENABLE_BATCH_PADDING"].string_value == "YES"
        assert config.parameters["PERFORMANCE_HINT"].string_value == "LATENCY"
    for want, have in zip(reference_outputs(model, batches), got, strict=True):
        for output in model.spec.outputs:
            np.testing.assert_allclose(have[output], want[output], atol=1e-4, rtol=1e-3)


def test_text_model_folder_carries_its_tokenizer_and_opens_as_an_output_dir(
    dirs: dict[str, tuple[Model, Path]], tmp_path: Path
) -> None:
    minilm, out = dirs["minilm-onnx"]
    assert cli("export", str(out), "--triton", str(tmp_path), "--name", "e5").returncode == 0
    opened = open_output_dir(tmp_path / "e5")  # tokenizer and pooling travel with the model
    assert opened.family.tokenizer is not None
    assert opened.family.pooling == minilm.family.pooling
    batch = minilm.family.verification_batches()[0]
    np.testing.assert_allclose(
        opened.session.run(batch)["last_hidden_state"],
        reference_outputs(minilm, [batch])[0]["last_hidden_state"],
        atol=1e-4,
        rtol=1e-3,
    )


def test_tuner_batching_instances_gpu_and_name(
    dirs: dict[str, tuple[Model, Path]], tmp_path: Path
) -> None:
    out = tmp_path / "tuned"
    shutil.copytree(dirs["mlp-onnx"][1], out)
    manifest = json.loads((out / "mahir.json").read_text())
    manifest["batching"] = {"max_batch_size": 8, "max_delay_ms": 2.5}
    (out / "mahir.json").write_text(json.dumps(manifest))
    repo = tmp_path / "repo"
    args = ["--triton", str(repo), "--name", "tuned_mlp", "--instances", "3", "--gpu"]
    done = cli("export", str(out), *args)
    assert done.returncode == 0, done.stderr
    config = parse(repo / "tuned_mlp")
    assert config.name == "tuned_mlp"
    assert config.max_batch_size == 8
    assert list(config.dynamic_batching.preferred_batch_size) == [8]
    assert config.dynamic_batching.max_queue_delay_microseconds == 2500
    ((group,),) = [config.instance_group]
    assert (group.count, group.kind) == (3, pb.ModelInstanceGroup.KIND_GPU)
    assert list(group.gpus) == []  # every GPU Triton sees
    assert not config.HasField("optimization")  # the CUDA provider alone
    assert (
        json.loads((repo / "tuned_mlp" / "mahir.json").read_text())["batching"]["max_batch_size"]
        == 8
    )


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_gpu_instances_on_named_gpus_with_tensorrt(
    dirs: dict[str, tuple[Model, Path]], tmp_path: Path, precision: str
) -> None:
    """`--gpu-index` pins the instances (count on each GPU named), `--tensorrt` adds ONNX
    Runtime's TensorRT accelerator; batching, tensors and the fp32 model stay as on the CPU."""
    model, out = dirs["minilm-onnx"]
    gpus = ["--gpu", "--gpu-index", "1", "--gpu-index", "0", "--instances", "2"]
    done = cli("export", str(out), "--triton", str(tmp_path), *gpus, "--tensorrt", precision)
    assert done.returncode == 0, done.stderr
    folder = tmp_path / "all-MiniLM-L6-v2"
    config = parse(folder)
    ((group,),) = [config.instance_group]
    assert (group.count, group.kind, list(group.gpus)) == (
        2,
        pb.ModelInstanceGroup.KIND_GPU,
        [1, 0],
    )
    ((accelerator,),) = [config.optimization.execution_accelerators.gpu_execution_accelerator]
    assert accelerator.name == "tensorrt"
    assert dict(accelerator.parameters) == {"precision_mode": precision.upper()}
    assert not config.optimization.execution_accelerators.cpu_execution_accelerator
    assert config.platform == "onnxruntime_onnx"
    assert list(config.dynamic_batching.preferred_batch_size) == [32]
    assert [i.name for i in config.input] == [t.name for t in model.spec.inputs]
    assert cpu_int8_ops(folder / "1" / "model.onnx") == []  # the float graph, as on the CPU
    assert (folder / "1" / "model.onnx").read_bytes() == (out / "model" / "model.onnx").read_bytes()


def test_an_int8_onnx_for_cpus_is_refused_on_gpus_and_nothing_is_lost(
    dirs: dict[str, tuple[Model, Path]], tmp_path: Path
) -> None:
    """int8 quantized for CPUs runs slower on a GPU than fp32: one line with the fix, before
    anything is written; the same directory exports to CPU instances as before."""
    out = dirs["mlp-int8"][1]
    assert "MatMulInteger" in cpu_int8_ops(out / "model" / "model.onnx")
    repo = tmp_path / "repo"
    assert cli("export", str(out), "--triton", str(repo)).returncode == 0  # CPUs: fine
    before = {p: p.read_bytes() for p in (repo / "mlp").rglob("*") if p.is_file()}
    for args in (["--triton", str(repo)], ["--kserve", "--storage-uri", "s3://b/r"]):
        done = cli("export", str(out), *args, "--gpu")
        assert done.returncode == 2
        (line,) = done.stderr.strip().splitlines()
        assert "quantized to int8 for CPUs (" in line
        assert "drop --gpu" in line
        assert str(out / "recipe.yaml") in line
        assert done.stdout == ""
    assert {p: p.read_bytes() for p in (repo / "mlp").rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in repo.iterdir()) == ["mlp"]


def test_kserve_manifest_to_stdout_and_to_a_file(
    dirs: dict[str, tuple[Model, Path]], tmp_path: Path
) -> None:
    out = dirs["minilm-onnx"][1]
    repo, uri = tmp_path / "repo", "s3://models-bucket/triton"
    # a real process: what a shell pipes to kubectl is stdout alone
    done = mahir("export", str(out), "--triton", str(repo), "--kserve", "--storage-uri", uri)
    assert done.returncode == 0, done.stderr
    service = yaml.safe_load(done.stdout)  # stdout is the YAML alone; the status is on stderr
    assert "wrote Triton model" in done.stderr
    assert "clients tokenize with" in done.stderr
    assert service["apiVersion"] == "serving.kserve.io/v1beta1"
    assert service["kind"] == "InferenceService"
    assert service["metadata"]["name"] == "all-minilm-l6-v2"
    model = service["spec"]["predictor"]["model"]
    assert model["modelFormat"] == {"name": "triton"}
    assert model["protocolVersion"] == "v2"
    assert model["storageUri"] == uri
    assert set(model["resources"]) == {"requests", "limits"}
    assert set(model["resources"]["requests"]) == {"cpu", "memory"}
    file = tmp_path / "k8s" / "isvc.yaml"
    args = ["--kserve", "--storage-uri", "pvc://claim/repo", "--gpu", "--out", str(file)]
    done = cli("export", str(out), *args)
    assert done.returncode == 0, done.stderr
    on_gpu = yaml.safe_load(file.read_text())["spec"]["predictor"]["model"]
    assert on_gpu["storageUri"] == "pvc://claim/repo"
    assert on_gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"
    # A pod numbers its GPUs from 0: for instances on GPU 2, it asks for three.
    done = cli("export", str(out), *args, "--gpu-index", "2")
    assert done.returncode == 0, done.stderr
    resources = yaml.safe_load(file.read_text())["spec"]["predictor"]["model"]["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == "3"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--kserve"], "--storage-uri"),
        (["--kserve", "--storage-uri", "not a uri"], "no URI"),
        ([], "--triton"),
        (["--triton", "{repo}", "--instances", "0"], "--instances"),
        (["--kserve", "--storage-uri", "s3://b/r", "--instances", "0"], "--instances"),
        (["--triton", "{repo}", "--name", "a b"], "no Triton model name"),
        (["--triton", "{repo}", "--out", "{repo}.yaml"], "add --kserve"),
        (["--triton", "{repo}", "--gpu-index", "0"], "add --gpu"),
        (["--triton", "{repo}", "--tensorrt", "fp16"], "add --gpu"),
        (["--kserve", "--storage-uri", "s3://b/r", "--gpu", "--tensorrt", "fp16"], "add --triton"),
        (["--triton", "{repo}", "--gpu", "--tensorrt", "int8"], "give fp16 or fp32"),
        (["--triton", "{repo}", "--gpu", "--gpu-index", "-1"], "no GPU index"),
        (["--triton", "{repo}", "--gpu", "--gpu-index", "0", "--gpu-index", "0"], "given twice"),
        # where nothing can be written: refused before the repository is written, not after
        (
            ["--triton", "{repo}", "--kserve", "--storage-uri", "s3://b/r", "--out", "/proc/m.yml"],
            "--out /proc/m.yml: cannot create files in /proc",
        ),
        (
            ["--triton", "{repo}", "--kserve", "--storage-uri", "s3://b/r", "--out", "{tmp}"],
            "is a folder: give a file to write",
        ),
        (["--triton", "/proc/repo"], "cannot write a Triton repository at /proc/repo"),
    ],
)
def test_bad_options_get_one_line_and_write_nothing(
    dirs: dict[str, tuple[Model, Path]], tmp_path: Path, args: list[str], message: str
) -> None:
    repo = tmp_path / "repo"
    args = [a.replace("{repo}", str(repo)).replace("{tmp}", str(tmp_path)) for a in args]
    done = cli("export", str(dirs["mlp-onnx"][1]), *args)
    assert done.returncode == 2
    assert message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert done.stdout == ""
    assert not repo.exists()


def test_torch_program_is_refused_with_the_fix(
    dirs: dict[str, tuple[Model, Path]], tmp_path: Path
) -> None:
    out = dirs["mlp-torch"][1]
    assert (out / "model" / "model.pt2").is_file()
    for args in (["--triton", str(tmp_path / "repo")], ["--kserve", "--storage-uri", "s3://b/r"]):
        done = cli("export", str(out), *args)
        assert done.returncode == 2  # Unsupported
        (line,) = done.stderr.strip().splitlines()
        assert "torch artifact" in line
        assert "runtime onnxruntime" in line
        assert done.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_openvino_ir_on_gpu_is_refused(dirs: dict[str, tuple[Model, Path]], tmp_path: Path) -> None:
    done = cli("export", str(dirs["mlp-ir"][1]), "--triton", str(tmp_path / "repo"), "--gpu")
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert "KIND_CPU" in line
    assert not (tmp_path / "repo").exists()


def test_never_overwrites_what_mahir_did_not_write(
    dirs: dict[str, tuple[Model, Path]], tmp_path: Path
) -> None:
    out = dirs["mlp-onnx"][1]
    notes = tmp_path / "project" / "notes.txt"
    notes.parent.mkdir()
    notes.write_text("mine")
    done = cli("export", str(out), "--triton", str(notes.parent))
    assert done.returncode == 2
    assert "not a Triton model repository" in done.stderr
    assert [p.name for p in notes.parent.iterdir()] == ["notes.txt"]
    # Someone else's model of the same name in a real repository stays as it was.
    theirs = tmp_path / "repo" / "mlp"
    (theirs / "1").mkdir(parents=True)
    (theirs / "config.pbtxt").write_text('name: "mlp"\n')
    done = cli("export", str(out), "--triton", str(tmp_path / "repo"))
    assert done.returncode == 2
    assert "mahir did not write it" in done.stderr
    assert (theirs / "config.pbtxt").read_text() == 'name: "mlp"\n'
    # Beside it, under another name, and again over mahir's own export: fine.
    for _ in range(2):
        done = cli("export", str(out), "--triton", str(tmp_path / "repo"), "--name", "mlp2")
        assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["mlp", "mlp2"]
    assert parse(tmp_path / "repo" / "mlp2").name == "mlp2"
