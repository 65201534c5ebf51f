"""End-to-end offline throughput through vLLM per KV-cache dtype (issue 5, item 4b).

Llama-3.1-8B shape with random weights (`load_format="dummy"`, no tokenizer, prompts as random token
ids, `ignore_eos`, greedy). Each KV dtype gets a fresh engine in its own subprocess (vLLM keeps the
KV memory for the process's lifetime); that engine runs every selected workload. Every finished
(dtype, workload) row is written to the results file at once, so a run cut short keeps its rows, and
a later run (another subset of dtypes or workloads) merges into the same file.

Reports per row: vLLM's KV capacity (cache_config), engine start, warm-up and generation seconds,
output and total tokens/s. cq dtypes need codebooks at MODEL/vllm-cq/FMT.safetensors; missing ones
are made with benchmarks/dummy_codebooks.py (random: for speed, never for quality).

    python benchmarks/e2e_throughput.py benchmarks/configs/llama-3.1-8b --formats auto,cq1 \\
        --workloads 128x4096+512
    python benchmarks/e2e_throughput.py benchmarks/configs/llama-3.1-8b --formats fp8 \\
        --engine '{"enforce_eager": true}' --tag eager

With --profile-dir DIR the timed workloads run under vLLM's torch profiler (traces in DIR/<dtype>, rows
tagged "profiled": the profiler slows the run); `benchmarks/kernel_breakdown.py DIR/<dtype>` sums the
GPU time per kernel class (matmuls, attention, cq write, ...).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from typing import Any

from vllm_cq.child import TIMEOUT_RC, run_logged

HERE = os.path.dirname(os.path.abspath(__file__))
WORKLOADS = {"128x4096+512": (128, 4096, 512), "96x8192+256": (96, 8192, 256)}
DEFAULT_ENGINE = {
    "load_format": "dummy",
    "skip_tokenizer_init": True,
    "gpu_memory_utilization": 0.9,
    "seed": 0,
}


def cq_full_decode_graphs(vllm_config, kv_cache_dtype: str) -> bool | None:
    """Whether the plugin asked vLLM for full decode graphs (None: not a plugin dtype). vLLM's own
    cudagraph_mode reads the same either way."""
    from vllm_cq.formats import format_names

    if kv_cache_dtype not in format_names():
        return None
    from vllm_cq.integration.backend import full_decode_graphs

    return full_decode_graphs(vllm_config)


def parse_workload(s: str) -> tuple[int, int, int]:
    """'128x4096+512' -> (prompts, input tokens, output tokens)."""
    m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*\+\s*(\d+)\s*", s)
    if not m:
        raise argparse.ArgumentTypeError(f"workload {s!r} is not NxIN+OUT (e.g. 128x4096+512)")
    return int(m[1]), int(m[2]), int(m[3])


def workload_name(n: int, i: int, o: int) -> str:
    return f"{n}x{i}+{o}"


def device_name() -> str:
    """The GPU's name from nvidia-smi: no CUDA context in this process (one would hold ~0.5 GiB of
    the memory vLLM's engine core is about to size its KV cache from)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
        )
        names = [ln.strip() for ln in out.stdout.splitlines() if ln.strip()]
        if out.returncode == 0 and names:
            return names[0] + (f" x{len(names)}" if len(names) > 1 else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return f"CPU ({platform.processor() or platform.machine()})"


def slug(s: str) -> str:
    s = re.sub(r"^nvidia\s+", "", s.lower())
    return re.sub(r"[^a-z0-9]+", "-", s).strip("-")[:40] or "device"


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for mod in ("torch", "triton", "vllm"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as e:
            out[mod] = f"unavailable: {type(e).__name__}"
    return out


def kernel_env() -> dict[str, str]:
    """The plugin's VLLM_CQ_* settings of this run (kernel forms, builds), kept with its rows; the CUDA
    builds' switches with their effective value even where unset, since their defaults changed
    (2026-12-04: layout constants and persistent decode CTAs on), so a row says which build ran."""
    from vllm_cq.kernels.cq import cuda_build, decode_cuda

    env = {k: v for k, v in os.environ.items() if k.startswith("VLLM_CQ_")}
    env.setdefault(cuda_build.LAYOUT_ENV, str(int(cuda_build.SPECIALIZE_LAYOUT)))
    env.setdefault(decode_cuda.PERSISTENT_ENV, str(int(decode_cuda.PERSISTENT)))
    return dict(sorted(env.items()))


def row_key(r: dict) -> tuple:
    return (r["kv_cache_dtype"], r["workload"], r.get("tag") or "")


def load(path: str) -> dict[str, Any]:
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {}


def save(path: str, data: dict[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def add_rows(path: str, meta: dict[str, Any], rows: list[dict]) -> None:
    """Merge rows into the file (a row replaces an earlier one with the same dtype, workload, tag)."""
    data = load(path)
    for k, v in meta.items():
        data.setdefault(k, v)
    keep = [r for r in data.get("rows", []) if row_key(r) not in {row_key(x) for x in rows}]
    data["rows"] = keep + rows
    add_derived(data["rows"])
    save(path, data)


def add_derived(rows: list[dict]) -> None:
    """Factors over auto (bf16) and fp8 at the same workload and tag."""
    by = {(r["kv_cache_dtype"], r["workload"], r.get("tag") or ""): r for r in rows if r.get("output_tok_s")}
    for r in rows:
        for ref in ("auto", "fp8"):
            b = by.get((ref, r["workload"], r.get("tag") or ""))
            ok = b is not None and r.get("output_tok_s")
            r[f"output_speedup_vs_{ref}"] = round(r["output_tok_s"] / b["output_tok_s"], 3) if ok else None
        b = by.get(("auto", r["workload"], r.get("tag") or ""))
        ok = b is not None and r.get("kv_cache_tokens") and b.get("kv_cache_tokens")
        r["capacity_vs_auto"] = round(r["kv_cache_tokens"] / b["kv_cache_tokens"], 3) if ok else None


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| kv dtype | tag | workload | KV tokens | x auto | engine s | gen s | out tok/s | total tok/s "
        "| out vs auto | out vs fp8 | note |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]

    def f(x, nd=1):
        return "" if x is None else (f"{x:,.{nd}f}" if isinstance(x, float) else f"{x:,}")

    for r in sorted(rows, key=lambda r: (r["workload"], r.get("tag") or "", r["kv_cache_dtype"])):
        sa, sf = r.get("output_speedup_vs_auto"), r.get("output_speedup_vs_fp8")
        lines.append(
            f"| {r['kv_cache_dtype']} | {r.get('tag') or ''} | {r['workload']} | {f(r.get('kv_cache_tokens'))} "
            f"| {f(r.get('capacity_vs_auto'), 2)} | {f(r.get('engine_start_s'))} | {f(r.get('elapsed_s'))} "
            f"| {f(r.get('output_tok_s'), 0)} | {f(r.get('total_tok_s'), 0)} "
            f"| {'' if sa is None else f'{sa:.2f}x'} | {'' if sf is None else f'{sf:.2f}x'} "
            f"| {(r.get('error') or '')[:100]} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Child: one engine, every workload
# ------------------------------------------------------------------------------------------------


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[dict]:
    import random

    rng = random.Random(seed)
    lo = min(1000, vocab // 4)  # clear of special ids (tiny test vocabularies too)
    hi = vocab - lo  # distinct random prompts: no prefix-cache hits
    return [{"prompt_token_ids": [rng.randrange(lo, hi) for _ in range(length)]} for _ in range(n)]


def run_one(args: argparse.Namespace, fmt: str, workloads: list[tuple[int, int, int]], engine: dict) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vllm_cq.capacity import engine_capacity
    from vllm_cq.child import dump_stacks_from_env
    from vllm_cq.labels import label_engine_kwargs

    dump_stacks_from_env()  # VLLM_CQ_STACK_DUMP_S: a start or step that hangs says where, in the engine log
    from vllm import LLM, SamplingParams

    with open(os.path.join(args.model, "config.json")) as fh:
        vocab = int(json.load(fh).get("vocab_size", 32000))
    meta = run_meta(args)
    base = {"kv_cache_dtype": fmt, "tag": args.tag, "engine": engine, "kernel_env": kernel_env()}
    t0 = time.perf_counter()
    kw = label_engine_kwargs(fmt, engine)  # `cq1` serves the default window, `cq1+w0` codes only
    if args.profile_dir:  # vLLM's torch profiler in the worker: GPU kernels only, no stacks or shapes
        trace_dir = os.path.abspath(os.path.join(args.profile_dir, fmt))
        kw["profiler_config"] = dict(profiler="torch", torch_profiler_dir=trace_dir, torch_profiler_with_stack=False)
    llm = LLM(args.model, **kw)
    start_s = time.perf_counter() - t0
    vc = llm.llm_engine.vllm_config
    cc = vc.cache_config
    cap = engine_capacity(vc, kw["kv_cache_dtype"])  # with a window: whole sequences, window blocks counted
    base.update(
        engine_start_s=round(start_s, 1),
        num_gpu_blocks=int(cc.num_gpu_blocks),
        block_size=int(cc.block_size),
        kv_cache_tokens=cap["kv_cache_tokens"],
        recent_window=cap.get("recent_window", 0),
        vllm_reported_tokens=int(getattr(cc, "kv_cache_size_tokens", 0) or 0),
        max_num_seqs=getattr(vc.scheduler_config, "max_num_seqs", None),
        max_num_batched_tokens=getattr(vc.scheduler_config, "max_num_batched_tokens", None),
        cudagraph_mode=str(getattr(vc.compilation_config, "cudagraph_mode", "")),
        cq_full_decode_graphs=cq_full_decode_graphs(vc, kw["kv_cache_dtype"]),
        v2_model_runner=os.environ.get("VLLM_USE_V2_MODEL_RUNNER"),
    )
    print(f"[{fmt}] engine up in {start_s:.1f} s, {base['kv_cache_tokens']:,} KV tokens", flush=True)
    warm_s = None
    if args.warmup:  # first calls compile Triton kernels (decode and prefill shapes): keep them out of timing
        n, i, o = args.warmup
        t1 = time.perf_counter()
        llm.generate(
            random_prompts(n, i, vocab, seed=12345),
            SamplingParams(max_tokens=o, ignore_eos=True, temperature=0, detokenize=False),
            use_tqdm=False,
        )
        warm_s = round(time.perf_counter() - t1, 1)
        print(f"[{fmt}] warm-up {n}x{i}+{o}: {warm_s} s", flush=True)
    for k, (n, i, o) in enumerate(workloads):
        prompts = random_prompts(n, i, vocab, seed=1000 + k)
        sp = SamplingParams(max_tokens=o, ignore_eos=True, temperature=0, detokenize=False)
        if args.profile_dir:
            llm.start_profile()
        t1 = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        el = time.perf_counter() - t1
        if args.profile_dir:
            llm.stop_profile()
        out_tok = sum(len(x.outputs[0].token_ids) for x in outs)
        row = dict(
            base,
            workload=workload_name(n, i, o),
            num_prompts=n,
            input_len=i,
            output_len=o,
            warmup_s=warm_s,
            elapsed_s=round(el, 2),
            output_tokens=out_tok,
            output_tok_s=round(out_tok / el, 1),
            total_tok_s=round((out_tok + n * i) / el, 1),
            finished=time.time(),
        )
        if out_tok != n * o:
            row["error"] = f"generated {out_tok} tokens, expected {n * o}"
        add_rows(args.out, meta, [row])
        print(f"[{fmt}] {row['workload']}: {el:.1f} s, {row['output_tok_s']:,.0f} out tok/s", flush=True)
    return 0


# ------------------------------------------------------------------------------------------------
# Parent: one subprocess per dtype
# ------------------------------------------------------------------------------------------------


def run_meta(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "benchmark": "e2e_throughput",
        "model": args.model,
        "device": device_name(),
        "date": datetime.date.today().isoformat(),
        "versions": versions(),
    }


def ensure_codebooks(model: str, fmt: str) -> str | None:
    from vllm_cq.codebooks import default_codebook_path
    from vllm_cq.formats import get_format, is_plugin_dtype

    if not is_plugin_dtype(fmt) or not get_format(fmt).needs_codebook:  # auto/fp8, KVTQ
        return None
    path = default_codebook_path(model, fmt)
    if not os.path.exists(path):
        cmd = [sys.executable, os.path.join(HERE, "dummy_codebooks.py"), model, "--formats", fmt]
        subprocess.run(cmd, check=True)
    return path


def run_child(args: argparse.Namespace, fmt: str, log_path: str, timeout: float) -> tuple[int, str]:
    """Run the dtype's engine in a subprocess; its output goes to log_path, its '[fmt] ...' progress
    lines are echoed. Returns (rc, last lines worth showing); rc 124 on timeout."""
    cmd = [sys.executable, os.path.abspath(__file__), args.model, "--one", fmt, "--out", args.out]
    cmd += ["--workloads", ",".join(args.workload_names), "--engine", json.dumps(args.engine_user)]
    cmd += ["--tag", args.tag or "", "--warmup", args.warmup_str]
    if args.profile_dir:
        cmd += ["--profile-dir", args.profile_dir]
    if args.max_model_len:
        cmd += ["--max-model-len", str(args.max_model_len)]
    tail: list[str] = []
    with open(log_path, "a") as log:
        log.write(f"\n==== {datetime.datetime.now().isoformat(timespec='seconds')} {' '.join(cmd)}\n")

    def echo(ln: str) -> bool:
        if ln.startswith("["):
            print("  " + ln.rstrip(), flush=True)
        if ln.startswith("[") or "Error" in ln or "error:" in ln:
            tail.append(ln.rstrip())
            del tail[:-30]
        return False  # every line also goes to the log

    # own session: on timeout the whole group goes (vLLM's engine core is a grandchild holding GPU memory)
    rc = run_logged(cmd, log_path, timeout, on_line=echo, mode="a")
    msg = "\n".join(tail[-8:])
    return rc, (f"timed out after {timeout:.0f} s\n{msg}" if rc == TIMEOUT_RC else msg)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument("model", help="model directory (config.json; weights are dummy)")
    p.add_argument("--formats", default="auto,fp8,cq4,cq2,cq1", help="--kv-cache-dtype values, one engine each")
    p.add_argument(
        "--workloads", default="128x4096+512", help=f"NxIN+OUT, comma separated; the issue's: {list(WORKLOADS)}"
    )
    p.add_argument("--engine", default="{}", help="JSON merged over the defaults into LLM(...)")
    p.add_argument("--max-model-len", type=int, default=None, help="default 8704 (8192+512), more if a workload needs")
    p.add_argument("--warmup", default="4x1024+32", help="NxIN+OUT run before timing ('' = none)")
    p.add_argument("--tag", default="", help="label for a variant (e.g. eager); rows key on dtype+workload+tag")
    p.add_argument("--timeout", type=float, default=560, help="seconds per dtype subprocess")
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="wall budget for the whole run: later dtypes get what is left, none starts with < --min-start-s",
    )
    p.add_argument(
        "--min-start-s", type=float, default=150, help="with --budget-s: least time worth starting an engine"
    )
    p.add_argument("--seed-dir", default=None, help="if the results file is new, start from DIR/<same name> if there")
    p.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    p.add_argument("--out", default=None, help="results file (default OUT_DIR/e2e-<device>-<date>.json)")
    p.add_argument("--log-dir", default=None, help="engine logs (default: next to the results file)")
    p.add_argument("--profile-dir", default=None, help="torch-profile the timed workloads into DIR/<dtype>")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.profile_dir and not args.one:  # profiled rows never replace plain ones (rows key on the tag)
        args.tag = f"{args.tag}-profiled" if args.tag else "profiled"
        args.profile_dir = os.path.abspath(args.profile_dir)
    args.workload_list = [parse_workload(w) for w in args.workloads.split(",") if w.strip()]
    args.workload_names = [workload_name(*w) for w in args.workload_list]
    args.warmup_str = args.warmup
    args.warmup = parse_workload(args.warmup) if args.warmup.strip() else None
    args.engine_user = json.loads(args.engine)
    if not isinstance(args.engine_user, dict):
        p.error("--engine must be a JSON object")
    longest = max(i + o for _, i, o in args.workload_list) if args.workload_list else 8704
    engine = dict(DEFAULT_ENGINE)
    engine["max_model_len"] = args.max_model_len or max(8704, -(-longest // 512) * 512)
    engine.update(args.engine_user)
    args.engine_full = engine
    args.formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.out is None:
        name = f"e2e-{slug(device_name())}-{datetime.date.today().isoformat()}.json"
        args.out = os.path.join(args.out_dir, name)
    args.out = os.path.abspath(args.out)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    seed = os.path.join(args.seed_dir, os.path.basename(args.out)) if args.seed_dir else None
    if not args.one and seed and not os.path.exists(args.out) and os.path.exists(seed):
        save(args.out, load(seed))  # carry an earlier call's rows (another subset) into this file
        print(f"# continuing {seed}", flush=True)
    if args.one:
        return run_one(args, args.one, args.workload_list, args.engine_full)

    log_dir = args.log_dir or os.path.dirname(args.out)
    os.makedirs(log_dir, exist_ok=True)
    meta = run_meta(args)
    print(f"# {meta['device']} {meta['versions']} -> {args.out}", flush=True)
    print(f"# engine {json.dumps(args.engine_full)}", flush=True)
    deadline = time.monotonic() + args.budget_s if args.budget_s else None
    for fmt in args.formats:
        t0 = time.perf_counter()
        started = time.time()
        timeout = args.timeout
        if deadline is not None:
            left = deadline - time.monotonic()
            if left < args.min_start_s:
                print(f"{fmt}: skipped, {left:.0f} s left of --budget-s {args.budget_s}", flush=True)
                continue
            timeout = min(timeout, left - 5)
        log_path = os.path.join(log_dir, f"{os.path.splitext(os.path.basename(args.out))[0]}-{fmt}.log")
        try:
            ensure_codebooks(args.model, fmt)
            rc, msg = run_child(args, fmt, log_path, timeout)
        except Exception as e:
            rc, msg = 1, f"{type(e).__name__}: {e}"
        rows = load(args.out).get("rows", [])
        mine = {r["workload"]: r for r in rows if (r["kv_cache_dtype"], r.get("tag") or "") == (fmt, args.tag or "")}
        fresh = {w for w, r in mine.items() if r.get("output_tok_s") and r.get("finished", 0) >= started}
        missing = [w for w in args.workload_names if w not in fresh]
        if rc != 0 and missing:  # leave a trace; never replace an earlier good row with an error row
            failure = {"kv_cache_dtype": fmt, "tag": args.tag, "engine": args.engine_full, "log": log_path}
            failure["error"] = f"rc {rc}: {msg[-1500:]}"
            err = [dict(failure, workload=w) for w in missing if not (mine.get(w) or {}).get("output_tok_s")]
            add_rows(args.out, meta, err)
            data = load(args.out)
            data.setdefault("failures", []).append(dict(failure, workloads=missing, at=started))
            save(args.out, data)
        print(f"{fmt}: rc {rc} in {time.perf_counter() - t0:.0f} s" + (f" -- {msg.splitlines()[-1:]}" if rc else ""))
    data = load(args.out)
    print()
    print(markdown_table(data.get("rows", [])))
    print(f"\n-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
