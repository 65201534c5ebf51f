"""KV-cache capacity as vLLM itself reports it, per `--kv-cache-dtype`, at the same memory budget.

    python -m vllm_cq.capacity MODEL --formats auto,cq4,cq2,cq1 [--engine '{"enforce_eager": true}']

Each format starts a fresh engine in its own process (vLLM reserves the KV memory for the process's
lifetime) and reports vLLM's block count and token capacity; the summary gives each format's factor
over the first one. On CPU set VLLM_CPU_KVCACHE_SPACE (GiB) so every engine gets the same budget.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from vllm_cq.child import TIMEOUT_RC, dump_stacks_from_env, run_logged
from vllm_cq.labels import label_engine_kwargs

RESULT = "VLLM_CQ_CAPACITY "  # prefix of the child's result line (vLLM logs to the same stdout)


def window_capacity(num_blocks: int, max_model_len: int, window: int, cq_block: int, window_block: int) -> dict:
    """Tokens a recent window leaves for codes, at max_model_len. The window's pages come out of the same
    block pool as the codes: a sequence of L tokens holds cdiv(L, cq_block) code blocks plus, in the steady
    state, cdiv(W - 1, window_block) + 1 window blocks (vLLM frees older ones). vLLM's own logged figure
    reserves W - 1 + max_num_batched_tokens window tokens per request (what a prefilling request may hold
    at once) and so reads far lower."""
    per_seq = -(-max_model_len // cq_block) + -(-(window - 1) // window_block) + 1
    seqs = num_blocks // per_seq
    return {
        "recent_window": window,
        "cq_block_size": cq_block,
        "window_block_size": window_block,
        "kv_cache_tokens_without_window": num_blocks * cq_block,
        "kv_cache_tokens": seqs * max_model_len,  # with the window, whole max_model_len sequences
    }


def measure_one(model: str, label: str, engine: dict[str, Any]) -> dict[str, Any]:
    """Start one engine for a format label (`cq1`, `cq1+w0`; vllm_cq.labels) and read vLLM's own capacity
    numbers (call in a fresh process; stack dumps with VLLM_CQ_STACK_DUMP_S, see `dump_stacks_from_env`).
    With a cq recent window, `kv_cache_tokens` is `window_capacity`'s figure (blocks are shared by codes
    and window)."""
    dump_stacks_from_env()
    from vllm import LLM

    kw = label_engine_kwargs(label, engine)
    llm = LLM(model, **kw)
    return {"kv_cache_dtype": label, **engine_capacity(llm.llm_engine.vllm_config, kw["kv_cache_dtype"])}


def engine_capacity(vllm_config: Any, kv_cache_dtype: str) -> dict[str, Any]:
    """A started engine's KV capacity from its config: vLLM's block count and logged size, and the tokens
    they hold (`window_capacity`'s figure with a cq recent window, whose pages share the pool)."""
    vc = vllm_config
    cc = vc.cache_config
    row = {
        "num_blocks": int(cc.num_gpu_blocks),
        "block_size": int(cc.block_size),
        # blocks x block size: what the scheduler can hold. vLLM's logged "KV cache size" is
        # max_model_len x whole requests that fit, smaller when max_model_len is not a multiple of
        # the block size; kept beside it.
        "kv_cache_tokens": int(cc.num_gpu_blocks * cc.block_size),
        "vllm_reported_tokens": int(cc.kv_cache_size_tokens or 0),
    }
    from vllm_cq.formats import is_plugin_dtype

    if is_plugin_dtype(kv_cache_dtype):
        from vllm_cq.integration.config import window_block_sizes, window_tokens

        w = window_tokens(vc)
        row["recent_window"] = w
        if w:
            head_dim = vc.model_config.get_head_size()
            cq_block, win_block = window_block_sizes(kv_cache_dtype, head_dim, vc.model_config.dtype.itemsize)
            row.update(window_capacity(row["num_blocks"], vc.model_config.max_model_len, w, cq_block, win_block))
    return row


def iter_measure(
    model: str, formats: list[str], engine: dict[str, Any], timeout: float = 900, log_dir: str | None = None
) -> Iterator[dict]:
    """Capacity per format, each in a fresh subprocess, yielded as soon as it is known (with `factor`
    relative to the first format measured), so a run cut short keeps what it measured. Each engine's
    output goes to LOG_DIR/capacity-FORMAT.log as it runs (a temporary directory without `log_dir`),
    kept when a start hangs or fails. A format that fails or outlasts `timeout` yields a row with
    `error` (its engine's process group stopped) and the next format still runs."""
    first = None
    log_dir = log_dir or tempfile.mkdtemp(prefix="vllm-cq-capacity-")
    os.makedirs(log_dir, exist_ok=True)
    for fmt in formats:
        cmd = [sys.executable, "-m", "vllm_cq.capacity", model, "--one", fmt, "--engine", json.dumps(engine)]
        log_path = os.path.join(log_dir, f"capacity-{fmt}.log")
        rows: list[str] = []

        def keep(line: str, rows: list[str] = rows) -> bool:
            if line.startswith(RESULT):
                rows.append(line[len(RESULT) :])
                return True
            return False

        t0 = time.perf_counter()
        rc = run_logged(cmd, log_path, timeout, on_line=keep)
        seconds = round(time.perf_counter() - t0, 1)
        if rc != 0 or not rows:
            why = f"timed out after {timeout:.0f} s" if rc == TIMEOUT_RC else f"exit code {rc}"
            yield {"kv_cache_dtype": fmt, "error": f"{why}, see {log_path}", "engine_seconds": seconds}
            continue
        row = json.loads(rows[-1])
        first = first or row["kv_cache_tokens"]
        row["factor"] = row["kv_cache_tokens"] / first
        row["engine_seconds"] = seconds
        yield row


def measure(model: str, formats: list[str], engine: dict[str, Any], timeout: float = 900) -> list[dict]:
    """Every format's row; raises if one failed (its log path is in the message)."""
    rows = list(iter_measure(model, formats, engine, timeout))
    bad = [f"{r['kv_cache_dtype']}: {r['error']}" for r in rows if "error" in r]
    if bad:
        raise RuntimeError("capacity run failed for " + "; ".join(bad))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vllm_cq.capacity", description=__doc__)
    p.add_argument("model")
    p.add_argument("--formats", default="auto,cq4,cq2,cq1")
    p.add_argument("--engine", default="{}", help="JSON of extra LLM(...) arguments")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    engine = json.loads(args.engine)
    if args.one:
        print(RESULT + json.dumps(measure_one(args.model, args.one, engine)), flush=True)
        return 0
    failed = False
    for r in iter_measure(args.model, args.formats.split(","), engine):
        if "error" in r:
            failed = True
            print(f"{r['kv_cache_dtype']:>10}: failed ({r['error']})")
        else:
            print(f"{r['kv_cache_dtype']:>10}: {r['kv_cache_tokens']:>12,} tokens ({r['factor']:.2f}x)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
