"""vllm-cq: coupled-quantization KV caches for vLLM.

Importing this package never imports vLLM; the vLLM hook is `vllm_cq.plugin.register`, called by
vLLM's `vllm.general_plugins` entry point.
"""

from vllm_cq.errors import CodebookError, CQConfigError
from vllm_cq.formats import CQSpec, KVFormat, format_names, get_format, register_format

__version__ = "0.1.0"

__all__ = [
    "CQConfigError",
    "CQSpec",
    "CodebookError",
    "KVFormat",
    "format_names",
    "get_format",
    "register_format",
]
