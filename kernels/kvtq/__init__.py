"""KVTQ: fine-grained dynamic ternary KV quantization (reference, Triton kernels, dispatch)."""
