"""Errors the plugin raises for bad input: one clear message, raised before any memory is allocated."""


class CQConfigError(ValueError):
    """A bad or unsupported configuration: unknown dtype, head_dim, model, option."""


class CodebookError(CQConfigError):
    """A codebook file that is missing, not safetensors, malformed, or made for another model/format."""
