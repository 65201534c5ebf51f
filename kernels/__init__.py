"""Kernels of vllm-cq, installed as `vllm_cq.kernels`.

One folder per op family (`cq/`), each with `naive.py`, the plain-torch reference that is the ground
truth for every Triton kernel beside it. `rope.py` is shared rotary-embedding math.
"""
