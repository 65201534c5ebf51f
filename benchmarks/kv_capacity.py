"""vLLM's reported KV capacity per dtype at the same memory, saved to benchmarks/results/.

    python benchmarks/kv_capacity.py benchmarks/configs/llama-3.1-8b --formats auto,fp8,cq4,cq2,cq1 \
        --engine '{"load_format": "dummy", "skip_tokenizer_init": true, "gpu_memory_utilization": 0.9}'
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform

import torch

from vllm_cq.capacity import iter_measure


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or 'x86-64'})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("model")
    p.add_argument("--formats", default="auto,fp8,cq4,cq2,cq1")
    p.add_argument("--engine", default="{}")
    p.add_argument("--name", default=None, help="results file stem (default: capacity-<model>)")
    p.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--log-dir", default=None, help="each engine's log, written as it runs")
    p.add_argument("--timeout", type=float, default=900, help="seconds per engine start")
    args = p.parse_args()
    engine = json.loads(args.engine)
    import vllm

    result = {
        "benchmark": "kv_capacity",
        "model": args.model,
        "engine": engine,
        "device": device_name(),
        "date": datetime.date.today().isoformat(),
        "vllm": vllm.__version__,
        "rows": [],
    }
    os.makedirs(args.out_dir, exist_ok=True)
    stem = args.name or f"capacity-{os.path.basename(os.path.normpath(args.model))}"
    path = os.path.join(args.out_dir, f"{stem}.json")
    for r in iter_measure(args.model, args.formats.split(","), engine, args.timeout, args.log_dir):
        result["rows"].append(r)
        with open(path, "w") as f:  # rewritten after every format: a cut-short run keeps its rows
            json.dump(result, f, indent=2)
        if "error" in r:
            print(f"{r['kv_cache_dtype']:>8}: failed ({r['error']})", flush=True)
            continue
        dt, tok, fac, nb, sec = (
            r["kv_cache_dtype"],
            r["kv_cache_tokens"],
            r["factor"],
            r["num_blocks"],
            r["engine_seconds"],
        )
        print(f"{dt:>8}: {tok:>12,} KV tokens  {fac:6.2f}x  ({nb} blocks, engine {sec} s)", flush=True)
    print(f"-> {path}")


if __name__ == "__main__":
    main()
