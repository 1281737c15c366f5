#!/usr/bin/env bash
# The first check on a GPU host, in one command, from the checkout (no install needed there):
#   here:   .venv/bin/ssjf gpu-check --pack .gpu-pack   (config + tokenizer files, a few MB; ignored by git)
#   there:  bash scripts/gpu-check.sh [OUT_DIR]          (the device tool: carry .gpu-pack)
# Engine correctness on CUDA against transformers, bench-engine in bf16 at batch 1/8/16, the proxy.
set -euo pipefail
out=${1:-${OUT:-results}}
mkdir -p "$out"
export PYTHONPATH="$PWD/python_backend:$PWD/tools:$PWD/client${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__)"
python3 -m ssjf_tools.gpu_check --from .gpu-pack --out "$out/gpu-check.json" 2>&1 | tee "$out/gpu-check.log"
