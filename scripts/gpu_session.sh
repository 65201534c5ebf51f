#!/usr/bin/env bash
# Runs on the lent GPU machine after ../shared/gpu's three staging calls (vLLM 0.26.0 in /tmp/site).
#   bash scripts/gpu_session.sh tests      # kernels compiled on the GPU + tiny-model vLLM tests (Triton path), ~5 min
#   bash scripts/gpu_session.sh engines    # the tests that start many engines: capacity (5); TP=2 (6) on 2-GPU kinds
#   bash scripts/gpu_session.sh capacity   # Llama-3.1-8B shape, dummy weights: KV capacity per dtype
# Logs and results go to $OUT (the device tool brings them back). The capacity run caps
# max_num_batched_tokens for every dtype alike: vLLM's profiling prefill otherwise runs 8192 tokens
# through the first-version cq attention kernel, which has no tensor-core prefill path yet (issue 5).
set -uo pipefail
export PYTHONPATH=/tmp/site:${PYTHONPATH:-} VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || python3 -m pip install --no-deps --no-build-isolation -e .
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
case "${1:-tests}" in
  tests)
    python3 -m pytest -q -x tests/kernels tests/test_formats.py tests/test_codebooks.py 2>&1 | tee "$OUT/pytest-kernels.log" | tail -5
    python3 -m pytest -v tests/integration/test_vllm_generate.py tests/integration/test_vllm_errors.py \
      tests/integration/test_vllm_serve.py > "$OUT/pytest-integration.log" 2>&1
    grep -E "PASSED|FAILED|ERROR|passed|failed" "$OUT/pytest-integration.log" | cut -c1-300
    ;;
  engines)
    python3 -m pytest -v tests/integration/test_vllm_capacity.py tests/integration/test_vllm_tp.py \
      > "$OUT/pytest-engines.log" 2>&1
    grep -E "PASSED|FAILED|ERROR|passed|failed" "$OUT/pytest-engines.log" | cut -c1-300
    ;;
  capacity)
    python3 benchmarks/dummy_codebooks.py benchmarks/configs/llama-3.1-8b --formats cq4,cq2,cq1
    python3 benchmarks/kv_capacity.py benchmarks/configs/llama-3.1-8b --formats auto,fp8,cq4,cq2,cq1 \
      --name capacity-llama-3.1-8b-h100 --out-dir "$OUT" \
      --engine '{"load_format": "dummy", "skip_tokenizer_init": true, "gpu_memory_utilization": 0.9, "enforce_eager": true, "max_model_len": 8192, "max_num_batched_tokens": 512}' \
      2>&1 | tee "$OUT/capacity.log" | grep -v " INFO \| WARNING " | tail -15
    ;;
esac
