"""Issue 5's targets, read from results files: decode at 64 x 32K (cq1 vs FA3 on bf16 and fp8), prefill at
8K causal (cq1 vs FA3 bf16), the write's share of a decode step, and end to end (cq1 vs auto and fp8 per
workload). Prints one markdown row per target with the measured factor and whether it is met, so a
closing note quotes numbers computed the same way every time.

    python benchmarks/targets.py benchmarks/results/attention-h200-grid.json benchmarks/results/e2e-*.json

Later files win where two hold the same row. Attention rows take the CUDA kernels' backend ("cq-cuda")
where present, else the default dispatch ("cq"); end-to-end rows the last row per (dtype, workload),
or only those of `--tag`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from typing import Any

CQ_BACKENDS = ("cq", "cq-cuda")  # later in this order wins: the CUDA kernels where measured


@dataclass
class Target:
    what: str
    goal: str
    measured: float | None  # the factor (or percent) the goal is about
    unit: str  # "x" or "%"
    detail: str
    met: bool | None


def _load(paths: list[str]) -> tuple[list[dict], list[dict]]:
    attention, e2e = [], []
    for path in paths:
        with open(path) as f:
            doc = json.load(f)
        kind = doc.get("benchmark")
        if kind == "attention":
            attention += doc["rows"]
        elif kind == "e2e_throughput":
            e2e += doc["rows"]
    return attention, e2e


def _attention_row(rows: list[dict], kind: str, backends: tuple[str, ...], kv: str, **shape: int) -> dict | None:
    found = None
    for be in backends:
        for r in rows:
            if r.get("kind") == kind and r.get("backend") == be and r.get("kv_dtype") == kv and r.get("ms"):
                if all(r.get(k) == v for k, v in shape.items()):
                    found = r
    return found


def _ratio(num: dict | None, den: dict | None, key: str) -> float | None:
    return num[key] / den[key] if num and den and num.get(key) and den.get(key) else None


def _at_least(f: float | None, goal: float) -> bool | None:
    return None if f is None else f >= goal


def _at_most(f: float | None, goal: float) -> bool | None:
    return None if f is None else f <= goal


def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def targets(attention: list[dict], e2e: list[dict], tag: str | None = None) -> list[Target]:
    """Issue 5's targets from attention and end-to-end rows (None where a row is missing)."""
    out = []
    dec = dict(batch=64, context=32768, q_len=1)
    cq = _attention_row(attention, "decode", CQ_BACKENDS, "cq1", **dec)
    for kv, goal in (("bf16", 4.0), ("fp8", 2.0)):
        fa3 = _attention_row(attention, "decode", ("fa3",), kv, **dec)
        f = _ratio(fa3, cq, "ms")
        detail = f"cq1 {_fmt(cq and cq['ms'], 3)} ms vs FA3 {kv} {_fmt(fa3 and fa3['ms'], 3)} ms"
        out.append(
            Target(f"decode 64 x 32K, cq1 vs FA3 {kv}", f">= {goal}x faster", f, "x", detail, _at_least(f, goal))
        )
    pre = dict(batch=1, context=8192, q_len=8192)
    cq = _attention_row(attention, "prefill", CQ_BACKENDS, "cq1", **pre)
    fa3 = _attention_row(attention, "prefill", ("fa3",), "bf16", **pre)
    f = _ratio(cq, fa3, "ms")
    detail = f"cq1 {_fmt(cq and cq['ms'], 3)} ms vs FA3 bf16 {_fmt(fa3 and fa3['ms'], 3)} ms"
    out.append(Target("prefill 8K causal, cq1 / FA3 bf16", "<= 1.2x the time", f, "x", detail, _at_most(f, 1.2)))
    writes = [r for r in attention if r.get("kind") == "write" and r.get("kv_dtype") == "cq1"]
    writes = [r for r in writes if r.get("backend") in CQ_BACKENDS and r.get("pct_of_decode_attention")]
    if writes:
        w = max(writes, key=lambda r: r["batch"])  # the largest decode step measured
        ctx, pct = max(w["pct_of_decode_attention"].items(), key=lambda kv: kv[1])
        detail = f"one decode step of {w['batch']} sequences, {ctx}-token context (the worst measured)"
        out.append(Target("encoding, share of a decode step's attention", "< 3%", pct, "%", detail, pct < 3))
    last: dict[tuple[str, str], dict] = {}
    for r in e2e:
        if (tag is None or r.get("tag") == tag) and r.get("output_tok_s"):
            last[(r["kv_cache_dtype"], r["workload"])] = r
    for workload, base, goal in (
        ("128x4096+512", "auto", 2.0),
        ("128x4096+512", "fp8", 1.4),
        ("96x8192+256", "auto", 2.5),
    ):
        cq, other = last.get(("cq1", workload)), last.get((base, workload))
        f = _ratio(cq, other, "output_tok_s")
        tok_s = [_fmt(r and r["output_tok_s"], 0) for r in (cq, other)]
        detail = f"cq1 {tok_s[0]} vs {base} {tok_s[1]} output tok/s"
        out.append(Target(f"end to end {workload}, cq1 vs {base}", f">= {goal}x", f, "x", detail, _at_least(f, goal)))
    return out


def markdown(rows: list[Target]) -> str:
    lines = ["| target | goal | measured | met | from |", "|---|---|---|---|---|"]
    for t in rows:
        met = "-" if t.met is None else ("yes" if t.met else "no")
        measured = "-" if t.measured is None else f"{t.measured:.2f}{t.unit}"
        lines.append(f"| {t.what} | {t.goal} | {measured} | {met} | {t.detail} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", help="attention-*.json and e2e-*.json results files")
    p.add_argument("--tag", default=None, help="end-to-end rows of this tag only (e.g. kv-h100)")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    rows = targets(*_load(args.files), tag=args.tag)
    print(markdown(rows))
    out = [asdict(t) for t in rows]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
