"""Runs inside mahir's optimum-intel environment (`export/openvino_llm.py` creates it), never in
mahir's own: exports a Hugging Face causal-LM folder to a stateful OpenVINO IR with optimum-intel,
its weights compressed by NNCF as asked, and the source's tokenizer as OpenVINO tokenizer and
detokenizer models beside it (openvino-tokenizers): GenAI is fed ids, but its structured outputs
read the vocabulary from them.

    python optimum_worker.py request.json

request.json: {"source": folder, "output": folder, "bits": null | 8 | 4, "sym": bool,
"group_size": int, "ratio": float, "calibration": [texts] | null}. With calibration texts (int4),
AWQ and scale estimation fit the int4 scales to activations on them. Imports only the standard
library and the environment's packages: mahir is not installed there.
"""

from __future__ import annotations

import json
import sys
from typing import Any


def export(request: dict[str, Any]) -> None:
    from optimum.intel import OVModelForCausalLM, OVWeightQuantizationConfig

    options: dict[str, Any] = {"load_in_8bit": False}
    if request["bits"] is not None:
        texts = request["calibration"]
        four = request["bits"] == 4
        options = {
            "quantization_config": OVWeightQuantizationConfig(
                bits=request["bits"],
                sym=request["sym"],
                group_size=request["group_size"] if four else -1,
                # a layer whose width the group does not divide gets the largest group that
                # does (SmolLM2's 576 columns: 64, not 128)
                group_size_fallback="adjust" if four else None,
                ratio=request["ratio"] if four else 1.0,
                dataset=texts,
                tokenizer=request["source"] if texts else None,
                num_samples=len(texts) if texts else None,
                quant_method="awq" if texts else "default",
                scale_estimation=True if texts else None,
            )
        }
    model = OVModelForCausalLM.from_pretrained(
        request["source"], export=True, stateful=True, compile=False, **options
    )
    model.save_pretrained(request["output"])
    save_tokenizer(request["source"], request["output"])


def save_tokenizer(source: str, output: str) -> None:
    import openvino as ov
    from openvino_tokenizers import convert_tokenizer
    from transformers import AutoTokenizer

    tokenizer, detokenizer = convert_tokenizer(
        AutoTokenizer.from_pretrained(source), with_detokenizer=True
    )
    ov.save_model(tokenizer, f"{output}/openvino_tokenizer.xml")
    ov.save_model(detokenizer, f"{output}/openvino_detokenizer.xml")


if __name__ == "__main__":
    with open(sys.argv[1]) as file:
        export(json.load(file))
