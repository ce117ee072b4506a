"""llama.cpp's own quantizer: an f32 (or f16) GGUF to Q8_0, Q6_K, Q5_K_M, Q4_K_M, IQ4_NL or Q4_0.

The quantizer is llama.cpp's `llama_model_quantize`, called through the llama-cpp-python binding
(no separate binary). What each type stores, per block of weights:
- Q8_0: 32 int8 values and one fp16 scale (8.5 bits a weight), near-lossless;
- Q6_K, Q5_K_M, Q4_K_M: "k-quants" in super-blocks of 256 with 6-bit sub-block scales (and
  minimums), 6.6, ~5.7 and ~4.8 bits; the M mixes keep half of the attention V and
  feed-forward down layers a step higher. A row must hold whole super-blocks: a tensor whose
  rows are not a multiple of 256 wide falls back per tensor to Q5_0, Q5_1 or Q8_0 (all of
  SmolLM2-135M's 576-wide layers do, so its "Q4_K_M" is mostly Q5_0);
- IQ4_NL: 32 4-bit indices into a fixed non-uniform table and one fp16 scale (4.5 bits);
- Q4_0: 32 4-bit values and one fp16 scale (4.5 bits), round-to-nearest, symmetric.
On x86 with AVX2, llama.cpp repacks Q4_0, IQ4_NL and Q4_K weights into interleaved rows when it
loads them and multiplies them by its fastest CPU kernels; the other types run as stored.
The input must be full precision: llama.cpp refuses to requantize (Q4_1 -> Q8_0 only compounds
errors), so a quantized source is first written as f32 from the reference (`export/gguf.py`).
Files are cached beside the input's key (its source content, the type, llama-cpp-python's
version), so each is made once. The llama.cpp engine's `describe` counts the tensors of each
type in the file it runs.

A pass: it makes an artifact and knows nothing of search or serving.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mahir.errors import BadInput, Unsupported
from mahir.files import cache_dir, content_hash, staged
from mahir.hardware import physical_cores
from mahir.runtimes.engines import ENGINES
from mahir.types import Artifact

GgufType = Literal["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "IQ4_NL", "Q4_0"]
FILE_TYPES: dict[str, int] = {
    "Q8_0": 7,
    "Q6_K": 18,
    "Q5_K_M": 17,
    "Q4_K_M": 15,
    "IQ4_NL": 25,
    "Q4_0": 2,
}
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
