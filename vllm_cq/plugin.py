"""vLLM `vllm.general_plugins` entry point.

vLLM calls `register()` in every process it starts (API server, engine core, workers), before it
parses arguments or validates configs. It is idempotent and imports vLLM only when called, so
importing this module is cheap and never fails (vLLM swallows import errors of plugins). If the
hooks cannot be installed (an untested vLLM release changed an internal), vLLM keeps working for
everyone else: the error is logged and the cq dtypes stay unknown ("invalid choice: 'cq1'").
"""

from __future__ import annotations

import logging

logger = logging.getLogger("vllm.vllm_cq")

_registered = False


def register() -> None:
    """Make the cq KV-cache dtypes known to vLLM in this process (idempotent)."""
    global _registered
    if _registered:
        return
    _registered = True
    from vllm_cq.child import dump_stacks_from_env

    dump_stacks_from_env()  # VLLM_CQ_STACK_DUMP_S: every vLLM process (engine core, workers) says where it waits
    try:
        from vllm_cq.integration import compat

        compat.install()
    except Exception:
        logger.exception("vllm-cq could not hook into this vLLM; cq KV-cache dtypes are unavailable")


def is_registered() -> bool:
    return _registered
