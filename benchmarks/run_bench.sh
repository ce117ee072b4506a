#!/usr/bin/env bash
# Record `mahir bench` on the default model on this machine: batch 1 and 32 on a short-skewed
# generated workload, and batch 1 on sentences of 64-128 tokens. Results land in
# benchmarks/results/ named by date and CPU; benchmarks/README.md carries the summary.
set -euo pipefail
cd "$(dirname "$0")/.."
cpu=$(grep -m1 "model name" /proc/cpuinfo | cut -d: -f2 | xargs | tr ' ()@' '____' | tr -s _)
stem="benchmarks/results/$(date -u +%F)-${cpu}"
mkdir -p benchmarks/results
runtimes=(-r torch -r torch-compile -r onnxruntime -r openvino)
.venv/bin/mahir bench "${runtimes[@]}" -b 1 -b 32 --seconds "${SECONDS_PER_RUN:-10}" \
    --json "${stem}-mixed.json" | tee "${stem}-mixed.txt"
.venv/bin/mahir bench "${runtimes[@]}" -b 1 --tokens 64-128 --seconds "${SECONDS_PER_RUN:-10}" \
    --json "${stem}-64-128.json" | tee "${stem}-64-128.txt"
.venv/bin/python benchmarks/session_overhead.py --seconds "${SECONDS_PER_RUN:-10}" \
    --json "${stem}-overhead.json" | tee "${stem}-overhead.txt"
