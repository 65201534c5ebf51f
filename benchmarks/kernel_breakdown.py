"""GPU time per kernel class in torch-profiler traces (`e2e_throughput.py --profile-dir`): where an end-to-end
run's GPU time goes (matmuls, attention, cq write, ...), per dtype, to compare cq1 with auto step by step.

    python benchmarks/kernel_breakdown.py prof/cq1 prof/auto --out breakdown.json

Reads every *.json / *.json.gz chrome trace under each directory (vLLM writes one per worker rank, and one
for the front end without GPU events), sums the durations of GPU kernel, memcpy and memset events by
class (first matching pattern in CLASSES), and prints the classes and the top kernels per directory.
Times are summed over kernels; kernels on other streams overlap, so the sum can exceed the wall time.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
from collections import Counter
from typing import Any

# (class, pattern on the kernel name), first match wins
CLASSES = [
    ("cq write", r"_write_kv_kernel|tq_write|_write_kernel"),
    ("cq prefill attention", r"cq_prefill"),
    ("cq decode attention", r"cq_decode"),
    ("cq Triton attention", r"_cq_attention_kernel|_tq_attention_kernel|_merge_segments"),
    ("recent window", r"_window"),
    ("vLLM attention", r"flash|fmha|FlashAttn|attention|paged_attention"),
    ("vLLM KV write", r"reshape_and_cache"),
    ("matmul", r"gemm|Gemm|GEMM|sm90_xmma|xmma|cutlass|nvjet|cublas|wgmma|splitK"),
    ("norm / rope / activation", r"rms|norm|rotary|rope|silu|act_and_mul|gelu"),
    ("sampling / logits", r"sampl|topk|top_k|softmax|argmax|logit|gumbel"),
    ("memcpy / memset", r"^Memcpy|^Memset|memcpy|memset"),
]
GPU_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}


def trace_files(root: str) -> list[str]:
    out = []
    for d, _, files in os.walk(root):
        out += [os.path.join(d, f) for f in files if f.endswith((".json", ".json.gz"))]
    return sorted(out)


def gpu_events(path: str) -> list[dict[str, Any]]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as fh:
        # torch 2.11's traces can hold stray NUL characters between tokens (seen on the H200, 2026-12-03)
        data = json.loads(fh.read().replace("\x00", ""))
    events = data.get("traceEvents", data) if isinstance(data, dict) else data
    return [e for e in events if isinstance(e, dict) and e.get("cat") in GPU_CATS and "dur" in e]


def classify(name: str) -> str:
    return next((c for c, pat in CLASSES if re.search(pat, name)), "other")


def breakdown(root: str, top: int = 15) -> dict[str, Any]:
    """Summed GPU microseconds per class and per kernel name over every trace under `root`."""
    by_class: Counter[str] = Counter()
    by_name: Counter[str] = Counter()
    calls: Counter[str] = Counter()
    files = trace_files(root)
    for path in files:
        for e in gpu_events(path):
            by_class[classify(e["name"])] += float(e["dur"])
            by_name[e["name"]] += float(e["dur"])
            calls[e["name"]] += 1
    total = sum(by_class.values())
    return {
        "dir": root,
        "files": [os.path.relpath(f, root) for f in files],
        "gpu_s": round(total / 1e6, 6),
        "classes": {c: round(us / 1e6, 6) for c, us in by_class.most_common()},
        "top_kernels": [
            {"name": n[:160], "s": round(us / 1e6, 6), "calls": calls[n], "class": classify(n)}
            for n, us in by_name.most_common(top)
        ],
    }


def markdown(results: list[dict[str, Any]]) -> str:
    names = [os.path.basename(os.path.normpath(r["dir"])) for r in results]
    classes = list(dict.fromkeys(c for r in results for c in r["classes"]))
    lines = ["| GPU seconds | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for c in classes:
        lines.append(f"| {c} | " + " | ".join(f"{r['classes'].get(c, 0.0):.3f}" for r in results) + " |")
    lines.append("| **all** | " + " | ".join(f"**{r['gpu_s']:.3f}**" for r in results) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="+", help="trace directories (e2e_throughput --profile-dir DIR: DIR/<dtype>)")
    p.add_argument("--top", type=int, default=15, help="kernels listed per directory")
    p.add_argument("--out", default=None, help="write the breakdown as JSON")
    args = p.parse_args(argv)
    results = [breakdown(d, args.top) for d in args.dirs]
    print(markdown(results))
    for r in results:
        print(f"\n{r['dir']}: {len(r['files'])} trace files, top kernels")
        for k in r["top_kernels"]:
            print(f"  {k['s']:9.3f} s {k['calls']:8d} x  [{k['class']}] {k['name'][:110]}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
