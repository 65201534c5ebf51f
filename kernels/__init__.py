"""Kernels of vllm-cq, installed as `vllm_cq.kernels`.

One folder per op family (`cq/`), each with `naive.py`, the plain-torch reference that is the ground
truth for every Triton kernel beside it. `rope.py` is shared rotary-embedding math; `window.py` the
exact recent window (bf16 paged cache of the last W tokens) the references attend beside the codes,
with its Triton counterpart `window_triton.py` beside it.
"""
