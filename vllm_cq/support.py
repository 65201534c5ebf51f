"""What vllm-cq has verified, in one place: the model families whose keys it stores correctly.

Keys are stored pre-RoPE: the cache write un-rotates what the attention layer receives, and the codes
must come from the same tensor calibration saw (the `k_proj` output). That holds for these
architectures; others (q/k-norm before RoPE, MLA, M-RoPE) are refused until a test covers them.
"""

from __future__ import annotations

from vllm_cq.errors import CQConfigError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


def check_architecture(architecture: str) -> None:
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise CQConfigError(
            f"vllm-cq supports {', '.join(SUPPORTED_ARCHITECTURES)}; {architecture} is not verified "
            "(its keys may be normalised or rotated differently before attention)"
        )
