"""PNG plots of the benchmark results (matplotlib, Agg backend).

For every attention-*.json: <stem>-decode.png (decode latency vs context per backend/kv dtype, one
column per batch size, with speedup over FA3 bf16 below) and <stem>-prefill.png. For every
e2e-*.json: <stem>.png (output tokens/s per workload per kv dtype, with the factor over auto, and
vLLM's KV capacity per dtype).

    python benchmarks/plot.py                          # every results file in benchmarks/results/
    python benchmarks/plot.py benchmarks/results/attention-h100-80gb-hbm3-2026-11-24.json --batches 64
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

# one colour per kv dtype, one line style per backend
COLORS = {
    "bf16": "#1f77b4",
    "auto": "#1f77b4",
    "fp8": "#ff7f0e",
    "cq4": "#2ca02c",
    "cq2": "#9467bd",
    "cq1": "#d62728",
    "cq_k4v1": "#8c564b",
    "cq_k4v2": "#e377c2",
}
STYLES = {"fa3": "-", "fa3-cg": ":", "triton": "--", "cq": "-", "cq-triton": "--", "cq-cuda": "-"}
MARKERS = {"fa3": "o", "fa3-cg": "x", "triton": "s", "cq": "^", "cq-triton": "v", "cq-cuda": "^"}
BACKEND_ORDER = [
    "fa3",
    "fa3-cg",
    "triton",
    "cq",
    "cq-triton",
    "cq-cuda",
    "cq-mma",
    "cq-wgmma",
    "cq-ws",
    "cq-wso",
    "cq-wsp",
]
KV_ORDER = ["bf16", "auto", "fp8", "cq4", "cq_k4v2", "cq2", "cq_k4v1", "cq1"]


def _series_rank(s: tuple[str, str]) -> tuple:
    be, kv = s
    return (
        BACKEND_ORDER.index(be) if be in BACKEND_ORDER else 99,
        KV_ORDER.index(kv) if kv in KV_ORDER else 99,
        be,
        kv,
    )


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _ctx_label(c: int) -> str:
    return f"{c // 1024}K" if c >= 1024 and c % 1024 == 0 else str(c)


def _title(data: dict, what: str) -> str:
    v = data.get("versions") or {}
    sw = ", ".join(f"{k} {v[k]}" for k in ("vllm", "torch", "triton") if v.get(k))
    return f"{what}: {data.get('device', '?')}, {data.get('date', '?')}" + (f" ({sw})" if sw else "")


def plot_attention(path: str, out_dir: str, batches: list[int] | None) -> list[str]:
    plt = _plt()
    with open(path) as f:
        data = json.load(f)
    rows = [r for r in data.get("rows", []) if r.get("ms") is not None]
    stem = os.path.splitext(os.path.basename(path))[0]
    written = []

    dec = [r for r in rows if r["kind"] == "decode"]
    bs = sorted({r["batch"] for r in dec})
    if batches:
        bs = [b for b in bs if b in batches]
    if bs:
        fig, axes = plt.subplots(2, len(bs), figsize=(5.2 * len(bs), 8), squeeze=False, sharex=True)
        series = sorted({(r["backend"], r["kv_dtype"]) for r in dec}, key=_series_rank)
        for j, b in enumerate(bs):
            ax, ax2 = axes[0][j], axes[1][j]
            for be, kv in series:
                pts = sorted(
                    (r["context"], r["ms"], r.get("speedup_vs_fa3_bf16"))
                    for r in dec
                    if r["batch"] == b and (r["backend"], r["kv_dtype"]) == (be, kv)
                )
                if not pts:
                    continue
                xs = [p[0] for p in pts]
                style = dict(color=COLORS.get(kv, None), linestyle=STYLES.get(be, "-"), marker=MARKERS.get(be, "."))
                ax.plot(xs, [p[1] for p in pts], label=f"{be} {kv}", **style)
                sp = [(p[0], p[2]) for p in pts if p[2] is not None]
                if sp:
                    ax2.plot([p[0] for p in sp], [p[1] for p in sp], **style)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"decode, batch {b}")
            ax.set_ylabel("ms per layer")
            ax.grid(True, which="both", alpha=0.3)
            ax2.axhline(1.0, color="grey", lw=0.8)
            ax2.set_xscale("log", base=2)
            ax2.set_ylabel("speedup vs FA3 bf16")
            ax2.set_xlabel("context (tokens)")
            ax2.grid(True, which="both", alpha=0.3)
            ctxs = sorted({r["context"] for r in dec if r["batch"] == b})
            ax2.set_xticks(ctxs, [_ctx_label(c) for c in ctxs])
        axes[0][0].legend(fontsize=8, ncol=2)
        fig.suptitle(_title(data, "Attention decode, Llama-3.1-8B layer (32q/8kv x 128)"), fontsize=10)
        fig.tight_layout()
        out = os.path.join(out_dir, f"{stem}-decode.png")
        fig.savefig(out, dpi=120)
        plt.close(fig)
        written.append(out)

    pre = [r for r in rows if r["kind"] == "prefill"]
    if pre:
        groups = sorted({(r["context"], r["q_len"]) for r in pre})
        series = sorted({(r["backend"], r["kv_dtype"]) for r in pre}, key=_series_rank)
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups) * len(series) / 3), 4.5))
        w = 0.8 / max(len(series), 1)
        for i, (be, kv) in enumerate(series):
            ys = []
            for ctx, ql in groups:
                m = [
                    r["ms"] for r in pre if (r["backend"], r["kv_dtype"], r["context"], r["q_len"]) == (be, kv, ctx, ql)
                ]
                ys.append(m[0] if m else 0)
            xs = [g + i * w for g in range(len(groups))]
            hatch = {"triton": "//", "cq-triton": "//", "cq-mma": "..", "cq-ws": "xx"}.get(be)
            ax.bar(xs, ys, w, label=f"{be} {kv}", color=COLORS.get(kv), hatch=hatch)
        labels = [_ctx_label(c) + ("" if q == c else f"\n(last {_ctx_label(q)})") for c, q in groups]
        ax.set_xticks([g + 0.4 - w / 2 for g in range(len(groups))], labels)
        ax.set_ylabel("ms per layer")
        ax.set_yscale("log")
        ax.legend(fontsize=8, ncol=2)
        ax.grid(True, axis="y", alpha=0.3)
        ax.set_title(_title(data, "Prefill attention (one sequence, causal)"), fontsize=9)
        fig.tight_layout()
        out = os.path.join(out_dir, f"{stem}-prefill.png")
        fig.savefig(out, dpi=120)
        plt.close(fig)
        written.append(out)
    return written


def plot_e2e(path: str, out_dir: str) -> list[str]:
    plt = _plt()
    with open(path) as f:
        data = json.load(f)
    rows = [r for r in data.get("rows", []) if r.get("output_tok_s")]
    if not rows:
        return []
    order = KV_ORDER[1:]

    def label(r):
        return r["kv_cache_dtype"] + (f" ({r['tag']})" if r.get("tag") else "")

    def rank(lbl: str):
        base = lbl.split(" ")[0]
        return (order.index(base) if base in order else len(order), lbl)

    series = sorted({label(r) for r in rows}, key=rank)
    wls = sorted({r["workload"] for r in rows}, key=lambda w: next(r["input_len"] for r in rows if r["workload"] == w))
    fig, (ax, axc) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [2, 1]})
    w = 0.8 / len(series)
    for i, s in enumerate(series):
        for g, wl in enumerate(wls):
            m = [r for r in rows if label(r) == s and r["workload"] == wl]
            if not m:
                continue
            r = m[-1]
            x = g + i * w
            ax.bar(x, r["output_tok_s"], w, color=COLORS.get(r["kv_cache_dtype"]), label=s if g == 0 else None)
            f = r.get("output_speedup_vs_auto")
            if f:
                ax.text(x, r["output_tok_s"], f"{f:.2f}x", ha="center", va="bottom", fontsize=7)
    ax.set_xticks([g + 0.4 - w / 2 for g in range(len(wls))], [f"{wl} tokens" for wl in wls])
    ax.set_ylabel("output tokens/s")
    ax.set_title("Throughput (x = factor over auto/bf16)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    cap = {}
    for r in rows:
        if r.get("kv_cache_tokens"):
            cap[label(r)] = r
    names = [s for s in series if s in cap]
    axc.bar(
        range(len(names)),
        [cap[s]["kv_cache_tokens"] / 1e3 for s in names],
        color=[COLORS.get(cap[s]["kv_cache_dtype"]) for s in names],
    )
    for i, s in enumerate(names):
        f = cap[s].get("capacity_vs_auto")
        if f:
            axc.text(i, cap[s]["kv_cache_tokens"] / 1e3, f"{f:.1f}x", ha="center", va="bottom", fontsize=7)
    axc.set_xticks(range(len(names)), names, rotation=30, fontsize=8)
    axc.set_ylabel("KV cache capacity (K tokens)")
    axc.set_title("vLLM KV capacity", fontsize=9)
    axc.grid(True, axis="y", alpha=0.3)
    fig.suptitle(_title(data, "End to end, Llama-3.1-8B shape, dummy weights"), fontsize=10)
    fig.tight_layout()
    out = os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0] + ".png")
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return [out]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument(
        "files", nargs="*", help="results JSON files (default: attention-*.json, e2e-*.json in --results-dir)"
    )
    p.add_argument("--results-dir", default=os.path.join(HERE, "results"))
    p.add_argument("--out-dir", default=None, help="where PNGs go (default: next to each results file)")
    p.add_argument("--batches", default="", help="decode plot: only these batch sizes (e.g. 64)")
    args = p.parse_args(argv)
    files = args.files or sorted(
        glob.glob(os.path.join(args.results_dir, "attention-*.json"))
        + glob.glob(os.path.join(args.results_dir, "e2e-*.json"))
    )
    batches = [int(b) for b in args.batches.split(",") if b.strip()] or None
    if not files:
        print(f"no attention-*.json or e2e-*.json in {args.results_dir}")
        return 1
    for f in files:
        out_dir = args.out_dir or os.path.dirname(os.path.abspath(f))
        os.makedirs(out_dir, exist_ok=True)
        kind = os.path.basename(f).split("-")[0]
        try:
            written = plot_attention(f, out_dir, batches) if kind == "attention" else plot_e2e(f, out_dir)
        except Exception as e:  # one bad file must not stop the others
            print(f"{f}: {type(e).__name__}: {e}")
            continue
        for w in written:
            print(w)
    return 0


if __name__ == "__main__":
    sys.exit(main())
