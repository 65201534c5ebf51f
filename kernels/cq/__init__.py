"""Coupled-quantization kernels. `naive` is the plain-torch reference (ground truth for tests)."""
