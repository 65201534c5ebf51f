"""vLLM `vllm.general_plugins` entry point.

vLLM calls `register()` in every process it starts (API server, engine core, workers). It must be
cheap, idempotent and safe when vLLM is missing. The vLLM integration (dtype registration, KV cache
spec, attention backend) is wired here; until it lands, `register` only records that it ran.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

_registered = False


def register() -> None:
    """Hook vllm-cq into vLLM (idempotent)."""
    global _registered
    if _registered:
        return
    _registered = True
    logger.debug("vllm-cq plugin loaded (no vLLM hooks installed yet)")


def is_registered() -> bool:
    return _registered
