"""Sweep the cq attention kernel's launch parameters (key tile, warps, stages, KV segments) on the
Llama-3.1-8B attention shape, to pick the defaults in `kernels/cq/attention.py`. Not a test.

    python benchmarks/tune_cq.py --formats cq1,cq4 --out benchmarks/results/tune-cq-h100.json
"""

from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import json

import torch
import triton

from vllm_cq.formats import get_format
from vllm_cq.kernels.cq.attention import paged_attention
from vllm_cq.kernels.rope import build_cos_sin_cache

HQ, HKV, D, PAGE = 32, 8, 128, 16


def setup(fmt_name: str, batch: int, context: int, q_len: int):
    fmt = get_format(fmt_name)
    dev = "cuda"
    blocks_per_seq = -(-context // PAGE)
    nblk = batch * blocks_per_seq
    cache = torch.randint(0, 256, (nblk, HKV, PAGE, fmt.slot_bytes(D)), dtype=torch.uint8, device=dev)
    table = torch.randperm(nblk, device=dev, dtype=torch.int32).view(batch, blocks_per_seq)
    kcb = torch.randn(fmt.key.codebook_shape(HKV, D), device=dev, dtype=torch.bfloat16)
    vcb = torch.randn(fmt.value.codebook_shape(HKV, D), device=dev, dtype=torch.bfloat16)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=dev)
    qsl = torch.arange(0, batch + 1, dtype=torch.int32, device=dev) * q_len
    q = torch.randn(batch * q_len, HQ, D, dtype=torch.bfloat16, device=dev)
    rope = build_cos_sin_cache(D, context + 1, base=500000.0).to(dev)
    return fmt, q, cache, kcb, vcb, table, seq_lens, qsl, rope


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--formats", default="cq1")
    p.add_argument("--out", default=None)
    p.add_argument("--ablate", action="store_true", help="time the kernel with parts switched off instead")
    p.add_argument(
        "--rope-split", choices=("off", "on", "both"), default="off",
        help="RoPE as R(P) R(n) (fewer table reads, ~100 more registers) instead of per-tile table rows",
    )  # fmt: skip
    p.add_argument("--k-parts", default="0", help="comma list of k_parts (key tile in parts of RoPE pairs); 0: default")
    args = p.parse_args()
    shapes = [("decode", 64, 32768, 1), ("decode", 16, 4096, 1), ("decode", 1, 32768, 1), ("prefill", 1, 8192, 8192)]
    if args.ablate:
        shapes = [shapes[0], shapes[3]]
    split_opts = {"off": [False], "on": [True], "both": [False, True]}[args.rope_split]
    variants = [{"rope_split": v, "k_parts": int(k) or None} for v in split_opts for k in args.k_parts.split(",")]
    rows = []
    for fmt_name in args.formats.split(","):
        for kind, batch, ctx, q_len in shapes:
            fmt, q, cache, kcb, vcb, table, seq_lens, qsl, rope = setup(fmt_name, batch, ctx, q_len)
            call = functools.partial(
                paged_attention, q, cache, kcb, vcb, fmt.key_bytes(D), table, seq_lens, qsl, D**-0.5, rope, True,
                q_len, out=torch.empty_like(q), key_norm_offset=fmt.key.norm_offset(D),
            )  # fmt: skip
            if args.ablate:  # (block_n, warps, stages, segments, extra): 1 = no K gathers, 2 = no V, 4 = no RoPE
                extra = [{"_ablate": a} for a in (0, 1, 2, 3, 4, 7)] + [{"head_major": False}, {"rope_split": True}]
                extra += [{"k_parts": k} for k in (1, 2, 4)]
                if kind == "prefill":
                    extra += [{"block_m": 128, "num_warps": 8}, {"block_m": 128, "num_warps": 4}]
                    grid = [(32, 4, 1, 1, e) for e in extra]
                else:
                    grid = [(32, 4, 3, seg, e) for e in extra for seg in (None, 8)]
            elif kind == "decode":
                grid = [(*c, e) for e in variants for c in itertools.product([32, 64, 128], [4, 8], [2, 3], [None, 16])]
            else:
                grid = [(*c, e) for e in variants for c in itertools.product([16, 32, 64], [4, 8], [1, 2], [1])]
            best = None
            for bn, nw, ns, seg, extra in grid:
                row = {"format": fmt_name, "kind": kind, "batch": batch, "context": ctx, "block_n": bn,
                       "num_warps": nw, "num_stages": ns, "segments": seg, **extra}  # fmt: skip
                try:
                    kw = {"num_segments": seg, "block_n": bn, "num_warps": nw, "num_stages": ns, **extra}
                    fn = functools.partial(call, **kw)
                    row["ms"] = round(triton.testing.do_bench(fn, warmup=5, rep=30), 4)
                except Exception as e:  # out of shared memory / registers for this config
                    row["error"] = str(e)[:200]
                rows.append(row)
                if "ms" in row and (best is None or row["ms"] < best["ms"]):
                    best = row
            print(f"{fmt_name} {kind} b={batch} ctx={ctx}: best {best}", flush=True)
            if args.ablate:
                for r in rows[-len(grid) :]:
                    print("   ", {k: v for k, v in r.items() if k not in ("format", "kind", "batch", "context")})
            del call, q, cache
            torch.cuda.empty_cache()
    if args.out:
        res = {
            "benchmark": "tune_cq",
            "device": torch.cuda.get_device_name(),
            "date": datetime.date.today().isoformat(),
            "torch": torch.__version__,
            "triton": triton.__version__,
            "rows": rows,
        }
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
