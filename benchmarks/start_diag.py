"""Start one engine and report how long it took, for diagnosing engine starts that stall.

    VLLM_CQ_STACK_DUMP_S=30 python benchmarks/start_diag.py MODEL --kv-cache-dtype cq1 --mode spawn

`--mode` picks how vLLM starts its engine core: `default` (what the plugin picks: spawn on CUDA, see
compat P5), `fork` (vLLM's own default when CUDA is not yet initialized), `spawn`, or `inproc`
(VLLM_ENABLE_V1_MULTIPROCESSING=0: the engine core in this process).
On the H200 on 2026-12-01 cq engines of real model shapes did not start within 140-320 s when vLLM
forked its engine core, while every start that worked used spawn (pytest, where calibration had
initialized CUDA) or ran in-process (the 8B cq1 start of 2026-11-23); this tells the cases apart.
With VLLM_CQ_STACK_DUMP_S set, every vLLM process that loads the plugin dumps its stacks periodically.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--kv-cache-dtype", default="cq1")
    p.add_argument("--mode", choices=["default", "fork", "spawn", "inproc"], default="default")
    p.add_argument("--engine", default='{"enforce_eager": true, "gpu_memory_utilization": 0.5}')
    args = p.parse_args()
    if args.mode == "inproc":
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    elif args.mode != "default":
        os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = args.mode
    from vllm_cq.child import dump_stacks_from_env

    dump_stacks_from_env()
    t0 = time.perf_counter()
    from vllm import LLM, SamplingParams

    llm = LLM(args.model, kv_cache_dtype=args.kv_cache_dtype, **json.loads(args.engine))
    start = time.perf_counter() - t0
    prompt = {"prompt_token_ids": [1, 2, 3, 4, 5, 6]}  # ids in any vocabulary; works with skip_tokenizer_init
    out = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0))
    row = {"mode": args.mode, "kv_cache_dtype": args.kv_cache_dtype, "start_s": round(start, 1),
           "method": os.environ.get("VLLM_WORKER_MULTIPROC_METHOD", "fork (vLLM default)"),
           "token_ids": list(out[0].outputs[0].token_ids)}  # fmt: skip
    print("START_DIAG " + json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
