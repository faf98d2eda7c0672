#!/usr/bin/env bash
# The GPU check, as one prepared script (about 5 minutes on one H100/H200): run on the lent GPU
# machine from the repo root, after benchmarks/gpu_wheels.sh prepared .whl and .gpu-data here:
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl", ".gpu-data"], timeout_s=540)
# Prints one JSON line per figure (and writes them to $OUT/gpu_figures.jsonl): the bf16 GEMM rate,
# full ranking and graph decoding queries/s at 12k and 1M items, Beauty training in bf16 through
# `rpg-dist train` (one GPU, DeepSpeed over NCCL, ZeRO 0 and 2), and whether faiss-gpu is there.
# The machine's own PyTorch (CUDA) is used: it reaches no index, so the README's CUDA install is
# not repeated; the GPU-marked tests need faiss-gpu and Ray, which its image lacks (BENCHMARKS.md).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site:$PWD" DS_ACCELERATOR=cuda HF_HUB_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.csv"
python3 -c "import torch, deepspeed; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'deepspeed', deepspeed.__version__)"
python3 benchmarks/gpu_figures.py --device cuda --beauty .gpu-data/amazon2014-beauty --out "$OUT/gpu_figures.jsonl" \
  2>&1 | tee "$OUT/log.txt" | grep '"figure"'
