#!/usr/bin/env bash
# Runs on the lent GPU machine after ../shared/gpu's three staging calls (vLLM 0.26.0 in /tmp/site).
#   bash scripts/gpu_session.sh tests      # kernels compiled on the GPU + tiny-model vLLM tests (Triton path), ~5 min
#   bash scripts/gpu_session.sh engines    # the tests that start many engines: capacity (5); TP=2 (6) on 2-GPU kinds
#   bash scripts/gpu_session.sh capacity   # Llama-3.1-8B shape, dummy weights: KV capacity per dtype
#   bash scripts/gpu_session.sh bench-kernels [ARGS]  # attention/write kernel microbenchmarks (~6 min; --quick ~1.5 min)
#   bash scripts/gpu_session.sh bench-e2e [ARGS]      # end-to-end tok/s per dtype; pass --formats to fit one call
#   bash scripts/gpu_session.sh diagnose   # the three open GPU failures, one short pytest / start each, logs kept (~8 min)
# bench-* pass ARGS on to benchmarks/attention_bench.py / benchmarks/e2e_throughput.py. Their results
# files go to $OUT and continue a same-named file in benchmarks/results/ (copy the previous call's file
# there before the next call, and the rows of both calls end up in one file). PNGs are drawn at the end.
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
  diagnose)
    # 2026-11-23 H100: the full-CUDA-graph decode test and the skip-layers test failed (the call limit cut
    # the log before pytest printed why), and the 8B-shape cq1 engine did not finish starting in 290 s.
    # Each runs alone here with a short timeout, so its traceback or stack dump comes back.
    for t in test_cuda_graph_decode_matches_eager test_prompt_logprobs_match_reference_over_the_same_codes; do
      timeout 150 python3 -m pytest -x -q --tb=long tests/integration/test_vllm_generate.py -k "$t" \
        > "$OUT/diag-$t.log" 2>&1; echo "$t rc=$?"; grep -E "^E |passed|failed" "$OUT/diag-$t.log" | head -8
    done
    VLLM_CQ_ALLOW_SKIP_LAYERS_ON_CUDA=1 timeout 150 python3 -m pytest -x -q --tb=long \
      tests/integration/test_vllm_generate.py -k test_skip_layers > "$OUT/diag-skip.log" 2>&1
    echo "skip-layers rc=$?"; grep -E "^E |passed|failed" "$OUT/diag-skip.log" | head -8
    python3 benchmarks/dummy_codebooks.py benchmarks/configs/llama-3.1-8b --formats cq1 > /dev/null
    VLLM_CQ_STACK_DUMP_S=60 VLLM_ENABLE_V1_MULTIPROCESSING=0 timeout 200 python3 benchmarks/kv_capacity.py \
      benchmarks/configs/llama-3.1-8b --formats cq1 --name diag-capacity --out-dir "$OUT" --log-dir "$OUT" \
      --engine '{"load_format": "dummy", "skip_tokenizer_init": true, "gpu_memory_utilization": 0.9, "enforce_eager": true, "max_model_len": 8192, "max_num_batched_tokens": 2048}'
    echo "capacity rc=$?"; grep -vE " (INFO|DEBUG) " "$OUT/capacity-cq1.log" | tail -40
    ;;
  bench-kernels)
    python3 benchmarks/attention_bench.py --out-dir "$OUT" --seed-dir benchmarks/results "${@:2}" \
      > "$OUT/bench-kernels.log" 2>&1
    echo "attention_bench rc=$?"
    grep -E "^\| (kind|decode .* 64 \| 32768|prefill|write)|budget|broken|->" "$OUT/bench-kernels.log" | cut -c1-220 | tail -60
    python3 benchmarks/plot.py "$OUT"/attention-*.json --out-dir "$OUT" > "$OUT/plot.log" 2>&1 || tail -3 "$OUT/plot.log"
    ;;
  bench-e2e)
    python3 benchmarks/e2e_throughput.py benchmarks/configs/llama-3.1-8b --out-dir "$OUT" --seed-dir benchmarks/results \
      --budget-s "${BENCH_BUDGET_S:-530}" "${@:2}" > "$OUT/bench-e2e.log" 2>&1
    echo "e2e_throughput rc=$?"
    grep -vE " (INFO|WARNING|DEBUG) " "$OUT/bench-e2e.log" | cut -c1-220 | tail -40
    python3 benchmarks/plot.py "$OUT"/e2e-*.json --out-dir "$OUT" > "$OUT/plot.log" 2>&1 || tail -3 "$OUT/plot.log"
    ;;
esac
