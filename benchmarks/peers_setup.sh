#!/usr/bin/env bash
# The separate venv benchmarks/peers.py runs in: mahir plus the peers a user would pick instead
# (sentence-transformers with its onnx and openvino backends, optimum-onnx, optimum-intel).
#
# Why a separate venv with older versions: optimum-onnx 0.1.0 (the newest) needs optimum 2.1 and
# transformers < 4.58, so sentence-transformers 6.x (transformers >= 5) cannot have its onnx
# extra; 5.7.0 is the newest that resolves with both its onnx and openvino extras. With
# optimum 2.1 the newest optimum-intel is 1.27.0 (2.x needs optimum 2.3). transformers 4.57
# needs huggingface-hub < 1.0, which `datasets` (needed by the OpenVINO calibration) would
# otherwise lift. mahir itself imports and runs under transformers 4.57.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-peers}
test -x "$VENV/bin/python" || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# CPU build of torch first, pinned as in the Makefile: a looser requirement pulls a CUDA build.
"$VENV/bin/python" -m pip install -q torch==2.13.0
"$VENV/bin/python" -m pip install -q -e .
"$VENV/bin/python" -m pip install -q \
    "sentence-transformers[onnx,openvino]==5.7.0" \
    "transformers==4.57.6" \
    "tokenizers==0.22.2" \
    "huggingface-hub==0.36.2" \
    "optimum==2.1.0" \
    "optimum-onnx==0.1.0" \
    "optimum-intel==1.27.0" \
    "datasets==5.0.1"
"$VENV/bin/python" -m pip check
"$VENV/bin/python" -c "import mahir, sentence_transformers, optimum.intel, optimum.onnxruntime"
echo "ready: HF_HUB_OFFLINE=1 $VENV/bin/python benchmarks/peers.py"
