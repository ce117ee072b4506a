"""llama.cpp's own quantizer: an f32 (or f16) GGUF to Q8_0, Q4_K_M or Q4_0 weights.

The quantizer is llama.cpp's `llama_model_quantize`, called through the llama-cpp-python binding
(no separate binary). What each type stores, per block of weights:
- Q8_0: 32 int8 values and one fp16 scale (8.5 bits a weight), near-lossless;
- Q4_0: 32 4-bit values and one fp16 scale (4.5 bits), round-to-nearest, symmetric;
- Q4_K_M: 4-bit "k-quants" in super-blocks of 256 with 6-bit sub-block scales and minimums
  (~4.8 bits), where the M mix keeps half of the attention V and feed-forward down layers in
  6 bits: llama.cpp's usual 4-bit default.
The input must be full precision: llama.cpp refuses to requantize (Q4_1 -> Q8_0 only compounds
errors), so a quantized source is first written as f32 from the reference (`export/gguf.py`).
Files are cached beside the input's key (its source content, the type, llama-cpp-python's
version), so each is made once.

A pass: it makes an artifact and knows nothing of search or serving.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mahir.errors import BadInput, Unsupported
from mahir.files import cache_dir, staged
from mahir.hardware import physical_cores
from mahir.recipe import content_hash
from mahir.runtimes.engines import ENGINES
from mahir.types import Artifact

GgufType = Literal["Q8_0", "Q4_K_M", "Q4_0"]
FILE_TYPES: dict[str, int] = {"Q8_0": 7, "Q4_K_M": 15, "Q4_0": 2}
"""llama.cpp's `llama_ftype` of each type (LLAMA_FTYPE_MOSTLY_*)."""


@dataclass(frozen=True, slots=True)
class GgufQuantize:
    """Which quantization llama.cpp's quantizer writes."""

    type: GgufType = "Q8_0"
    version: int = 1

    def __post_init__(self) -> None:
        if self.type not in FILE_TYPES:
            raise ValueError(f"GGUF type must be one of {', '.join(FILE_TYPES)}, got {self.type!r}")


def quantize_gguf(
    artifact: Artifact, config: GgufQuantize, *, folder: Path | None = None
) -> Artifact:
    """`artifact` (an f32 or f16 GGUF) quantized by llama.cpp into `folder` (default: the
    cache); an existing file of the same key is reused."""
    if artifact.format != "gguf" or artifact.path is None:
        raise Unsupported(f"llama.cpp quantizes GGUF files, not a {artifact.format} artifact")
    missing = ENGINES["llama.cpp"].missing()
    if missing:
        raise Unsupported(f"quantizing a GGUF needs llama.cpp: pip install {missing}")
    import llama_cpp

    from mahir.runtimes.llamacpp import captured_logs, last_error

    key = _key(artifact, artifact.path, config, llama_cpp.__version__)
    path = (folder or cache_dir() / "gguf") / f"{artifact.path.stem}-{key[:12]}-{config.type}.gguf"
    if not path.is_file():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = FILE_TYPES[config.type]
        params.nthread = physical_cores()
        with staged(path) as draft, captured_logs() as logs:
            status = llama_cpp.llama_model_quantize(
                str(artifact.path).encode(), str(draft).encode(), params
            )
            if status != 0:
                raise BadInput(
                    f"llama.cpp cannot quantize {artifact.path.name} to {config.type} "
                    f"({last_error(logs)}): give an f32 or f16 GGUF"
                )
    made = artifact.derive(path, step="gguf-quantize", type=config.type, version=config.version)
    return dataclasses.replace(made, meta={**made.meta, "sha256": key, "gguf_type": config.type})


def _key(artifact: Artifact, path: Path, config: GgufQuantize, version: str) -> str:
    """The made file's key: the input's (its recorded source key, else its bytes), the type
    and the quantizer's version."""
    source = artifact.meta.get("sha256") or content_hash(path)
    parts = f"{source}\0{config.type}\0{config.version}\0{version}"
    return hashlib.sha256(parts.encode()).hexdigest()
