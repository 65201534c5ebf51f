"""One attention backend's kernel, called a few times on one shape, for Nsight Compute (`ncu`) to read.

    ncu --clock-control none --kernel-name regex:cq_prefill --launch-skip 2 --launch-count 1 \\
        --section SpeedOfLight --section WarpStateStats python3 benchmarks/profile_kernel.py \\
        --backend cq-wgmma:cq1 --kind prefill --context 8192 --q-len 8192

Inputs and calls are `attention_bench.py`'s (same shape, pages, codebooks, kernel choices), so the
counters describe what the benchmark times. The first calls compile and warm up; profile a later one.
"""

from __future__ import annotations

import argparse
import sys

import attention_bench as ab
import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", required=True, help="an attention_bench.py backend, e.g. cq-wgmma:cq1 or fa3:bf16")
    p.add_argument("--kind", choices=("decode", "prefill"), default="prefill")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--q-len", type=int, default=None, help="new tokens per sequence (default: 1 decode, all prefill)")
    p.add_argument("--calls", type=int, default=4)
    args = p.parse_args(argv)
    if args.backend not in ab.BACKENDS:
        raise SystemExit(f"unknown backend {args.backend!r}; known: {', '.join(ab.BACKENDS)}")
    if not torch.cuda.is_available():
        raise SystemExit("profile_kernel.py needs a CUDA GPU")
    backend, kv = ab.BACKENDS[args.backend]
    q_len = args.q_len or (1 if args.kind == "decode" else args.context)
    dev = torch.device("cuda")
    inp = ab.make_inputs(ab.Case(args.kind, args.batch, args.context, q_len), dev, torch.Generator().manual_seed(0))
    fn = ab.make_fn(backend, kv, inp)
    for _ in range(args.calls):
        fn()
    torch.cuda.synchronize()
    print(f"{args.backend} {args.kind} {args.batch}x{args.context} q_len {q_len}: {args.calls} calls", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
