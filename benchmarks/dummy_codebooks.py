"""Random codebooks for a model config, for capacity and speed benchmarks with `load_format="dummy"`
(random weights have nothing to calibrate on). Never use these for quality: calibrate instead.

    python benchmarks/dummy_codebooks.py benchmarks/configs/llama-3.1-8b --formats cq4,cq2,cq1
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from vllm_cq.codebooks import CodebookSet, ModelIdentity, default_codebook_path, save_codebooks
from vllm_cq.formats import get_format


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("model_dir")
    p.add_argument("--formats", default="cq4,cq2,cq1")
    args = p.parse_args()
    with open(os.path.join(args.model_dir, "config.json")) as f:
        ident = ModelIdentity.from_hf_config(json.load(f), name=args.model_dir)
    g = torch.Generator().manual_seed(0)
    for name in args.formats.split(","):
        fmt = get_format(name)
        shape_k = fmt.key.codebook_shape(ident.num_kv_heads, ident.head_dim)
        shape_v = fmt.value.codebook_shape(ident.num_kv_heads, ident.head_dim)
        keys = [torch.randn(shape_k, generator=g) for _ in range(ident.num_layers)]
        values = [torch.randn(shape_v, generator=g) for _ in range(ident.num_layers)]
        cbs = CodebookSet(fmt, ident, keys, values, calibration={"dummy": True})
        path = default_codebook_path(args.model_dir, name)
        save_codebooks(path, cbs)
        print(path)


if __name__ == "__main__":
    main()
