"""KV-cache capacity as vLLM itself reports it, per `--kv-cache-dtype`, at the same memory budget.

    python -m vllm_cq.capacity MODEL --formats auto,cq4,cq2,cq1 [--engine '{"enforce_eager": true}']

Each format starts a fresh engine in its own process (vLLM reserves the KV memory for the process's
lifetime) and reports vLLM's block count and token capacity; the summary gives each format's factor
over the first one. On CPU set VLLM_CPU_KVCACHE_SPACE (GiB) so every engine gets the same budget.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any


def dump_stacks_from_env() -> None:
    """VLLM_CQ_STACK_DUMP_S=N: print every thread's stack to stderr every N seconds, so an engine
    start or step that hangs says where (with VLLM_ENABLE_V1_MULTIPROCESSING=0 the engine core is in
    this process). Used by the capacity and e2e benchmark children."""
    dump = float(os.environ.get("VLLM_CQ_STACK_DUMP_S", "0") or 0)
    if dump > 0:
        faulthandler.dump_traceback_later(dump, repeat=True, file=sys.stderr)


def measure_one(model: str, kv_cache_dtype: str, engine: dict[str, Any]) -> dict[str, Any]:
    """Start one engine and read vLLM's own capacity numbers (call in a fresh process; stack dumps
    with VLLM_CQ_STACK_DUMP_S, see `dump_stacks_from_env`)."""
    dump_stacks_from_env()
    from vllm import LLM

    llm = LLM(model, kv_cache_dtype=kv_cache_dtype, **engine)
    cc = llm.llm_engine.vllm_config.cache_config
    return {
        "kv_cache_dtype": kv_cache_dtype,
        "num_blocks": int(cc.num_gpu_blocks),
        "block_size": int(cc.block_size),
        # blocks x block size: what the scheduler can hold. vLLM's logged "KV cache size" is
        # max_model_len x whole requests that fit, smaller when max_model_len is not a multiple of
        # the block size; kept beside it.
        "kv_cache_tokens": int(cc.num_gpu_blocks * cc.block_size),
        "vllm_reported_tokens": int(cc.kv_cache_size_tokens or 0),
    }


def iter_measure(
    model: str, formats: list[str], engine: dict[str, Any], timeout: float = 900, log_dir: str | None = None
) -> Iterator[dict]:
    """Capacity per format, each in a fresh subprocess, yielded as soon as it is known (with `factor`
    relative to the first format), so a run cut short keeps what it measured. With `log_dir`, each
    engine's log goes to LOG_DIR/capacity-FORMAT.log as it runs (kept when a start hangs or fails)."""
    first = None
    for fmt in formats:
        cmd = [sys.executable, "-m", "vllm_cq.capacity", model, "--one", fmt, "--engine", json.dumps(engine)]
        t0 = time.perf_counter()
        if log_dir:
            os.makedirs(log_dir, exist_ok=True)
            log_path = os.path.join(log_dir, f"capacity-{fmt}.log")
            with open(log_path, "w") as log:
                out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True, timeout=timeout)
            err = f"see {log_path}"
        else:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            err = out.stderr[-4000:]
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
        if out.returncode != 0 or not lines:
            raise RuntimeError(f"capacity run for {fmt} failed (rc {out.returncode}):\n{err}")
        row = json.loads(lines[-1])
        first = first or row["kv_cache_tokens"]
        row["factor"] = row["kv_cache_tokens"] / first
        row["engine_seconds"] = round(time.perf_counter() - t0, 1)
        yield row


def measure(model: str, formats: list[str], engine: dict[str, Any], timeout: float = 900) -> list[dict]:
    return list(iter_measure(model, formats, engine, timeout))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vllm_cq.capacity", description=__doc__)
    p.add_argument("model")
    p.add_argument("--formats", default="auto,cq4,cq2,cq1")
    p.add_argument("--engine", default="{}", help="JSON of extra LLM(...) arguments")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    engine = json.loads(args.engine)
    if args.one:
        print(json.dumps(measure_one(args.model, args.one, engine)), flush=True)
        return 0
    for r in measure(args.model, args.formats.split(","), engine):
        print(f"{r['kv_cache_dtype']:>10}: {r['kv_cache_tokens']:>12,} tokens ({r['factor']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
