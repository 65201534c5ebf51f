"""Entry points the attention backend calls: write codes into the paged cache, attend over codes.

Dispatches by device. Today every device runs the plain-torch reference (`naive`), which is exact but
slow; the Triton kernels take the CUDA path as they land (issue 5), each tested against `naive`.
"""

from __future__ import annotations

from vllm_cq.kernels.cq import naive

write_kv_cache = naive.write_kv_cache
paged_attention = naive.paged_attention
