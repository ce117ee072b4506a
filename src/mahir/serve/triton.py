"""`mahir export --triton`: an output directory as one model of a Triton model repository.

    REPO/<name>/config.pbtxt    built as tritonclient's ModelConfig message, written as text
    REPO/<name>/1/model.onnx    (or model.xml + model.bin for OpenVINO IR)
    REPO/<name>/mahir.json      the output directory's manifest (marks the folder as ours)
    REPO/<name>/tokenizer/      for text models: Triton ignores it, the client tokenizes with it
    REPO/<name>/processor/      for image models: Triton ignores it, the client preprocesses

ONNX artifacts get the ONNX Runtime backend (platform "onnxruntime_onnx"), OpenVINO IR the
"openvino" backend. The dims come from the graph itself, since Triton checks the config against
it: a config that says -1 where the graph has a fixed size fails to load. Triton serves tensors,
not text or images: for a text model tokenization and pooling stay with the client (mahir.json
has both), for an image model decoding and the image processor (mahir.json has the labels).

On GPUs (`GpuPlacement`) the instances are KIND_GPU, on the GPUs named (else on every GPU
Triton sees), and ONNX Runtime may hand the graph to TensorRT (`gpu_execution_accelerator`) at
fp16 or fp32. The ONNX must be a float one: an int8 graph quantized for CPUs (integer MatMuls,
QDQ pairs) runs slower on a GPU than fp32, so it is refused before anything is written.

The batching settings are the batching tuner's (`batching` in mahir.json) when it ran, else
`DEFAULT_MAX_BATCH` and `DEFAULT_DELAY_US`. Opens artifacts read-only with onnx/openvino; never
imports passes or search.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mahir.errors import BadInput, Unsupported
from mahir.families.text import TOKENIZER
from mahir.families.vision import PROCESSOR
from mahir.files import staged, unwritable
from mahir.outdir import MANIFEST, model_name, read_artifact, read_manifest
from mahir.types import BATCH, RuntimeOptions

CONFIG = "config.pbtxt"
VERSION = "1"
DEFAULT_MAX_BATCH = 32
DEFAULT_DELAY_US = 100
"""Without a tuner's value: wait at most 100 us for a batch to fill, about the cost of one
small request; mahir's own server runs at once (0), Triton's batcher needs a window to batch."""

BACKENDS = {"onnx": "onnxruntime_onnx", "openvino": "openvino"}
_TRITON_TYPES = {
    "bool": "TYPE_BOOL",
    "uint8": "TYPE_UINT8",
    "int8": "TYPE_INT8",
    "int16": "TYPE_INT16",
    "int32": "TYPE_INT32",
    "int64": "TYPE_INT64",
    "float16": "TYPE_FP16",
    "float32": "TYPE_FP32",
    "float64": "TYPE_FP64",
    "bfloat16": "TYPE_BF16",
}


@dataclass(frozen=True, slots=True)
class Tensor:
    """An input or output as the graph declares it: numpy dtype name, dims with -1 dynamic."""

    name: str
    dtype: str
    dims: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Batching:
    """Triton's dynamic batcher settings; `max_batch_size` 0 means the model cannot batch."""

    max_batch_size: int
    delay_us: int


_CPU_INT8_OPS = frozenset(
    "DynamicQuantizeLinear MatMulInteger ConvInteger QuantizeLinear DequantizeLinear QGemm "
    "QAttention DynamicQuantizeMatMul MatMulIntegerToFloat".split()
)
"""What ONNX Runtime's int8 quantizers leave in a graph (dynamic and QDQ alike), besides the
QLinear* ops: kernels written for CPUs' int8 instructions."""


@dataclass(frozen=True, slots=True)
class GpuPlacement:
    """Triton instances on GPUs (KIND_GPU): `count` instances on each GPU of `gpus`, or on every
    GPU Triton sees when empty; `tensorrt`, the precision ONNX Runtime's TensorRT accelerator
    builds its engines in (None: the CUDA provider alone)."""

    gpus: tuple[int, ...] = ()
    """CUDA indices as the server numbers them (in a Kubernetes pod: from 0)."""
    tensorrt: Literal["fp16", "fp32"] | None = None
    """TensorRT's precision_mode; fp16 lets TensorRT pick fp16 kernels where they are faster."""

    def __post_init__(self) -> None:
        for index in self.gpus:
            if index < 0:
                raise BadInput(f"--gpu-index {index} is no GPU index: give 0, 1, ...")
            if self.gpus.count(index) > 1:
                raise BadInput(f"--gpu-index {index} is given twice: name each GPU once")
        if self.tensorrt not in (None, "fp16", "fp32"):
            raise BadInput(
                f"--tensorrt {self.tensorrt!r} is no TensorRT precision: give fp16 or fp32"
            )

    @property
    def devices(self) -> int:
        """GPUs a machine (a pod) needs for every named index to exist there."""
        return max(self.gpus) + 1 if self.gpus else 1


def check_exportable(
    manifest: dict[str, Any], out: Path, *, gpu: GpuPlacement | None = None
) -> str:
    """The artifact's format, or Unsupported for one Triton has no mahir backend for (or, on
    GPUs, OpenVINO IR: that backend runs KIND_CPU instances only; and an int8 ONNX quantized
    for CPUs)."""
    fmt = str(manifest.get("format"))
    spec = manifest.get("spec")
    if manifest.get("family") == "decoder":
        raise Unsupported(
            f"{out} holds an LLM; Triton export takes encoders and tensor models: serve it with "
            f"mahir serve {out} (--ray to scale out)"
        )
    if "model_file" not in manifest or not isinstance(spec, dict) or not spec.get("inputs"):
        raise BadInput(f"{out / MANIFEST} is damaged (no model_file or spec): write it again")
    if fmt not in BACKENDS:
        raise Unsupported(
            f"{out} holds a {fmt} artifact; Triton export takes ONNX or OpenVINO IR: re-run mahir "
            "optimize with --only an onnxruntime/openvino candidate, or mahir apply a recipe with "
            "runtime onnxruntime or openvino"
        )
    if gpu is not None and fmt == "openvino":
        raise Unsupported(
            f"{out} holds OpenVINO IR, and Triton's OpenVINO backend runs on CPUs only (KIND_CPU): "
            "drop --gpu, or export an ONNX artifact (mahir apply a recipe with runtime onnxruntime)"
        )
    if gpu is not None and fmt == "onnx":
        int8 = cpu_int8_ops(_model_file(out, manifest))
        if int8:
            raise Unsupported(
                f"{out} holds an ONNX model quantized to int8 for CPUs ({', '.join(int8[:3])}), "
                "which a GPU runs slower than fp32: drop --gpu, or export a float one (mahir "
                f"apply {out / 'recipe.yaml'} with its int8 steps deleted, runtime onnxruntime)"
            )
    return fmt


def cpu_int8_ops(model_file: Path) -> list[str]:
    """The int8 op types in an ONNX graph (subgraphs aside), sorted; empty for a float graph."""
    import onnx

    graph = onnx.load(str(model_file), load_external_data=False).graph
    found = {n.op_type for n in graph.node}
    return sorted(op for op in found if op in _CPU_INT8_OPS or op.startswith("QLinear"))


def default_name(manifest: dict[str, Any], out: Path) -> str:
    """The output directory's model name, as a Triton model folder name."""
    raw = model_name(manifest, out)
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", raw).strip("-.") or "model"


def write_triton_repo(
    out: Path,
    repo: Path,
    *,
    name: str | None = None,
    instances: int = 1,
    gpu: GpuPlacement | None = None,
) -> Path:
    """Add `out`'s model to the repository at `repo` as `repo/<name>`, atomically; returns that
    folder. Replaces only a model folder mahir wrote, in a folder that is a Triton repository.
    `gpu`: instances on GPUs; None: on CPUs."""
    manifest = read_manifest(out)
    fmt = check_exportable(manifest, out, gpu=gpu)
    name = name or default_name(manifest, out)
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
        raise BadInput(f"--name {name!r} is no Triton model name: use letters, digits, _ . -")
    if instances < 1:
        raise BadInput(f"--instances must be at least 1, got {instances}")
    _check_repo(repo, name)
    model_file = _model_file(out, manifest)
    text = config_text(
        manifest, read_tensors(fmt, model_file), name=name, instances=instances, gpu=gpu
    )
    with staged(repo / name, folder=True) as staging:
        _fill(staging, out, manifest, text)
    return repo / name


def _fill(staging: Path, out: Path, manifest: dict[str, Any], config: str) -> None:
    """The model folder's contents: config, version folder, manifest, tokenizer."""
    model_file = out / manifest["model_file"]
    (staging / VERSION).mkdir()
    for source in read_artifact(out, manifest).files():
        shutil.copy2(source, staging / VERSION / source.name)
    (staging / CONFIG).write_text(config)
    for client_side in (TOKENIZER, PROCESSOR):  # Triton ignores them; the client needs them
        if (out / client_side).is_dir():
            shutil.copytree(out / client_side, staging / client_side)
    # The folder stays an output directory mahir can open (and marks it as ours).
    copied = {**manifest, "model_file": f"{VERSION}/{model_file.name}"}
    (staging / MANIFEST).write_text(json.dumps(copied, indent=2) + "\n")


def config_text(
    manifest: dict[str, Any],
    tensors: dict[str, Tensor],
    *,
    name: str,
    instances: int = 1,
    gpu: GpuPlacement | None = None,
) -> str:
    """config.pbtxt for the manifest's model: the ModelConfig message in protobuf text form."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as pb

    fmt = str(manifest["format"])
    inputs = [_tensor(tensors, t["name"]) for t in manifest["spec"]["inputs"]]
    outputs = [_tensor(tensors, n) for n in manifest["spec"]["outputs"]]
    can_batch = all(t["shape"][:1] == [BATCH] for t in manifest["spec"]["inputs"]) and all(
        t.dims[:1] == (-1,) for t in outputs
    )
    batching = read_batching(manifest) if can_batch else Batching(0, 0)
    skip = 1 if batching.max_batch_size else 0  # Triton adds the batch axis itself
    config = pb.ModelConfig(name=name, max_batch_size=batching.max_batch_size)
    if fmt == "onnx":
        config.platform = BACKENDS[fmt]
    else:
        config.backend = BACKENDS[fmt]
    for t in inputs:
        config.input.add(name=t.name, data_type=pb.DataType.Value(_type(t)), dims=t.dims[skip:])
    for t in outputs:
        config.output.add(name=t.name, data_type=pb.DataType.Value(_type(t)), dims=t.dims[skip:])
    if batching.max_batch_size:
        config.dynamic_batching.preferred_batch_size.append(batching.max_batch_size)
        config.dynamic_batching.max_queue_delay_microseconds = batching.delay_us
    if gpu is None:
        config.instance_group.add(count=instances, kind=pb.ModelInstanceGroup.KIND_CPU)
    else:
        kind = pb.ModelInstanceGroup.KIND_GPU
        config.instance_group.add(count=instances, kind=kind, gpus=gpu.gpus)
    if gpu is not None and gpu.tensorrt:
        accelerators = config.optimization.execution_accelerators.gpu_execution_accelerator
        accelerators.add(name="tensorrt").parameters["precision_mode"] = gpu.tensorrt.upper()
    for key, value in _parameters(fmt, manifest, batching).items():
        config.parameters[key].string_value = value
    if fmt == "openvino":
        config.default_model_filename = "model.xml"
    text: str = text_format.MessageToString(config)
    return text


def read_batching(manifest: dict[str, Any]) -> Batching:
    """The tuner's batching (`{"max_batch_size": int, "max_delay_ms": float}`), else defaults:
    batches up to 32, a 100 us window. The one preferred batch size is the maximum, so a full
    batch goes at once and a partial one after the window."""
    tuned = manifest.get("batching")
    if not tuned:
        return Batching(DEFAULT_MAX_BATCH, DEFAULT_DELAY_US)
    try:
        size, delay_ms = int(tuned["max_batch_size"]), float(tuned["max_delay_ms"])
    except (KeyError, TypeError, ValueError) as err:
        raise BadInput(f"mahir.json has a damaged batching entry {tuned!r}: tune again") from err
    if size < 1 or delay_ms < 0:
        raise BadInput(f"mahir.json batching {tuned!r} is out of range: tune again")
    return Batching(size, round(delay_ms * 1000))


def _model_file(out: Path, manifest: dict[str, Any]) -> Path:
    model_file = out / str(manifest["model_file"])
    if not model_file.is_file():
        raise BadInput(f"{model_file} is missing: write the output directory again")
    return model_file


def read_tensors(fmt: str, model_file: Path) -> dict[str, Tensor]:
    """Inputs and outputs by name, as the graph in `model_file` declares them."""
    if not model_file.is_file():
        raise BadInput(f"{model_file} is missing: write the output directory again")
    if fmt == "onnx":
        return _onnx_tensors(model_file)
    return _openvino_tensors(model_file)


def _onnx_tensors(path: Path) -> dict[str, Tensor]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    tensors: dict[str, Tensor] = {}
    for value in [*graph.input, *graph.output]:
        typed = value.type.tensor_type
        if not typed.HasField("shape"):
            raise Unsupported(f"{path}: {value.name} has no declared rank; Triton needs one")
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(typed.elem_type)).name
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in typed.shape.dim)
        tensors[value.name] = Tensor(value.name, dtype, dims)
    return tensors


def _openvino_tensors(path: Path) -> dict[str, Tensor]:
    import openvino as ov

    model = ov.Core().read_model(str(path))
    tensors: dict[str, Tensor] = {}
    for port in [*model.inputs, *model.outputs]:
        shape = port.get_partial_shape()
        if shape.rank.is_dynamic:
            raise Unsupported(f"{path}: {port.get_any_name()} has no fixed rank; Triton needs one")
        dims = tuple(-1 if d.is_dynamic else d.get_length() for d in shape)
        dtype = np.dtype(port.get_element_type().to_dtype()).name
        # The backend knows a port by get_any_name() alone, whatever other names it has.
        name = port.get_any_name()
        tensors[name] = Tensor(name, dtype, dims)
    return tensors


def _tensor(tensors: dict[str, Tensor], name: str) -> Tensor:
    if name not in tensors:
        raise BadInput(f"the model has no tensor {name!r} (it has {sorted(tensors)}): re-export")
    return tensors[name]


def _type(tensor: Tensor) -> str:
    if tensor.dtype not in _TRITON_TYPES:
        raise Unsupported(f"{tensor.name} is {tensor.dtype}, a type Triton has no name for")
    return _TRITON_TYPES[tensor.dtype]


def _parameters(fmt: str, manifest: dict[str, Any], batching: Batching) -> dict[str, str]:
    """The runtime settings the model was measured with, as the backend's parameters. The
    OpenVINO backend can ask for bf16 but not insist on f32: on a CPU with AMX it picks bf16 by
    itself, so check its answers there (mahir verified f32)."""
    options = RuntimeOptions.from_dict(manifest.get("options"))
    threads = options.threads
    if fmt == "onnx":
        return {"intra_op_thread_count": str(threads)} if threads else {}
    params = {"PERFORMANCE_HINT": options.openvino.hint.upper()}
    if threads:
        params["INFERENCE_NUM_THREADS"] = str(threads)
    if options.openvino.precision == "bf16":
        params["HINT_BF16"] = "YES"
    if batching.max_batch_size:
        # The backend fixes the batch axis at max_batch_size and refuses smaller batches unless
        # told to pad them: the price of batching OpenVINO in Triton.
        params["ENABLE_BATCH_PADDING"] = "YES"
    return params


def _check_repo(repo: Path, name: str) -> None:
    """Refuse what mahir did not write: a folder that is no model repository (every entry a
    model folder with a config), or a model folder of the same name that is not ours."""
    if repo.exists() and not repo.is_dir():
        raise BadInput(f"refusing to write a Triton repository at {repo}: it is a file")
    reason = unwritable(repo / name)
    if reason is not None:
        raise BadInput(f"cannot write a Triton repository at {repo}: {reason}; give another")
    if not repo.exists():
        return
    strays = [
        p.name
        for p in repo.iterdir()
        if not p.name.startswith(".") and not (p.is_dir() and (p / CONFIG).is_file())
    ]
    if strays:
        raise BadInput(
            f"refusing to write into {repo}: it is not a Triton model repository "
            f"({', '.join(sorted(strays)[:3])} are no model folders); give an empty or new folder"
        )
    target = repo / name
    if target.exists() and not (target / MANIFEST).is_file():
        raise BadInput(f"refusing to replace {target}: mahir did not write it; choose --name")
